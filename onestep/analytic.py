"""Exact oracles for flow matching on Gaussian and Gaussian-mixture data (numpy float64).

Convention: data at t = 0, noise at t = 1, ``z_t = (1 - t) x0 + t x1`` with
``x1 ~ N(0, I)``.  For these data distributions the marginal velocity
``v(z, t) = E[x1 - x0 | z_t = z]``, the marginal densities of ``z_t`` and the flow
map ``Phi_{t->r}`` of ``dz/dt = v(z, t)`` are known in closed form (Gaussian) or up
to a tight float64 ODE solve (mixture), so the book can compare learned models
against the truth.

Shapes: points ``z`` are ``(n, d)``; every time argument is a scalar or an ``(n,)``
array giving one time per row.
"""
from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp
from scipy.special import logsumexp, softmax

__all__ = [
    "Gaussian",
    "GaussianMixture",
    "clusters",
    "eight_gaussians",
    "exact_teacher",
    "mixture_velocity",
    "w2_gaussians",
]

_ODE_RTOL = 1e-11
_ODE_ATOL = 1e-11
_LOG_2PI = np.log(2.0 * np.pi)


def _times(t, n: int) -> np.ndarray:
    """A time argument as an ``(n,)`` float array (a scalar is repeated per row)."""
    t = np.asarray(t, dtype=float)
    if t.ndim == 0:
        return np.full(n, float(t))
    if t.shape != (n,):
        raise ValueError(f"times must be a scalar or have shape ({n},), got {t.shape}")
    return t


class _Flow:
    """Methods shared by both distributions, written against their velocity and flow map."""

    dim: int

    def _points(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"points must have shape (n, {self.dim}), got {z.shape}")
        return z

    def log_prob(self, x) -> np.ndarray:
        """Exact log density of the data distribution (the marginal at t = 0)."""
        return self.marginal_log_prob(x, 0.0)

    def trajectory(self, z, times) -> np.ndarray:
        """The PF-ODE path of points ``z`` given at ``times[0]``, at every time in ``times``:
        shape ``(len(times), n, d)``."""
        z = self._points(z)
        return np.stack([self.flow_map(z, times[0], s) for s in times])

    def average_velocity(self, z, r, t) -> np.ndarray:
        """``u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r)``; the velocity ``v(z, t)`` on rows with r == t."""
        z = self._points(z)
        t, r = _times(t, len(z)), _times(r, len(z))
        same = r == t
        u = np.empty_like(z)
        u[same] = self.velocity(z[same], t[same])
        zm, tm, rm = z[~same], t[~same], r[~same]
        u[~same] = (zm - self.flow_map(zm, tm, rm)) / (tm - rm)[:, None]
        return u


