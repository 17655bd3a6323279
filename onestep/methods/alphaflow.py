"""α-Flow (Zhang et al. 2025), written once for both backends on MeanFlow's machinery (``twotime``).

The network is MeanFlow's average velocity ``u_θ(z, r, t)``.  On a row with ``r < t`` the target
takes one step of length ``α(t − r)`` along the (guided) conditional velocity ṽ and asks the
network for the rest of the interval:

    s = α·r + (1 − α)·t,    z_s = z_t − α(t − r)·ṽ,    u_tgt = sg(α·ṽ + (1 − α)·u_θ(z_s, r, s)),

the average of a velocity over ``[s, t]`` (weight α) and over ``[r, s]`` (weight 1 − α).  At α = 1
the target is ṽ: *trajectory flow matching*, ``u_θ(z_t, r, t)`` regressed onto the data velocity
for every r.  As α → 0 the target tends to ``u_θ + α·(ṽ − (t − r)·du_θ/dt − u_θ) + O(α²)``, so the
residual is α times MeanFlow's; below ``alpha_snap`` (0.005, the official ``clamp_value``) the
schedule snaps α to 0 and the rows take MeanFlow's JVP target ``sg(ṽ − (t − r)·du_θ/dt)``
(``twotime.jvp_target``), and above ``1 − alpha_snap`` to 1.  Rows with ``r = t`` (the first
``border_fraction`` of a batch) are flow-matching rows with target ṽ.

Row weights: each row's squared error ``‖Δ‖²`` (summed over dimensions) is weighted by MeanFlow's
adaptive ``1/sg((‖Δ‖² + ε)^p)`` and, on rows with ``r < t`` and ``0 < α``, by ``α^(2p − 1)``.  Since
``Δ ≈ α·R_MF``, this makes the gradient tend to MeanFlow's as α → 0 for every p (while
``α²‖R_MF‖² ≫ ε``): at ``p = 1`` it is the official code's ``α``, at ``p = 0`` the paper's ``1/α``.

Curriculum: α runs from ``alpha_start`` to ``alpha_end`` along the official sigmoid
``α(k) = α_start + (α_end − α_start)·σ(γ·(k − k_mid)/(k_e − k_s))`` between ``k_s, k_e`` (the
fractions ``ramp`` of the run), constant outside, then snapped; ``alpha_start = alpha_end`` is a
fixed α (0: MeanFlow, 1: trajectory flow matching).  The table of α per step is built once
(``bk.cached``) and read in ``draw``.

Mapping from the official code (``snap-research/alphaflow``, ``src/training/loss.py``,
``AlphaFlowLoss``), which shares our orientation (data at t = 0, ``v = ε − x``): ``sigma`` and
``sigma_next`` are our t and r; ``dt = α·(t − r)``; ``ratio_fm`` is ``border_fraction``; the
scheduler's ``init/end value``, ``k_s, k_e``, ``gamma`` and ``clamp_value`` are ``alpha_start,
alpha_end``, ``ramp`` (as fractions of the run), ``sigmoid_steepness`` and ``alpha_snap``;
``weight_d = α`` is our row weight at p = 1, ``adaptive_loss_weight_eps`` is ``norm_eps``;
``omega, kappa, t_min, t_max`` are ``omega, kappa, guidance_interval``.  ``loss_tfm`` and
``loss_tcc`` are ``trajectory_terms``.

Departures: the squared error is summed over dimensions and ε applies to the sum (the code takes
the mean over dimensions with ε = 1e-3 there: the same weight up to a constant factor with our ε
equal to D·1e-3); the adaptive power p is a setting (the code fixes p = 1), with the row weight
α^(2p − 1) that keeps the α → 0 limit (the code's α at p = 1); the prediction is the JVP's primal
(the code runs a separate forward pass; the values are equal); the JVP and the α-step target are
both evaluated on every step and the row takes one of them (the code evaluates only the one in
use); no clip of the α-step target (the code's ``clamp_utgt = 4`` in its XL-2 setting); label
dropout is a Bernoulli mask per row whose rows keep ṽ = v (the code zeroes labels inside the
guidance interval only and still guides them); the two times enter through the book's
sinusoidal embedding, as in MeanFlow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..paths import expand
from . import twotime

VARIANTS = ("alphaflow",)


@dataclass(frozen=True)
class Config(twotime.TwoTimeConfig):
    """Hyper-parameters of the α-Flow objective; defaults are the official DiT-B/2 sigmoid run
    (``alphaflow-sigmoid-latentspace-B-2``) with the guidance of its ``-cfg-training`` run.  The shared
    settings are ``twotime.TwoTimeConfig``'s."""

    border_fraction: float = 0.5  # ratio_fm (B-2 and XL-2; B-2 with guidance trained in: 0.25)
    norm_eps: float = 1e-3  # adaptive_loss_weight_eps (applied by the code to the per-dimension mean)
    alpha_start: float = 1.0  # α at the start of the run (1: trajectory flow matching)
    alpha_end: float = 0.0  # α at the end (0: MeanFlow)
    sigmoid_steepness: float = 25.0  # γ of the sigmoid
    ramp: tuple[float, float] = (0.0, 1.0)  # (k_s, k_e) as fractions of the run (B-2: 0 to 400k of 400k)
    alpha_snap: float = 0.005  # α below it is 0 (the JVP target), above 1 − it is 1 (clamp_value)

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha_start", "alpha_end"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1] (α = 1: trajectory flow matching, α = 0: MeanFlow), "
                                 f"got {value!r}")
        if self.alpha_start < self.alpha_end:
            raise ValueError(f"the α schedule runs from alpha_start down to alpha_end (flow matching first); got "
                             f"alpha_start = {self.alpha_start!r} below alpha_end = {self.alpha_end!r}")
        if not self.sigmoid_steepness > 0:
            raise ValueError(f"sigmoid_steepness must be positive, got {self.sigmoid_steepness!r}")
        lo, hi = self.ramp
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"ramp must be (start, end) fractions of the run with 0 ≤ start ≤ end ≤ 1, "
                             f"got {self.ramp!r}")
        if not 0 <= self.alpha_snap < 0.5:
            raise ValueError(f"alpha_snap must be in [0, 0.5), got {self.alpha_snap!r}")


