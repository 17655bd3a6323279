"""Samplers, written once for both backends.

``integrate`` solves the probability-flow ODE ``dz/dt = v(z, t)`` on a uniform grid
from t = 1 (noise) to t = 0 (data) with Euler or Heun steps.  A velocity function is
any ``velocity(bk, model, z, t, y, **kw)``; each step is compiled once per
(backend, velocity, solver, kw) -- jitted in JAX, run under ``no_grad`` in torch.
"""
from __future__ import annotations

from functools import cache
from itertools import pairwise

import numpy as np

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


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of an ODE solve: one per Euler step, two per Heun step."""
    return {"euler": 1, "heun": 2}[check_solver(solver)] * steps


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; accepted: {', '.join(SOLVERS)}")
    return solver


@cache
def _stepper(bk, velocity, solver: str, kw: tuple):
    kwargs = dict(kw)

    def step(model, z, t, s, y):
        d1 = velocity(bk, model, z, t, y, **kwargs)
        if solver == "euler":
            return z + (s - t) * d1
        d2 = velocity(bk, model, z + (s - t) * d1, s, y, **kwargs)
        return z + (s - t) * 0.5 * (d1 + d2)

    return bk.inference(step)


def integrate(bk, model, velocity, z, steps: int, solver: str = "euler", y=None,
              t_start: float = 1.0, t_end: float = 0.0, trajectory: bool = False, **kw):
    """Transport ``z`` from ``t_start`` to ``t_end`` in ``steps`` ODE steps.

    Returns the end point, or with ``trajectory=True`` a numpy array of shape
    ``(steps + 1, n, ...)`` holding every grid point.
    """
    step = _stepper(bk, velocity, check_solver(solver), tuple(sorted(kw.items())))
    grid = uniform_grid(steps, t_start, t_end)
    path = [bk.to_numpy(z)] if trajectory else None
    for t, s in pairwise(grid):
        z = step(model, z, bk.from_numpy(np.asarray(t)), bk.from_numpy(np.asarray(s)), y)
        if trajectory:
            path.append(bk.to_numpy(z))
    return np.stack(path) if trajectory else z
