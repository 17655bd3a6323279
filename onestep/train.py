"""The training loop shared by every method and both backends.

Step ``i`` uses the random key ``fold_in(train_key, i)`` and the minibatch
``batch_indices(n, batch, seed, i)``: nothing depends on how the run got to step i,
so a run resumed from a checkpoint reaches the same weights as one that never stopped.
Checkpoints hold the loss history and the periodic evaluations too, and are written every
``ckpt_every`` steps, at the end, and when the process is asked to stop (SIGTERM, as a cluster
does before preempting a job, or SIGINT / Ctrl-C): the step in flight finishes, a checkpoint is
written and ``Interrupted`` is raised.  With several data-parallel workers (``backends.distributed``)
only process 0 writes, and the workers agree every ``STOP_CHECK_EVERY`` steps on whether to stop.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from .backends.architectures import model_shape
from .backends.distributed import check_batch
from .data import batch_indices

STOP_CHECK_EVERY = 10  # steps between the workers' agreements on a stop request (one process: every step)


class DecaySchedule(Protocol):
    """An EMA decay that changes over a run (CT's μ(k)): one value per training step."""

    def table(self, total_steps: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (values per scale live in ``presets``).

    ``ema_decay`` is the running average the samples come from; ``target_decay``, when set, keeps
    a second average that the loss reads as its target network (CD's μ, CT's μ(k), CTM's EMA
    target); without it a loss that asks for a target gets the sampling average.
    """

    steps: int
    batch_size: int
    lr: float = 1e-3
    ema_decay: float | DecaySchedule = 0.999
    target_decay: float | DecaySchedule | None = None
    grad_clip: float | None = None
    log_every: int = 100
    ckpt_every: int = 0  # 0: only at the end (when a checkpoint path is given)
    eval_every: int = 0  # steps between evaluations during the run (0: none; see ``train``'s ``evaluate``)
    mixed_precision: bool = False  # bf16 autocast of the loss outside JVPs (torch); JAX trains in float32

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("ckpt_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (0: never), got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for name in ("ema_decay", "target_decay"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1) or a schedule, got {value!r}")

    def decays(self) -> tuple[Any, Any]:
        """``(ema_decay, target_decay)`` as a backend takes them: constants, or functions of the step."""
        def per_step(decay):
            if decay is None or isinstance(decay, (int, float)):
                return decay
            table = decay.table(self.steps)
            return lambda step: table[min(step, len(table) - 1)]
        return per_step(self.ema_decay), per_step(self.target_decay)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """The run was asked to stop (SIGTERM / SIGINT); a checkpoint of the last finished step was written."""


def _show_progress(progress) -> bool:
    if progress is not None:
        return bool(progress)
    setting = os.environ.get("ONESTEP_PROGRESS", "auto")
    return setting == "1" or (setting == "auto" and sys.stderr.isatty() and not os.environ.get("CI"))


@contextlib.contextmanager
def stop_requests():
    """A list that SIGTERM / SIGINT append their signal's name to while the block runs (a second SIGINT
    interrupts at once).  Outside the main thread, where handlers cannot be installed, it stays empty."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and requests:
            raise KeyboardInterrupt
        requests.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _save(bk, state, ckpt_path: str) -> None:
    """Checkpoint on process 0, after checking the weights are finite (on every process)."""
    _check_finite(bk, state, state.step, ckpt_path)
    if bk.topology.is_main:
        bk.save(state, ckpt_path)


def train(bk, loss_fn, state, data, cfg: TrainConfig, seed: int, ckpt_path: str | None = None,
          resume: bool = False, progress: bool | None = None, evaluate: Callable | None = None,
          timing: list | None = None):
    """Run ``cfg.steps`` optimisation steps; returns ``(state, history)``.

    ``data`` is a ``data.Data``: ``x`` (numpy, float) and ``y`` (int labels or None).  The data set is
    moved to the device once; minibatches are gathered there.  ``history`` (also ``state.history``)
    holds ``(step, loss)`` at every ``log_every`` steps; ``evaluate(state) -> dict``, when given, runs
    every ``eval_every`` steps and its results go to ``state.evals``.  With ``resume`` and an existing
    checkpoint at ``ckpt_path`` the run continues from it, history included.  ``timing``, when given,
    receives ``(step, time.perf_counter())`` at every logged step (throughput without compilation).
    """
    check_batch(cfg.batch_size, bk.topology.world_size)
    if resume and ckpt_path and os.path.exists(ckpt_path):
        state = bk.load(state, ckpt_path)
    on_device = {"x": bk.from_numpy(data.x),
                 "y": None if data.y is None else bk.from_numpy(data.y)}
    _, base_key = run_keys(bk, seed)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (bk.topology.is_main and _show_progress(progress)),
               desc="train", leave=False)
    with stop_requests() as requests:
        while state.step < cfg.steps:
            idx = batch_indices(len(data.x), cfg.batch_size, seed, state.step)
            state, loss, _ = bk.train_step(loss_fn, state, on_device, idx, base_key)
            done = state.step
            if done % cfg.log_every == 0 or done == cfg.steps:
                value = float(bk.to_numpy(loss))
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"loss became {value} at step {done}; "
                                        f"last good checkpoint kept at {ckpt_path or '(none written)'}")
                state.history.append((done, value))
                bar.set_postfix(loss=f"{value:.4f}")
                if timing is not None:
                    timing.append((done, time.perf_counter()))
            if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0:
                state.evals.append({"step": done, **evaluate(state)})
            if ckpt_path and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
                _save(bk, state, ckpt_path)
            bar.update(1)
            if _stop_agreed(bk, requests, done):
                bar.close()
                if ckpt_path:
                    _save(bk, state, ckpt_path)
                bk.barrier()
                where = f"checkpoint at {ckpt_path}; continue with --resume" if ckpt_path else "no checkpoint path"
                raise Interrupted(f"stopped by {requests[0] if requests else 'another worker'} after step "
                                  f"{done} of {cfg.steps}; {where}")
    bar.close()
    if ckpt_path:
        _save(bk, state, ckpt_path)
    return state, state.history


