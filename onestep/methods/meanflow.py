"""MeanFlow (Geng et al. 2025), written once for both backends.

The network predicts the *average velocity* of the PF-ODE over ``[r, t]``,

    u_θ(z, r, t) ≈ (z − Φ_{t→r}(z))/(t − r),    z_r = z − (t − r)·u_θ(z, r, t)  (``flowmap.jump``),

so one step from noise is ``x0 = x1 − u_θ(x1, 0, 1)`` and any grid of jumps samples in more steps.
Differentiating ``(t − r)·u(z_t, r, t) = ∫_r^t v(z_τ, τ) dτ`` in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) − (t − r)·du/dt,    du/dt = ∂_z u·v + ∂_t u,

and the loss regresses ``u_θ`` onto ``sg(ṽ − (t − r)·du_θ/dt)``: du_θ/dt is ONE ``bk.jvp`` with
tangent ``(ṽ, 0, 1)`` on ``(z, r, t)``, whose primal output is the prediction.  ``ṽ`` is the
conditional velocity ``x1 − x0`` (the target is affine in it, so its conditional mean is the
target built from the marginal field, as in flow matching), or with labels its guided form
(below).  Each row's squared error is summed over dimensions and weighted adaptively by
``1/sg((‖Δ‖² + ε)^p)``.

Times: t and r are two logit-normal draws, sorted (t the larger); the first
``⌊n·border_fraction⌋`` rows of a batch get ``r = t``, where the target is ṽ and the row is a
flow-matching row.  Guidance trained in (class labels): on labelled rows with ``t`` in the
guidance interval that keep their label,

    ṽ = ω·v + (1 − ω − κ)·u_θ(z, t, t | ∅) + κ·u_θ(z, t, t | c),

with the online network under stop-gradient; rows whose label is dropped keep ṽ = v.  At its
fixed point the conditional field is ``v_∅ + (ω/(1 − κ))·(v_c − v_∅)``: guided at scale
``ω/(1 − κ)``, and sampled with one network call per jump and no guidance at inference.

Mapping from the official code (JAX ``Gsunshine/meanflow``, PyTorch ``Gsunshine/py-meanflow``),
which shares our orientation (data at t = 0, ``v = e − x``, jump ``z − (t − r)·u``): the net's
``(t, h = t − r)`` is our ``embedding = "t_gap"``; ``P_mean, P_std`` are ``time_mean, time_std``;
the JAX ``data_proportion`` (fraction of rows with r = t, 0.75) is our ``border_fraction``, while
the PyTorch ``--ratio`` is the fraction with r ≠ t (0.75, so 25% have r = t): the two keys mean
opposite things; ``norm_p, norm_eps`` are ``norm_p, norm_eps``; ``omega, kappa``, ``t_start, t_end``
and ``class_dropout_prob`` are ``omega, kappa``, ``guidance_interval`` and ``label_dropout``.

Departures: the network sees the two times through the book's sinusoidal embedding with the
times unscaled (as the official DiT; ``network_times`` divides by the embedding's ×1000) and
concatenated, not through two separate embedding MLPs that are summed; label dropout is a
Bernoulli mask per row (the JAX code drops the first rows, which are also its r = t rows, so its
unconditional field is trained almost only at r = t); the guided velocity has no clip of
``t − r`` (a no-op for 0 ≤ r ≤ t ≤ 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backends.embedding import EMBEDDING_TIME_SCALE
from ..paths import LINEAR, expand
from ..times import sample_times
from .flowmap import check_steps, condition_labels, label_dropout, per_row, sample_jumps, uniform_times

VARIANTS = ("meanflow",)
EMBEDDINGS = ("t_gap", "r_t")  # (t, t − r) as the official DiT, or the two ends (r, t)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of the MeanFlow objective; defaults are the official ImageNet (JAX) config.
    Deviations per scale live in ``presets``."""

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

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale the conditional field is trained towards, ``ω/(1 − κ)``."""
        return self.omega / (1 - self.kappa)


def needs_teacher(cfg: Config) -> bool:
    return False


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: two times, (t, t − r) or (r, t) (``embedding``)."""
    return 2


# -- the network as an average velocity ------------------------------------------------------
def network_times(xp, cfg: Config, r, t):
    """The ``(n, 2)`` times the network sees: ``(t, t − r)`` or ``(r, t)``, unscaled (the
    embedding's ×1000 undone, as the official DiT feeds t ∈ [0, 1] to its sinusoids)."""
    pair = (t, t - r) if cfg.embedding == "t_gap" else (r, t)
    return xp.stack(pair, axis=1) / EMBEDDING_TIME_SCALE


