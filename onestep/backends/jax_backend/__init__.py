"""JAX/Equinox implementation of the Backend protocol (see ``onestep.backends.base``).

float64 is enabled process-wide so the derivation checks can run in double
precision; training arrays and parameters are created in ``self.dtype`` (float32 by
default) explicitly, never by JAX's default dtype.

Data parallelism: one process drives every device of its platform (``devices="all"``, the
default; an integer takes the first n).  With more than one device the backend builds a 1-D mesh
with a ``data`` axis: parameters, optimiser state and the training set are replicated, each
step's batch is sharded over ``data`` inside the compiled step, and XLA inserts the gradient
reductions (the program stays the global one, so random draws are those of a one-device run).
Several hosts join one run through ``jax.distributed.initialize``, read from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; the mesh then spans
the devices of every process.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ...files import atomic_write
from ..architectures import MLPConfig, UNetConfig
from ..base import CompileCache, TrainState, ema_decay_at
from ..distributed import Topology, block_size, jax_cluster_env, local_rows
from .mlp import MLP
from .params import from_flat, to_flat
from .unet import UNet

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
_MAGIC = b"onestep-jax-checkpoint\n"  # then the step, the length of a JSON log and the log, then the leaves


def _is_float_array(x) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


class JaxBackend(CompileCache):
    """JAX with jitted train steps (``eqx.filter_jit``) and ``jax.random`` keys."""

    name = "jax"
    xp = jnp

    def __init__(self, device: str = "auto", precision: str = "float32", devices: int | str = "all"):
        cluster = jax_cluster_env()
        if cluster is not None and not jax.distributed.is_initialized():
            address, processes, process_id = cluster
            jax.distributed.initialize(address, processes, process_id)
        platform = jax.default_backend() if device in ("auto", "cuda", "gpu") else device
        available = jax.devices(platform)
        if devices == "all":
            devices = len(available)
        if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= len(available):
            raise ValueError(f"devices must be 'all' or an integer in 1..{len(available)} (the {platform} devices "
                             f"JAX sees), got {devices!r}")
        self.device = available[0]
        self.dtype = _DTYPES[precision]
        self.mesh = Mesh(np.array(available[:devices]), ("data",))
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.topology = Topology(world_size=devices, rank=jax.process_index(), processes=jax.process_count(),
                                 devices=tuple(f"{d.platform}:{d.id} ({d.device_kind})" for d in available[:devices]))
        super().__init__()

    @property
    def _parallel(self) -> bool:
        return self.topology.world_size > 1

    def _put(self, a: np.ndarray, sharding):
        """A global array with ``sharding`` from a numpy array that every process holds whole."""
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def _replicate(self, tree):
        """Every array of ``tree`` replicated over the mesh (a no-op on one device)."""
        if not self._parallel:
            return tree
        return jax.tree.map(lambda x: self._put(np.asarray(self._local(x)), self._replicated)
                            if eqx.is_array(x) else x, tree)

    @staticmethod
    def _local(x):
        """A replicated global array as this process's copy (arrays of one process pass unchanged)."""
        if eqx.is_array(x) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    # -- arrays ---------------------------------------------------------------
    def from_numpy(self, a, dtype: str | None = None):
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(_DTYPES[dtype] if dtype else self.dtype)
        if self._parallel:  # replicated once over the mesh (a multi-host program's arrays are global)
            return self._put(a, self._replicated)
        return jnp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        if eqx.is_array(a) and not a.is_fully_addressable:
            if a.sharding.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    # -- random ---------------------------------------------------------------
    def key(self, seed: int):
        return jax.random.key(int(seed))

    def split(self, key, n: int = 2):
        return list(jax.random.split(key, n))

    def fold_in(self, key, data: int):
        return jax.random.fold_in(key, data)

    def normal(self, key, shape):
        return jax.random.normal(key, shape, dtype=self.dtype)

    def uniform(self, key, shape):
        return jax.random.uniform(key, shape, dtype=self.dtype)

    # -- autodiff -------------------------------------------------------------
    def jvp(self, fn: Callable, primals: tuple, tangents: tuple):
        out, tangent = jax.jvp(fn, primals, tangents)
        return out, jax.lax.stop_gradient(tangent)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def value_and_grad(self, fn: Callable, model):
        (loss, aux), grads = eqx.filter_value_and_grad(fn, has_aux=True)(model)
        return float(loss), {k: np.asarray(v) for k, v in aux.items()}, to_flat(grads)

    # -- models ---------------------------------------------------------------
    def make_model(self, cfg, key):
        if isinstance(cfg, MLPConfig):
            return self._replicate(MLP(cfg, key, self.dtype))
        if isinstance(cfg, UNetConfig):
            return self._replicate(UNet(cfg, key, self.dtype))
        raise TypeError(f"unknown model config {type(cfg).__name__}; expected MLPConfig or UNetConfig")

    def get_params(self, model) -> dict[str, np.ndarray]:
        return to_flat(jax.tree.map(self._local, model))

    def set_params(self, model, params: dict[str, np.ndarray]):
        return self._replicate(from_flat(jax.tree.map(self._local, model), params))

    def count_params(self, model) -> int:
        return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))

    # -- compilation ----------------------------------------------------------
    @staticmethod
    def _compile(fn: Callable) -> Callable:
        """``fn`` jitted (``eqx.filter_jit``: arrays traced, everything else static)."""
        return eqx.filter_jit(fn)

    @staticmethod
    def _eagerly():
        return jax.ensure_compile_time_eval()

    # -- training -------------------------------------------------------------
    def init_train_state(self, model, lr: float, ema_decay, target_decay=None, grad_clip: float | None = None,
                         mixed_precision: bool = False):
        # mixed_precision is torch's autocast; JAX trains in float32 (XLA picks the GPU matmul precision)
        opt = optax.adam(lr)
        if grad_clip:
            opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
        opt_state = self._replicate(opt.init(eqx.filter(model, eqx.is_inexact_array)))
        return TrainState(model=model, ema=model, target=None if target_decay is None else model, optimizer=opt,
                          opt_state=opt_state, ema_decay=ema_decay, target_decay=target_decay, grad_clip=grad_clip)

    def _compiled_step(self, loss_fn, opt):
        cache_key = (loss_fn, opt)  # an optax transformation is a hashable tuple
        if cache_key not in self._cache:
            def average(avg, model, decay):
                return jax.tree.map(lambda e, p: e + (1.0 - decay).astype(p.dtype) * (p - e)
                                    if _is_float_array(p) else e, avg, model)

            rows = self._rows if self._parallel else None

            @eqx.filter_jit
            def step(model, ema, target, opt_state, data, idx, key, step_no, ema_decay, target_decay):
                batch = {k: None if v is None else v[idx] for k, v in data.items()}
                if rows is not None:  # each device computes its block of the global batch
                    batch = jax.lax.with_sharding_constraint(batch, rows)
                step_key = jax.random.fold_in(key, step_no)

                def scalar_loss(m):
                    return loss_fn(m, ema if target is None else target, batch, step_key, step_no)

                (loss, aux), grads = eqx.filter_value_and_grad(scalar_loss, has_aux=True)(model)
                updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
                model = eqx.apply_updates(model, updates)
                ema = average(ema, model, ema_decay)
                if target is not None:
                    target = average(target, model, target_decay)
                return model, ema, target, opt_state, loss, aux

            self._cache[cache_key] = step
        return self._cache[cache_key]

    def train_step(self, loss_fn, state: TrainState, data: dict, idx, key):
        fn = self._compiled_step(loss_fn, state.optimizer)
        decays = [np.float64(ema_decay_at(d, state.step)) if d is not None else None
                  for d in (state.ema_decay, state.target_decay)]
        idx = np.asarray(idx)
        if self.topology.processes > 1:
            idx = self._put(idx, self._replicated)
        model, ema, target, opt_state, loss, aux = fn(state.model, state.ema, state.target, state.opt_state, data,
                                                      idx, key, np.asarray(state.step, np.uint32), *decays)
        new = replace(state, model=model, ema=ema, target=target, opt_state=opt_state, step=state.step + 1)
        return new, loss, aux

    def _arrays(self, state: TrainState):
        return jax.tree.map(self._local, (state.model, state.ema, state.target, state.opt_state))

    def save(self, state: TrainState, path: str) -> None:
        log = json.dumps({"history": state.history, "evals": state.evals}).encode()

        def write(f):
            f.write(_MAGIC + int(state.step).to_bytes(8, "little") + len(log).to_bytes(8, "little") + log)
            eqx.tree_serialise_leaves(f, self._arrays(state))

        atomic_write(path, write)

    def load(self, state: TrainState, path: str) -> TrainState:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{path} is not a jax onestep checkpoint")
            step = int.from_bytes(f.read(8), "little")
            try:
                log = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                model, ema, target, opt_state = self._replicate(eqx.tree_deserialise_leaves(f, self._arrays(state)))
            except (RuntimeError, ValueError, EOFError) as e:
                raise ValueError(f"checkpoint {path} does not match the model: {e}") from None
        return replace(state, model=model, ema=ema, target=target, opt_state=opt_state, step=step,
                       history=[tuple(h) for h in log["history"]], evals=log["evals"])

    # -- data parallelism -----------------------------------------------------
    def local_rows(self, tree: dict, n: int) -> dict:
        return local_rows(tree, n, 0, 1, None)  # checks the shapes; the compiled program is global

    def batch_statistic(self, x):
        return jax.lax.stop_gradient(x)

    def local_key(self, key):
        return key

    def scatter_rows(self, x):
        if not self._parallel:
            return x
        x = np.asarray(self._local(x))
        size = block_size(len(x), self.topology.world_size) * self.topology.world_size
        if size > len(x):  # padded with copies of row 0, dropped again by gather_rows
            x = np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])
        return self._put(x, self._rows)

    def gather_rows(self, x, n: int) -> np.ndarray:
        return self.to_numpy(x)[:n]

    def _sum_over_processes(self, a: np.ndarray) -> np.ndarray:
        if self.topology.processes == 1:
            return a
        return np.asarray(multihost_utils.process_allgather(np.asarray(a))).sum(axis=0)

    def peak_memory(self) -> int | None:
        if self.device.platform == "cpu":
            return None
        stats = self.device.memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def any_process(self, flag: bool) -> bool:
        return bool(self._sum_over_processes(np.asarray([float(flag)]))[0] > 0)

    def barrier(self) -> None:
        if self.topology.processes > 1:
            multihost_utils.sync_global_devices("onestep")
