"""Sinusoidal embedding of scalar conditions (times), written once for both backends."""
from __future__ import annotations

import math

import numpy as np


def frequencies(dim: int) -> np.ndarray:
    """The ``dim // 2`` frequencies ``10000^(-k/half)`` of the Transformer/DDPM embedding.

    Models keep them as a constant on their own device (a torch buffer, a jax constant),
    so the embedding never creates arrays on the wrong device.
    """
    half = dim // 2
    return np.exp(-math.log(10000.0) * np.arange(half) / half)


EMBEDDING_TIME_SCALE = 1000.0


def embed_conditions(xp, cond, freqs, scale: float = EMBEDDING_TIME_SCALE):
    """Embed each column of ``cond`` ``(n, k)`` as ``[cos(scale·c·f), sin(scale·c·f)]``,
    concatenated over columns: ``(n, k·2·len(freqs))``.

    The ``scale`` stretches times in [0, 1] over the range the frequencies resolve.
    """
    args = scale * cond[:, :, None] * freqs
    emb = xp.concatenate([xp.cos(args), xp.sin(args)], axis=2)
    return emb.reshape((cond.shape[0], -1))