def needs_teacher(cfg: Config) -> bool:
    return False


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: two times, (t, t − r) or (r, t) (``embedding``)."""
    return 2


average_velocity = twotime.average_velocity  # u_θ(z, r, t): the network as a flow map's average velocity


# -- the curriculum --------------------------------------------------------------------------
def alpha_schedule(cfg: Config, total_steps: int) -> np.ndarray:
    """α at each of the run's ``total_steps`` steps: the sigmoid from ``alpha_start`` to ``alpha_end``
    over the ``ramp`` of the run, then snapped to 0 below ``alpha_snap`` and to 1 above ``1 − alpha_snap``."""
    k = np.arange(total_steps, dtype=float)
    k_s, k_e = cfg.ramp[0] * total_steps, cfg.ramp[1] * total_steps
    if k_e > k_s:
        progress = np.clip((k - (k_s + k_e) / 2) / (k_e - k_s), -0.5, 0.5)
        alpha = cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) / (1 + np.exp(-cfg.sigmoid_steepness * progress))
        alpha = np.where(k < k_s, cfg.alpha_start, np.where(k > k_e, cfg.alpha_end, alpha))
    else:  # a step from start to end at k_s
        alpha = np.where(k < k_s, cfg.alpha_start, cfg.alpha_end)
    return np.where(alpha < cfg.alpha_snap, 0.0, np.where(alpha > 1 - cfg.alpha_snap, 1.0, alpha))


def alpha_table(bk, cfg: Config, total_steps: int):
    """``alpha_schedule`` as a device table, built once per backend."""
    return bk.from_numpy(alpha_schedule(cfg, total_steps))


# -- training --------------------------------------------------------------------------------
def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """MeanFlow's draws (``twotime.draw``: noise, times with ``r = t`` on the first rows, label
    dropout) and the step's α (a 0-d array)."""
    table = bk.cached(alpha_table, bk, cfg, total_steps)
    return {**twotime.draw(bk, cfg, key, batch), "alpha": table[bk.xp.clip(bk.xp.asarray(step), 0, total_steps - 1)]}


