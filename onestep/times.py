"""Training-time samplers and sampling-time grids (written once for both backends)."""
from __future__ import annotations

import numpy as np

TIME_SAMPLERS = ("uniform", "logit_normal")


def sample_times(bk, key, n: int, sampler: str = "uniform", mean: float = 0.0, std: float = 1.0):
    """``n`` times in (0, 1): uniform, or logit-normal ``sigmoid(mean + std·ε)``.

    In our orientation (noise at t = 1) a positive ``mean`` puts more weight near noise;
    a paper with noise at t = 0 uses the opposite sign for the same distribution.
    """
    if sampler == "uniform":
        return bk.uniform(key, (n,))
    if sampler == "logit_normal":
        e = bk.normal(key, (n,))
        return 1 / (1 + bk.xp.exp(-(mean + std * e)))
    raise ValueError(f"unknown time sampler {sampler!r}; accepted: {', '.join(TIME_SAMPLERS)}")


def uniform_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> np.ndarray:
    """``steps + 1`` equally spaced times from ``t_start`` down to ``t_end``."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"number of steps must be a positive integer, got {steps!r}")
    return np.linspace(t_start, t_end, int(steps) + 1)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The EDM/CM grid of ``n ≥ 2`` noise levels, ascending from ``sigma_min`` to ``sigma_max``:
    ``σ_i = (σ_min^{1/ρ} + i/(n − 1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ``."""
    if int(n) != n or n < 2:
        raise ValueError(f"a noise grid needs at least 2 levels, got {n!r}")
    i = np.arange(int(n)) / (int(n) - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
