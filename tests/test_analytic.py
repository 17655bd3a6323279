"""Checks of the exact oracles in onestep.analytic against independent computations, on the
linear and the cosine path; the backend-array RK4 flow map against DOP853 and through ``bk.jvp``."""

import numpy as np
import pytest
from parity import backend64
from scipy.integrate import solve_ivp
from scipy.linalg import sqrtm
from scipy.stats import multivariate_normal

from onestep.analytic import (
    RK4_STEPS,
    Gaussian,
    GaussianMixture,
    clusters,
    eight_gaussians,
    exact_average_velocity,
    exact_flow_map,
    exact_teacher,
    mixture_average_velocity,
    mixture_flow_map,
    mixture_velocity,
    w2_gaussians,
)
from onestep.paths import COSINE, LINEAR, PATHS

ON_PATHS = pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)


def coefficients(path, t):
    """``(a, b, a', b')`` of ``path`` at a scalar time, as floats."""
    t = np.array(float(t))
    return tuple(float(c) for c in (*path.coefficients(np, t), *path.derivatives(np, t)))


def random_spd(d, seed):
    """A random well-conditioned symmetric positive definite matrix."""
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


def random_gaussian(d, seed, path=LINEAR):
    mean = np.random.default_rng(seed + 100).standard_normal(d)
    return Gaussian(mean, random_spd(d, seed), path=path)


def uneven_mixture(path=LINEAR):
    """Three well-separated 2-D components with unequal weights and stds."""
    return GaussianMixture([[3.0, 0.0], [-2.0, 2.0], [-1.0, -3.0]], [0.3, 0.5, 0.2], [0.2, 0.3, 0.5], path=path)


def ode_solve(velocity, z, t, r):
    """Reference flow map: one tight DOP853 solve per row in the original time variable."""
    out = []
    for zi, ti, ri in zip(z, np.broadcast_to(t, len(z)), np.broadcast_to(r, len(z))):
        sol = solve_ivp(lambda s, y: velocity(y[None], s)[0], (ti, ri), zi,
                        method="DOP853", rtol=1e-13, atol=1e-13)
        out.append(sol.y[:, -1])
    return np.array(out)


# --------------------------------------------------------------------------- Gaussian


@ON_PATHS
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_gaussian_velocity_is_schur_complement_posterior_mean(d, t, path):
    """E[a' x0 + b' x1 | z_t] from the joint Gaussian of (x0, x1) with generic linear algebra."""
    g = random_gaussian(d, seed=d, path=path)
    a, b, da, db = coefficients(path, t)
    eye = np.eye(d)
    joint_mean = np.concatenate([g.mean, np.zeros(d)])
    joint_cov = np.block([[g.cov, np.zeros((d, d))], [np.zeros((d, d)), eye]])
    to_z = np.hstack([a * eye, b * eye])
    to_y = np.hstack([da * eye, db * eye])
    cov_zz = to_z @ joint_cov @ to_z.T
    cov_yz = to_y @ joint_cov @ to_z.T
    z = np.random.default_rng(1).standard_normal((5, d)) * 2
    expected = to_y @ joint_mean + np.linalg.solve(cov_zz, (z - to_z @ joint_mean).T).T @ cov_yz.T
    np.testing.assert_allclose(g.velocity(z, t), expected, rtol=1e-11, atol=1e-11)


def test_gaussian_velocity_matches_monte_carlo_regression():
    """E[x1 - x0 | z_t] is affine in z; least squares on samples recovers it to sampling error."""
    g = random_gaussian(2, seed=7)
    t, n = 0.4, 200_000
    rng = np.random.default_rng(2)
    x0, x1 = g.sample(n, seed=3), rng.standard_normal((n, 2))
    z = (1 - t) * x0 + t * x1
    design = np.hstack([np.ones((n, 1)), z])
    coef, *_ = np.linalg.lstsq(design, x1 - x0, rcond=None)
    probe = np.array([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]])
    mc = np.hstack([np.ones((3, 1)), probe]) @ coef
    np.testing.assert_allclose(mc, g.velocity(probe, t), atol=0.02)


@ON_PATHS
@pytest.mark.parametrize("make", [lambda p: random_gaussian(2, seed=3, path=p), uneven_mixture],
                         ids=["gaussian", "mixture"])
