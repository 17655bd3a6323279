"""Shortcut models (Frans et al. 2025), written once for both backends.

A shortcut network ``s_θ(z, t, d)`` predicts the average velocity over one step of size ``d``
from time ``t`` towards the data: the jump is ``z ↦ z − d·s_θ(z, t, d)``, landing at ``t − d``
(in the two-time notation of the book, ``s_θ(z, t, d) = u(z, t − d, t)``).  Step sizes are
powers of two, ``d = 2^−k`` with ``k = 0 … L`` and ``2^L = max_steps``; the network sees
``(t, k/L)``, the step size embedded as log2 of the number of steps, scaled into [0, 1].

Training splits every batch.  The first ``batch/bootstrap_every`` rows get *bootstrap* targets at
a level ``k < L``: two half steps of size ``d/2`` with the EMA network (``ema_target``; else the
online network), averaged under stop-gradient,
``sg[(s(z, t, d/2) + s(z', t − d/2, d/2))/2]`` with ``z' = z − (d/2)·s(z, t, d/2)``.  The other rows
get the flow-matching target ``x1 − x0`` at the smallest level ``k = L``.  Plain squared error,
no JVP.  Every row's time lies on the grid of its step, ``t ∈ {d, 2d, …, 1}``, so a sampler with
``K = 2^k`` steps from t = 1 visits only trained points.

Mapping from the official code (noise at τ = 0, data at τ = 1, steps from τ to τ + d):
``t = 1 − τ`` and ``s_ours = −s_code`` (the same path run backwards); its ``dt_base = k``;
its bootstrap times ``τ ∈ {0, d, …, 1 − d}`` are ours ``t ∈ {d, …, 1}``; its flow-matching rows
sit at ``dt_base = log2(denoise_timesteps) = L`` on the grid ``τ ∈ {0, 1/2^L, …}``.  Like the code
we clip the half-step point and the averaged target to ``[−clip, clip]``; unlike it we drop
labels on every row (the code keeps the labels of bootstrap rows), so the unconditional model
learns all step sizes too, and we drop its ``σ_min = 1e−5`` on the path.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..paths import LINEAR, expand
from .flowmap import condition_labels, label_dropout, sample_jumps, uniform_times

VARIANTS = ("shortcut",)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of the shortcut objective (deviations per scale live in ``presets``)."""

    max_steps: int = 128  # the finest sampler: d = 1/max_steps carries the flow-matching rows
    bootstrap_every: int = 8  # 1/8 of each batch bootstraps (the official code; the paper says 1/4)
    clip: float | None = 4.0  # bound on the half-step point and the bootstrap target (None: no clip)
    ema_target: bool = True  # bootstrap with the target (EMA) network (the code's bootstrap_ema = 1)
    label_dropout: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.max_steps, int) and self.max_steps >= 2
                and self.max_steps & (self.max_steps - 1) == 0):
            raise ValueError(f"max_steps must be a power of two ≥ 2, got {self.max_steps!r}")
        if not (isinstance(self.bootstrap_every, int) and self.bootstrap_every >= 1):
            raise ValueError(f"bootstrap_every must be a positive integer, got {self.bootstrap_every!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be positive or None, got {self.clip!r}")

    @property
    def levels(self) -> int:
        """``L = log2(max_steps)``: step sizes run from ``2^0`` down to ``2^−L``."""
        return int(math.log2(self.max_steps))


