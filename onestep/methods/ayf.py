"""Align Your Flow (Sabour, Fidler & Kreis, 2025): flow-map distillation, written once for both backends.

A flow map jumps from time t to an earlier time s ≤ t in one step.  The paper writes it
``f_θ(x_t, t, s) = x_t + (s − t)·F_θ(x_t, t, s)``; with ``s = r`` that is the book's jump
``f(z, t, r) = z − (t − r)·u(z, r, t)`` with ``F_θ = u`` exactly (no sign change: both papers run
time from data at 0 to noise at 1).  So ``F_θ`` is our average velocity, ``f(z, t, t) = z`` holds
for any network, and the network sees ``(t, s)`` (and, when guided, the guidance scale λ).

Two continuous-time objectives train it from a teacher's velocity field ``v`` (``loss_from_draws``):

- **EMD** (Eulerian): the end ``s`` is fixed and the start ``t`` moves along the teacher's ODE; the
  exact map satisfies ``d f/dt = 0``, i.e. ``F = v − (t − s)·dF/dt``.  The tangent
  ``g = (F⁻ − v) + r·(t − s)·dF⁻/dt`` comes from ONE JVP with tangents ``(v, 1, 0)`` on ``(z, t, s)``;
  the loss is ``‖F_θ − sg(F⁻ − g/(‖g‖ + c))‖²``.  At s = 0 this is the continuous-time consistency
  objective; as s → t it is flow matching on the teacher's velocity.
- **LMD** (Lagrangian): the start ``t`` is fixed and the end ``s`` moves; the exact map satisfies
  ``∂_s f = v(f, s)``, i.e. ``F − (t − s)·∂_s F = v(f(z, t, s), s)``, with the teacher evaluated at the
  predicted point.  ``g = F⁻ − r·(t − s)·∂_s F⁻ − v(f⁻, s)`` from a JVP with tangents ``(0, 0, 1)``.
- **EMD+LMD**: every other row of the batch is an LMD row (weight ``lmd_weight``), the rest EMD rows;
  one JVP serves both because the tangents are per row.

``F⁻`` is the online network under stop-gradient, the JVP's own primal (the paper's θ⁻ is "the
stop-gradient version of the student"; an EMA target would lag behind the tangent it is paired with).
``r`` ramps from 0 to ``tangent_max`` over the first ``warmup_fraction`` of the run (tangent warmup);
at r = 0 the loss is flow matching on the teacher at every (t, s).

Autoguidance: with ``guidance = (λ_lo, λ_hi)`` the teacher is ``v_weak + λ·(v − v_weak)`` with a weaker
checkpoint ``v_weak`` of the same teacher (``teachers.autoguided_teacher``), λ ~ U[λ_lo, λ_hi] per row,
and the student sees ``(λ − λ_lo)/(λ_hi − λ_lo)`` as a third condition; λ is chosen at sampling.

Departures and choices (no official code exists; the paper's values we could not verify are marked):
plain mean squared error with no (t, s) weighting (the paper's w(t, s) is not given; the
re-implementations use none); (t, s) drawn as a sorted pair of times from ``time_sampler`` with a
fixed share of rows at the borders s = t (flow matching) and s = 0 (consistency), placed by row
position (the paper's interval sampler is not published; re-implementations disagree); the warmup
length is ours (the paper's is not given); the tangent normalisation and warmup are applied to LMD
rows exactly as to EMD rows; EMD+LMD splits rows instead of evaluating both losses on every row (same
expectation, one JVP); the network sees 10·t, not the embedding's 1000·t (``TIME_INPUT``); the λ range
U[1, 3] and λ as a student input follow a re-implementation (``presets.AUTOGUIDANCE``); no adversarial
fine-tuning and no stochastic sampling.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..backends.embedding import EMBEDDING_TIME_SCALE
from ..paths import LINEAR, expand
from ..times import TIME_SAMPLERS, sample_times
from .flowmap import check_jump, condition_labels, jump, label_dropout, sample_jumps, uniform_times

VARIANTS = ("emd", "lmd", "emd+lmd")
# The network sees 10·t where the embedding expects 1000·t: the JVP differentiates through the embedding,
# whose fastest frequency sets the size of dF/dt (sCM feeds τ without its ×1000 for the same reason).
TIME_INPUT = 10.0 / EMBEDDING_TIME_SCALE


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of AYF distillation (deviations per scale live in ``presets``)."""

    variant: str = "emd"
    tangent_norm: float = 0.1  # c in g/(‖g‖ + c) (the paper's value)
    tangent_max: float = 0.99  # r_max: the warmup ramps the derivative term up to this (the paper's value)
    warmup_fraction: float = 0.1  # share of the run the warmup takes (the paper's length is not given)
    lmd_weight: float = 1.0  # weight of the LMD rows in emd+lmd
    time_sampler: str = "uniform"  # each of the two times of a pair (then sorted: t ≥ s)
    time_mean: float = 0.0  # logit-normal location and scale
    time_std: float = 1.0
    equal_fraction: float = 0.1  # rows with s = t (flow matching on the teacher)
    zero_fraction: float = 0.1  # rows with s = 0 (the consistency / one-step border)
    guidance: tuple[float, float] | None = None  # autoguidance range (λ_lo, λ_hi); None: unguided
    label_dropout: float = 0.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; accepted: {', '.join(VARIANTS)}")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time_sampler {self.time_sampler!r}; accepted: {', '.join(TIME_SAMPLERS)}")
        if not self.tangent_norm > 0:
            raise ValueError(f"tangent_norm must be positive, got {self.tangent_norm!r}")
        if not 0 < self.tangent_max <= 1:
            raise ValueError(f"tangent_max must be in (0, 1], got {self.tangent_max!r}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}")
        if not self.lmd_weight > 0:
            raise ValueError(f"lmd_weight must be positive, got {self.lmd_weight!r}")
        if not (0 <= self.equal_fraction and 0 <= self.zero_fraction and self.equal_fraction + self.zero_fraction <= 1):
            raise ValueError(f"equal_fraction and zero_fraction must be ≥ 0 with a sum ≤ 1, got "
                             f"{self.equal_fraction!r} and {self.zero_fraction!r}")
        if self.guidance is not None:
            lo, hi = self.guidance
            if not 0 < lo < hi:
                raise ValueError(f"guidance must be a range (λ_lo, λ_hi) with 0 < λ_lo < λ_hi, got {self.guidance!r}")


