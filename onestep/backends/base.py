"""The Backend protocol: everything a method may ask of a framework.

Method files (``onestep/methods``) are written once against this protocol and the
array namespace ``backend.xp`` (``torch`` or ``jax.numpy``).  Anything that differs
between frameworks -- modules, optimisers, compilation and its caches, random keys,
checkpoints -- lives behind it, once per backend.  The networks' configurations are in
``architectures``.

Conventions shared by both implementations:

* A *key* is an explicit random key (a ``jax.random`` key, or a 64-bit integer seed
  in torch).  ``fold_in(key, i)`` and ``split(key, n)`` derive new keys
  deterministically, so the random numbers of training step ``i`` depend only on
  ``(seed, i)`` and an interrupted run resumes bit for bit.  Losses and samplers both
  take keys.
* ``jvp`` returns the primal output *with* its gradient to the parameters and the tangent
  output *under stop-gradient*: every JVP objective in the book (sCT, AYF, MeanFlow,
  α-Flow) regresses onto a target built from the tangent, so the network is evaluated
  once and the backward pass runs through the primal only.
* Training state is a :class:`TrainState`; ``train_step`` returns a new one (JAX)
  or the same one updated in place (torch) -- callers always use the returned one.
  ``train_step(loss_fn, state, data, idx, key)`` gathers the minibatch ``data[k][idx]``
  and calls ``loss_fn(model, target, batch, fold_in(key, state.step), state.step)`` inside
  its compiled region, so a JAX step is one dispatch.  ``target`` is the state's target
  network (``state.target``, or ``state.ema`` when the run keeps no separate one).
* Data parallelism (see ``distributed``): ``topology`` says how many workers train and which
  process this is.  ``train_step`` takes the indices of the *global* batch; the loss draws the
  random numbers of the whole batch and keeps this worker's rows with ``local_rows``, and the
  backend averages the workers' gradients, so the result does not depend on the number of workers.
  Methods see none of this, except ``batch_statistic`` for a loss that reads a mean over the batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .architectures import ModelConfig
from .distributed import Topology

EMADecay = float | Callable[[int], float]  # a constant, or the decay used after each step (CT's μ(k))
LossFn = Callable[..., tuple[Any, dict]]  # (model, target, batch, key, step) -> (loss, aux)


@dataclass
class TrainState:
    """Model, EMA copies, optimiser and step counter of one training run."""

    model: Any
    ema: Any  # the running average the samples come from
    target: Any | None  # a second average that losses read as their target network; None: they read ``ema``
    optimizer: Any  # torch: the ``Optimizer`` (it holds its own state); JAX: the optax transformation
    opt_state: Any  # JAX: the optax state; torch: None
    ema_decay: EMADecay
    target_decay: EMADecay | None
    grad_clip: float | None  # global gradient-norm bound (None: no clipping)
    step: int = 0
    mixed_precision: bool = False  # torch: the loss runs under bf16 autocast, JVPs in float32; JAX: ignored
    # what the run logged so far, saved with every checkpoint so that a resumed run keeps it:
    history: list = field(default_factory=list)  # (step, loss) every ``log_every`` steps
    evals: list = field(default_factory=list)  # {"step": ..., metric: value} of periodic evaluations

    @property
    def target_net(self):
        """The network a loss uses as its target (an EMA, or the sampling EMA when none is kept)."""
        return self.ema if self.target is None else self.target


class Backend(Protocol):
    name: str
    xp: Any  # the array namespace: torch or jax.numpy
    device: Any
    dtype: Any  # the float type of arrays and parameters it creates (float32, or float64 for checks)

    # -- arrays ---------------------------------------------------------------
    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Any: ...
    def to_numpy(self, a: Any) -> np.ndarray: ...

    # -- random ---------------------------------------------------------------
    def key(self, seed: int) -> Any: ...
    def split(self, key: Any, n: int = 2) -> Sequence[Any]: ...
    def fold_in(self, key: Any, data: int) -> Any: ...
    def normal(self, key: Any, shape: tuple[int, ...]) -> Any: ...
    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any: ...

    # -- autodiff -------------------------------------------------------------
    def jvp(self, fn: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]: ...
    def stop_gradient(self, x: Any) -> Any: ...
    def value_and_grad(self, fn: Callable, model: Any) -> tuple[Any, dict, dict[str, np.ndarray]]: ...

    # -- models ---------------------------------------------------------------
    def make_model(self, cfg: ModelConfig, key: Any) -> Any: ...
    def get_params(self, model: Any) -> dict[str, np.ndarray]: ...
    def set_params(self, model: Any, params: dict[str, np.ndarray]) -> Any: ...
    def count_params(self, model: Any) -> int: ...

    # -- compilation ----------------------------------------------------------
    def inference(self, fn: Callable) -> Callable: ...
    def cached(self, build: Callable, *args) -> Any: ...

    # -- training -------------------------------------------------------------
    def init_train_state(self, model: Any, lr: float, ema_decay: EMADecay, target_decay: EMADecay | None = None,
                         grad_clip: float | None = None, mixed_precision: bool = False) -> TrainState: ...
    def train_step(self, loss_fn: LossFn, state: TrainState, data: dict, idx: np.ndarray,
                   key: Any) -> tuple[TrainState, Any, dict]: ...
    def save(self, state: TrainState, path: str) -> None: ...
    def load(self, state: TrainState, path: str) -> TrainState: ...

    # -- data parallelism (``distributed``) -------------------------------------
    topology: Topology  # world size, this process's rank, the devices

    def local_rows(self, tree: dict, n: int) -> dict:
        """This worker's rows of every per-row array of a global batch of ``n`` rows (JAX: all of them)."""

    def batch_statistic(self, x: Any) -> Any:
        """A mean over this worker's rows -> the same mean over the global batch, under stop-gradient."""

    def local_key(self, key: Any) -> Any:
        """The key of this worker's own draws when sampling its block of rows (``scatter_rows``)."""

    def scatter_rows(self, x: Any) -> Any:
        """Rows ``(n, ...)`` -> what this worker samples or evaluates (padded to a multiple of the workers)."""

    def gather_rows(self, x: Any, n: int) -> np.ndarray:
        """Inverse of ``scatter_rows``: the first ``n`` rows of the whole array, on every process."""

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (every process must call it)."""

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on this process's (first) accelerator so far; None on a CPU."""


class CompileCache:
    """What a backend compiles or builds once: functions for inference and device tables.

    A backend implements ``_compile(fn)`` (jit in JAX, gradient-free eager calls in torch) and
    ``_eagerly()`` (a context in which array code runs now, even inside a traced function, so a
    cached table never holds a tracer); the cache is keyed by the function itself, so methods pass
    module-level functions, not closures.
    """

    def __init__(self):
        self._cache: dict = {}

    def inference(self, fn: Callable) -> Callable:
        """``fn`` compiled for inference (no gradients), once per backend."""
        if fn not in self._cache:
            self._cache[fn] = self._compile(fn)
        return self._cache[fn]

    def cached(self, build: Callable, *args):
        """``build(*args)``, computed once per backend (device tables such as a curriculum's grids)."""
        if (build, args) not in self._cache:
            with self._eagerly():
                self._cache[build, args] = build(*args)
        return self._cache[build, args]


def ema_decay_at(decay: EMADecay, step: int) -> float:
    """The EMA decay applied after optimisation step ``step`` (a constant or a schedule)."""
    value = float(decay(step)) if callable(decay) else float(decay)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {value} at step {step}")
    return value
