"""The book's single time convention and the papers' time variables (EDM σ, TrigFlow τ)."""
from __future__ import annotations

import numpy as np

from onestep import conventions


def test_sigma_and_t_are_inverse_and_describe_the_linear_path():
    t = np.linspace(0.0, 0.99, 50)
    sigma = conventions.sigma_from_t(t)
    assert np.allclose(conventions.t_from_sigma(sigma), t, rtol=0, atol=1e-14)
    # z_t / (1 - t) = x0 + sigma * x1: the EDM variance-exploding form of the same point
    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    z = (1 - t)[:, None] * x0 + t[:, None] * x1
    assert np.allclose(conventions.edm_point(z, t[:, None]), x0 + sigma[:, None] * x1, atol=1e-12)
    assert np.isclose(conventions.sigma_from_t(conventions.T_MAX), conventions.EDM_SIGMA_MAX)
    assert np.isclose(conventions.sigma_from_t(conventions.T_MIN), conventions.EDM_SIGMA_MIN)


def test_trigflow_time_has_the_same_noise_to_signal_ratio():
    sd = 0.7
    t = np.linspace(0.0, 1.0, 41)
    tau = conventions.tau_from_t(np, t, sd)
    assert np.allclose(conventions.t_from_tau(np, tau, sd), t, rtol=0, atol=1e-14)
    assert tau[0] == 0 and np.isclose(tau[-1], np.pi / 2)
    inner = slice(1, -1)
    assert np.allclose(sd * np.tan(tau[inner]), conventions.sigma_from_t(t[inner]), rtol=1e-12)
    # x_τ = cos τ·x0 + sin τ·σ_d·x1 is a(τ)·z_t
    rng = np.random.default_rng(1)
    x0, x1 = rng.normal(size=(41, 2)), rng.normal(size=(41, 2))
    z = (1 - t)[:, None] * x0 + t[:, None] * x1
    x_tau = np.cos(tau)[:, None] * x0 + np.sin(tau)[:, None] * sd * x1
    assert np.allclose(conventions.trigflow_scale(np, tau, sd)[:, None] * z, x_tau, atol=1e-12)