def prediction_and_target(bk, cfg: Config, model, batch: dict, draws: dict):
    """``(u, u_tgt, w)``: the prediction ``u_θ(z_t, r, t)`` (with its gradient), the target and the row
    weight.  Rows with ``r = t``: ṽ, weight 1; rows with ``r < t``: the α-step target
    ``sg(α·ṽ + (1 − α)·u_θ(z_s, r, s))``, weight ``α^(2p − 1)``, or at α = 0 MeanFlow's JVP target, weight 1."""
    xp = bk.xp
    t, r, alpha = draws["t"], draws["r"], draws["alpha"]
    z, v, y = twotime.inputs(bk, cfg, model, batch, draws)
    u, jvp_tgt = twotime.jvp_target(bk, cfg, model, z, r, t, v, y)  # at r = t the JVP target is ṽ
    s = alpha * r + (1 - alpha) * t
    z_s = z - expand(alpha * (t - r), z) * v
    step_tgt = bk.stop_gradient(alpha * v + (1 - alpha) * average_velocity(bk, model, cfg, z_s, r, s, y))
    stepped = (r < t) & (alpha > 0)
    weight = xp.where(stepped, xp.where(alpha > 0, alpha, 1.0) ** (2 * cfg.norm_p - 1), 1.0)
    return u, xp.where(expand(stepped, u), step_tgt, jvp_tgt), weight


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Mean over rows of ``w·a·‖u_θ − u_tgt‖²`` (summed over dimensions), ``w`` the row weight of
    ``prediction_and_target`` and ``a`` the adaptive weight.  ``aux``: α, and the unweighted squared
    error on all rows, the rows with r = t (``border_sq``) and r < t (``jump_sq``)."""
    u, u_tgt, weight = prediction_and_target(bk, cfg, model, batch, draws)
    sq = twotime.row_squared_error(bk, u, u_tgt)
    loss = bk.xp.mean(weight * twotime.adaptive_weight(bk, cfg, sq) * sq)
    return loss, {**twotime.row_groups(bk, cfg, sq, loss), "alpha": draws["alpha"]}


def trajectory_terms(bk, cfg: Config, model, batch: dict, draws: dict):
    """Per row ``(tfm, tc)``: trajectory flow matching ``‖u_θ − ṽ‖²`` and trajectory consistency
    ``2·u_θᵀ sg(ṽ − u_tgt)`` (both ``(n,)``, summed over dimensions), whose sum is ``‖u_θ − u_tgt‖²``
    up to ``‖u_tgt‖² − ‖ṽ‖²``, a constant under the stop-gradient (the code's ``loss_tfm``, ``loss_tcc``)."""
    xp = bk.xp
    _, v, _ = twotime.inputs(bk, cfg, model, batch, draws)
    u, u_tgt, _ = prediction_and_target(bk, cfg, model, batch, draws)
    n = u.shape[0]
    tfm = twotime.row_squared_error(bk, u, v)
    tc = 2 * xp.sum((u * bk.stop_gradient(v - u_tgt)).reshape((n, -1)), axis=1)
    return tfm, tc


# -- sampling --------------------------------------------------------------------------------
def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, times=None, trajectory: bool = False):
    """Jumps ``z ↦ z − (t − r)·u_θ(z, r, t)`` along ``times`` (``twotime.sample``; default the uniform
    grid), with no guidance at inference; one step is ``x1 − u_θ(x1, 0, 1)``.  Deterministic, so
    ``key`` is unused."""
    return twotime.sample(bk, cfg, model, x1, steps, y, times, trajectory)
