"""What every method shares: the jump of a two-time model and its other forms, conditioning labels,
per-row times and step counts, and the any-step sampler of flow maps.

A two-time model predicts the *average velocity* ``u(z, r, t)`` of the PF-ODE over ``[r, t]``
(r ≤ t); its *flow map* jumps from t to r,

    f(z, t, r) = z − (t − r)·u(z, r, t),

so ``f(z, t, t) = z`` for any network.  The same object appears under other names: CTM's
``G(x, σ_t, σ_r)`` in EDM variables (``ctm_jump``, with the clean-data prediction ``g = z − t·u``),
a shortcut model's step ``z − d·s(z, t, d)`` with ``d = t − r``, and a consistency function, which
is the flow map to the boundary, ``f(z, t, ε)``.  A flow-map method provides its
``average_velocity(bk, model, cfg, z, r, t, y)``; ``sample_jumps`` then samples with any grid.
"""
from __future__ import annotations

import numbers
from itertools import pairwise

import numpy as np

from ..conventions import edm_point, sigma_from_t
from ..paths import expand


# -- times and step counts -------------------------------------------------------------------
def per_row(bk, t, z):
    """A time given as a 0-d array or one per row, as one time per row of ``z``: ``(n,)``."""
    return bk.xp.broadcast_to(t, (z.shape[0],))


def check_steps(steps) -> int:
    """A sampler's number of steps: a positive integer, else ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"number of sampling steps must be a positive integer, got {steps!r}")
    return int(steps)


def check_jump(t: float, r: float) -> tuple[float, float]:
    """Scalar times of one jump, ``0 ≤ r ≤ t ≤ 1``, else ValueError naming them."""
    t, r = float(t), float(r)
    if not 0 <= r <= t <= 1:
        raise ValueError(f"a jump goes from t to r with 0 ≤ r ≤ t ≤ 1, got t = {t}, r = {r}")
    return t, r


# -- the jump and its other forms ------------------------------------------------------------
def jump(z, u, t, r):
    """``f(z, t, r) = z − (t − r)·u``: where average velocity ``u`` over ``[r, t]`` sends ``z``
    (``t``, ``r`` scalars or one per row)."""
    return z - expand(t - r, z) * u


def average_velocity(z, z_r, t, r):
    """Inverse of ``jump``: ``u = (z − z_r)/(t − r)`` for ``r < t``."""
    return (z - z_r) / expand(t - r, z)


def ctm_g(z, t, u):
    """CTM's ``g`` (a clean-data prediction) from an average velocity ``u`` of a jump from t: ``g = z − t·u``."""
    return z - expand(t, z) * u


def average_velocity_from_g(z, t, g):
    """Inverse of ``ctm_g``: ``u = (z − g)/t`` (t > 0)."""
    return (z - g) / expand(t, z)


def ctm_jump(z, t, r, g):
    """CTM's jump in EDM variables, mapped back to our path: ``(1 − r)·G(x, σ_t, σ_r)`` with
    ``x = z/(1 − t)`` and ``G(x, σ, σ') = (σ'/σ)·x + (1 − σ'/σ)·g`` (per-row ``0 ≤ r ≤ t < 1``, t > 0)."""
    ratio = expand(sigma_from_t(r) / sigma_from_t(t), z)
    return expand(1 - r, z) * (ratio * edm_point(z, expand(t, z)) + (1 - ratio) * g)


# -- conditioning labels ---------------------------------------------------------------------
def label_dropout(bk, key, batch: dict, rate: float) -> dict:
    """``{"drop": mask}`` marking the rows trained without their label (classifier-free guidance);
    empty for unlabelled data."""
    y = batch.get("y")
    return {} if y is None else {"drop": bk.uniform(key, (y.shape[0],)) < rate}


def condition_labels(bk, model, y, drop=None):
    """Labels with dropped rows replaced by the model's "no label" class."""
    if y is None or drop is None:
        return y
    return bk.xp.where(drop, model.cfg.n_classes, y)


# -- any-step sampling of a flow map ---------------------------------------------------------
def _jump_step(bk, velocity, model, cfg, z, t, r, y):
    return jump(z, velocity(bk, model, cfg, z, per_row(bk, r, z), per_row(bk, t, z), y), t, r)


def sample_jumps(bk, velocity, model, cfg, z, times, y=None, trajectory: bool = False):
    """Jump along ``times`` (descending, e.g. ``1 − k/K``) with ``velocity(bk, model, cfg, z, r, t, y)``,
    the average velocity of a method's network; deterministic.  Returns the end point, or with
    ``trajectory=True`` a numpy array ``(len(times), n, ...)`` of every point visited."""
    step = bk.inference(_jump_step)
    path = [bk.to_numpy(z)]
    for t, r in pairwise(times):
        t, r = check_jump(t, r)
        z = step(bk, velocity, model, cfg, z, bk.from_numpy(np.asarray(t)), bk.from_numpy(np.asarray(r)), y)
        if trajectory:
            path.append(bk.to_numpy(z))
    return np.stack(path) if trajectory else z


def uniform_times(steps: int) -> np.ndarray:
    """The grid ``1, 1 − 1/K, …, 0`` of a K-step sampler."""
    steps = check_steps(steps)
    return 1 - np.arange(steps + 1) / steps