def test_velocity_at_the_endpoints(make, path):
    """At t = 0, z = x0 and E[x1 | z] = 0: v = a'(0) z (linear: -z; cosine: 0).  At t = 1,
    z = x1 and E[x0 | z] = E[x0]: v = a'(1) E[x0] + b'(1) z (linear: z - E[x0]; cosine: -(π/2) E[x0])."""
    dist = make(path)
    z = np.random.default_rng(0).standard_normal((6, 2))
    data_mean = dist.mean if isinstance(dist, Gaussian) else dist.weights @ dist.means
    _, _, da0, _ = coefficients(path, 0.0)
    _, _, da1, db1 = coefficients(path, 1.0)
    np.testing.assert_allclose(dist.velocity(z, 0.0), da0 * z, atol=1e-12)
    np.testing.assert_allclose(dist.velocity(z, 1.0), db1 * z + da1 * data_mean, atol=1e-12)


@ON_PATHS
def test_gaussian_flow_map_matches_ode_solve(path):
    """The closed form m_r + S_r^{1/2} S_t^{-1/2} (z - m_t) (the S_t commute on any path) against DOP853."""
    g = random_gaussian(3, seed=4, path=path)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((6, 3))
    t = np.array([1.0, 1.0, 0.7, 0.2, 0.0, 0.5])
    r = np.array([0.0, 0.3, 0.1, 0.9, 1.0, 0.5])
    np.testing.assert_allclose(g.flow_map(z, t, r), ode_solve(g.velocity, z, t, r), atol=1e-8, rtol=0)


def test_gaussian_noise_pushforward_is_the_data():
    """Phi_{1->0} is affine, x -> mu + A x with A A^T = Sigma, and maps N(0, I) samples onto N(mu, Sigma)."""
    g = random_gaussian(3, seed=8)
    rng = np.random.default_rng(9)
    origin = g.flow_map(np.zeros((1, 3)), 1.0, 0.0)[0]
    np.testing.assert_allclose(origin, g.mean, atol=1e-12)
    a = (g.flow_map(np.eye(3), 1.0, 0.0) - origin).T  # columns: images of the basis vectors
    np.testing.assert_allclose(a @ a.T, g.cov, atol=1e-12)
    x, y = rng.standard_normal((2, 4, 3))
    combo = g.flow_map(2.0 * x - 0.5 * y, 1.0, 0.0) - origin
    np.testing.assert_allclose(combo, 2.0 * (g.flow_map(x, 1.0, 0.0) - origin)
                               - 0.5 * (g.flow_map(y, 1.0, 0.0) - origin), atol=1e-12)

    n = 200_000
    mapped = g.flow_map(rng.standard_normal((n, 3)), 1.0, 0.0)
    var = np.diag(g.cov)
    assert np.all(np.abs(mapped.mean(0) - g.mean) < 5 * np.sqrt(var / n))
    cov_se = np.sqrt((np.outer(var, var) + g.cov**2) / n)
    assert np.all(np.abs(np.cov(mapped.T) - g.cov) < 5 * cov_se)


@ON_PATHS
def test_gaussian_sample_and_log_prob(path):
    g = random_gaussian(2, seed=10, path=path)
    x = g.sample(100_000, seed=11)
    np.testing.assert_array_equal(x, g.sample(100_000, seed=11))
    assert np.all(np.abs(x.mean(0) - g.mean) < 5 * np.sqrt(np.diag(g.cov) / len(x)))
    np.testing.assert_allclose(g.log_prob(x[:50]), multivariate_normal(g.mean, g.cov).logpdf(x[:50]), rtol=1e-12)
    t = 0.35
    a, b, _, _ = coefficients(path, t)
    s_t = a**2 * g.cov + b**2 * np.eye(2)
    np.testing.assert_allclose(g.marginal_log_prob(x[:50], t),
                               multivariate_normal(a * g.mean, s_t).logpdf(x[:50]), rtol=1e-12)


# --------------------------------------------------------------------------- both classes


@ON_PATHS
@pytest.mark.parametrize("make", [lambda p: random_gaussian(3, seed=12, path=p), eight_gaussians],
                         ids=["gaussian", "mixture"])
