"""Helpers for float64 backend-parity tests: identical weights in both backends, loss and gradients."""
from __future__ import annotations

import numpy as np

from onestep import get_backend

TOL = 1e-10


def make_pair(cfg):
    """Torch and JAX backends in float64 with identical weights: ``(tb, torch_model, jb, jax_model)``."""
    tb, jb = get_backend("torch", precision="float64"), get_backend("jax", precision="float64")
    tm = tb.make_model(cfg, tb.key(0))
    jm = jb.set_params(jb.make_model(cfg, jb.key(0)), tb.get_params(tm))
    return tb, tm, jb, jm


def loss_and_grads(bk, model, loss_of_model):
    """``(loss, {parameter name: gradient})`` of ``loss_of_model(model) -> (loss, aux)`` in either backend."""
    if bk.name == "torch":
        model.zero_grad()
        loss, _ = loss_of_model(model)
        loss.backward()
        return float(loss), {k: p.grad.numpy() for k, p in model.named_parameters()}
    import equinox as eqx

    from onestep.backends.jax_backend.params import to_flat

    loss, grads = eqx.filter_value_and_grad(lambda m: loss_of_model(m)[0])(model)
    return float(loss), to_flat(grads)


def assert_same_loss_and_grads(pair, loss_of_model, tol: float = TOL):
    """Both backends give the same loss and parameter gradients; returns the loss."""
    tb, tm, jb, jm = pair
    (lt, gt), (lj, gj) = loss_and_grads(tb, tm, lambda m: loss_of_model(tb, m)), \
        loss_and_grads(jb, jm, lambda m: loss_of_model(jb, m))
    assert abs(lt - lj) < tol, (lt, lj)
    assert gt.keys() == gj.keys()
    for k in gt:
        assert np.max(np.abs(gt[k] - gj[k])) < tol, k
    assert max(np.abs(g).max() for g in gt.values()) > 0  # the loss depends on the weights
    return lt