def needs_teacher(cfg: Config) -> bool:
    return True


def n_cond(cfg: Config) -> int:
    """How many conditions the network sees: (t, s), and λ when guided."""
    return 2 + (cfg.guidance is not None)


def check_guidance(cfg: Config, guidance) -> float | None:
    """The λ a sampler asks for: inside the trained range (default its lower end), or None unguided."""
    if cfg.guidance is None:
        if guidance not in (None, 1, 1.0):
            raise ValueError(f"this flow map was trained without autoguidance; guidance must be 1 or None, "
                             f"got {guidance!r}")
        return None
    lo, hi = cfg.guidance
    if guidance is None:
        return float(lo)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not lo <= guidance <= hi:
        raise ValueError(f"guidance λ = {guidance!r} is outside the range the student was trained on, "
                         f"[{lo}, {hi}]; choose λ in that range")
    return float(guidance)


# -- the flow map ---------------------------------------------------------------------------
def network_conditions(bk, cfg: Config, t, s, guidance=None):
    """The conditions the network sees, ``(n, n_cond)``: t, s and, when guided, ``(λ − λ_lo)/(λ_hi − λ_lo)``,
    each scaled by ``TIME_INPUT``."""
    cols = [t * TIME_INPUT, s * TIME_INPUT]
    if cfg.guidance is not None:
        lo, hi = cfg.guidance
        cols.append((guidance - lo) / (hi - lo) * TIME_INPUT)
    return bk.xp.stack(cols, axis=1)