def test_flow_map_semigroup(make, path):
    """Phi_{u->r} o Phi_{t->u} = Phi_{t->r}, with u inside and outside [r, t], and per-row times."""
    dist = make(path)
    z = np.random.default_rng(13).standard_normal((40, dist.dim)) * 1.5
    for t, u, r in [(1.0, 0.4, 0.0), (0.9, 0.3, 0.05), (0.2, 0.8, 0.5)]:
        np.testing.assert_allclose(dist.flow_map(dist.flow_map(z, t, u), u, r), dist.flow_map(z, t, r),
                                   atol=1e-8, rtol=0)
    rng = np.random.default_rng(14)
    t, u, r = rng.uniform(0, 1, (3, len(z)))
    np.testing.assert_allclose(dist.flow_map(dist.flow_map(z, t, u), u, r), dist.flow_map(z, t, r),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("dist", [random_gaussian(2, seed=15), uneven_mixture()], ids=["gaussian", "mixture"])
def test_flow_map_is_identity_at_equal_times(dist):
    z = np.random.default_rng(16).standard_normal((5, 2))
    np.testing.assert_array_equal(dist.flow_map(z, 0.3, 0.3), z)
    out = dist.flow_map(z, np.array([0.3, 0.5, 1.0, 0.0, 0.2]), np.array([0.3, 0.1, 1.0, 0.0, 0.9]))
    np.testing.assert_array_equal(out[[0, 2, 3]], z[[0, 2, 3]])
    assert np.all(np.abs(out[[1, 4]] - z[[1, 4]]).sum(1) > 1e-3)


@ON_PATHS
@pytest.mark.parametrize("make", [lambda p: random_gaussian(2, seed=17, path=p), uneven_mixture],
                         ids=["gaussian", "mixture"])
def test_average_velocity(make, path):
    dist = make(path)
    z = np.random.default_rng(18).standard_normal((6, 2))
    t = np.array([0.8, 0.8, 0.5, 1.0, 0.3, 0.0])
    r = np.array([0.8, 0.1, 0.5, 0.0, 0.6, 0.0])
    u = dist.average_velocity(z, r, t)
    same = r == t
    np.testing.assert_array_equal(u[same], dist.velocity(z[same], t[same]))
    moved = ~same
    np.testing.assert_allclose(z[moved] - (t - r)[moved, None] * u[moved],
                               dist.flow_map(z[moved], t[moved], r[moved]), atol=1e-12)
    np.testing.assert_allclose(z - dist.average_velocity(z, 0.0, 1.0), dist.flow_map(z, 1.0, 0.0), atol=1e-12)


# --------------------------------------------------------------------------- mixture


@ON_PATHS
def test_single_component_mixture_equals_gaussian(path):
    mean, std = np.array([1.0, -2.0, 0.5]), 0.7
    mix, g = GaussianMixture(mean[None], std, path=path), Gaussian(mean, std**2 * np.eye(3), path=path)
    rng = np.random.default_rng(19)
    z = rng.standard_normal((20, 3)) * 2
    t = rng.uniform(0, 1, 20)
    r = rng.uniform(0, 1, 20)
    np.testing.assert_allclose(mix.velocity(z, t), g.velocity(z, t), atol=1e-12)
    np.testing.assert_allclose(mix.marginal_log_prob(z, t), g.marginal_log_prob(z, t), atol=1e-12)
    np.testing.assert_allclose(mix.flow_map(z, t, r), g.flow_map(z, t, r), atol=1e-9)
    np.testing.assert_allclose(mix.component_velocities(z, t)[:, 0], g.velocity(z, t), atol=1e-12)
    np.testing.assert_array_equal(mix.responsibilities(z, t), 1.0)


@ON_PATHS
def test_mixture_velocity_is_responsibility_weighted_mix(path):
    """Responsibilities are Bayes' rule on scipy densities; velocity is their weighted mix of component fields."""
    mix = uneven_mixture(path)
    rng = np.random.default_rng(20)
    z = rng.standard_normal((10, 2)) * 2
    t = 0.6
    a, b, _, _ = coefficients(path, t)
    dens = np.stack([w * multivariate_normal(a * m, (a**2 * s**2 + b**2) * np.eye(2)).pdf(z)
                     for m, s, w in zip(mix.means, mix.stds, mix.weights)], axis=1)
    resp = mix.responsibilities(z, t)
    np.testing.assert_allclose(resp, dens / dens.sum(1, keepdims=True), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mix.marginal_log_prob(z, t), np.log(dens.sum(1)), rtol=1e-12)
    comp = mix.component_velocities(z, t)
    for k in range(3):
        g = Gaussian(mix.means[k], mix.stds[k] ** 2 * np.eye(2), path=path)
        np.testing.assert_allclose(comp[:, k], g.velocity(z, t), atol=1e-12)
    np.testing.assert_allclose(mix.velocity(z, t), np.einsum("nk,nkd->nd", resp, comp), atol=1e-12)


@ON_PATHS
@pytest.mark.parametrize("t", [0.5, 0.85])
def test_mixture_velocity_matches_importance_sampling(t, path):
    """E[a' x0 + b' x1 | z_t = z] (the conditional velocity's posterior mean; linear: x1 - x0)
    with x0 from the data, x1 = (z - a x0)/b and weights N(z; a x0, b^2 I)."""
    mix = eight_gaussians(path)
    a, b, da, db = coefficients(path, t)
    x0 = mix.sample(400_000, seed=21)
    z = np.array([[0.0, 0.0], [1.5, 0.3], [-1.0, 1.8], [0.4, -2.2]])
    v = mix.velocity(z, t)
    for zi, vi in zip(z, v):
        resid = zi - a * x0
        logw = -(resid**2).sum(1) / (2 * b**2)
        w = np.exp(logw - logw.max())
        w /= w.sum()
        y = da * x0 + db * resid / b
        est = w @ y
        se = np.sqrt(w**2 @ (y - est) ** 2)
        assert np.all(se < 0.02)  # the check has teeth
        assert np.all(np.abs(est - vi) < 5 * se), (zi, est, vi, se)


@ON_PATHS
def test_mixture_velocity_is_time_derivative_of_flow_map(path):
    """d/dr Phi_{t->r}(z) at r = t is v(z, t); central differences in r."""
    mix = eight_gaussians(path)
    z = np.random.default_rng(22).standard_normal((30, 2)) * 2
    h = 1e-4  # truncation error ~ h^2 |d^3 Phi / dr^3| ~ 3e-7 here; ODE error / h ~ 1e-8
    for t in [0.2, 0.5, 0.9]:
        fd = (mix.flow_map(z, t, t + h) - mix.flow_map(z, t, t - h)) / (2 * h)
        np.testing.assert_allclose(fd, mix.velocity(z, t), atol=2e-6, rtol=0)


@ON_PATHS
def test_mixture_flow_map_matches_per_row_ode_solve(path):
    """The stacked, time-rescaled solve agrees with independent per-row solves."""
    mix = uneven_mixture(path)
    rng = np.random.default_rng(23)
    z = rng.standard_normal((8, 2)) * 2
    t = np.array([1.0, 1.0, 0.6, 0.1, 0.0, 0.9, 0.4, 0.7])
    r = np.array([0.0, 0.5, 0.05, 0.8, 1.0, 0.0, 0.4, 0.2])
    np.testing.assert_allclose(mix.flow_map(z, t, r), ode_solve(mix.velocity, z, t, r), atol=1e-9, rtol=0)
    np.testing.assert_allclose(mix.flow_map(z, 1.0, 0.0), ode_solve(mix.velocity, z, 1.0, 0.0), atol=1e-9, rtol=0)


@ON_PATHS
def test_mixture_noise_pushforward_is_the_data(path):
    """Phi_{1->0} of N(0, I) puts the right mass on each mode, with Gaussian spread around it."""
    mix = uneven_mixture(path)
    n = 3000
    x = mix.flow_map(np.random.default_rng(24).standard_normal((n, 2)), 1.0, 0.0)
    label = np.argmin(((x[:, None] - mix.means) ** 2).sum(-1), axis=1)
    frac = np.bincount(label, minlength=3) / n
    assert np.all(np.abs(frac - mix.weights) < 5 * np.sqrt(mix.weights * (1 - mix.weights) / n))
    # |x - mu_k|^2 / sigma_k^2 is chi-squared with 2 degrees of freedom: mean 2, variance 4.
    chi2 = ((x - mix.means[label]) ** 2).sum(1) / mix.stds[label] ** 2
    assert abs(chi2.mean() - 2.0) < 5 * 2.0 / np.sqrt(n)


@ON_PATHS
def test_marginal_log_prob_integrates_to_one(path):
    """Riemann sums on a grid much finer than the narrowest std are accurate far below 1e-6."""
    edges = np.linspace(-7.0, 7.0, 351)
    h = edges[1] - edges[0]
    grid = np.stack(np.meshgrid(edges, edges), -1).reshape(-1, 2)
    gaussian = Gaussian([0.5, -1.0], [[1.0, 0.6], [0.6, 0.8]], path=path)
    for dist in [eight_gaussians(path), uneven_mixture(path), gaussian]:
        for t in [0.0, 0.5, 1.0]:
            mass = np.exp(dist.marginal_log_prob(grid, t)).sum() * h**2
            assert abs(mass - 1.0) < 1e-6, (dist, t, mass)


def test_log_prob_is_marginal_at_zero():
    mix = eight_gaussians()
    x = mix.sample(100, seed=26)
    np.testing.assert_array_equal(mix.log_prob(x), mix.marginal_log_prob(x, 0.0))
    dens = sum(w * multivariate_normal(m, s**2 * np.eye(2)).pdf(x) for m, s, w in zip(mix.means, mix.stds, mix.weights))
    np.testing.assert_allclose(mix.log_prob(x), np.log(dens), rtol=1e-12)


def test_mixture_sample():
    mix = uneven_mixture()
    x = mix.sample(50_000, seed=27)
    np.testing.assert_array_equal(x, mix.sample(50_000, seed=27))
    assert x.shape == (50_000, 2)
    frac = np.bincount(np.argmin(((x[:, None] - mix.means) ** 2).sum(-1), axis=1), minlength=3) / len(x)
    assert np.all(np.abs(frac - mix.weights) < 5 * np.sqrt(mix.weights * (1 - mix.weights) / len(x)))


# --------------------------------------------------------------------------- helpers


def test_eight_gaussians_spec():
    mix = eight_gaussians()
    assert mix.dim == 2 and mix.means.shape == (8, 2)
    angles = np.deg2rad(np.arange(0, 360, 45))
    expected = 4 / np.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], 1)
    np.testing.assert_allclose(mix.means, expected, atol=1e-15)
    np.testing.assert_allclose(mix.means[[0, 2]], [[2 * np.sqrt(2), 0], [0, 2 * np.sqrt(2)]], atol=1e-15)
    np.testing.assert_allclose(mix.means[1], [2, 2], atol=1e-15)
    np.testing.assert_allclose(mix.stds, 0.5 / np.sqrt(2))
    np.testing.assert_allclose(mix.weights, 1 / 8)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_clusters(k):
    mix = clusters(k)
    assert mix.means.shape == (k, 2)
    np.testing.assert_allclose(mix.means[0], [3.0, 0.0])
    np.testing.assert_allclose(mix.weights, 1 / k)
    if k > 1:
        gaps = np.linalg.norm(mix.means[:, None] - mix.means, axis=-1)[~np.eye(k, dtype=bool)]
        assert gaps.min() > 6 * mix.stds.max()


