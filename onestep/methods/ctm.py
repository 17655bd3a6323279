"""Consistency trajectory models (Kim et al., 2024), written once for both backends.

A CTM learns the whole PF-ODE map, not only its end point: ``f_θ(z, t, r) ≈ Φ_{t→r}(z)`` for
any ``1 ≥ t ≥ r ≥ 0``.  The network sees both times (``cond = (t, r)``) and returns an average
velocity ``U_θ``; the jump is

    f_θ(z, t, r) = z − (t − r)·U_θ(z, t, r),   U_θ = c_out·F_θ(c_in(t)·z, (t, r)),

so ``f(z, t, t) = z`` holds for any network.  ``c_in(t) = 1/√((1 − t)²σ_d² + t²)`` gives the
network unit-variance input and ``c_out = √(1 + σ_d²)`` is the scale of the conditional velocity
``x1 − x0``, so F is O(1) at initialisation and at the optimum.

CTM's own notation (EDM, ``x_σ = x0 + σ·ε``) is the same object: with ``σ = t/(1 − t)``,
``x = z/(1 − t)`` and ``g = z − t·U`` (a prediction of the clean data),

    f(z, t, r) = (1 − r)·G(x, σ_t, σ_r),   G(x, σ, σ') = (σ'/σ)·x + (1 − σ'/σ)·g,

which is CTM's ``G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s)`` (``flowmap.ctm_jump``;
``flowmap.ctm_g`` and ``flowmap.average_velocity_from_g`` convert between U and g).

Training (``loss_from_draws``) is CTM's distillation objective without its GAN term:

- soft consistency: draw ``0 ≤ s ≤ u < t ≤ 1`` (continuous times, as CTM's ``time_continuous``
  mode; see ``draw``).  The student jumps ``t → s`` and the EMA net carries the result on to the
  end (t = 0); the target runs the teacher's ODE ``t → u`` (Heun steps), then the EMA net jumps
  ``u → s → 0``, all under stop-gradient.  The two are compared in data space (squared error).
  The outer EMA jump on the student side has frozen weights but passes gradients to its input,
  as CTM's default (``ctm_estimate_outer_type = target_model_sg``).  The target's ``u → s`` jump
  uses the EMA net as in the paper (the official code's default uses the online net under
  stop-gradient; with our short EMA the two are close).
- denoising (CTM's DSM term): at ``r = t`` the jump's velocity is the ODE velocity, so we train
  that part with the flow-matching loss ``‖U_θ(z_τ, τ, τ) − (x1 − x0)‖²`` (uniform τ, no weights).
  CTM's DSM is EDM's denoising loss on ``g`` with EDM's noise distribution and weights: the same
  minimiser (``g = z − t·U``), a different weighting of the noise levels.  CTM
  weights it by ``‖∇_W L_CTM‖ / ‖∇_W L_DSM‖`` at the last layer W, which needs reverse-mode access
  to one layer, a backend-specific operation.  We use the ratio of the two losses' root values
  instead, ``λ = sg(√(L_CTM / L_DSM))``: for squared errors a gradient's norm scales with the
  root of its loss, so λ matches the two terms' residual sizes the same way, at no extra cost
  (``dsm_balance = "adaptive"``; ``"fixed"`` uses ``dsm_weight`` alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

from ..conventions import edm_point, sigma_from_t
from ..ode import ode_step
from ..paths import LINEAR, expand
from .flowmap import condition_labels, jump, label_dropout, sample_jumps, uniform_times

VARIANTS = ("ctm",)
BALANCES = ("adaptive", "fixed")


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of CTM distillation (deviations per scale live in ``presets``)."""

    sigma_data: float = 0.5
    teacher_steps: int = 4  # Heun steps of the teacher from t to u (equal sub-steps)
    max_span: float = 1.0  # u = t − b·t with b ~ U[0, max_span]: how far the teacher runs
    dsm_balance: str = "adaptive"
    dsm_weight: float = 1.0
    gamma: float = 0.0  # default γ of the sampler (0: deterministic long jumps)
    label_dropout: float = 0.0

    def __post_init__(self):
        if self.dsm_balance not in BALANCES:
            raise ValueError(f"unknown dsm_balance {self.dsm_balance!r}; accepted: {', '.join(BALANCES)}")
        if not (isinstance(self.teacher_steps, int) and self.teacher_steps >= 1):
            raise ValueError(f"teacher_steps must be a positive integer, got {self.teacher_steps!r}")
        if not 0 < self.max_span <= 1:
            raise ValueError(f"max_span must be in (0, 1], got {self.max_span!r}")
        check_gamma(self.gamma)


def check_gamma(gamma: float) -> float:
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1] (0: deterministic jumps, 1: consistency-model "
                         f"multistep), got {gamma!r}")
    return float(gamma)


