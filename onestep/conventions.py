"""The book's one time convention, and adapters from each paper's notation.

Ours: data at t = 0, noise at t = 1, ``z_t = (1 − t)·x0 + t·x1``, velocity
``v = dz_t/dt = x1 − x0``, sampling from t = 1 down to 0.  Two-time models jump from
t to r ≤ t: ``f(z, t, r) = z − (t − r)·u(z, r, t)``.
"""
from __future__ import annotations


def from_noise_at_zero(tau, v_paper):
    """Papers with noise at τ = 0 (Meta's flow_matching, Shortcut): ``t = 1 − τ``, ``v = −v_paper``."""
    return 1 - tau, -v_paper


def sigma_from_t(t):
    """EDM noise level of the linear path: ``z_t/(1 − t) = x0 + σ·x1`` with ``σ = t/(1 − t)``."""
    return t / (1 - t)


def t_from_sigma(sigma):
    """Inverse of ``sigma_from_t``: ``t = σ/(1 + σ)`` (σ ∈ [0, ∞) ↦ t ∈ [0, 1))."""
    return sigma / (1 + sigma)


def logit_normal_mean_in_our_orientation(mean_paper: float) -> float:
    """A logit-normal time sampler ported from a noise-at-0 paper changes the sign of its mean."""
    return -mean_paper


def flow_map_from_average_velocity(z, u, t, r):
    """``f(z, t, r) = z − (t − r)·u(z, r, t)``: where a two-time model sends z from t to r."""
    return z - (t - r) * u


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
