"""Flow Matching on the linear path (Lipman et al. 2023), written once for both backends.

Loss: ``E ‖v_θ(z_t, t) − (x1 − x0)‖²`` with ``z_t = (1 − t)x0 + t·x1``; its minimiser is
the marginal velocity ``E[x1 − x0 | z_t]``.  Sampling integrates ``dz/dt = v_θ`` from
t = 1 (noise) down to t = 0 (data) with the ODE solvers of ``onestep.ode``.

Departures from Lipman et al. (Chapter 1's box): their path runs from noise at 0 to data at 1 with
target ``x_data − (1 − σ_min)·x_noise``; with ``t ↦ 1 − t`` and σ_min = 0 it is our path, whose
derivative is ``x_noise − x_data = x1 − x0``.  Fixed-step Euler/Heun instead of an adaptive solver;
optional label dropout for guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ode import check_solver, integrate
from ..paths import LINEAR
from ..times import TIME_SAMPLERS, sample_times
from .flowmap import condition_labels, label_dropout, per_row

VARIANTS = ("fm",)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of the FM objective (deviations per scale live in ``presets``)."""

    time_sampler: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    label_dropout: float = 0.0  # fraction of rows trained unconditionally (for guidance)

    def __post_init__(self):
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time_sampler {self.time_sampler!r}; accepted: {', '.join(TIME_SAMPLERS)}")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout!r}")


def needs_teacher(cfg: Config) -> bool:
    return False


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: one time, t."""
    return 1


def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation: times ``t`` (n,), noise ``x1`` and the label-dropout mask."""
    x0 = batch["x"]
    k_t, k_x, k_y = bk.split(key, 3)
    draws = {"t": sample_times(bk, k_t, x0.shape[0], cfg.time_sampler, cfg.time_mean, cfg.time_std),
             "x1": bk.normal(k_x, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def velocity(bk, model, z, t, y=None):
    """``v_θ(z, t)``; ``t`` is a 0-d array or one time per row."""
    return model(z, per_row(bk, t, z)[:, None], y)


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Mean squared error to the conditional velocity (mean over rows and dimensions)."""
    x0, x1, t = batch["x"], draws["x1"], draws["t"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    err = velocity(bk, model, LINEAR.sample(bk.xp, x0, x1, t), t, y) - LINEAR.velocity(bk.xp, x0, x1, t)
    loss = bk.xp.mean(err ** 2)
    return loss, {"mse": loss}


def guided_velocity(bk, model, z, t, y=None, guidance: float = 1.0):
    """Classifier-free guidance ``v_∅ + w·(v_y − v_∅)``; ``w = 1`` is the plain conditional field."""
    v = velocity(bk, model, z, t, y)
    if y is None or guidance == 1.0:
        return v
    v_null = velocity(bk, model, z, t, bk.xp.full_like(y, model.cfg.n_classes))
    return v_null + guidance * (v - v_null)


def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, solver: str = "heun", guidance: float = 1.0):
    """Samples from noise ``x1`` by solving the learned ODE from t = 1 to t = 0 in ``steps`` steps of
    ``solver``; deterministic, so ``key`` is unused."""
    return integrate(bk, model, guided_velocity, x1, steps, check_solver(solver), y=y, guidance=guidance)
