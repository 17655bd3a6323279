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


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of an ODE solve: one per Euler step, two per Heun step."""
    return {"euler": 1, "heun": 2}[check_solver(solver)] * steps


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; accepted: {', '.join(SOLVERS)}")
    return solver


def ode_step(field, z, t, s, y=None, solver: str = "heun"):
    """One Euler or Heun step of ``dz/dt = field(z, t, y)`` from ``t`` to ``s`` (scalars or one per row)."""
    h = expand(s - t, z)
    d1 = field(z, t, y)
    if solver == "euler":
        return z + h * d1
    d2 = field(z + h * d1, s, y)
    return z + h * 0.5 * (d1 + d2)


@cache
def _stepper(bk, velocity, solver: str, kw: tuple):
    kwargs = dict(kw)

    def step(model, z, t, s, y):
        return ode_step(lambda zz, tt, yy: velocity(bk, model, zz, tt, yy, **kwargs), z, t, s, y, solver)

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


def sample_run(bk, model, preset, n: int, seed: int, steps: int, solver: str | None = None, noise=None,
               label=None):
    """``(samples, labels)`` of the model of a ``RunPreset``, shaped like its data set.

    The noise is given (shape ``(n, *model input)``) or drawn from ``seed``; a class-conditional
    model is asked for ``label``, or for labels cycling 0..K-1 (sample i gets i mod K).  ``solver``
    applies to ODE samplers (fm; Heun when None); ``seed`` also drives any renoising (cm multistep).
    """
    from .backends.base import model_shape
    from .data import dataset_info
    from .methods import get_method

    shape = dataset_info(preset.dataset).shape
    in_shape = model_shape(preset.model)
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal((n, *in_shape))
    else:
        noise = np.asarray(noise)
        if noise.ndim != 1 + len(in_shape) or noise.shape[1:] != in_shape:
            raise ValueError(f"noise has shape {noise.shape}; this run needs (n, {', '.join(map(str, in_shape))})")
    labels = None
    n_classes = preset.model.n_classes
    if n_classes:
        labels = (np.full(len(noise), label) if label is not None else np.arange(len(noise)) % n_classes)
        if labels.max() >= n_classes:
            raise ValueError(f"label {int(labels.max())} out of range; accepted: 0..{n_classes - 1}")
    elif label is not None:
        raise ValueError("a label was given but the model is not class-conditional")
    y = None if labels is None else bk.from_numpy(labels)
    out = get_method(preset.method).sample(bk, model, preset.method_cfg, bk.from_numpy(noise), steps, y=y,
                                           solver=solver, seed=seed)
    return bk.to_numpy(out).reshape((len(noise), *shape)), labels