def average_velocity(bk, model, cfg: Config, z, r, t, y=None, guidance=None):
    """``F_θ(z, t, r)``, the average velocity of the jump from ``t`` to ``r`` (per-row times; ``guidance``
    λ per row, or None: the range's lower end)."""
    if cfg.guidance is not None and guidance is None:
        guidance = bk.xp.full_like(t, cfg.guidance[0])
    return model(z, network_conditions(bk, cfg, t, r, guidance), y)


def flow_map(bk, model, cfg: Config, z, t, s, y=None, guidance=None):
    """``f_θ(z, t, s) = z − (t − s)·F_θ(z, t, s)`` (per-row times, s ≤ t)."""
    return jump(z, average_velocity(bk, model, cfg, z, s, t, y, guidance), t, s)


# -- training -------------------------------------------------------------------------------
def border_rows(cfg: Config, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the rows at the borders: the first ``⌊n·equal_fraction⌋`` rows have s = t, the next
    ``⌊n·zero_fraction⌋`` have s = 0 (by position, so every batch has its share)."""
    n_equal, n_zero = int(n * cfg.equal_fraction), int(n * cfg.zero_fraction)
    index = np.arange(n)
    return index < n_equal, (index >= n_equal) & (index < n_equal + n_zero)


def lmd_rows(cfg: Config, n: int) -> np.ndarray:
    """Which rows take the Lagrangian objective: all (lmd), none (emd), every other row (emd+lmd)."""
    if cfg.variant == "emd+lmd":
        return np.arange(n) % 2 == 1
    return np.full(n, cfg.variant == "lmd")


def warmup(bk, cfg: Config, step, total_steps: int, dtype):
    """``r`` at training step ``step``: from ``tangent_max/warmup_steps`` up to ``tangent_max``."""
    xp, steps = bk.xp, cfg.warmup_fraction * total_steps
    if steps <= 0:
        return xp.asarray(cfg.tangent_max, dtype=dtype)
    return cfg.tangent_max * xp.clip(xp.asarray(step + 1, dtype=dtype) / steps, 0.0, 1.0)


def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation: a sorted pair ``t ≥ s`` per row (borders by position),
    noise ``x1``, the LMD rows, the warmup factor, λ per row when guided, and the label-dropout mask."""
    xp, x0 = bk.xp, batch["x"]
    n = x0.shape[0]
    k_a, k_b, k_x, k_g, k_y = bk.split(key, 5)
    a = sample_times(bk, k_a, n, cfg.time_sampler, cfg.time_mean, cfg.time_std)
    b = sample_times(bk, k_b, n, cfg.time_sampler, cfg.time_mean, cfg.time_std)
    t, s = xp.maximum(a, b), xp.minimum(a, b)
    equal, zero = (bk.from_numpy(m) for m in border_rows(cfg, n))
    s = xp.where(equal, t, xp.where(zero, xp.zeros_like(s), s))
    draws = {"t": t, "s": s, "x1": bk.normal(k_x, tuple(x0.shape)),
             "lmd": bk.from_numpy(lmd_rows(cfg, n).astype(np.float64)),
             "warmup": warmup(bk, cfg, step, total_steps, x0.dtype)}
    if cfg.guidance is not None:
        lo, hi = cfg.guidance
        draws["guidance"] = lo + (hi - lo) * bk.uniform(k_g, (n,))
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def teacher_velocity(teacher, z, t, y, guidance):
    """The teacher's velocity, autoguided with per-row λ when ``guidance`` is given."""
    return teacher(z, t, y) if guidance is None else teacher(z, t, y, guidance)


def tangent(bk, cfg: Config, F, teacher, z, t, s, y, lmd, r, guidance=None):
    """``(F_θ, g)`` at ``(z, t, s)``: the network ``F(z, t, s)`` with its gradient (the JVP's primal) and the
    un-normalised tangent under stop-gradient, EMD on rows where ``lmd`` (``(n,)``, 0 or 1) is 0, LMD where 1.

    ``F`` is any average-velocity function ``(z, t, s) -> (n, ...)``.  EMD: ``g = F⁻ − v(z, t) + r·(t − s)·dF⁻/dt``
    with ``dF/dt = ∂_z F·v + ∂_t F``; LMD: ``g = F⁻ − r·(t − s)·∂_s F⁻ − v(f⁻, s)`` with ``f⁻ = z − (t − s)·F⁻``.
    """
    xp = bk.xp
    eul = 1.0 - lmd  # the EMD rows
    v = bk.stop_gradient(teacher_velocity(teacher, z, t, y, guidance)) if cfg.variant != "lmd" else xp.zeros_like(z)
    u, du = bk.jvp(F, (z, t, s), (expand(eul, z) * v, eul, 1.0 - eul))
    u_sg = bk.stop_gradient(u)
    gap = expand(t - s, z)
    g_emd = u_sg - v + r * gap * du
    if cfg.variant == "emd":
        return u, g_emd
    v_end = bk.stop_gradient(teacher_velocity(teacher, jump(z, u_sg, t, s), s, y, guidance))
    g_lmd = u_sg - r * gap * du - v_end
    if cfg.variant == "lmd":
        return u, g_lmd
    return u, xp.where(expand(lmd > 0.5, z), g_lmd, g_emd)


def normalise(bk, cfg: Config, g):
    """``g/(‖g‖ + c)`` per row (norm over all dimensions), and the norms ``(n,)``."""
    norm = bk.xp.sqrt(bk.xp.sum((g**2).reshape((g.shape[0], -1)), axis=1))
    return g / (expand(norm, g) + cfg.tangent_norm), norm


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """``‖F_θ − sg(F⁻ − g/(‖g‖ + c))‖²`` per row (mean over dimensions), LMD rows weighted by ``lmd_weight``."""
    xp = bk.xp
    x0, t, s, lmd = batch["x"], draws["t"], draws["s"], draws["lmd"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    guidance = draws.get("guidance")
    z = LINEAR.sample(xp, x0, draws["x1"], t)

    def F(zz, tt, ss):
        return average_velocity(bk, model, cfg, zz, ss, tt, y, guidance)

    u, g = tangent(bk, cfg, F, teacher, z, t, s, y, lmd, draws["warmup"], guidance)
    g_hat, norm = normalise(bk, cfg, g)
    err = u - bk.stop_gradient(u - g_hat)
    sq = xp.mean((err**2).reshape((z.shape[0], -1)), axis=1)
    weight = 1.0 + (cfg.lmd_weight - 1.0) * lmd if cfg.variant == "emd+lmd" else 1.0
    return xp.mean(weight * sq), {"tangent_norm": xp.mean(norm), "warmup": draws["warmup"] * xp.ones_like(sq[0])}


# -- sampling -------------------------------------------------------------------------------
def _guided(bk, model, setting, z, r, t, y=None):
    """``average_velocity`` with λ carried in ``setting = (cfg, λ)`` (a static argument when compiled)."""
    cfg, guidance = setting
    lam = None if guidance is None else bk.xp.full_like(t, guidance)
    return average_velocity(bk, model, cfg, z, r, t, y, lam)


def jump_once(bk, model, cfg: Config, z, t: float, s: float, y=None, guidance=None):
    """One jump of the learned map from scalar time ``t`` to ``s ≤ t`` (checked), at guidance λ."""
    t, s = check_jump(t, s)
    setting = (cfg, check_guidance(cfg, guidance))
    return sample_jumps(bk, _guided, model, setting, z, (t, s), y)


def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, guidance=None, trajectory: bool = False):
    """``steps`` equal jumps of the flow map from t = 1 to 0 at guidance λ (default: the trained range's lower
    end); deterministic, so ``key`` is unused.  ``trajectory=True``: every point visited, numpy ``(steps + 1, n, ...)``."""
    setting = (cfg, check_guidance(cfg, guidance))
    return sample_jumps(bk, _guided, model, setting, x1, uniform_times(steps), y, trajectory)

