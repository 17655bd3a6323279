"""ODE solvers, written once for both backends (and numpy).

``ode_step`` is one Euler or Heun step of ``dz/dt = field(z, t, y)``; ``integrate`` solves the
probability-flow ODE of a model's velocity on a uniform grid from t = 1 (noise) to t = 0 (data).
A velocity function is any ``velocity(bk, model, z, t, y, **options)``; each step is compiled
once per (backend, velocity, solver, options) by the backend (jitted in JAX, ``no_grad`` in torch).
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np

from .paths import expand
from .times import uniform_grid

SOLVERS = ("euler", "heun")


class _NumpyArrays:
    """Stands in for a backend when the field is a numpy function (an exact oracle)."""

    @staticmethod
    def inference(fn):
        return fn

    @staticmethod
    def from_numpy(a):
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def to_numpy(a):
        return np.asarray(a)


NUMPY = _NumpyArrays()


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; accepted: {', '.join(SOLVERS)}")
    return solver


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of an ODE solve: one per Euler step, two per Heun step."""
    return {"euler": 1, "heun": 2}[check_solver(solver)] * steps


def ode_step(field, z, t, s, y=None, solver: str = "heun"):
    """One Euler or Heun step of ``dz/dt = field(z, t, y)`` from ``t`` to ``s`` (scalars or one per row)."""
    h = expand(s - t, z)
    d1 = field(z, t, y)
    if solver == "euler":
        return z + h * d1
    d2 = field(z + h * d1, s, y)
    return z + h * 0.5 * (d1 + d2)


def _model_step(bk, model, velocity, z, t, s, y, solver: str, options: tuple):
    """One solver step of a model's velocity field (``options``: sorted ``(name, value)`` pairs)."""
    return ode_step(lambda zz, tt, yy: velocity(bk, model, zz, tt, yy, **dict(options)), z, t, s, y, solver)


def integrate(bk, model, velocity, z, steps: int, solver: str = "euler", y=None,
              t_start: float = 1.0, t_end: float = 0.0, trajectory: bool = False, **options):
    """Transport ``z`` from ``t_start`` to ``t_end`` in ``steps`` ODE steps.

    Returns the end point, or with ``trajectory=True`` a numpy array of shape
    ``(steps + 1, n, ...)`` holding every grid point.
    """
    step = bk.inference(_model_step)
    solver, options = check_solver(solver), tuple(sorted(options.items()))
    path = [bk.to_numpy(z)] if trajectory else None
    for t, s in pairwise(uniform_grid(steps, t_start, t_end)):
        z = step(bk, model, velocity, z, bk.from_numpy(np.asarray(t)), bk.from_numpy(np.asarray(s)), y, solver,
                 options)
        if trajectory:
            path.append(bk.to_numpy(z))
    return np.stack(path) if trajectory else z