def test_w2_gaussians():
    rng = np.random.default_rng(28)
    m1, m2 = rng.standard_normal((2, 3))
    s1, s2 = random_spd(3, 29), random_spd(3, 30)
    assert w2_gaussians(m1, s1, m1, s1) < 1e-6
    assert w2_gaussians(m1, s1, m2, s2) == pytest.approx(w2_gaussians(m2, s2, m1, s1), rel=1e-10)
    assert w2_gaussians(1.0, 4.0, -0.5, 0.25) == pytest.approx(np.sqrt(1.5**2 + (2.0 - 0.5) ** 2), rel=1e-12)
    # Commuting (diagonal) covariances: the per-axis 1-D formula.
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.3, 2.0, 4.0])
    expected = np.sqrt(((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert w2_gaussians(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # General case: the cost E|x - T x|^2 of the optimal linear map T (T S1 T = S2), via scipy's sqrtm.
    r1 = np.real(sqrtm(s1))
    r1_inv = np.linalg.inv(r1)
    t_map = r1_inv @ np.real(sqrtm(r1 @ s2 @ r1)) @ r1_inv
    np.testing.assert_allclose(t_map @ s1 @ t_map, s2, atol=1e-10)
    gap = np.eye(3) - t_map
    cost = ((m1 - m2) ** 2).sum() + np.trace(gap @ s1 @ gap.T)
    assert w2_gaussians(m1, s1, m2, s2) == pytest.approx(np.sqrt(cost), rel=1e-10)


def test_input_validation():
    with pytest.raises(ValueError):
        Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])  # not positive definite
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0]], [0.0])
    g = Gaussian([0.0, 0.0], np.eye(2))
    with pytest.raises(ValueError):
        g.velocity(np.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError):
        g.velocity(np.zeros((3, 2)), np.zeros(4))


