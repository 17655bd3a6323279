"""Sinusoidal embedding of scalar conditions, written once for both backends."""
from __future__ import annotations

import math


def sinusoidal(xp, t, dim: int, scale: float = 1000.0):
    """Embed ``t`` of shape ``(n,)`` as ``(n, dim)``: ``[cos(scale·t·f_k), sin(scale·t·f_k)]``.

    Frequencies ``f_k = 10000^(-k/half)`` as in the Transformer/DDPM embedding; the
    ``scale`` stretches t in [0, 1] over the range the frequencies resolve.
    """
    half = dim // 2
    k = xp.arange(half, dtype=t.dtype)
    freqs = xp.exp(-math.log(10000.0) * k / half)
    args = scale * t[:, None] * freqs[None, :]
    return xp.concatenate([xp.cos(args), xp.sin(args)], axis=1)


def embed_conditions(xp, cond, dim: int):
    """Embed each column of ``cond`` (shape ``(n, k)``) and concatenate: ``(n, k·dim)``."""
    return xp.concatenate([sinusoidal(xp, cond[:, i], dim) for i in range(cond.shape[1])], axis=1)
