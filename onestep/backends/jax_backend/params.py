"""Flat ``{name: array}`` views of Equinox models, named like torch ``state_dict`` keys.

Pytree paths become dotted names (``layers[0].weight`` -> ``layers.0.weight``); a
leaf whose torch counterpart has another shape of the same size (an eqx conv bias is
(C, 1, 1), torch's is (C,)) is reshaped on the way in and out.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def _name(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        else:
            raise TypeError(f"unsupported pytree path element {p!r}")
    return ".".join(parts)


def _leaves(model):
    arrays = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_flatten_with_path(arrays)[0]


def to_flat(model, squeeze: bool = True) -> dict[str, np.ndarray]:
    """``{name: numpy array}``; conv biases of shape (C, 1, 1) are returned as (C,)."""
    out = {}
    for path, leaf in _leaves(model):
        a = np.asarray(leaf)
        if squeeze and a.ndim == 3 and a.shape[1:] == (1, 1):
            a = a.reshape(a.shape[0])
        out[_name(path)] = a
    return out


def from_flat(model, params: dict[str, np.ndarray]):
    """A copy of ``model`` with every parameter replaced by ``params[name]`` (same names)."""
    leaves = _leaves(model)
    names = [_name(p) for p, _ in leaves]
    if set(names) != set(params):
        raise ValueError(f"parameter names differ: missing {sorted(set(names) - set(params))}, "
                         f"unexpected {sorted(set(params) - set(names))}")
    new = []
    for name, (_, leaf) in zip(names, leaves):
        a = np.asarray(params[name])
        if a.size != leaf.size:
            raise ValueError(f"parameter {name}: shape {a.shape} does not fit {leaf.shape}")
        new.append(jnp.asarray(a.reshape(leaf.shape), dtype=leaf.dtype))
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    treedef = jax.tree_util.tree_structure(arrays)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)