class Gaussian(_Flow):
    """Data ``x0 ~ N(mean, cov)`` with ``cov`` symmetric positive definite.

    Everything is diagonal in the eigenbasis of ``cov``: there
    ``S_t = (1 - t)^2 cov + t^2 I`` has eigenvalues ``(1 - t)^2 lam + t^2``, which are
    positive for all t when ``cov`` is positive definite, so t = 0 and t = 1 need no
    special case.
    """

    def __init__(self, mean, cov):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=float))
        self.cov = np.atleast_2d(np.asarray(cov, dtype=float))
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError("mean must have shape (d,) and cov shape (d, d)")
        if not np.allclose(self.cov, self.cov.T):
            raise ValueError("cov must be symmetric")
        self._eig, self._basis = np.linalg.eigh(self.cov)
        if self._eig.min() <= 0:
            raise ValueError("cov must be positive definite")
        self.dim = d

    def _variances(self, t: np.ndarray) -> np.ndarray:
        """Eigenvalues of ``S_t`` per row, ``(n, d)``."""
        return (1 - t)[:, None] ** 2 * self._eig + t[:, None] ** 2

    def _centred(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``z - m_t`` in the eigenbasis of ``cov``, ``(n, d)``."""
        return (z - (1 - t)[:, None] * self.mean) @ self._basis

    def sample(self, n: int, seed) -> np.ndarray:
        """``n`` data samples from ``numpy.random.default_rng(seed)``."""
        eps = np.random.default_rng(seed).standard_normal((n, self.dim))
        return self.mean + (eps * np.sqrt(self._eig)) @ self._basis.T

    def marginal_log_prob(self, z, t) -> np.ndarray:
        """Log density of ``z_t ~ N((1 - t) mean, S_t)``."""
        z = self._points(z)
        t = _times(t, len(z))
        s, y = self._variances(t), self._centred(z, t)
        return -0.5 * (self.dim * _LOG_2PI + np.log(s).sum(1) + (y**2 / s).sum(1))

    def velocity(self, z, t) -> np.ndarray:
        """``v = -mean + (t I - (1 - t) cov) S_t^{-1} (z - m_t)``."""
        z = self._points(z)
        t = _times(t, len(z))
        gain = (t[:, None] - (1 - t)[:, None] * self._eig) / self._variances(t)
        return -self.mean + (gain * self._centred(z, t)) @ self._basis.T

    def flow_map(self, z, t, r) -> np.ndarray:
        """``Phi_{t->r}(z) = m_r + S_r^{1/2} S_t^{-1/2} (z - m_t)`` (exact; ``z`` itself where r == t)."""
        z = self._points(z)
        t, r = _times(t, len(z)), _times(r, len(z))
        scale = np.sqrt(self._variances(r) / self._variances(t))
        out = (1 - r)[:, None] * self.mean + (scale * self._centred(z, t)) @ self._basis.T
        return np.where((r == t)[:, None], z, out)


class GaussianMixture(_Flow):
    """Data from a mixture of isotropic Gaussians ``N(means[k], stds[k]^2 I)``.

    Component k of ``z_t`` is ``N((1 - t) means[k], s_k(t) I)`` with
    ``s_k(t) = (1 - t)^2 stds[k]^2 + t^2``; the marginal velocity is the posterior
    (responsibility) weighted mix of the per-component Gaussian velocities.  The flow
    map has no closed form and is a DOP853 solve in float64.
    """

    def __init__(self, means, stds, weights=None):
        self.means = np.asarray(means, dtype=float)
        if self.means.ndim != 2:
            raise ValueError("means must have shape (k, d)")
        k, self.dim = self.means.shape
        self.stds = np.broadcast_to(np.asarray(stds, dtype=float), (k,)).copy()
        if self.stds.min() <= 0:
            raise ValueError("stds must be positive")
        w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (k,) or w.min() <= 0:
            raise ValueError("weights must be positive with shape (k,)")
        self.weights = w / w.sum()

    def _components(self, z: np.ndarray, t: np.ndarray):
        """Per-component ``z - (1 - t) means[k]`` ``(n, k, d)``, variances ``s_k(t)`` and
        velocity gains ``(t - (1 - t) stds[k]^2) / s_k(t)`` (both ``(n, k)``)."""
        diff = z[:, None, :] - (1 - t)[:, None, None] * self.means
        s = (1 - t)[:, None] ** 2 * self.stds**2 + t[:, None] ** 2
        gain = (t[:, None] - (1 - t)[:, None] * self.stds**2) / s
        return diff, s, gain

    def _joint_log_probs(self, diff: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``log w_k + log N_k(z_t)``, ``(n, k)``."""
        log_n = -0.5 * (self.dim * (_LOG_2PI + np.log(s)) + (diff**2).sum(-1) / s)
        return np.log(self.weights) + log_n

    def sample(self, n: int, seed) -> np.ndarray:
        """``n`` data samples from ``numpy.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k, None] * rng.standard_normal((n, self.dim))

    def marginal_log_prob(self, z, t) -> np.ndarray:
        """Log density of ``z_t`` (log-sum-exp over components)."""
        z = self._points(z)
        diff, s, _ = self._components(z, _times(t, len(z)))
        return logsumexp(self._joint_log_probs(diff, s), axis=1)

    def responsibilities(self, z, t) -> np.ndarray:
        """Posterior ``P(component k | z_t = z)``, ``(n, k)``."""
        z = self._points(z)
        diff, s, _ = self._components(z, _times(t, len(z)))
        return softmax(self._joint_log_probs(diff, s), axis=1)

    def component_velocities(self, z, t) -> np.ndarray:
        """Velocity field of each component alone, ``-means[k] + gain_k (z - (1 - t) means[k])``, ``(n, k, d)``."""
        z = self._points(z)
        diff, _, gain = self._components(z, _times(t, len(z)))
        return -self.means + gain[..., None] * diff

    def velocity(self, z, t) -> np.ndarray:
        """``v(z, t) = sum_k P(k | z_t = z) v_k(z, t)`` (one pass, for the ODE solver's sake)."""
        z = self._points(z)
        return mixture_velocity(np, z, _times(t, len(z)), self.means, self.stds**2, np.log(self.weights))

    def flow_map(self, z, t, r) -> np.ndarray:
        """``Phi_{t->r}(z)`` by one stacked DOP853 solve (``z`` itself where r == t).

        Row i is integrated along ``tau_i(s) = t_i + s (r_i - t_i)``, s in [0, 1], so
        rows with different start and end times (either direction) share one system.
        """
        z = self._points(z)
        t, r = _times(t, len(z)), _times(r, len(z))
        out = z.copy()
        move = r != t
        if not move.any():
            return out
        z0, t0, span = z[move], t[move], (r - t)[move]

        def rhs(s, y):
            v = self.velocity(y.reshape(z0.shape), t0 + s * span)
            return (span[:, None] * v).ravel()

        sol = solve_ivp(rhs, (0.0, 1.0), z0.ravel(), method="DOP853",
                        t_eval=[1.0], rtol=_ODE_RTOL, atol=_ODE_ATOL)
        if not sol.success:
            raise RuntimeError(f"flow map ODE solve failed: {sol.message}")
        out[move] = sol.y[:, -1].reshape(z0.shape)
        return out


    def trajectory(self, z, times) -> np.ndarray:
        """The PF-ODE path of ``z`` (given at ``times[0]``) at every time in the monotone
        ``times``, from one DOP853 solve with dense output: ``(len(times), n, d)``."""
        z = self._points(z)
        times = np.asarray(times, dtype=float)
        if len(times) < 2 or not (np.all(np.diff(times) < 0) or np.all(np.diff(times) > 0)):
            raise ValueError("times must be strictly monotone with at least two entries")

        def rhs(tau, y):
            return self.velocity(y.reshape(z.shape), tau).ravel()

        sol = solve_ivp(rhs, (times[0], times[-1]), z.ravel(), method="DOP853", t_eval=times,
                        rtol=_ODE_RTOL, atol=_ODE_ATOL)
        if not sol.success:
            raise RuntimeError(f"trajectory ODE solve failed: {sol.message}")
        return sol.y.T.reshape(len(times), *z.shape)


def mixture_velocity(xp, z, t, means, variances, log_weights):
    """The exact mixture velocity against an array namespace (numpy, torch or jax.numpy).

    ``z`` ``(n, d)``, ``t`` ``(n,)``; ``means`` ``(k, d)``, ``variances`` and ``log_weights`` ``(k,)``.
    Written once so that the oracle and a backend's compiled training step (an exact teacher
    for distillation) compute the same field.
    """
    d = z.shape[1]
    tt = t[:, None]
    diff = z[:, None, :] - (1 - tt)[:, :, None] * means  # (n, k, d)
    s = (1 - tt) ** 2 * variances + tt**2  # (n, k)
    gain = (tt - (1 - tt) * variances) / s
    logits = log_weights - 0.5 * (d * xp.log(s) + xp.sum(diff**2, axis=2) / s)
    resp = xp.exp(logits - xp.amax(logits, axis=1, keepdims=True))
    resp = resp / xp.sum(resp, axis=1, keepdims=True)
    return -resp @ means + xp.sum((resp * gain)[:, :, None] * diff, axis=1)


def exact_teacher(bk, oracle: GaussianMixture):
    """The oracle's velocity as a teacher field ``(z, t, y) -> v`` on backend arrays.

    ``t`` is a scalar or one time per row; the field ignores labels (the oracle is unconditional).
    """
    if not isinstance(oracle, GaussianMixture):
        raise TypeError(f"an exact teacher needs a Gaussian-mixture oracle, got {type(oracle).__name__}")
    means, variances = bk.from_numpy(oracle.means), bk.from_numpy(oracle.stds**2)
    log_weights = bk.from_numpy(np.log(oracle.weights))

    def field(z, t, y=None):
        t = bk.xp.broadcast_to(bk.xp.asarray(t, dtype=z.dtype), (z.shape[0],))
        return mixture_velocity(bk.xp, z, t, means, variances, log_weights)

    return field


def eight_gaussians() -> GaussianMixture:
    """The 2-D toy: 8 equal components at ``4 d_k / sqrt(2)`` (d_k at 0, 45, ..., 315 deg), std ``0.5 / sqrt(2)``."""
    angles = np.deg2rad(45.0 * np.arange(8))
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(4.0 * directions / np.sqrt(2.0), 0.5 / np.sqrt(2.0))


def clusters(k: int, radius: float = 3.0, std: float = 0.3) -> GaussianMixture:
    """``k`` equal 2-D clusters evenly spaced on a circle of ``radius`` starting at (radius, 0).

    ``k = 1`` is the single Gaussian ``N((radius, 0), std^2 I)``; the defaults keep
    neighbours many stds apart for k up to about 16.
    """
    angles = 2.0 * np.pi * np.arange(k) / k
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means, std)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    lam, q = np.linalg.eigh(0.5 * (a + a.T))
    return (q * np.sqrt(np.clip(lam, 0.0, None))) @ q.T


def w2_gaussians(m1, S1, m2, S2) -> float:
    """2-Wasserstein distance (not squared) between ``N(m1, S1)`` and ``N(m2, S2)``.

    Bures formula: ``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``.
    Scalars are read as 1-D means and variances.
    """
    m1, m2 = np.atleast_1d(np.asarray(m1, float)), np.atleast_1d(np.asarray(m2, float))
    S1, S2 = np.atleast_2d(np.asarray(S1, float)), np.atleast_2d(np.asarray(S2, float))
    root = _sqrtm_psd(S1)
    cross = root @ S2 @ root
    cross_trace = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (cross + cross.T)), 0.0, None)).sum()
    w2_sq = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2.0 * cross_trace
    return float(np.sqrt(max(w2_sq, 0.0)))


def oracle_velocity(bk, oracle, z, t, y=None):
    """An oracle's exact velocity in the signature samplers expect (``sample.integrate``
    with ``sample.NUMPY`` as the backend), so exact fields run through the same solvers."""
    return oracle.velocity(z, float(t))
