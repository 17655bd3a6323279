"""The interpolation path between data (t = 0) and noise (t = 1), written once for both backends.

Only array operators are used, so the same code runs on torch tensors, jax arrays
and numpy arrays.
"""
from __future__ import annotations


def expand(t, x):
    """Reshape per-sample times ``t`` of shape ``(n,)`` to broadcast against ``x`` ``(n, ...)``."""
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(x0, x1, t):
    """The linear path ``z_t = (1 − t)·x0 + t·x1`` (t per sample)."""
    t = expand(t, x0)
    return (1 - t) * x0 + t * x1


def conditional_velocity(x0, x1):
    """``d z_t / dt = x1 − x0``: the same for every t on a conditional path."""
    return x1 - x0
