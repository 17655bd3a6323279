"""Data parallelism, the framework-free part: who this process is and which rows of a batch it owns.

A run with ``world_size`` workers trains on the same global batch as a run with one: every worker
gathers the whole batch of step i (``data.batch_indices``), draws the random numbers of the whole
batch from the step's key (a method's ``draw`` sees the global batch), and keeps its own rows
(``local_rows``: rows ``rank, rank + W, rank + 2W, …``) for the forward and backward passes.  The
workers' gradients are then averaged, which for a loss that is a mean over rows is the gradient of
the global batch: the weights after K steps do not depend on the number of workers, up to the order
of floating-point sums.  How the two backends get there:

* torch: one process per device (``torchrun``); each process computes its rows and the gradients
  are all-reduced explicitly after ``backward`` (no ``DistributedDataParallel``, see
  ``torch_backend``).  ``local_rows`` slices.
* JAX: one program over every device (``jax.sharding``); the batch is sharded over a ``data`` mesh
  axis and XLA inserts the reductions.  ``local_rows`` keeps every row: the program is global.

Rows are dealt out strided, not in blocks, so that a prefix of the batch (Shortcut's bootstrap rows)
stays a prefix of every worker's rows and is shared evenly between them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Multi-host JAX: where process 0 listens, how many processes there are and which one this is
# (JAX's own variable names; ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK for torch).
JAX_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclass(frozen=True)
class Topology:
    """The data-parallel layout seen by one process."""

    world_size: int = 1  # data-parallel workers: torch processes, or JAX devices over all processes
    rank: int = 0  # this process's index among ``processes``
    processes: int = 1  # processes taking part (torch: = world_size; JAX: hosts)
    devices: tuple[str, ...] = ()  # the devices the run trains on, as text (recorded in run.json)

    @property
    def is_main(self) -> bool:
        """Process 0 writes the run directory, the logs and the checkpoints."""
        return self.rank == 0

    def record(self) -> dict:
        return {"world_size": self.world_size, "processes": self.processes, "devices": list(self.devices)}


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` of a process started by ``torchrun`` with more than one
    process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def jax_cluster_env() -> tuple[str, int, int] | None:
    """``(coordinator address, number of processes, process id)`` of a multi-host JAX run, read from
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; None when unset."""
    values = [os.environ.get(name) for name in JAX_CLUSTER_ENV]
    if not any(values):
        return None
    if not all(values):
        missing = [n for n, v in zip(JAX_CLUSTER_ENV, values, strict=True) if not v]
        raise ValueError(f"a multi-host JAX run needs all of {', '.join(JAX_CLUSTER_ENV)}; missing {', '.join(missing)}")
    address, processes, process_id = values
    try:
        processes, process_id = int(processes), int(process_id)
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got {values[1]!r}, "
                         f"{values[2]!r}") from None
    if not 0 <= process_id < processes:
        raise ValueError(f"JAX_PROCESS_ID must be in 0..{processes - 1}, got {process_id}")
    return address, processes, process_id


def check_batch(batch_size: int, world_size: int, what: str = "batch size") -> None:
    """A global batch splits evenly over the workers, with at least one row each; else ValueError."""
    if batch_size < world_size:
        raise ValueError(f"{what} {batch_size} is smaller than the number of data-parallel workers {world_size}: "
                         f"every worker needs at least one row; use a {what} of at least {world_size}")
    if batch_size % world_size:
        raise ValueError(f"{what} {batch_size} does not split evenly over {world_size} data-parallel workers; "
                         f"use a multiple of {world_size} (e.g. {batch_size - batch_size % world_size or world_size})")


def local_rows(tree, n: int, rank: int, world_size: int, take: Callable):
    """This worker's rows ``rank::world_size`` of every per-row array in ``tree`` (a dict, possibly nested).

    An array is per-row when its leading dimension is the global batch size ``n``; 0-d arrays and None
    (values shared by all rows, e.g. a warmup factor) pass unchanged; any other shape is an error,
    because a worker could not tell which part of it is its own.  ``take(a, rows)`` slices an array
    (numpy arrays, e.g. a method's static masks, are sliced with numpy).
    """
    if isinstance(tree, dict):
        return {k: local_rows(v, n, rank, world_size, take) for k, v in tree.items()}
    if tree is None or len(tree.shape) == 0:
        return tree
    if tree.shape[0] != n:
        raise ValueError(f"a draw or batch entry of shape {tuple(tree.shape)} is neither per-row (leading "
                         f"dimension {n}, the batch size) nor shared by all rows (0-d); data-parallel workers "
                         "could not split it")
    if world_size == 1:
        return tree
    rows = slice(rank, None, world_size)
    return tree[rows] if isinstance(tree, np.ndarray) else take(tree, rows)


def block_size(n: int, world_size: int) -> int:
    """Rows each worker samples or evaluates when ``n`` rows are dealt out in equal blocks (the last
    blocks padded): ``ceil(n / world_size)``."""
    return -(-n // world_size)
