"""Interpolation paths between data (t = 0) and noise (t = 1), written once for every backend.

A path is ``z_t = a(t)·x0 + b(t)·x1`` with ``a(0) = b(1) = 1`` and ``a(1) = b(0) = 0``.  Its
nouns are the point ``sample`` on it, the conditional velocity ``velocity = dz_t/dt`` and the
conditional average velocity ``average_velocity = (z_t − z_r)/(t − r)`` (the slope of the chord
from r to t, which two-time models regress onto).  Two paths:

* ``LINEAR``: ``a = 1 − t``, ``b = t`` (the book's path; velocity ``x1 − x0`` at every t, and so
  is the average velocity);
* ``COSINE``: ``a = cos(πt/2)``, ``b = sin(πt/2)`` (variance preserving: ``a² + b² = 1``).

Only array operators are used, plus an array namespace ``xp`` (``numpy``, ``torch`` or
``jax.numpy``, e.g. ``bk.xp``) for functions of time such as ``cos``, so the same code runs on
numpy arrays, torch tensors and jax arrays and is differentiable by the backends' JVPs.

Shapes: ``x0``, ``x1`` are ``(n, ...)``; times are ``(n,)`` (one per row) or 0-d arrays.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

__all__ = ["COSINE", "LINEAR", "PATHS", "CosinePath", "LinearPath", "Path", "expand", "get_path"]


def expand(t, x):
    """Reshape per-sample times ``t`` of shape ``(n,)`` to broadcast against ``x`` ``(n, ...)``."""
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


class Path(ABC):
    """``z_t = a(t)·x0 + b(t)·x1``; a subclass gives ``a, b``, their derivatives and their secants."""

    name: str

    @abstractmethod
    def coefficients(self, xp, t):
        """``(a(t), b(t))``, each shaped like ``t``."""

    @abstractmethod
    def derivatives(self, xp, t):
        """``(a'(t), b'(t))``, each shaped like ``t``."""

    @abstractmethod
    def secants(self, xp, r, t):
        """``((a(t) − a(r))/(t − r), (b(t) − b(r))/(t − r))`` in a form that is exact (and smooth)
        at ``r = t``, where it is ``(a'(t), b'(t))``; times broadcast against each other."""

    def sample(self, xp, x0, x1, t):
        """The point ``z_t = a(t)·x0 + b(t)·x1`` on the path from ``x0`` (data) to ``x1`` (noise)."""
        a, b = self.coefficients(xp, t)
        return expand(a, x0) * x0 + expand(b, x0) * x1

    def velocity(self, xp, x0, x1, t):
        """The conditional velocity ``dz_t/dt = a'(t)·x0 + b'(t)·x1``."""
        da, db = self.derivatives(xp, t)
        return expand(da, x0) * x0 + expand(db, x0) * x1

    def average_velocity(self, xp, x0, x1, r, t):
        """The conditional average velocity ``(z_t − z_r)/(t − r)`` for r ≤ t (or r > t): the
        chord's slope, which is ``velocity(x0, x1, t)`` on rows with ``r = t``."""
        sa, sb = self.secants(xp, r, t)
        return expand(sa, x0) * x0 + expand(sb, x0) * x1

    def __repr__(self) -> str:
        return f"paths.{self.name.upper()}"


class LinearPath(Path):
    """``z_t = (1 − t)·x0 + t·x1``: straight lines walked at constant speed, so the velocity and
    every average velocity are ``x1 − x0``."""

    name = "linear"

    def coefficients(self, xp, t):
        return 1 - t, t

    def derivatives(self, xp, t):
        one = xp.ones_like(t)
        return -one, one

    def secants(self, xp, r, t):
        one = xp.ones_like(t + r)
        return -one, one


class CosinePath(Path):
    """``z_t = cos(πt/2)·x0 + sin(πt/2)·x1``: a quarter circle, ``a² + b² = 1``.

    By sum-to-product, ``cos A − cos B = −2 sin((A+B)/2) sin((A−B)/2)`` (and likewise for sin), so
    the secants are the derivatives at the mid-time ``m = (t + r)/2`` shrunk by
    ``sin(h)/h``, ``h = π(t − r)/4``; ``sin(h)/h = sinc((t − r)/4)`` with the normalised sinc of
    numpy, torch and jax (each exact and differentiable at 0), so r = t needs no special case.
    """

    name = "cosine"

    def coefficients(self, xp, t):
        angle = (math.pi / 2) * t
        return xp.cos(angle), xp.sin(angle)

    def derivatives(self, xp, t):
        angle = (math.pi / 2) * t
        return -(math.pi / 2) * xp.sin(angle), (math.pi / 2) * xp.cos(angle)

    def secants(self, xp, r, t):
        da, db = self.derivatives(xp, (t + r) / 2)
        shrink = xp.sinc((t - r) / 4)
        return shrink * da, shrink * db


LINEAR, COSINE = LinearPath(), CosinePath()
PATHS = {path.name: path for path in (LINEAR, COSINE)}


def get_path(name: str) -> Path:
    """The path called ``name`` (``"linear"`` or ``"cosine"``)."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; accepted: {', '.join(PATHS)}")
    return PATHS[name]