def _stop_agreed(bk, requests: list, step: int) -> bool:
    """Whether every worker stops after ``step``: at once on one process; on several, every
    ``STOP_CHECK_EVERY`` steps, when any process got a request (so all stop at the same step)."""
    if bk.topology.processes == 1:
        return bool(requests)
    return step % STOP_CHECK_EVERY == 0 and bk.any_process(bool(requests))


def _check_finite(bk, state, step: int, ckpt_path: str) -> None:
    """Refuse to overwrite a good checkpoint with non-finite weights."""
    for name, value in bk.get_params(state.model).items():
        if not np.all(np.isfinite(value)):
            raise NonFiniteLoss(f"parameter {name} is not finite at step {step}; "
                                f"last good checkpoint kept at {ckpt_path}")


def as_model_input(data, model_cfg):
    """The data set with samples reshaped to what the network takes (flat for an MLP)."""
    shape = model_shape(model_cfg)
    if data.x.shape[1:] == shape:
        return data
    return replace(data, x=data.x.reshape((len(data.x), *shape)))


def run_keys(bk, seed: int):
    """The (model-initialisation, training) keys of a run with this seed."""
    return bk.split(bk.key(seed), 2)


def init_state(bk, model_cfg, cfg: TrainConfig, seed: int):
    """A fresh train state: the network of ``model_cfg`` initialised from the run's key, its averages,
    and the optimiser of ``cfg``."""
    ema_decay, target_decay = cfg.decays()
    return bk.init_train_state(bk.make_model(model_cfg, run_keys(bk, seed)[0]), lr=cfg.lr, ema_decay=ema_decay,
                               target_decay=target_decay, grad_clip=cfg.grad_clip,
                               mixed_precision=cfg.mixed_precision)