def needs_teacher(cfg: Config) -> bool:
    return True


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: the start time t and the end time r."""
    return 2


# -- the jump -------------------------------------------------------------------------------
def average_velocity(bk, model, cfg: Config, z, r, t, y=None):
    """``U_θ(z, r, t) = c_out·F_θ(c_in(t)·z, (t, r))``; ``r``, ``t`` one time per row."""
    sd = cfg.sigma_data
    c_in = 1 / bk.xp.sqrt((1 - t) ** 2 * sd**2 + t**2)
    cond = bk.xp.stack([t, r], axis=1)
    return math.sqrt(1 + sd**2) * model(expand(c_in, z) * z, cond, y)


def flow_map(bk, model, cfg: Config, z, t, r, y=None):
    """``f_θ(z, t, r) = z − (t − r)·U_θ(z, r, t)``: the jump from t to r (per-row times, r ≤ t)."""
    return jump(z, average_velocity(bk, model, cfg, z, r, t, y), t, r)


# -- training -------------------------------------------------------------------------------
def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation.

    ``t = 1 − U[0, 1)`` (so t = 1 is reachable), ``u = t − b·t`` with ``b ~ U[0, max_span]``,
    ``s ~ U[0, u]``, noise ``x1``; the DSM term's own time ``dsm_t ~ U[0, 1)`` and noise ``dsm_x1``;
    and the label-dropout mask ``drop`` (shared by both terms).
    """
    x0 = batch["x"]
    n = x0.shape[0]
    k_t, k_b, k_s, k_x, k_dt, k_dx, k_y = bk.split(key, 7)
    t = 1 - bk.uniform(k_t, (n,))
    u = t - cfg.max_span * bk.uniform(k_b, (n,)) * t
    draws = {"t": t, "u": u, "s": bk.uniform(k_s, (n,)) * u, "x1": bk.normal(k_x, tuple(x0.shape)),
             "dsm_t": bk.uniform(k_dt, (n,)), "dsm_x1": bk.normal(k_dx, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def teacher_solve(teacher, z, t, u, y, steps: int):
    """The teacher's ODE from ``t`` to ``u`` (per row) in ``steps`` equal Heun steps."""
    for i in range(steps):
        a, b = t + (u - t) * (i / steps), t + (u - t) * ((i + 1) / steps)
        z = ode_step(teacher, z, a, b, y, "heun")
    return z


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Soft consistency in data space plus the balanced DSM (flow-matching) term; ``target`` is the EMA net."""
    xp = bk.xp
    x0, x1, t, u, s = batch["x"], draws["x1"], draws["t"], draws["u"], draws["s"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    end = xp.zeros_like(t)
    z_t = LINEAR.sample(xp, x0, x1, t)
    estimate = flow_map(bk, target, cfg, flow_map(bk, model, cfg, z_t, t, s, y), s, end, y)
    z_u = bk.stop_gradient(teacher_solve(teacher, z_t, t, u, y, cfg.teacher_steps))
    ctm_target = bk.stop_gradient(flow_map(bk, target, cfg, flow_map(bk, target, cfg, z_u, u, s, y), s, end, y))
    ctm = xp.mean((estimate - ctm_target) ** 2)

    tau, noise = draws["dsm_t"], draws["dsm_x1"]
    velocity = average_velocity(bk, model, cfg, LINEAR.sample(xp, x0, noise, tau), tau, tau, y)
    dsm = xp.mean((velocity - LINEAR.velocity(xp, x0, noise, tau)) ** 2)
    weight = cfg.dsm_weight
    if cfg.dsm_balance == "adaptive":  # a ratio of batch means: the global batch's, on any number of workers
        weight = weight * xp.sqrt(bk.batch_statistic(ctm) / (bk.batch_statistic(dsm) + 1e-12))
    return ctm + weight * dsm, {"ctm": ctm, "dsm": dsm, "dsm_weight": weight * xp.ones_like(ctm)}


# -- sampling -------------------------------------------------------------------------------
def gamma_jump_time(t_next: float, gamma: float) -> float:
    """Where a γ-sampler jumps before renoising to ``t_next``: ``σ' = √(1 − γ²)·σ(t_next)``, which in
    our time is ``t' = ρt/(1 − t + ρt)`` with ``ρ = √(1 − γ²)`` (finite at t = 1)."""
    rho = math.sqrt(1 - gamma**2)
    return rho * t_next / (1 - t_next + rho * t_next) if rho * t_next > 0 else 0.0


def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, gamma: float | None = None):
    """CTM's γ-sampling on the grid ``t_k = 1 − k/steps``.

    Each step jumps from ``t_k`` to ``t'`` with ``σ' = √(1 − γ²)·σ_{k+1}`` and adds fresh noise
    ``γ·σ_{k+1}·ε`` in EDM variables (ε from ``key``), which lands exactly on the marginal at
    ``t_{k+1}``.  γ = 0: deterministic long jumps ``t_k → t_{k+1}``; γ = 1: jump to the data and
    renoise, the consistency-model multistep sampler.
    """
    gamma = check_gamma(cfg.gamma if gamma is None else gamma)
    times = uniform_times(steps)
    if gamma == 0:
        return sample_jumps(bk, average_velocity, model, cfg, x1, times, y)
    z = x1
    for (t, t_next), k in zip(pairwise(times), bk.split(key, len(times) - 1)):
        t_jump = gamma_jump_time(float(t_next), gamma)
        z = sample_jumps(bk, average_velocity, model, cfg, z, (t, t_jump), y)
        if t_next > 0:
            # z_{t'} = (1 − t')·x_{σ'} and z_{t_next} = (1 − t_next)·(x_{σ'} + γ·σ_next·ε)
            z = (1 - t_next) * (edm_point(z, t_jump) + gamma * sigma_from_t(t_next) * bk.normal(k, tuple(x1.shape)))
    return z
