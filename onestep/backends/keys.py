"""Deterministic integer-seed keys (the torch backend's stand-in for jax.random keys)."""
from __future__ import annotations

import numpy as np

_MASK = (1 << 63) - 1


def _mix(*words: int) -> int:
    state = np.random.SeedSequence([w & _MASK for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & _MASK


def split_seed(key: int, n: int = 2) -> list[int]:
    """``n`` independent child keys of ``key``."""
    return [_mix(key, 0x5EED, i) for i in range(n)]


def fold_in_seed(key: int, data: int) -> int:
    """A child key of ``key`` determined by the integer ``data`` (e.g. a step number)."""
    return _mix(key, 0xF01D, data)
