"""Flow Matching on the linear path, written once for both backends.

Loss: ``E ‖v_θ(z_t, t) − (x1 − x0)‖²`` with ``z_t = (1 − t)x0 + t·x1``; its minimiser is
the marginal velocity ``E[x1 − x0 | z_t]``.  Sampling integrates ``dz/dt = v_θ`` from
t = 1 (noise) down to t = 0 (data) with the ODE solvers of ``onestep.sample``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..paths import LINEAR
from ..sample import integrate
from ..times import sample_times


@dataclass(frozen=True)
class FMConfig:
    """Hyper-parameters of the FM objective (values per scale live in ``presets``)."""

    time_sampler: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    label_dropout: float = 0.0  # fraction of rows trained unconditionally (for guidance)


N_COND = 1  # the network sees one time


def draw(bk, key, batch: dict, cfg: FMConfig) -> dict:
    """The random part of one loss evaluation: times, noise and label-dropout mask."""
    x0 = batch["x"]
    k_t, k_x, k_y = bk.split(key, 3)
    draws = {"t": sample_times(bk, k_t, x0.shape[0], cfg.time_sampler, cfg.time_mean, cfg.time_std),
             "x1": bk.normal(k_x, tuple(x0.shape))}
    return {**draws, **label_dropout(bk, k_y, batch, cfg.label_dropout)}


def label_dropout(bk, key, batch: dict, rate: float) -> dict:
    """``{"drop": mask}`` marking the rows trained without their label (classifier-free guidance);
    empty for unlabelled data."""
    y = batch.get("y")
    return {} if y is None else {"drop": bk.uniform(key, (y.shape[0],)) < rate}


def condition_labels(bk, model, y, drop=None):
    """Labels with dropped rows replaced by the model's "no label" class."""
    if y is None or drop is None:
        return y
    return bk.xp.where(drop, model.cfg.n_classes, y)


def velocity(bk, model, z, t, y=None):
    """``v_θ(z, t)``; ``t`` is a scalar array or one time per row."""
    t = bk.xp.broadcast_to(t, (z.shape[0],))
    return model(z, t[:, None], y)


def loss_from_draws(bk, model, batch: dict, draws: dict):
    """Mean squared error to the conditional velocity (mean over rows and dimensions)."""
    x0, x1, t = batch["x"], draws["x1"], draws["t"]
    y = condition_labels(bk, model, batch.get("y"), draws.get("drop"))
    err = velocity(bk, model, LINEAR.sample(bk.xp, x0, x1, t), t, y) - LINEAR.velocity(bk.xp, x0, x1, t)
    loss = bk.xp.mean(err ** 2)
    return loss, {"mse": loss}


def make_loss(bk, cfg: FMConfig, teacher=None):
    """The training loss ``(model, ema, batch, key, step) -> (loss, aux)``; FM ignores the EMA."""
    if teacher is not None:
        raise ValueError("flow matching learns from data; it takes no teacher")
    def loss_fn(model, ema, batch, key, step):
        return loss_from_draws(bk, model, batch, draw(bk, key, batch, cfg))
    return loss_fn


def guided_velocity(bk, model, z, t, y=None, guidance: float = 1.0):
    """Classifier-free guidance ``v_∅ + w·(v_y − v_∅)``; ``w = 1`` is the plain conditional field."""
    v = velocity(bk, model, z, t, y)
    if y is None or guidance == 1.0:
        return v
    v_null = velocity(bk, model, z, t, bk.xp.full_like(y, model.cfg.n_classes))
    return v_null + guidance * (v - v_null)


def generate(bk, model, x1, steps: int, solver: str = "heun", y=None, guidance: float = 1.0):
    """Samples from noise ``x1`` by solving the learned ODE from t = 1 to t = 0."""
    return integrate(bk, model, guided_velocity, x1, steps, solver, y=y, guidance=guidance)


VARIANTS = ("fm",)
EVAL_STEPS = 32


def ema_decay(cfg: FMConfig, default: float) -> float:
    """FM keeps the preset's constant EMA decay."""
    return default


def sample(bk, model, cfg: FMConfig, x1, steps: int, y=None, solver: str | None = None, seed: int = 0):
    """The method protocol's sampler: ``steps`` ODE steps (Heun unless ``solver`` says otherwise);
    deterministic, so ``seed`` is unused."""
    return generate(bk, model, x1, steps, solver or "heun", y=y)
