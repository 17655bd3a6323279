"""The Backend protocol: everything a method may ask of a framework.

Method files (``onestep/methods``) are written once against this protocol and the
array namespace ``backend.xp`` (``torch`` or ``jax.numpy``).  Anything that differs
between frameworks -- modules, optimisers, compilation, random keys, checkpoints --
lives behind it, once per backend.

Conventions shared by both implementations:

* A *key* is an explicit random key (a ``jax.random`` key, or a 64-bit integer seed
  in torch).  ``fold_in(key, i)`` and ``split(key, n)`` derive new keys
  deterministically, so the random numbers of training step ``i`` depend only on
  ``(seed, i)`` and an interrupted run resumes bit for bit.
* A *model* is called as ``model(x, cond, y)``: ``x`` has shape ``(n, *shape)``,
  ``cond`` has shape ``(n, n_cond)`` (the times the method conditions on, each
  embedded sinusoidally), ``y`` is ``None`` or integer labels of shape ``(n,)``
  (label ``n_classes`` means "no label", for classifier-free guidance).
* Training state is a :class:`TrainState`; ``train_step`` returns a new one (JAX)
  or the same one updated in place (torch) -- callers always use the returned one.
  ``train_step(loss_fn, state, data, idx, key)`` gathers the minibatch ``data[k][idx]``
  and calls ``loss_fn(model, ema, batch, fold_in(key, state.step), state.step)`` inside
  its compiled region, so a JAX step is one dispatch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class MLPConfig:
    """A residual-free MLP on flat vectors: ``depth`` hidden layers of ``width``, SiLU."""

    data_dim: int
    n_cond: int = 1
    width: int = 256
    depth: int = 4
    emb_dim: int = 64
    n_classes: int = 0


@dataclass(frozen=True)
class UNetConfig:
    """A small U-Net for ``(channels, size, size)`` images with time/label embedding."""

    channels: int
    size: int
    n_cond: int = 1
    base: int = 32
    mults: tuple[int, ...] = (1, 2)
    emb_dim: int = 128
    n_classes: int = 0

    def __post_init__(self):
        factor = 2 ** (len(self.mults) - 1)
        if self.size % factor:
            raise ValueError(f"UNet: image size {self.size} is not divisible by 2**(levels-1) = {factor} "
                             f"(mults={self.mults}); use fewer levels or another size")


def group_count(channels: int) -> int:
    """GroupNorm groups of the U-Net: ``min(8, channels)``, lowered until it divides ``channels``."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def unet_levels(h, emb, down, mid, up):
    """The U-Net's skip wiring, the same in both backends: each ``down`` level returns
    ``(skip, h)``, ``mid`` transforms the deepest ``h``, and ``up[i]`` consumes ``down[i]``'s skip."""
    skips = []
    for level in down:
        skip, h = level(h, emb)
        skips.append(skip)
    h = mid(h, emb)
    for level, skip in zip(reversed(up), reversed(skips)):
        h = level(h, skip, emb)
    return h


ModelConfig = MLPConfig | UNetConfig


@dataclass
class TrainState:
    """Model, EMA copy, optimiser state and step counter of one training run."""

    model: Any
    ema: Any
    opt_state: Any
    step: int = 0
    extra: dict = field(default_factory=dict)


LossFn = Callable[..., tuple[Any, dict]]
EMADecay = float | Callable[[int], float]  # a constant, or the decay used at each step (CT's μ(k))


class Backend(Protocol):
    name: str
    xp: Any  # the array namespace: torch or jax.numpy

    # -- arrays ---------------------------------------------------------------
    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Any: ...
    def to_numpy(self, a: Any) -> np.ndarray: ...
    def set_precision(self, dtype: str) -> None: ...

    # -- random ---------------------------------------------------------------
    def key(self, seed: int) -> Any: ...
    def split(self, key: Any, n: int = 2) -> Sequence[Any]: ...
    def fold_in(self, key: Any, data: int) -> Any: ...
    def normal(self, key: Any, shape: tuple[int, ...]) -> Any: ...
    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any: ...
    def randint(self, key: Any, shape: tuple[int, ...], high: int) -> Any: ...

    # -- autodiff -------------------------------------------------------------
    def jvp(self, fn: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]: ...
    def stop_gradient(self, x: Any) -> Any: ...

    # -- models ---------------------------------------------------------------
    def make_model(self, cfg: ModelConfig, key: Any) -> Any: ...
    def get_params(self, model: Any) -> dict[str, np.ndarray]: ...
    def set_params(self, model: Any, params: dict[str, np.ndarray]) -> Any: ...
    def count_params(self, model: Any) -> int: ...

    # -- training -------------------------------------------------------------
    def init_train_state(self, model: Any, lr: float, ema_decay: EMADecay,
                         grad_clip: float | None = None) -> TrainState: ...
    def train_step(self, loss_fn: LossFn, state: TrainState, data: dict, idx: np.ndarray,
                   key: Any) -> tuple[TrainState, Any, dict]: ...
    def inference(self, fn: Callable) -> Callable: ...
    def save(self, state: TrainState, path: str) -> None: ...
    def load(self, state: TrainState, path: str) -> TrainState: ...


def ema_decay_at(decay: EMADecay, step: int) -> float:
    """The EMA decay applied after optimisation step ``step`` (a constant or a schedule)."""
    value = float(decay(step)) if callable(decay) else float(decay)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {value} at step {step}")
    return value


def model_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Per-sample array shape a network takes and returns (flat for an MLP)."""
    if isinstance(cfg, MLPConfig):
        return (cfg.data_dim,)
    return (cfg.channels, cfg.size, cfg.size)
