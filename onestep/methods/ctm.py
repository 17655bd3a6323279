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

which is CTM's ``G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s)`` (``ctm_jump`` below;
``ctm_g`` and ``average_velocity_from_g`` convert between U and g).

Training (``loss_from_draws``) is CTM's distillation objective without its GAN term:

- soft consistency: draw ``0 ≤ s ≤ u < t ≤ 1`` (continuous times, as CTM's ``time_continuous``
  mode; see ``draw``).  The student jumps ``t → s`` and the EMA net carries the result on to the
  end (t = 0); the target runs the teacher's ODE ``t → u`` (Heun steps), then the EMA net jumps
  ``u → s → 0``, all under stop-gradient.  The two are compared in data space (squared error).
  The outer EMA jump on the student side has frozen weights but passes gradients to its input,
  as CTM's default (``ctm_estimate_outer_type = target_model_sg``).  The target's ``u → s`` jump
  uses the EMA net as in the paper (the official code's default uses the online net under
  stop-gradient; with our short EMA the two are close).
- denoising (CTM's DSM term): at ``r = t`` the jump's velocity is the ODE velocity, so in our
  convention the DSM term is the flow-matching loss ``‖U_θ(z_τ, τ, τ) − (x1 − x0)‖²``.  CTM
  weights it by ``‖∇_W L_CTM‖ / ‖∇_W L_DSM‖`` at the last layer W, which needs reverse-mode access
  to one layer, a backend-specific operation.  We use the ratio of the two losses' root values
  instead, ``λ = sg(√(L_CTM / L_DSM))``: for squared errors a gradient's norm scales with the
  root of its loss, so λ matches the two terms' residual sizes the same way, at no extra cost
  (``dsm_balance = "adaptive"``; ``"fixed"`` uses ``dsm_weight`` alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

import numpy as np

from ..paths import LINEAR, expand
from ..sample import ode_step
from . import no_solver
from .fm import FMConfig, condition_labels
from .fm import draw as fm_draw

VARIANTS = ("ctm",)
N_COND = 2  # the network sees the start time t and the end time r
EVAL_STEPS = 1
BALANCES = ("adaptive", "fixed")


@dataclass(frozen=True)
class CTMConfig:
    """Hyper-parameters of CTM distillation (values per scale live in ``presets``)."""

    sigma_data: float = 0.5
    teacher_steps: int = 4  # Heun steps of the teacher from t to u (equal sub-steps)
    max_span: float = 1.0  # u = t − b·t with b ~ U[0, max_span]: how far the teacher runs
    dsm_balance: str = "adaptive"
    dsm_weight: float = 1.0
    ema: float = 0.999  # the EMA net is the target network and the sampler
    gamma: float = 0.0  # default γ of the sampler (0: deterministic long jumps)
    label_dropout: float = 0.0

    def __post_init__(self):
        if self.dsm_balance not in BALANCES:
            raise ValueError(f"unknown dsm_balance {self.dsm_balance!r}; accepted: {', '.join(BALANCES)}")
        if not (isinstance(self.teacher_steps, int) and self.teacher_steps >= 1):
            raise ValueError(f"teacher_steps must be a positive integer, got {self.teacher_steps!r}")
        if not 0 < self.max_span <= 1:
            raise ValueError(f"max_span must be in (0, 1], got {self.max_span!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        check_gamma(self.gamma)


def check_gamma(gamma: float) -> float:
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1] (0: deterministic jumps, 1: consistency-model "
                         f"multistep), got {gamma!r}")
    return float(gamma)


# -- the jump -------------------------------------------------------------------------------
def average_velocity(bk, model, cfg: CTMConfig, z, t, r, y=None):
    """``U_θ(z, t, r) = c_out·F_θ(c_in(t)·z, (t, r))``; ``t``, ``r`` one time per row."""
    sd = cfg.sigma_data
    c_in = 1 / bk.xp.sqrt((1 - t) ** 2 * sd**2 + t**2)
    cond = bk.xp.stack([t, r], axis=1)
    return math.sqrt(1 + sd**2) * model(expand(c_in, z) * z, cond, y)


def flow_map(bk, model, cfg: CTMConfig, z, t, r, y=None):
    """``f_θ(z, t, r) = z − (t − r)·U_θ(z, t, r)``: the jump from t to r (per-row times, r ≤ t)."""
    return z - expand(t - r, z) * average_velocity(bk, model, cfg, z, t, r, y)


def ctm_g(z, t, u):
    """CTM's ``g`` (a clean-data prediction) from our average velocity: ``g = z − t·U``."""
    return z - expand(t, z) * u


def average_velocity_from_g(z, t, g):
    """Inverse of ``ctm_g``: ``U = (z − g)/t`` (t > 0)."""
    return (z - g) / expand(t, z)


def ctm_jump(x, sigma_t, sigma_s, g):
    """CTM's jump in EDM variables: ``G(x, σ_t, σ_s) = (σ_s/σ_t)·x + (1 − σ_s/σ_t)·g``."""
    ratio = expand(sigma_s / sigma_t, x)
    return ratio * x + (1 - ratio) * g


# -- training -------------------------------------------------------------------------------
def _fm_cfg(cfg: CTMConfig) -> FMConfig:
    return FMConfig(time_sampler="uniform", label_dropout=cfg.label_dropout)


def draw(bk, key, batch: dict, cfg: CTMConfig) -> dict:
    """The random part of one loss evaluation.

    ``t = 1 − U[0, 1)`` (so t = 1 is reachable), ``u = t − b·t`` with ``b ~ U[0, max_span]``,
    ``s ~ U[0, u]``, noise ``x1``; plus the DSM term's FM draws (``dsm_t``, ``dsm_x1``) and the
    label-dropout mask ``drop`` (shared by both terms).
    """
    x0 = batch["x"]
    n = x0.shape[0]
    k_t, k_b, k_s, k_x, k_fm = bk.split(key, 5)
    t = 1 - bk.uniform(k_t, (n,))
    u = t - cfg.max_span * bk.uniform(k_b, (n,)) * t
    s = bk.uniform(k_s, (n,)) * u
    fm = fm_draw(bk, k_fm, batch, _fm_cfg(cfg))
    draws = {"t": t, "u": u, "s": s, "x1": bk.normal(k_x, tuple(x0.shape)), "dsm_t": fm["t"],
             "dsm_x1": fm["x1"]}
    if "drop" in fm:
        draws["drop"] = fm["drop"]
    return draws


def teacher_solve(teacher, z, t, u, y, steps: int):
    """The teacher's ODE from ``t`` to ``u`` (per row) in ``steps`` equal Heun steps."""
    for i in range(steps):
        a, b = t + (u - t) * (i / steps), t + (u - t) * ((i + 1) / steps)
        z = ode_step(teacher, z, a, b, y, "heun")
    return z


def loss_from_draws(bk, cfg: CTMConfig, teacher, model, ema, batch: dict, draws: dict):
    """Soft consistency in data space plus the balanced DSM (flow-matching) term."""
    xp = bk.xp
    x0, x1, t, u, s = batch["x"], draws["x1"], draws["t"], draws["u"], draws["s"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    end = xp.zeros_like(t)
    z_t = LINEAR.sample(xp, x0, x1, t)
    estimate = flow_map(bk, ema, cfg, flow_map(bk, model, cfg, z_t, t, s, y), s, end, y)
    z_u = bk.stop_gradient(teacher_solve(teacher, z_t, t, u, y, cfg.teacher_steps))
    target = bk.stop_gradient(flow_map(bk, ema, cfg, flow_map(bk, ema, cfg, z_u, u, s, y), s, end, y))
    ctm = xp.mean((estimate - target) ** 2)

    tau, noise = draws["dsm_t"], draws["dsm_x1"]
    velocity = average_velocity(bk, model, cfg, LINEAR.sample(xp, x0, noise, tau), tau, tau, y)
    dsm = xp.mean((velocity - LINEAR.velocity(xp, x0, noise, tau)) ** 2)
    weight = cfg.dsm_weight
    if cfg.dsm_balance == "adaptive":
        weight = weight * bk.stop_gradient(xp.sqrt(ctm / (dsm + 1e-12)))
    return ctm + weight * dsm, {"ctm": ctm, "dsm": dsm, "dsm_weight": weight * xp.ones_like(ctm)}


def make_loss(bk, cfg: CTMConfig, teacher=None):
    """The CTM loss ``(model, ema, batch, key, step) -> (loss, aux)``; ``teacher`` is required."""
    if teacher is None:
        raise ValueError("CTM distils a teacher's ODE and needs a teacher velocity field: pass --teacher "
                         "exact (analytic data sets) or --teacher RUN_DIR of a trained flow-matching run "
                         "(python -m onestep train --method fm ...)")

    def loss_fn(model, ema, batch, key, step):
        return loss_from_draws(bk, cfg, teacher, model, ema, batch, draw(bk, key, batch, cfg))
    return loss_fn


def ema_decay(cfg: CTMConfig, default: float) -> float:
    """The EMA is CTM's target network; its decay is part of the method (``cfg.ema``)."""
    return cfg.ema


# -- sampling -------------------------------------------------------------------------------
@cache
def _compiled_jump(bk, cfg: CTMConfig):
    def fn(model, z, t, r, y):
        n = z.shape[0]
        return flow_map(bk, model, cfg, z, bk.xp.broadcast_to(t, (n,)), bk.xp.broadcast_to(r, (n,)), y)
    return bk.inference(fn)


def jump(bk, model, cfg: CTMConfig, z, t: float, r: float, y=None):
    """``f_θ(z, t, r)`` for scalar times ``1 ≥ t ≥ r ≥ 0`` (no gradient; compiled once)."""
    t, r = float(t), float(r)
    if not 0 <= r <= t <= 1:
        raise ValueError(f"a jump goes from t to r with 0 ≤ r ≤ t ≤ 1, got t = {t}, r = {r}")
    return _compiled_jump(bk, cfg)(model, z, bk.from_numpy(np.asarray(t)), bk.from_numpy(np.asarray(r)), y)


def gamma_jump_time(t_next: float, gamma: float) -> float:
    """Where a γ-sampler jumps before renoising to ``t_next``: ``σ' = √(1 − γ²)·σ(t_next)``."""
    sigma = t_next / (1 - t_next) if t_next < 1 else math.inf
    sigma_jump = math.sqrt(1 - gamma**2) * sigma
    return 1.0 if math.isinf(sigma_jump) else sigma_jump / (1 + sigma_jump)


def sample(bk, model, cfg: CTMConfig, x1, steps: int, y=None, solver: str | None = None, seed: int = 0,
           gamma: float | None = None):
    """CTM's γ-sampling on the grid ``t_k = 1 − k/steps``.

    Each step jumps from ``t_k`` to ``t'`` with ``σ' = √(1 − γ²)·σ_{k+1}`` and adds fresh noise
    ``γ·σ_{k+1}·ε`` in EDM variables, which lands exactly on the marginal at ``t_{k+1}``.
    γ = 0: deterministic long jumps ``t_k → t_{k+1}``; γ = 1: jump to the data and renoise, the
    consistency-model multistep sampler.  ``seed`` drives the renoising.
    """
    no_solver("ctm", solver)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"number of sampling steps must be a positive integer, got {steps!r}")
    gamma = check_gamma(cfg.gamma if gamma is None else gamma)
    rng = np.random.default_rng(seed)
    times = 1 - np.arange(int(steps) + 1) / int(steps)
    z = x1
    for t, t_next in pairwise(times):
        t_jump = gamma_jump_time(float(t_next), gamma)
        z = jump(bk, model, cfg, z, float(t), t_jump, y)
        if t_next > 0 and gamma > 0:
            # z_{t'} = (1 − t')·x_{σ'} and z_{t_next} = (1 − t_next)·(x_{σ'} + γ·σ_next·ε)
            eps = bk.from_numpy(rng.standard_normal(tuple(x1.shape)))
            sigma_next = t_next / (1 - t_next)
            z = (1 - t_next) * (z / (1 - t_jump) + gamma * sigma_next * eps)
    return z
