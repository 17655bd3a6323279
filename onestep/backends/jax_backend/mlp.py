"""The MLP for flat data (2-D sets), as an Equinox module.

Its pytree paths (``layers.{i}.weight``, ``label_emb.weight``) and shapes mirror the
torch MLP's ``state_dict``, which is what lets ``params.to_flat``/``from_flat``
exchange weights between the backends.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..architectures import MLPConfig
from ..embedding import embed_conditions, frequencies


class MLP(eqx.Module):
    layers: list
    label_emb: eqx.nn.Embedding | None
    log_weight_head: eqx.nn.Linear | None
    cfg: MLPConfig = eqx.field(static=True)

    def __init__(self, cfg: MLPConfig, key, dtype=jnp.float32):
        self.cfg = cfg
        in_dim = cfg.data_dim + cfg.n_cond * cfg.emb_dim + (cfg.emb_dim if cfg.n_classes else 0)
        dims = [in_dim] + [cfg.width] * cfg.depth + [cfg.data_dim]
        keys = jax.random.split(key, len(dims))
        self.layers = [eqx.nn.Linear(a, b, key=k, dtype=dtype) for a, b, k in zip(dims[:-1], dims[1:], keys)]
        self.label_emb = (eqx.nn.Embedding(cfg.n_classes + 1, cfg.emb_dim, key=keys[-1], dtype=dtype)
                          if cfg.n_classes else None)
        self.log_weight_head = (eqx.nn.Linear(cfg.n_cond * cfg.emb_dim, 1, key=jax.random.fold_in(key, 1),
                                              dtype=dtype) if cfg.log_weight_head else None)

    def log_weight(self, cond):
        """``w(cond)`` (n,) for ``cond`` (n, n_cond): the loss-weight head (``log_weight_head``)."""
        emb = embed_conditions(jnp, cond, jnp.asarray(frequencies(self.cfg.emb_dim), cond.dtype))
        return emb @ self.log_weight_head.weight[0] + self.log_weight_head.bias[0]

    def __call__(self, x, cond, y=None):
        freqs = jnp.asarray(frequencies(self.cfg.emb_dim), cond.dtype)  # a constant under jit
        h = [x, embed_conditions(jnp, cond, freqs)]
        if self.label_emb is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.cfg.n_classes, dtype=jnp.int32)
            h.append(self.label_emb.weight[y])
        h = jnp.concatenate(h, axis=1)
        for layer in self.layers[:-1]:
            h = jax.nn.silu(h @ layer.weight.T + layer.bias)
        last = self.layers[-1]
        return h @ last.weight.T + last.bias
