"""What MeanFlow and α-Flow share: a network of two times ``u_θ(z, r, t)`` (an average velocity over
``[r, t]``) and the pieces of its training.

* ``TwoTimeConfig``: the settings both objectives read (time law, border rows, adaptive weight,
  time embedding, guidance trained in, interpolation path), validated once;
* ``average_velocity``: the network called as ``u_θ(z, r, t)``, times as the official DiT sees them;
* ``draw``: two sorted logit-normal times with ``r = t`` on the first rows, noise, label dropout;
* ``inputs``: the point ``z_t`` on the path, the (guided) conditional velocity ṽ and the labels;
* ``jvp_target``: the prediction and MeanFlow's target ``sg(ṽ − (t − r)·du_θ/dt)`` from one JVP;
* ``adaptive_weight`` and ``row_squared_error``: the per-row loss of both codes;
* ``sample``: jumps ``z ↦ z − (t − r)·u_θ(z, r, t)`` along a grid.

Not a method: ``meanflow`` and ``alphaflow`` import it, and never each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backends.embedding import EMBEDDING_TIME_SCALE
from ..paths import PATHS, expand, get_path
from ..times import sample_times
from .flowmap import check_steps, condition_labels, label_dropout, per_row, sample_jumps, uniform_times

EMBEDDINGS = ("t_gap", "r_t")  # (t, t − r) as the official DiT, or the two ends (r, t)


@dataclass(frozen=True)
class TwoTimeConfig:
    """Settings of a two-time objective; defaults are the official MeanFlow ImageNet (JAX) config."""

    time_mean: float = -0.4  # t, r = sort(sigmoid(N(time_mean, time_std²)), twice)
    time_std: float = 1.0
    border_fraction: float = 0.75  # fraction of rows with r = t (ImageNet code; the CIFAR code: 0.25)
    norm_p: float = 1.0  # adaptive weight 1/sg((‖Δ‖² + ε)^p), ‖Δ‖² summed over dimensions (CIFAR: 0.75)
    norm_eps: float = 0.01  # (CIFAR: 1e-3)
    embedding: str = "t_gap"
    omega: float = 1.0  # guidance trained in (labelled data only): ṽ = ω·v + (1 − ω − κ)·u_∅ + κ·u_c
    kappa: float = 0.5
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # rows with t in it are guided
    label_dropout: float = 0.1
    path: str = "linear"  # the interpolation z_t = a(t)·x0 + b(t)·x1 (``onestep.paths``)

    def __post_init__(self):
        if not self.time_std > 0:
            raise ValueError(f"time_std must be positive, got {self.time_std!r}")
        if not 0 <= self.border_fraction <= 1:
            raise ValueError(f"border_fraction (the fraction of rows with r = t) must be in [0, 1], "
                             f"got {self.border_fraction!r}")
        if not self.norm_p >= 0:
            raise ValueError(f"norm_p (the adaptive weight's power; 0: no weighting) must be ≥ 0, got {self.norm_p!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; accepted: {', '.join(EMBEDDINGS)}")
        if not self.omega > 0:
            raise ValueError(f"omega (the weight of the data velocity in the guided target) must be positive, "
                             f"got {self.omega!r}")
        if not 0 <= self.kappa < 1:
            raise ValueError(f"kappa must be in [0, 1) (the guidance scale is omega/(1 − kappa)), got {self.kappa!r}")
        lo, hi = self.guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 ≤ lo ≤ hi ≤ 1, got {self.guidance_interval!r}")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout!r}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; accepted: {', '.join(PATHS)}")

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale the conditional field is trained towards, ``ω/(1 − κ)``."""
        return self.omega / (1 - self.kappa)


# -- the network as an average velocity ------------------------------------------------------
def network_times(xp, cfg: TwoTimeConfig, r, t):
    """The ``(n, 2)`` times the network sees: ``(t, t − r)`` or ``(r, t)``, unscaled (the
    embedding's ×1000 undone, as the official DiT feeds t ∈ [0, 1] to its sinusoids)."""
    pair = (t, t - r) if cfg.embedding == "t_gap" else (r, t)
    return xp.stack(pair, axis=1) / EMBEDDING_TIME_SCALE


def average_velocity(bk, model, cfg: TwoTimeConfig, z, r, t, y=None):
    """``u_θ(z, r, t)``; ``r``, ``t`` 0-d arrays or one per row of ``z``."""
    return model(z, network_times(bk.xp, cfg, per_row(bk, r, z), per_row(bk, t, z)), y)


# -- the draws -------------------------------------------------------------------------------
def border_rows(cfg: TwoTimeConfig, n: int) -> int:
    """How many rows of a batch of ``n`` get ``r = t`` (the first ones): ``⌊n·border_fraction⌋``."""
    return math.floor(n * cfg.border_fraction + 1e-9)