def average_velocity(bk, model, cfg: Config, z, r, t, y=None):
    """``u_θ(z, r, t)``; ``r``, ``t`` 0-d arrays or one per row of ``z``."""
    return model(z, network_times(bk.xp, cfg, per_row(bk, r, z), per_row(bk, t, z)), y)


# -- training --------------------------------------------------------------------------------
def border_rows(cfg: Config, n: int) -> int:
    """How many rows of a batch of ``n`` get ``r = t`` (the first ones): ``⌊n·border_fraction⌋``."""
    return math.floor(n * cfg.border_fraction + 1e-9)


def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation: noise ``x1``, times ``r ≤ t`` (n,) with ``r = t`` on
    the first ``border_rows`` rows, and the label-dropout mask."""
    xp, x0 = bk.xp, batch["x"]
    n = x0.shape[0]
    k_a, k_b, k_x, k_y = bk.split(key, 4)
    a = sample_times(bk, k_a, n, "logit_normal", cfg.time_mean, cfg.time_std)
    b = sample_times(bk, k_b, n, "logit_normal", cfg.time_mean, cfg.time_std)
    t, r = xp.maximum(a, b), xp.minimum(a, b)
    m = border_rows(cfg, n)
    draws = {"t": t, "r": xp.concatenate([t[:m], r[m:]]), "x1": bk.normal(k_x, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def guided_velocity(bk, cfg: Config, model, z, t, v, y=None, drop=None):
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


def adaptive_weight(bk, cfg: Config, sq):
    """``1/sg((sq + ε)^p)`` per row (``sq`` the row's squared error summed over dimensions)."""
    return 1 / bk.stop_gradient((sq + cfg.norm_eps) ** cfg.norm_p)


def prediction_and_target(bk, cfg: Config, model, batch: dict, draws: dict):
    """``(u, u_tgt)``: the prediction ``u_θ(z_t, r, t)`` (with its gradient) and the target
    ``sg(ṽ − (t − r)·du_θ/dt)``, both from one JVP with tangent ``(ṽ, 0, 1)`` on ``(z, r, t)``."""
    xp = bk.xp
    x0, x1, t, r = batch["x"], draws["x1"], draws["t"], draws["r"]
    y = batch.get("y")
    z = LINEAR.sample(xp, x0, x1, t)
    v = guided_velocity(bk, cfg, model, z, t, LINEAR.velocity(xp, x0, x1, t), y, draws.get("drop"))
    y_in = condition_labels(bk, model, y, draws.get("drop"))
    u, du_dt = bk.jvp(lambda z_, r_, t_: average_velocity(bk, model, cfg, z_, r_, t_, y_in), (z, r, t),
                      (v, xp.zeros_like(r), xp.ones_like(t)))
    return u, bk.stop_gradient(v - expand(t - r, z) * du_dt)


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Mean over rows of ``w·‖u_θ − u_tgt‖²`` (summed over dimensions), ``w`` the adaptive weight.
    ``aux``: the unweighted squared error on the rows with r = t (``border_sq``) and r < t (``jump_sq``)."""
    xp = bk.xp
    u, u_tgt = prediction_and_target(bk, cfg, model, batch, draws)
    n = u.shape[0]
    sq = xp.sum(((u - u_tgt) ** 2).reshape((n, -1)), axis=1)
    loss = xp.mean(adaptive_weight(bk, cfg, sq) * sq)
    m = border_rows(cfg, n)
    zero = loss * 0
    return loss, {"sq": xp.mean(sq), "border_sq": xp.mean(sq[:m]) if m else zero,
                  "jump_sq": xp.mean(sq[m:]) if m < n else zero}


# -- sampling --------------------------------------------------------------------------------
def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, times=None, trajectory: bool = False):
    """Jumps ``z ↦ z − (t − r)·u_θ(z, r, t)`` along ``times`` (``steps + 1`` descending times in
    [0, 1]; default ``1, 1 − 1/steps, …, 0``), with no guidance at inference; one step is
    ``x1 − u_θ(x1, 0, 1)``.  Deterministic, so ``key`` is unused.  With ``trajectory=True`` a numpy
    array ``(steps + 1, n, ...)`` of every point visited."""
    steps = check_steps(steps)
    if times is None:
        times = uniform_times(steps)
    elif len(times) != steps + 1:
        raise ValueError(f"a {steps}-step sampler takes {steps + 1} times, got {len(times)}: {list(times)}")
    return sample_jumps(bk, average_velocity, model, cfg, x1, np.asarray(times, dtype=float), y, trajectory)