@ON_PATHS
def test_trajectory_matches_flow_maps(path):
    """One dense-output solve gives the same path as separate flow maps, for both classes."""
    z = np.random.default_rng(11).normal(size=(40, 2))
    times = np.linspace(1.0, 0.0, 6)
    for dist in (eight_gaussians(path), Gaussian([1.0, -0.5], [[1.0, 0.8], [0.8, 1.0]], path=path)):
        path = dist.trajectory(z, times)
        assert path.shape == (6, 40, 2)
        expected = np.stack([dist.flow_map(z, 1.0, s) for s in times])
        assert np.max(np.abs(path - expected)) < 1e-8
    with pytest.raises(ValueError, match="monotone"):
        eight_gaussians().trajectory(z, [1.0, 0.5, 0.7])


# --------------------------------------------------------------------------- the cosine path


def continuity_residual(dist, z, t, velocity, h=1e-5):
    """``d/dt log p + div v + v . grad log p`` (zero for the marginal velocity: the continuity
    equation divided by p) by central differences of step h in t and in each coordinate."""
    shifts = np.eye(z.shape[1]) * h
    log_p = dist.marginal_log_prob
    dt = (log_p(z, t + h) - log_p(z, t - h)) / (2 * h)
    grad = np.stack([(log_p(z + e, t) - log_p(z - e, t)) / (2 * h) for e in shifts], axis=1)
    div = sum((velocity(z + e, t)[:, i] - velocity(z - e, t)[:, i]) / (2 * h) for i, e in enumerate(shifts))
    return dt + div + (velocity(z, t) * grad).sum(1)


