"""The MLP for flat data (2-D sets), as a torch ``nn.Module``.

Parameter names and shapes (``layers.{i}.weight`` of shape (out, in), ``label_emb.weight``)
are the exchange format shared with the JAX backend's MLP. The forward is written on
(primal, tangent) pairs for the backend's cheap JVP (see ``tangent``).
"""
from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from ..architectures import MLPConfig
from ..embedding import embed_conditions, frequencies
from . import tangent as tg


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("freqs", torch.as_tensor(frequencies(cfg.emb_dim)), persistent=False)
        in_dim = cfg.data_dim + cfg.n_cond * cfg.emb_dim + (cfg.emb_dim if cfg.n_classes else 0)
        dims = [in_dim] + [cfg.width] * cfg.depth + [cfg.data_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        if cfg.n_classes:
            self.label_emb = nn.Embedding(cfg.n_classes + 1, cfg.emb_dim)  # last row: "no label"
        if cfg.log_weight_head:
            self.log_weight_head = nn.Linear(cfg.n_cond * cfg.emb_dim, 1)

    def log_weight(self, cond):
        """``w(cond)`` (n,) for ``cond`` (n, n_cond): the loss-weight head (``log_weight_head``)."""
        return self.log_weight_head(embed_conditions(torch, cond, self.freqs))[:, 0]

    def forward(self, x, cond, y=None):
        """``x`` (n, data_dim), ``cond`` (n, n_cond), ``y`` None or labels (n,) -> (n, data_dim)."""
        return tg.call(self.forward_pairs, x, cond, y)

    def forward_pairs(self, x, dx, cond, dcond, y):
        """The network on (primal, tangent) pairs; ``dx = dcond = None`` is the plain forward."""
        h = [(x, dx), tg.embed(cond, dcond, self.freqs)]
        if self.cfg.n_classes:
            if y is None:
                y = torch.full((x.shape[0],), self.cfg.n_classes, device=x.device, dtype=torch.long)
            h.append((self.label_emb(y), None))  # labels are integers: no tangent
        h = tg.linear_map(lambda *parts: torch.cat(parts, dim=1), *h)
        for layer in self.layers[:-1]:
            h = tg.silu(*tg.linear(layer, *h))
        return tg.linear(self.layers[-1], *h)