def needs_teacher(cfg: Config) -> bool:
    return False


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: the time t and the step size."""
    return 2


def level_of_steps(cfg: Config, steps: int) -> int:
    """``k = log2(steps)`` for a sampler with ``steps`` equal jumps; ValueError unless steps is a
    power of two ≤ ``max_steps``."""
    accepted = [2**k for k in range(cfg.levels + 1)]
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps not in accepted:
        raise ValueError(f"a shortcut model samples with a power-of-two number of steps up to "
                         f"{cfg.max_steps}; got {steps!r}; accepted: {', '.join(map(str, accepted))}")
    return accepted.index(steps)


def shortcut(bk, model, cfg: Config, z, t, level, y=None):
    """``s_θ(z, t, d = 2^−level)``: the average velocity of the step from ``t`` to ``t − d``.
    ``t`` and ``level`` are scalars or one per row."""
    xp, n = bk.xp, z.shape[0]
    t = xp.broadcast_to(xp.asarray(t, dtype=z.dtype), (n,))
    k = xp.broadcast_to(xp.asarray(level, dtype=z.dtype), (n,))
    return model(z, xp.stack([t, k / cfg.levels], axis=1), y)


def average_velocity(bk, model, cfg: Config, z, r, t, y=None):
    """The two-time form ``u(z, r, t) = s_θ(z, t, d = t − r)``, for ``t − r`` a power of two."""
    return shortcut(bk, model, cfg, z, t, bk.xp.round(-bk.xp.log2(t - r)), y)


def _clip(bk, cfg: Config, x):
    return x if cfg.clip is None else bk.xp.clip(x, -cfg.clip, cfg.clip)


def bootstrap_target(bk, net, cfg: Config, z, t, level, y=None):
    """The self-consistency target of a step of size ``d = 2^−level``: the mean of two half steps
    of size ``d/2`` taken with ``net`` (no stop-gradient here; the loss applies it)."""
    half = 2.0 ** -(level + 1)
    s1 = shortcut(bk, net, cfg, z, t, level + 1, y)
    z_mid = _clip(bk, cfg, z - expand(half, z) * s1)
    s2 = shortcut(bk, net, cfg, z_mid, t - half, level + 1, y)
    return _clip(bk, cfg, 0.5 * (s1 + s2))


def draw_levels(cfg: Config, n: int) -> np.ndarray:
    """The level of every row: the first ``n // bootstrap_every`` rows cycle through the bootstrap
    levels ``0 … L − 1`` (equal shares, as in the code), the rest sit at the flow-matching level L."""
    n_boot = n // cfg.bootstrap_every
    levels = np.full(n, cfg.levels)
    levels[:n_boot] = np.arange(n_boot) % cfg.levels
    return levels


def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation: noise, times on each row's grid, label-dropout mask.
    ``level`` is fixed by the row's position (``draw_levels``); ``t = (j + 1)·2^−k``, j uniform."""
    x0 = batch["x"]
    n = x0.shape[0]
    k_t, k_x, k_y = bk.split(key, 3)
    levels = draw_levels(cfg, n)
    level = bk.from_numpy(levels.astype(np.float64))
    cells = 2.0**level
    # ``bootstrap`` (numpy, static) marks the bootstrap rows, a prefix of the batch and of any
    # data-parallel worker's rows, so the loss finds their number without reading a device array
    draws = {"level": level, "bootstrap": levels < cfg.levels,
             "t": (bk.xp.floor(bk.uniform(k_t, (n,)) * cells) + 1) / cells,
             "x1": bk.normal(k_x, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def bootstrap_rows(draws: dict) -> int:
    """How many rows (a prefix) get bootstrap targets."""
    return int(np.count_nonzero(draws["bootstrap"]))


def targets(bk, cfg: Config, net, batch: dict, draws: dict):
    """``(z_t, y, target)``: bootstrap targets from ``net`` (under stop-gradient) on the rows
    ``draws["bootstrap"]`` marks (the first ``n // bootstrap_every``), ``x1 − x0`` on the rest."""
    x0, x1, t, level = batch["x"], draws["x1"], draws["t"], draws["level"]
    y = condition_labels(bk, net, batch.get("y"), draws.get("drop"))
    z = LINEAR.sample(bk.xp, x0, x1, t)
    target = LINEAR.velocity(bk.xp, x0, x1, t)
    n_boot = bootstrap_rows(draws)
    if n_boot:
        boot = bootstrap_target(bk, net, cfg, z[:n_boot], t[:n_boot], level[:n_boot],
                                None if y is None else y[:n_boot])
        target = bk.xp.concatenate([bk.stop_gradient(boot), target[n_boot:]], axis=0)
    return z, y, target


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Mean squared error of ``s_θ(z_t, t, d)`` to the targets (mean over rows and dimensions)."""
    z, y, goal = targets(bk, cfg, target if cfg.ema_target else model, batch, draws)
    err = shortcut(bk, model, cfg, z, draws["t"], draws["level"], y) - goal
    n_boot = bootstrap_rows(draws)
    sq = bk.xp.mean((err**2).reshape((z.shape[0], -1)), axis=1)
    loss = bk.xp.mean(sq)
    return loss, {"fm_mse": bk.xp.mean(sq[n_boot:]),
                  "bootstrap_mse": bk.xp.mean(sq[:n_boot]) if n_boot else loss * 0}


def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, trajectory: bool = False):
    """``steps`` equal jumps from t = 1 to 0, each ``z ↦ z − d·s_θ(z, t, d)`` with ``d = 1/steps``;
    ``steps`` is a power of two ≤ ``max_steps``.  Deterministic, so ``key`` is unused.  With
    ``trajectory=True`` a numpy array ``(steps + 1, n, ...)`` of every point visited."""
    level_of_steps(cfg, steps)
    return sample_jumps(bk, average_velocity, model, cfg, x1, uniform_times(steps), y, trajectory)
