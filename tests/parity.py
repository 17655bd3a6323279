"""The one harness of every float64 backend-parity test: identical weights (an online network and a
distinct EMA network) in both backends, and the same arrays, losses, aux outputs and parameter
gradients from both."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from onestep import BACKENDS, get_backend

TOL = 1e-10


@cache
def backend64(name: str):
    """The float64 backend ``name`` (one per process, so compiled functions are reused)."""
    return get_backend(name, precision="float64")


@dataclass
class Side:
    """One backend's half of a pair: the backend, an online network and an EMA network."""

    bk: Any
    model: Any
    ema: Any


def make_pair(cfg, ema_noise: float = 0.05, weight_noise: float = 0.0, seed: int = 0) -> tuple[Side, Side]:
    """Torch and JAX sides with the same float64 weights: torch's initial ones moved by
    ``weight_noise``·N(0, 1) (so layers that start at zero matter too); the EMA net is the online net
    with its weights moved by a further ``ema_noise``·N(0, 1), so a loss that mixes them up does not pass."""
    params = ema_params = None
    sides = []
    for name in BACKENDS:
        bk = backend64(name)
        model = bk.make_model(cfg, bk.key(seed))
        if params is None:
            rng = np.random.default_rng(seed + 1)
            params = {k: v + weight_noise * rng.normal(size=v.shape) for k, v in bk.get_params(model).items()}
            ema_params = {k: v + ema_noise * rng.normal(size=v.shape) for k, v in params.items()}
        model = bk.set_params(model, params)
        ema = bk.set_params(bk.make_model(cfg, bk.key(seed)), ema_params)
        if name == "torch":
            ema.requires_grad_(False)
        sides.append(Side(bk, model, ema))
    return tuple(sides)


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_numpy(v) for v in tree]
    return np.asarray(tree.detach().cpu().numpy() if hasattr(tree, "detach") else tree, dtype=np.float64)


def _assert_close(a, b, tol, where="output"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _assert_close(a[k], b[k], tol, f"{where}[{k}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, tol, f"{where}[{i}]")
    else:
        assert a.shape == b.shape, (where, a.shape, b.shape)
        err = np.max(np.abs(a - b)) if a.size else 0.0
        assert err < tol, (where, err)


def assert_same(pair, fn, tol: float = TOL):
    """``fn(bk, model, ema)`` returns the same arrays (or dicts / tuples of them) in both backends;
    returns torch's, as numpy."""
    outs = [_numpy(fn(side.bk, side.model, side.ema)) for side in pair]
    _assert_close(outs[0], outs[1], tol)
    return outs[0]


def assert_same_loss_and_grads(pair, loss_of, tol: float = TOL):
    """``loss_of(bk, model, ema) -> (loss, aux)`` gives the same loss, aux outputs and gradients with
    respect to every parameter of the online network in both backends; returns the loss."""
    results = [side.bk.value_and_grad(lambda m, s=side: loss_of(s.bk, m, s.ema), side.model) for side in pair]
    (lt, at, gt), (lj, aj, gj) = results
    assert abs(lt - lj) < tol, (lt, lj)
    _assert_close(_numpy(at), _numpy(aj), tol, "aux")
    _assert_close(gt, gj, tol, "grad")
    assert max(np.abs(g).max() for g in gt.values()) > 0  # the loss depends on the weights
    return lt
