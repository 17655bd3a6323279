"""The book's one time convention, and the time variables of the papers it follows.

Ours: data at t = 0, noise at t = 1, ``z_t = (1 − t)·x0 + t·x1``, velocity
``v = dz_t/dt = x1 − x0``, sampling from t = 1 down to 0.  Two-time models jump from
t to r ≤ t (``methods.flowmap``).  CM and CTM write times as EDM noise levels σ, sCM as
TrigFlow angles τ; the conversions below are the only place either is computed.
"""
from __future__ import annotations


def sigma_from_t(t):
    """EDM noise level of the linear path: ``z_t/(1 − t) = x0 + σ·x1`` with ``σ = t/(1 − t)``."""
    return t / (1 - t)


def t_from_sigma(sigma):
    """Inverse of ``sigma_from_t``: ``t = σ/(1 + σ)`` (σ ∈ [0, ∞) ↦ t ∈ [0, 1))."""
    return sigma / (1 + sigma)


def edm_point(z, t):
    """The EDM variable of a point of the linear path: ``x_σ = z_t/(1 − t)`` (``t`` broadcast against ``z``)."""
    return z / (1 - t)


EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
T_MIN, T_MAX = t_from_sigma(EDM_SIGMA_MIN), t_from_sigma(EDM_SIGMA_MAX)


def tau_from_t(xp, t, sigma_data: float):
    """TrigFlow time of the linear path (sCM): ``x_τ = cos τ·x0 + sin τ·σ_d·x1`` is the same
    noise-to-signal ratio as ``z_t`` when ``σ_d·tan τ = t/(1 − t)``; τ ∈ [0, π/2] ↦ t ∈ [0, 1]."""
    return xp.arctan2(t, (1 - t) * sigma_data)


def t_from_tau(xp, tau, sigma_data: float):
    """Inverse of ``tau_from_t``: ``t = σ_d sin τ / (cos τ + σ_d sin τ)``."""
    s = sigma_data * xp.sin(tau)
    return s / (xp.cos(tau) + s)


def trigflow_scale(xp, tau, sigma_data: float):
    """``a(τ) = cos τ + σ_d sin τ``, with ``x_τ = a·z_t`` at ``t = t_from_tau(τ)``."""
    return xp.cos(tau) + sigma_data * xp.sin(tau)
