"""Consistency models, written once for both backends.

A consistency function maps every point of a PF-ODE trajectory to the trajectory's clean
end: ``f(z_t, t) = z_ε``.  It is wired as ``f = c_skip(t)·z + c_out(t)·F_θ(c_in(t)·z, t)``
with ``c_skip(ε) = 1`` and ``c_out(ε) = 0``, so the boundary ``f(z, ε) = z`` holds for any
network.  Two parameterisations, both in the book's time t (data at 0, noise at 1):

- ``edm`` (CD, CT, iCT): the EDM/CM skip and output weights on ``σ = t/(1 − t)``, carried
  over to the linear path by ``z_t = (1 − t)·x_σ``; the boundary sits at ``t = ε``
  (``σ_min = 0.002``).
- ``trig`` (sCT, sCD): TrigFlow, ``f = cos τ·x_τ − σ_d sin τ·F(x_τ/σ_d, t)`` with
  ``x_τ = a(τ)·z_t`` (see ``conventions.tau_from_t``); the boundary sits at t = 0.

Training variants:

- ``cd``: consistency distillation; one Heun step of a teacher's ODE from ``t_{i+1}`` to ``t_i``;
- ``ct``: consistency training; the adjacent point uses the same noise; EMA target with the
  adaptive curriculum ``N(k)``, ``μ(k)`` of Song et al. (2023);
- ``ict``: improved CT; the target is the online network under stop-gradient, pseudo-Huber
  distance, ``1/Δσ`` weights, lognormal index sampling, ``N`` doubling;
- ``sct`` / ``scd``: continuous time (Lu & Song 2024); the tangent ``cos τ·df⁻/dτ`` from a JVP,
  normalised ``g/(‖g‖ + c)`` and warmed up; the learned weighting ``e^{w(τ)}/D·‖·‖² − w(τ)`` with
  ``w`` the network's ``log_weight`` head (``weighting = "adaptive"``, read outside the JVP).

Mapping from the official CM code (``openai/consistency_models``, EDM σ, grid index 0 = σ_max):
``σ = t/(1 − t)``, ``x_σ = z_t/(1 − t)``; a sampled index gives our ``(sigma_hi, sigma_lo)``;
``target_model`` (rate ``target_ema``) is the run's target network (``TrainConfig.target_decay``,
``target_decay`` below) and ``ema_rate`` the average the samples come from
(``TrainConfig.ema_decay``).  sCM (TrigFlow, no official code): its time ``t`` is our ``τ``
(``conventions.tau_from_t``), its ``x_t/σ_d`` our ``x_τ/σ_d``, its ``w_φ(t)`` our ``model.log_weight``.

Departures (Chapter 2's box gives the reasons): the network sees ``t`` (edm) or ``τ/1000`` (trig),
not CM's ``1000·¼ ln σ``; σ_d is the data's RMS; L2 or pseudo-Huber instead of LPIPS; sCM's
lognormal time proposal keeps the images' distribution of τ (``IMAGE_SIGMA_DATA``); the CT preset
(``presets.CT_BOOK_CHANGES``) trains against the online net with iCT's ``1/Δσ`` weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ..backends.embedding import EMBEDDING_TIME_SCALE
from ..conventions import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    sigma_from_t,
    t_from_sigma,
    t_from_tau,
    tau_from_t,
    trigflow_scale,
)
from ..ode import ode_step
from ..paths import LINEAR, expand
from ..times import karras_sigmas
from .flowmap import check_steps, condition_labels, label_dropout, per_row

VARIANTS = ("ict", "ct", "cd", "sct", "scd")
CURRICULA = ("doubling", "adaptive", "fixed")
DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inv_dsigma", "adaptive")  # adaptive: sCM's learned e^{w(τ)}·L − w(τ)
INDEX_SAMPLERS = ("uniform", "lognormal")
TARGETS = ("online", "ema", "unstopped")  # sg(θ), sg(EMA θ⁻), or θ with the gradient flowing (collapses)
IMAGE_SIGMA_DATA = 0.5  # the papers' constants assume σ_d = 0.5; ours are rescaled by σ_d / 0.5
PSEUDO_HUBER_C = 0.00054  # iCT: c = 0.00054·√D at σ_d = 0.5


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of one consistency-model variant (deviations per scale live in ``presets``)."""

    variant: str = "ict"
    sigma_data: float = 0.5
    # discrete time: the EDM grid and its curriculum
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    rho: float = 7.0
    curriculum: str = "doubling"
    n_start: int = 10
    n_end: int = 1280
    mu0: float = 0.9  # target-network decay (CT: at N = n_start, then μ(k); see ``target_decay``)
    target: str = "online"
    distance: str = "pseudo_huber"
    weighting: str = "inv_dsigma"
    index_sampling: str = "lognormal"
    p_mean: float = -1.1  # lognormal σ/(2σ_d) for iCT's index sampling, or tan τ = e^P/0.5 for sCM
    p_std: float = 2.0
    # continuous time
    tangent_norm: float = 0.1
    warmup_fraction: float = 0.0  # tangent warmup over this fraction of the run (0: none)
    label_dropout: float = 0.0

    def __post_init__(self):
        for name, accepted in (("variant", VARIANTS), ("curriculum", CURRICULA), ("distance", DISTANCES),
                               ("weighting", WEIGHTINGS), ("index_sampling", INDEX_SAMPLERS),
                               ("target", TARGETS)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; accepted: {', '.join(accepted)}")
        if not (isinstance(self.n_start, int) and self.n_start >= 2):
            raise ValueError(f"n_start must be an integer ≥ 2 (grid points), got {self.n_start!r}")
        if not (isinstance(self.n_end, int) and self.n_end >= self.n_start):
            raise ValueError(f"the discretisation must not shrink: n_end = {self.n_end!r} < n_start = "
                             f"{self.n_start}; use n_end ≥ n_start (equal for a fixed grid)")
        if self.curriculum == "doubling" and self.n_end < 2 * self.n_start and self.n_end != self.n_start:
            raise ValueError(f"a doubling curriculum from {self.n_start} needs n_end ≥ {2 * self.n_start} "
                             f"(or n_end = n_start for no growth), got {self.n_end}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not 0 <= self.mu0 < 1:
            raise ValueError(f"mu0 must be in [0, 1), got {self.mu0!r}")
        accepted = ("uniform", "adaptive") if self.parameterisation == "trig" else ("uniform", "inv_dsigma")
        if self.weighting not in accepted:
            raise ValueError(f"weighting {self.weighting!r} does not apply to variant {self.variant!r}; "
                             f"accepted: {', '.join(accepted)}")

    @property
    def parameterisation(self) -> str:
        return "trig" if self.variant in ("sct", "scd") else "edm"

    @property
    def t_min(self) -> float:
        """The boundary time ε where ``f(z, ε) = z``."""
        return 0.0 if self.parameterisation == "trig" else float(t_from_sigma(self.sigma_min))

    @property
    def t_max(self) -> float:
        """Where one-step sampling starts (noise ``x1`` sits at ``z = t_max·x1``)."""
        return 1.0 if self.parameterisation == "trig" else float(t_from_sigma(self.sigma_max))


# -- the consistency function ---------------------------------------------------------------
def coefficients(xp, cfg: Config, t):
    """``(c_skip, c_out, c_in)`` at times ``t`` (any array shape) in the book's convention."""
    sd = cfg.sigma_data
    if cfg.parameterisation == "trig":
        tau = tau_from_t(xp, t, sd)
        a = trigflow_scale(xp, tau, sd)
        return a * xp.cos(tau), -sd * xp.sin(tau), a / sd
    sigma, lead = sigma_from_t(t), 1 - cfg.t_min
    root = xp.sqrt(sigma**2 + sd**2)
    c_skip = lead / (1 - t) * sd**2 / ((sigma - cfg.sigma_min) ** 2 + sd**2)
    return c_skip, lead * sd * (sigma - cfg.sigma_min) / root, 1 / ((1 - t) * root)


def network_time(xp, cfg: Config, t):
    """The time the network sees: t itself (edm), or TrigFlow's τ without the ×1000 of the
    embedding (sCM's stability fix, ``c_noise = τ``: a smooth time input keeps ``dF/dτ`` small)."""
    if cfg.parameterisation == "trig":
        return tau_from_t(xp, t, cfg.sigma_data) / EMBEDDING_TIME_SCALE
    return t


# Each variant's settings from its paper; ``Config``'s own defaults are iCT's.
PAPER_VARIANTS = {
    "ict": {},
    # CM (Song et al. 2023), CT: N(k) from s0 = 2 to s1 = 150 and μ(k) from μ0 = 0.9
    "ct": {"curriculum": "adaptive", "n_start": 2, "n_end": 150, "target": "ema", "mu0": 0.9, "distance": "l2",
           "weighting": "uniform", "index_sampling": "uniform"},
    # CM, CD: fixed N = 18 (CIFAR-10) with the EMA target μ = 0.95 of ImageNet-64 and LSUN (there N = 40;
    # CIFAR-10's CD uses μ = 0, the online net); their metric is LPIPS
    "cd": {"curriculum": "fixed", "n_start": 18, "n_end": 18, "target": "ema", "mu0": 0.95, "distance": "l2",
           "weighting": "uniform", "index_sampling": "uniform"},
    # sCM (Lu & Song 2024), CIFAR-10: tan τ = e^P/σ_d with P ~ N(−1.0, 1.4²), tangent normalisation c = 0.1
    # and the learned adaptive weighting e^{w(τ)}/D·‖F − F⁻ − g‖² − w(τ)
    "sct": {"p_mean": -1.0, "p_std": 1.4, "tangent_norm": 0.1, "weighting": "adaptive"},
    "scd": {"p_mean": -1.0, "p_std": 1.4, "tangent_norm": 0.1, "weighting": "adaptive"},
}


def variant_config(variant: str, **deviations) -> Config:
    """The paper's settings of ``variant`` with ``deviations`` on top."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    return Config(variant=variant, **{**PAPER_VARIANTS[variant], **deviations})


def needs_teacher(cfg: Config) -> bool:
    return cfg.variant in ("cd", "scd")


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: one time, t."""
    return 1


def consistency(bk, model, cfg: Config, z, t, y=None):
    """``f_θ(z, t) = c_skip(t)·z + c_out(t)·F_θ(c_in(t)·z, t)``; ``t`` a 0-d array or one per row."""
    t = per_row(bk, t, z)
    c_skip, c_out, c_in = (expand(c, z) for c in coefficients(bk.xp, cfg, t))
    return c_skip * z + c_out * model(c_in * z, network_time(bk.xp, cfg, t)[:, None], y)


# -- the discretisation curriculum ----------------------------------------------------------
def n_schedule(cfg: Config, total_steps: int) -> np.ndarray:
    """Grid size ``N(k)`` (number of noise levels) at every training step k of a run of ``total_steps``."""
    k, total, s0, s1 = np.arange(total_steps), total_steps, cfg.n_start, cfg.n_end
    if cfg.curriculum == "fixed" or s1 == s0:
        return np.full(total, s1)
    if cfg.curriculum == "adaptive":  # Song et al. (2023), with N counting grid points
        return (np.ceil(np.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1).astype(int)
    stages = int(math.log2(s1 // s0)) + 1  # iCT: s0, 2·s0, ... capped at s1, equal-length stages
    per_stage = max(total // stages, 1)
    return np.minimum(s0 * 2 ** (k // per_stage), s1).astype(int) + 1


@dataclass(frozen=True)
class AdaptiveDecay:
    """CT's target-network decay over a run: ``μ(k) = exp(n_start·ln μ0 / N(k))`` (Song et al. 2023)."""

    cfg: Config

    def table(self, total_steps: int) -> np.ndarray:
        """The decay after each of the run's ``total_steps`` steps."""
        return np.exp(self.cfg.n_start * np.log(self.cfg.mu0) / n_schedule(self.cfg, total_steps))


def target_decay(cfg: Config) -> float | AdaptiveDecay | None:
    """The decay of the run's target network: None when the target is the online network (iCT, sCM),
    ``μ0`` for a fixed EMA target (CD), CT's ``μ(k)`` with the adaptive curriculum."""
    if cfg.target != "ema":
        return None
    if cfg.curriculum != "adaptive":
        return cfg.mu0
    return AdaptiveDecay(cfg)


def index_probabilities(cfg: Config, sigmas: np.ndarray) -> np.ndarray:
    """Probability of training on interval ``(σ_i, σ_{i+1})``: uniform, or iCT's lognormal
    ``∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std))``."""
    if cfg.index_sampling == "uniform":
        return np.full(len(sigmas) - 1, 1.0 / (len(sigmas) - 1))
    log_sigma = np.log(sigmas * IMAGE_SIGMA_DATA / cfg.sigma_data)
    cdf = erf((log_sigma - cfg.p_mean) / (math.sqrt(2) * cfg.p_std))
    p = np.diff(cdf)
    return p / p.sum()


@dataclass(frozen=True)
class _Grids:
    """The curriculum as device tables: step → row; row → padded σ grid and interval CDF."""

    row_of_step: object
    sigmas: object
    cdf: object
    n_steps: int


def curriculum_tables(bk, cfg: Config, total_steps: int) -> _Grids:
    """One row per distinct grid size, so a compiled step looks its grid up by index."""
    n_of_step = n_schedule(cfg, total_steps)
    sizes, row_of_step = np.unique(n_of_step, return_inverse=True)
    width = int(sizes.max())
    sigmas = np.zeros((len(sizes), width))
    cdf = np.ones((len(sizes), width - 1))
    for r, n in enumerate(sizes):
        grid = karras_sigmas(int(n), cfg.sigma_min, cfg.sigma_max, cfg.rho)
        sigmas[r] = np.concatenate([grid, np.full(width - n, grid[-1])])
        cdf[r, : n - 1] = np.cumsum(index_probabilities(cfg, grid))
        cdf[r, n - 2:] = 1.0
    return _Grids(bk.from_numpy(row_of_step.astype(np.int64)), bk.from_numpy(sigmas), bk.from_numpy(cdf),
                  len(n_of_step))


def draw_intervals(bk, grids: _Grids, key, n: int, step):
    """``(σ_i, σ_{i+1})`` per row for training step ``step``: an interval of that step's grid."""
    xp = bk.xp
    row = grids.row_of_step[xp.clip(xp.asarray(step), 0, grids.n_steps - 1)]
    u = bk.uniform(key, (n,))
    i = xp.sum(grids.cdf[row][None, :] < u[:, None], axis=1)
    sig = grids.sigmas[row]
    return sig[i], sig[i + 1]


def distance(bk, cfg: Config, a, b):
    """Per-row distance: mean squared error, or pseudo-Huber ``√(‖a − b‖² + c²) − c``."""
    xp = bk.xp
    sq = xp.sum(((a - b) ** 2).reshape((a.shape[0], -1)), axis=1)
    dim = math.prod(a.shape[1:])
    if cfg.distance == "l2":
        return sq / dim
    c = PSEUDO_HUBER_C * math.sqrt(dim) * cfg.sigma_data / IMAGE_SIGMA_DATA
    return xp.sqrt(sq + c**2) - c


def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """What one loss evaluation draws and reads off the step: the noise, the label-dropout mask, and
    the interval ``(σ_i, σ_{i+1})`` of the step's grid (discrete), or the TrigFlow time τ and the
    tangent warmup factor (continuous)."""
    xp, x0 = bk.xp, batch["x"]
    n = x0.shape[0]
    k_t, k_n, k_y = bk.split(key, 3)
    draws = {"noise": bk.normal(k_n, tuple(x0.shape))}
    if cfg.parameterisation == "trig":
        # τ is a signal-to-noise angle (tan τ = σ/σ_d), so sCM's image distribution carries over unchanged
        p = cfg.p_mean + cfg.p_std * bk.normal(k_t, (n,))
        draws["tau"] = xp.arctan(xp.exp(p) / IMAGE_SIGMA_DATA)
        warmup_steps = cfg.warmup_fraction * total_steps
        draws["warmup"] = (xp.clip(xp.asarray(step + 1, dtype=x0.dtype) / warmup_steps, 0.0, 1.0)
                           if warmup_steps > 0 else xp.ones((), dtype=x0.dtype))
    else:
        grids = bk.cached(curriculum_tables, bk, cfg, total_steps)
        draws["sigma_lo"], draws["sigma_hi"] = draw_intervals(bk, grids, k_t, n, step)
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def discrete_loss(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """CD / CT / iCT: ``λ(σ_i, σ_{i+1})·d(f_θ(z_{t_{i+1}}, t_{i+1}), sg f_θ⁻(z_{t_i}, t_i))``."""
    x0, noise, s_lo, s_hi = batch["x"], draws["noise"], draws["sigma_lo"], draws["sigma_hi"]
    t_lo, t_hi = t_from_sigma(s_lo), t_from_sigma(s_hi)
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    z_hi = LINEAR.sample(bk.xp, x0, noise, t_hi)
    if teacher is None:
        z_lo = LINEAR.sample(bk.xp, x0, noise, t_lo)  # CT: the same noise one grid step cleaner
    else:
        z_lo = bk.stop_gradient(ode_step(teacher, z_hi, t_hi, t_lo, y, "heun"))  # one teacher Heun step
    f_lo = consistency(bk, target if cfg.target == "ema" else model, cfg, z_lo, t_lo, y)
    if cfg.target != "unstopped":
        f_lo = bk.stop_gradient(f_lo)
    d = distance(bk, cfg, consistency(bk, model, cfg, z_hi, t_hi, y), f_lo)
    weight = 1 / (s_hi - s_lo) if cfg.weighting == "inv_dsigma" else bk.xp.ones_like(d)
    loss = bk.xp.mean(weight * d)
    return loss, {"distance": bk.xp.mean(d), "sigma_gap": bk.xp.mean(s_hi - s_lo)}


# -- continuous time (TrigFlow) -------------------------------------------------------------
def trig_network(bk, model, cfg: Config, y):
    """``(x_τ/σ_d, τ) ↦ F_θ(x_τ/σ_d, τ)``: the network in TrigFlow variables (see ``network_time``)."""
    def F(x_in, tau):
        return model(x_in, (tau / EMBEDDING_TIME_SCALE)[:, None], y)
    return F


def trig_velocity(bk, cfg: Config, teacher, x_tau, tau, y):
    """``dx_τ/dτ`` along a teacher's ODE given in the book's time:
    ``(σ_d cos τ − sin τ)·z_t + σ_d·v(z_t, t)/a(τ)`` with ``z_t = x_τ/a(τ)``."""
    xp, sd = bk.xp, cfg.sigma_data
    a = expand(trigflow_scale(xp, tau, sd), x_tau)
    z = x_tau / a
    lead = expand(sd * xp.cos(tau) - xp.sin(tau), x_tau)
    return lead * z + sd * teacher(z, t_from_tau(xp, tau, sd), y) / a


def trig_tangent(bk, cfg: Config, model, x_tau, dx_dtau, tau, y, warmup):
    """``(F, g)``: the network ``F_θ(x_τ/σ_d, τ)`` (with its gradient) and the sCM tangent
    ``g = −cos²τ·(σ_d F⁻ − dx/dτ) − r·cos τ sin τ·(x_τ + σ_d dF⁻/dτ)`` with ``F⁻ = sg(F)``, which is
    ``cos τ·df⁻/dτ`` at ``r = 1`` (``r`` is the warmup factor).  One JVP gives both; its tangents
    are scaled by ``cos τ sin τ``."""
    xp, sd = bk.xp, cfg.sigma_data
    cs = xp.cos(tau) * xp.sin(tau)
    F, dF = bk.jvp(trig_network(bk, model, cfg, y), (x_tau / sd, tau),
                   (expand(cs, x_tau) * dx_dtau / sd, cs))  # dF = cos τ sin τ · dF⁻/dτ, under stop-gradient
    cos = expand(xp.cos(tau), x_tau)
    g = -(cos**2) * (sd * bk.stop_gradient(F) - dx_dtau) - warmup * (expand(cs, x_tau) * x_tau + sd * dF)
    return F, g


def continuous_loss(bk, cfg: Config, model, batch: dict, draws: dict, teacher=None):
    """sCT / sCD: ``e^{w(τ)}/D·‖F_θ(x_τ/σ_d, τ) − F⁻ − g/(‖g‖ + c)‖² − w(τ)`` at
    ``x_τ = cos τ·x0 + sin τ·σ_d·ε``, with the network's learned weight ``w(τ)`` (``weighting =
    "adaptive"``, outside the JVP) or ``w = 0`` (``"uniform"``)."""
    xp, sd = bk.xp, cfg.sigma_data
    x0, noise, tau = batch["x"], draws["noise"], draws["tau"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    cos, sin = expand(xp.cos(tau), x0), expand(xp.sin(tau), x0)
    x_tau = cos * x0 + sin * sd * noise
    if teacher is None:
        dx_dtau = cos * sd * noise - sin * x0  # sCT: the conditional velocity in TrigFlow time
    else:
        dx_dtau = bk.stop_gradient(trig_velocity(bk, cfg, teacher, x_tau, tau, y))
    F, g = trig_tangent(bk, cfg, model, x_tau, dx_dtau, tau, y, draws["warmup"])
    norm = xp.sqrt(xp.sum((g**2).reshape((g.shape[0], -1)), axis=1))
    g = g / (expand(norm, g) + cfg.tangent_norm)
    err = F - bk.stop_gradient(F) - g
    sq = xp.mean((err**2).reshape((err.shape[0], -1)), axis=1)  # ‖·‖²/D per row
    if cfg.weighting == "uniform":
        return xp.mean(sq), {"tangent_norm": xp.mean(norm)}
    if not model.cfg.log_weight_head:
        raise ValueError("weighting 'adaptive' needs a network with log_weight_head=True (the learned w(τ)); "
                         "build the model from presets.run_preset or use weighting='uniform'")
    w = model.log_weight((tau / EMBEDDING_TIME_SCALE)[:, None])
    return xp.mean(xp.exp(w) * sq - w), {"tangent_norm": xp.mean(norm), "mse": xp.mean(sq), "log_weight": xp.mean(w)}


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """The variant's loss for given draws (see ``draw``)."""
    if cfg.parameterisation == "trig":
        return continuous_loss(bk, cfg, model, batch, draws, teacher)
    return discrete_loss(bk, cfg, model, target, batch, draws, teacher)


# -- sampling -------------------------------------------------------------------------------
def sampling_times(cfg: Config, steps: int) -> np.ndarray:
    """The ``steps`` times the multistep sampler evaluates f at, from ``t_max`` down: the
    EDM grid of ``steps + 1`` levels without ``σ_min`` (edm), or equal steps in τ (trig)."""
    steps = check_steps(steps)
    if cfg.parameterisation == "trig":
        tau = 0.5 * np.pi * (1 - np.arange(steps) / steps)
        return t_from_tau(np, tau, cfg.sigma_data)
    return t_from_sigma(karras_sigmas(steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho)[::-1][:steps])


def sample(bk, cfg: Config, model, x1, steps: int, key, y=None):
    """Multistep consistency sampling: ``x = f(t_0·x1, t_0)``, then for each later time
    renoise ``z = (1 − t_k)·x + t_k·ε_k`` (ε_k from ``key``) and jump again.  One step is ``f(t_max·x1, t_max)``."""
    times = sampling_times(cfg, steps)
    f = bk.inference(consistency)
    keys = bk.split(key, len(times))
    x = f(bk, model, cfg, float(times[0]) * x1, bk.from_numpy(np.asarray(times[0])), y)
    for t, k in zip(map(float, times[1:]), keys[1:]):
        x = f(bk, model, cfg, (1 - t) * x + t * bk.normal(k, tuple(x1.shape)), bk.from_numpy(np.asarray(t)), y)
    return x
