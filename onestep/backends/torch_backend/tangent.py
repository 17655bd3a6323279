"""A cheap JVP for the torch backend: forward-mode tangents carried by hand through our own layers.

``jvp(fn, primals, tangents)`` runs ``fn`` once on torch forward-AD dual tensors. Our MLP and U-Net
recognise dual inputs (only inside ``jvp``) and run their forward on pairs ``(h, dh)``: the primal
``h`` with autograd as in a plain forward, the tangent ``dh`` under ``torch.no_grad`` (each linear or
conv map without its bias, exact derivatives of SiLU, GroupNorm, the time embedding and attention's
products and softmax), then hand back a dual output.
Elementwise method math around the model call (``cond = stack([r, t])``, input scalings) propagates
its tangents with torch's own forward AD.

Why: every JVP objective in the book stops the gradient of the tangent, so the tangent needs no
autograd graph and the backward runs through the primal output only. ``torch.func.jvp`` records the
tangent computation for backward and pays forward-AD dispatch on every op; this path costs one
forward for the primal, one for the tangent and one backward (two forwards' worth): 4/3 of a
flow-matching step. The primal and the tangent go through each layer in two calls, not one batched
call on ``[h; dh]``: a batched call would put the tangent rows in the autograd graph, and the
backward would multiply the weights' gradients over them too.

The layer helpers take and return pairs ``(h, dh)``; ``dh is None`` means "no tangent" and makes
them a plain forward, so each network is written once for both uses.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F

from ..embedding import EMBEDDING_TIME_SCALE, embed_conditions

_active = False  # true inside ``jvp``: only then do our models take their tangent path


@contextlib.contextmanager
def _tangent_mode():
    global _active
    _active = True
    try:
        yield
    finally:
        _active = False


def jvp(fn: Callable, primals: tuple, tangents: tuple):
    """``(fn(*primals), d/dε fn(*(primals + ε·tangents)))``, the signature of ``torch.func.jvp``.

    ``fn`` returns one tensor. The primal output keeps its autograd graph (gradients reach the
    parameters through it); the tangent output is detached (stop-gradient).
    """
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    with fwAD.dual_level(), _tangent_mode():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"jvp: fn must return one tensor, got {type(out).__name__}")
        primal, tangent = fwAD.unpack_dual(out)
    return primal, torch.zeros_like(primal) if tangent is None else tangent.detach()


def call(forward: Callable, x, cond, y):
    """A model call: ``forward(x, dx, cond, dcond, y) -> (out, dout)`` on pairs.

    Inside ``jvp``, when ``x`` or ``cond`` is a dual tensor, runs it with tangents (a missing one is
    zero) and returns the dual output; otherwise runs it with ``dx = dcond = None``, a plain forward
    (so ``torch.func.jvp`` and ``torch.autograd`` see ordinary torch ops).
    """
    if _active:
        (x, dx), (cond, dcond) = fwAD.unpack_dual(x), fwAD.unpack_dual(cond)
        if dx is not None or dcond is not None:
            out, dout = forward(x, torch.zeros_like(x) if dx is None else dx,
                                cond, torch.zeros_like(cond) if dcond is None else dcond, y)
            return fwAD.make_dual(out, dout)
    return forward(x, None, cond, None, y)[0]


# -- layers on pairs (h, dh) --------------------------------------------------------------------
def linear(layer: nn.Module, h, dh):
    """An ``nn.Linear``, ``nn.Conv2d`` or ``nn.Identity``; the tangent is the same map without bias."""
    out = layer(h)
    if dh is None or isinstance(layer, nn.Identity):
        return out, dh
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return out, F.linear(dh, layer.weight)
        if isinstance(layer, nn.Conv2d):
            return out, F.conv2d(dh, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                                 layer.groups)
    raise TypeError(f"no tangent rule for {type(layer).__name__}")


def silu(h, dh):
    """SiLU; its Jacobian is diagonal, so the JVP equals the VJP: aten's fused ``silu_backward``."""
    out = F.silu(h)
    if dh is None:
        return out, None
    with torch.no_grad():
        return out, torch.ops.aten.silu_backward(dh, h)


def group_norm(norm: nn.GroupNorm, h, dh):
    """GroupNorm ``γ·ĥ + β`` with ``ĥ = (h − μ)/σ`` per group. The Jacobian of ``h ↦ ĥ``,
    ``(I − 11ᵀ/m − ĥĥᵀ/m)/σ`` per group of ``m`` entries, is symmetric, so its JVP equals its VJP:
    the tangent is ``γ·native_group_norm_backward(dh)`` without ``γ``, from the forward's ``μ, 1/σ``."""
    if dh is None:
        return norm(h), None
    n, c = h.shape[:2]
    hw, g = h[0, 0].numel(), norm.num_groups
    out, mean, rstd = torch.native_group_norm(h, norm.weight, norm.bias, n, c, hw, g, norm.eps)
    with torch.no_grad():
        dout = torch.ops.aten.native_group_norm_backward(dh.contiguous(), h, mean, rstd, None, n, c, hw, g,
                                                         [True, False, False])[0]
        if norm.affine:
            dout = dout * norm.weight.reshape((1, -1) + (1,) * (h.ndim - 2))
        return out, dout


def embed(cond, dcond, freqs):
    """``embed_conditions`` (layout ``[cos a, sin a]`` per column, ``a = scale·c·f``) and its tangent
    ``[−sin a, cos a]·da``, read off the primal embedding."""
    out = embed_conditions(torch, cond, freqs)
    if dcond is None:
        return out, None
    with torch.no_grad():
        n, k = cond.shape
        cos_sin = out.reshape(n, k, 2, -1)
        da = (EMBEDDING_TIME_SCALE * dcond[:, :, None] * freqs)[:, :, None]
        return out, (torch.stack([-cos_sin[:, :, 1], cos_sin[:, :, 0]], dim=2) * da).reshape(n, -1)


def linear_map(f: Callable, *pairs):
    """``f`` linear in its tensor arguments (a sum, concatenation, pooling, upsampling, reshape):
    applied to the primals and to the tangents alike; a ``None`` tangent among present ones is zero
    (e.g. a label embedding's)."""
    out = f(*(h for h, _ in pairs))
    if all(dh is None for _, dh in pairs):
        return out, None
    with torch.no_grad():
        return out, f(*(torch.zeros_like(h) if dh is None else dh for h, dh in pairs))


def bilinear(f: Callable, a, b):
    """``f`` linear in each of its two arguments (a product, an einsum): the tangent is
    ``f(da, b) + f(a, db)``, a missing tangent dropping its term."""
    (h, dh), (g, dg) = a, b
    out = f(h, g)
    if dh is None and dg is None:
        return out, None
    with torch.no_grad():
        terms = ([] if dh is None else [f(dh, g)]) + ([] if dg is None else [f(h, dg)])
        return out, sum(terms[1:], terms[0])


def softmax(h, dh):
    """Softmax over the last axis; its Jacobian ``diag(w) − wwᵀ`` is symmetric, so the JVP equals the
    VJP: aten's ``_softmax_backward_data``, ``w·(dh − Σ w·dh)``, from the primal weights ``w``."""
    out = F.softmax(h, dim=-1)
    if dh is None:
        return out, None
    with torch.no_grad():
        return out, torch.ops.aten._softmax_backward_data(dh, out, -1, h.dtype)
