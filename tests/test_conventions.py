"""The adapters from the papers' notations to the book's single time convention."""
from __future__ import annotations

import numpy as np

from onestep import conventions
from onestep.analytic import eight_gaussians


def test_sigma_and_t_are_inverse_and_describe_the_linear_path():
    t = np.linspace(0.0, 0.99, 50)
    sigma = conventions.sigma_from_t(t)
    assert np.allclose(conventions.t_from_sigma(sigma), t, rtol=0, atol=1e-14)
    # z_t / (1 - t) = x0 + sigma * x1: the EDM variance-exploding form of the same point
    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    z = (1 - t)[:, None] * x0 + t[:, None] * x1
    assert np.allclose(z / (1 - t)[:, None], x0 + sigma[:, None] * x1, atol=1e-12)
    assert np.isclose(conventions.sigma_from_t(conventions.T_MAX), conventions.EDM_SIGMA_MAX)
    assert np.isclose(conventions.sigma_from_t(conventions.T_MIN), conventions.EDM_SIGMA_MIN)


def test_noise_at_zero_papers_flip_time_and_velocity():
    """A path written with noise at tau = 0 is the same path run backwards: v = -v_paper."""
    rng = np.random.default_rng(1)
    x0, x1, tau = rng.normal(size=3), rng.normal(size=3), 0.3
    v_paper = x0 - x1  # d/dtau of tau*x0 + (1 - tau)*x1, the noise-at-0 path
    t, v = conventions.from_noise_at_zero(tau, v_paper)
    assert np.isclose(t, 0.7) and np.allclose(v, x1 - x0)
    assert conventions.logit_normal_mean_in_our_orientation(-0.4) == 0.4


def test_flow_map_from_average_velocity_is_the_exact_map():
    gmm = eight_gaussians()
    z = np.random.default_rng(2).normal(size=(20, 2))
    u = gmm.average_velocity(z, 0.2, 0.9)
    assert np.allclose(conventions.flow_map_from_average_velocity(z, u, 0.9, 0.2), gmm.flow_map(z, 0.9, 0.2),
                       atol=1e-10)
