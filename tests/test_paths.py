"""The interpolation paths: end points, velocities as JVPs of the path, the conditional average
velocity's closed form against the chord and through its r → t limit, in numpy, torch and JAX."""
import math

import numpy as np
import pytest
from parity import backend64

from onestep.paths import COSINE, LINEAR, PATHS, get_path

BACKENDS = ("torch", "jax")


def draws(n=64, seed=0):
    """Data and noise ``(n, 3)`` and times ``(n,)`` in (0, 1)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)) * 2, rng.standard_normal((n, 3)), rng.uniform(0.01, 0.99, n)


def test_linear_path_is_the_book_formula():
    x0, x1, t = draws()
    r = t * np.random.default_rng(1).uniform(size=len(t))
    np.testing.assert_array_equal(LINEAR.sample(np, x0, x1, t), (1 - t)[:, None] * x0 + t[:, None] * x1)
    np.testing.assert_array_equal(LINEAR.velocity(np, x0, x1, t), x1 - x0)
    np.testing.assert_array_equal(LINEAR.average_velocity(np, x0, x1, r, t), x1 - x0)
    np.testing.assert_array_equal(LINEAR.average_velocity(np, x0, x1, t, t), x1 - x0)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_end_points(path):
    """z_0 = x0 (data) and z_1 = x1 (noise); cos(π/2) is 6e-17 in float64, hence the atol."""
    x0, x1, t = draws()
    np.testing.assert_allclose(path.sample(np, x0, x1, 0 * t), x0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(path.sample(np, x0, x1, 0 * t + 1), x1, rtol=0, atol=1e-15)


def test_cosine_path_coefficients():
    """a = cos(πt/2), b = sin(πt/2): variance preserving, a' = -(π/2) b, b' = (π/2) a."""
    t = np.linspace(0, 1, 11)
    a, b = COSINE.coefficients(np, t)
    da, db = COSINE.derivatives(np, t)
    np.testing.assert_allclose(a**2 + b**2, 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(a[[0, 5, 10]], [1.0, math.sqrt(0.5), 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(da, -(math.pi / 2) * b, rtol=0, atol=1e-15)
    np.testing.assert_allclose(db, (math.pi / 2) * a, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_velocity_is_the_time_derivative_of_the_path(backend, path):
    """``velocity`` (from ``derivatives``) equals the backend's JVP of ``sample`` (from ``coefficients``) in t."""
    bk = backend64(backend)
    x0, x1, t = draws()
    X0, X1, T = bk.from_numpy(x0), bk.from_numpy(x1), bk.from_numpy(t)
    z, dz_dt = bk.jvp(lambda s: path.sample(bk.xp, X0, X1, s), (T,), (bk.xp.ones_like(T),))
    np.testing.assert_allclose(bk.to_numpy(z), path.sample(np, x0, x1, t), rtol=0, atol=1e-15)
    np.testing.assert_allclose(bk.to_numpy(dz_dt), path.velocity(np, x0, x1, t), rtol=0, atol=1e-14)
    np.testing.assert_allclose(bk.to_numpy(path.velocity(bk.xp, X0, X1, T)), path.velocity(np, x0, x1, t),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_average_velocity_is_the_chord(path):
    """``(z_t - z_r)/(t - r)`` directly, for gaps of at least 0.05 (cancellation error below 1e-13),
    with r below and above t."""
    x0, x1, t = draws()
    r = np.random.default_rng(2).uniform(size=len(t))
    keep = np.abs(t - r) >= 0.05
    x0, x1, t, r = x0[keep], x1[keep], t[keep], r[keep]
    assert keep.sum() > 50 and (r > t).any() and (r < t).any()
    chord = (path.sample(np, x0, x1, t) - path.sample(np, x0, x1, r)) / (t - r)[:, None]
    np.testing.assert_allclose(path.average_velocity(np, x0, x1, r, t), chord, rtol=0, atol=1e-13)
    if path is COSINE:  # far from the velocity at t: the closed form has work to do
        assert np.median(np.linalg.norm(chord - path.velocity(np, x0, x1, t), axis=1)) > 0.3


def test_cosine_average_velocity_near_and_at_r_equals_t():
    """At r = t the closed form is exactly the velocity; at a gap ε it is within the chord's
    cancellation error (~1e-16 |z| / ε) of the chord, and moves off the velocity linearly in ε:
    ``u(t - ε, t) ≈ v(t - ε/2) ≈ v(t) - (ε/2) z''(t)`` with ``z'' = -(π/2)² z`` on this path."""
    x0, x1, t = draws()
    np.testing.assert_array_equal(COSINE.average_velocity(np, x0, x1, t, t), COSINE.velocity(np, x0, x1, t))
    v, z = COSINE.velocity(np, x0, x1, t), COSINE.sample(np, x0, x1, t)
    for eps in [1e-3, 1e-5]:
        r = t - eps
        u = COSINE.average_velocity(np, x0, x1, r, t)
        chord = (z - COSINE.sample(np, x0, x1, r)) / eps
        np.testing.assert_allclose(u, chord, rtol=0, atol=4 * np.finfo(float).eps * np.abs(z).max() / eps)
        np.testing.assert_allclose((u - v) / eps, (math.pi**2 / 8) * z, rtol=0, atol=eps * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_average_velocity_is_smooth_through_r_equals_t(backend, path):
    """The backend's JVP in r at r = t is finite and equals z''(t)/2 (cosine: -(π²/8) z_t; linear: 0)."""
    bk = backend64(backend)
    x0, x1, t = draws()
    X0, X1, T = bk.from_numpy(x0), bk.from_numpy(x1), bk.from_numpy(t)
    u, du_dr = bk.jvp(lambda s: path.average_velocity(bk.xp, X0, X1, s, T), (T,), (bk.xp.ones_like(T),))
    np.testing.assert_allclose(bk.to_numpy(u), path.velocity(np, x0, x1, t), rtol=0, atol=1e-15)
    half_acceleration = -(math.pi**2 / 8) * path.sample(np, x0, x1, t) if path is COSINE else 0 * x0
    np.testing.assert_allclose(bk.to_numpy(du_dr), half_acceleration, rtol=0, atol=1e-13)


def test_get_path():
    assert get_path("linear") is LINEAR and get_path("cosine") is COSINE
    assert set(PATHS) == {"linear", "cosine"}
    with pytest.raises(ValueError, match=r"unknown path 'quadratic'; accepted: linear, cosine"):
        get_path("quadratic")