@ON_PATHS
@pytest.mark.parametrize("make", [lambda p: Gaussian([0.5, -1.0], [[1.0, 0.6], [0.6, 0.8]], path=p), eight_gaussians],
                         ids=["gaussian", "mixture"])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_continuity_equation(make, t, path):
    """The oracle's velocity transports its marginal densities.  Terms are O(10); the residual
    with h = 1e-5 is at most 1.3e-8 (truncation ~h^2, shrinking 100x per 10x in h), and the other
    path's velocity misses by O(0.1) or more."""
    dist = make(path)
    a, b, _, _ = coefficients(path, t)
    z = a * dist.sample(200, seed=1) + b * np.random.default_rng(0).standard_normal((200, 2))
    assert np.abs(continuity_residual(dist, z, t, dist.velocity)).max() < 3e-8
    other = make(COSINE if path is LINEAR else LINEAR)
    assert np.abs(continuity_residual(dist, z, t, other.velocity)).max() > 0.1


def test_path_is_given_by_object_or_name():
    assert GaussianMixture([[0.0, 0.0]], 1.0, path="cosine").path is COSINE
    assert Gaussian([0.0], [[1.0]]).path is LINEAR and eight_gaussians(COSINE).path is COSINE
    with pytest.raises(ValueError, match="unknown path 'quadratic'; accepted: linear, cosine"):
        clusters(3, path="quadratic")
    with pytest.raises(TypeError, match="path must be a paths.Path"):
        Gaussian([0.0], [[1.0]], path=1.0)


# --------------------------------------------------------------------------- RK4 flow map on array namespaces


def mixture_args(mix):
    return mix.means, mix.stds**2, np.log(mix.weights), mix.path