def draw(bk, cfg: TwoTimeConfig, key, batch: dict) -> dict:
    """Noise ``x1``, times ``r ≤ t`` (n,) with ``r = t`` on the first ``border_rows`` rows, and the
    label-dropout mask."""
    xp, x0 = bk.xp, batch["x"]
    n = x0.shape[0]
    k_a, k_b, k_x, k_y = bk.split(key, 4)
    a = sample_times(bk, k_a, n, "logit_normal", cfg.time_mean, cfg.time_std)
    b = sample_times(bk, k_b, n, "logit_normal", cfg.time_mean, cfg.time_std)
    t, r = xp.maximum(a, b), xp.minimum(a, b)
    m = border_rows(cfg, n)
    draws = {"t": t, "r": xp.concatenate([t[:m], r[m:]]), "x1": bk.normal(k_x, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


# -- the target ------------------------------------------------------------------------------
def guided_velocity(bk, cfg: TwoTimeConfig, model, z, t, v, y=None, drop=None):
    """The velocity the target is built from: ``ω·v + (1 − ω − κ)·u_θ(z, t, t | ∅) + κ·u_θ(z, t, t | c)``
    under stop-gradient on labelled rows with t in the guidance interval that keep their label,
    ``v`` elsewhere (and everywhere for unlabelled data or ``ω = 1, κ = 0``)."""
    xp = bk.xp
    if y is None or (cfg.omega == 1 and cfg.kappa == 0):
        return v
    n = z.shape[0]
    both = average_velocity(bk, model, cfg, xp.concatenate([z, z]), xp.concatenate([t, t]),
                            xp.concatenate([t, t]), xp.concatenate([xp.full_like(y, model.cfg.n_classes), y]))
    u_null, u_cond = both[:n], both[n:]
    guided = cfg.omega * v + (1 - cfg.omega - cfg.kappa) * u_null + cfg.kappa * u_cond
    lo, hi = cfg.guidance_interval
    active = (t >= lo) & (t <= hi)
    if drop is not None:
        active = active & ~drop
    return xp.where(expand(active, v), bk.stop_gradient(guided), v)


def inputs(bk, cfg: TwoTimeConfig, model, batch: dict, draws: dict):
    """``(z_t, ṽ, y)``: the point on the path, the velocity of the target (the conditional velocity
    ``dz_t/dt``, guided on labelled rows) and the labels the network sees (dropped ones: "no label")."""
    xp, path = bk.xp, get_path(cfg.path)
    x0, x1, t, y = batch["x"], draws["x1"], draws["t"], batch.get("y")
    z = path.sample(xp, x0, x1, t)
    v = guided_velocity(bk, cfg, model, z, t, path.velocity(xp, x0, x1, t), y, draws.get("drop"))
    return z, v, condition_labels(bk, model, y, draws.get("drop"))


def jvp_target(bk, cfg: TwoTimeConfig, model, z, r, t, v, y=None):
    """``(u, u_tgt)``: the prediction ``u_θ(z, r, t)`` (with its gradient) and MeanFlow's target
    ``sg(v − (t − r)·du_θ/dt)``, both from one JVP with tangent ``(v, 0, 1)`` on ``(z, r, t)``."""
    xp = bk.xp
    u, du_dt = bk.jvp(lambda z_, r_, t_: average_velocity(bk, model, cfg, z_, r_, t_, y), (z, r, t),
                      (v, xp.zeros_like(r), xp.ones_like(t)))
    return u, bk.stop_gradient(v - expand(t - r, z) * du_dt)


# -- the loss --------------------------------------------------------------------------------
def row_squared_error(bk, u, target):
    """``‖u − target‖²`` per row, summed over dimensions: ``(n,)``."""
    return bk.xp.sum(((u - target) ** 2).reshape((u.shape[0], -1)), axis=1)


def adaptive_weight(bk, cfg: TwoTimeConfig, sq):
    """``1/sg((sq + ε)^p)`` per row (``sq`` the row's squared error summed over dimensions)."""
    return 1 / bk.stop_gradient((sq + cfg.norm_eps) ** cfg.norm_p)


def row_groups(bk, cfg: TwoTimeConfig, sq, loss) -> dict:
    """The unweighted squared error on all rows, the rows with r = t (``border_sq``) and r < t (``jump_sq``)."""
    xp, n = bk.xp, sq.shape[0]
    m, zero = border_rows(cfg, n), loss * 0
    return {"sq": xp.mean(sq), "border_sq": xp.mean(sq[:m]) if m else zero,
            "jump_sq": xp.mean(sq[m:]) if m < n else zero}


# -- sampling --------------------------------------------------------------------------------
def sample(bk, cfg: TwoTimeConfig, model, x1, steps: int, y=None, times=None, trajectory: bool = False):
    """Jumps ``z ↦ z − (t − r)·u_θ(z, r, t)`` along ``times`` (``steps + 1`` descending times in
    [0, 1]; default ``1, 1 − 1/steps, …, 0``), with no guidance at inference.  With
    ``trajectory=True`` a numpy array ``(steps + 1, n, ...)`` of every point visited."""
    steps = check_steps(steps)
    if times is None:
        times = uniform_times(steps)
    elif len(times) != steps + 1:
        raise ValueError(f"a {steps}-step sampler takes {steps + 1} times, got {len(times)}: {list(times)}")
    return sample_jumps(bk, average_velocity, model, cfg, x1, np.asarray(times, dtype=float), y, trajectory)