@ON_PATHS
def test_rk4_flow_map_matches_dop853(path):
    """Noise to data (the longest span) on eight_gaussians: largest error 1.4e-8 (linear) and
    1.2e-8 (cosine) at the default 200 steps, 16x larger at 100 (the h^4 rate); per-row times in
    both directions, and r = t rows returned unchanged.  The mean RK4 slope is the average velocity."""
    mix = eight_gaussians(path)
    rng = np.random.default_rng(40)
    z = rng.standard_normal((200, 2))
    one, zero = np.ones(200), np.zeros(200)
    exact = mix.flow_map(z, 1.0, 0.0)
    errors = [np.abs(mixture_flow_map(np, z, one, zero, *mixture_args(mix), steps=n) - exact).max()
              for n in (100, RK4_STEPS)]
    assert errors[1] < 2e-8
    assert 14 < errors[0] / errors[1] < 18

    t, r = rng.uniform(0, 1, (2, 200))
    r[:10] = t[:10]
    rk4 = mixture_flow_map(np, z, t, r, *mixture_args(mix))
    np.testing.assert_array_equal(rk4[:10], z[:10])
    np.testing.assert_allclose(rk4, mix.flow_map(z, t, r), rtol=0, atol=1e-8)
    u = mixture_average_velocity(np, z, r, t, *mixture_args(mix))
    np.testing.assert_allclose(z - (t - r)[:, None] * u, rk4, rtol=0, atol=1e-14)
    # at r = t the mean of 200 equal slopes: v up to the rounding of the sum
    np.testing.assert_allclose(u[:10], mixture_velocity(np, z[:10], t[:10], *mixture_args(mix)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@ON_PATHS
def test_exact_fields_on_backends(backend, path):
    """``exact_teacher``, ``exact_flow_map`` and ``exact_average_velocity`` in float64 agree with
    the numpy computations to rounding, and so with the oracle to the RK4 error above."""
    bk = backend64(backend)
    mix = eight_gaussians(path)
    rng = np.random.default_rng(41)
    z = rng.standard_normal((64, 2))
    t = rng.uniform(0, 1, 64)
    r = t * rng.uniform(0, 1, 64)
    Z, T, R = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(r)
    np.testing.assert_allclose(bk.to_numpy(exact_teacher(bk, mix)(Z, T)), mix.velocity(z, t), rtol=0, atol=1e-13)
    phi = bk.to_numpy(exact_flow_map(bk, mix)(Z, 1.0, 0.0))
    np.testing.assert_allclose(phi, mixture_flow_map(np, z, np.ones(64), np.zeros(64), *mixture_args(mix)),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi, mix.flow_map(z, 1.0, 0.0), rtol=0, atol=2e-8)
    u = bk.to_numpy(exact_average_velocity(bk, mix)(Z, R, T))
    np.testing.assert_allclose(u, mixture_average_velocity(np, z, r, t, *mixture_args(mix)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(u, mix.average_velocity(z, r, t), rtol=0, atol=1e-8)
    with pytest.raises(TypeError, match="needs a Gaussian-mixture oracle, got Gaussian"):
        exact_flow_map(bk, Gaussian([0.0, 0.0], np.eye(2), path=path))


@pytest.mark.parametrize("backend", ["torch", "jax"])
@ON_PATHS
def test_mean_flow_identity_through_jvp(backend, path):
    """``u = v - (t - r) du/dt`` for the exact average velocity, with ``du/dt`` the JVP along
    ``(v, 0, 1)`` on ``(z, r, t)``.  On these rows, with 100 RK4 steps, u is within 2.6e-9 of
    DOP853's and the identity holds to 1.0e-8 (at 50 steps: 4.1e-8 and 1.6e-7, the h^4 rate), to
    rounding on the r = t rows; the correction (t - r) du/dt itself is O(1)."""
    bk = backend64(backend)
    mix = eight_gaussians(path)
    rng = np.random.default_rng(42)
    z = rng.standard_normal((32, 2)) * 1.5
    t = rng.uniform(0.05, 1, 32)
    r = t * rng.uniform(0, 1, 32)
    r[:4], t[4], r[4] = t[:4], 1.0, 0.0
    Z, T, R = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(r)
    v = exact_teacher(bk, mix)(Z, T)
    u, du_dt = bk.jvp(exact_average_velocity(bk, mix, steps=100), (Z, R, T),
                      (v, bk.xp.zeros_like(R), bk.xp.ones_like(T)))
    u, correction = bk.to_numpy(u), (t - r)[:, None] * bk.to_numpy(du_dt)
    np.testing.assert_allclose(u, mix.average_velocity(z, r, t), rtol=0, atol=5e-9)
    np.testing.assert_allclose(u, bk.to_numpy(v) - correction, rtol=0, atol=2e-8)
    np.testing.assert_allclose(u[:4], bk.to_numpy(v)[:4], rtol=0, atol=1e-14)
    assert np.abs(correction).max() > 1
