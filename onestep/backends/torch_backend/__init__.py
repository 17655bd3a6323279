"""PyTorch implementation of the Backend protocol (see ``onestep.backends.base``).

Data parallelism: one process per device, started by ``torchrun`` (which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous); the first backend built in such a process joins the process group
(NCCL on GPUs, gloo on CPUs).  Gradients are averaged by one explicit all-reduce after ``backward``
rather than by wrapping the network in ``DistributedDataParallel``: DDP synchronises gradients from
hooks that fire only when the forward pass goes through the DDP wrapper's own ``forward``, and
``torch.func.jvp`` (or a hand-written tangent-carrying forward) calls the underlying module instead
(the official MeanFlow code hits the same wall and all-reduces by hand).  An all-reduce of ``.grad``
after ``backward`` does not care how the loss was computed, so every objective, with or without a
JVP, is averaged the same way.  What it gives up is DDP's overlap of communication with the backward
pass: one flat all-reduce per step, after it.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from ...files import atomic_write
from ..architectures import MLPConfig, UNetConfig
from ..base import CompileCache, TrainState, ema_decay_at
from ..distributed import Topology, block_size, local_rows, torchrun_env
from ..keys import fold_in_seed, split_seed
from .mlp import MLP
from .unet import UNet

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchBackend(CompileCache):
    """Eager PyTorch; random keys are 63-bit integer seeds for a ``torch.Generator``."""

    name = "torch"
    xp = torch

    def __init__(self, device: str = "auto", precision: str = "float32"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        self.topology = Topology(devices=(str(self.device),))
        cluster = torchrun_env()
        if cluster is not None:
            rank, world, local_rank = cluster
            if self.device.type == "cuda":  # one GPU per process: the one torchrun's LOCAL_RANK names
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.topology = Topology(world_size=world, rank=rank, processes=world,
                                     devices=tuple(self._all_devices(world)))
        super().__init__()

    def _all_devices(self, world: int) -> list[str]:
        names = [None] * world
        dist.all_gather_object(names, f"{self.device}" + (f" ({torch.cuda.get_device_name(self.device)})"
                                                         if self.device.type == "cuda" else ""))
        return names

    # -- arrays ---------------------------------------------------------------
    def from_numpy(self, a, dtype: str | None = None):
        a = np.asarray(a)
        if a.dtype.kind == "f":
            return torch.as_tensor(a, dtype=_DTYPES[dtype] if dtype else self.dtype, device=self.device)
        return torch.as_tensor(a, device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    # -- random ---------------------------------------------------------------
    def key(self, seed: int) -> int:
        return split_seed(int(seed), 1)[0]

    def split(self, key: int, n: int = 2) -> list[int]:
        return split_seed(key, n)

    def fold_in(self, key: int, data: int) -> int:
        return fold_in_seed(key, data)

    def _gen(self, key: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(key))
        return g

    def normal(self, key, shape):
        return torch.randn(shape, generator=self._gen(key), device=self.device, dtype=self.dtype)

    def uniform(self, key, shape):
        return torch.rand(shape, generator=self._gen(key), device=self.device, dtype=self.dtype)

    # -- autodiff -------------------------------------------------------------
    def jvp(self, fn: Callable, primals: tuple, tangents: tuple):
        # The primal output keeps the autograd graph of the primal computation (torch.func.jvp
        # records it), so gradients to the parameters flow through it; the tangent is detached.
        # Always in full precision: a tangent in bf16 is too coarse (mixed-precision runs autocast the rest).
        with torch.autocast(self.device.type, enabled=False):
            out, tangent = torch.func.jvp(fn, primals, tangents)
        return out, tangent.detach()

    def stop_gradient(self, x):
        return x.detach()

    def value_and_grad(self, fn: Callable, model):
        model.zero_grad(set_to_none=True)
        loss, aux = fn(model)
        loss.backward()
        grads = {k: p.grad.detach().cpu().numpy() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), {k: self.to_numpy(v) for k, v in aux.items()}, grads

    # -- models ---------------------------------------------------------------
    def make_model(self, cfg, key):
        if not isinstance(cfg, (MLPConfig, UNetConfig)):
            raise TypeError(f"unknown model config {type(cfg).__name__}; expected MLPConfig or UNetConfig")
        # Module initialisers draw from the global generator: seed it from the key inside a
        # forked RNG state, so building a model leaves the caller's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(key))
            model = MLP(cfg) if isinstance(cfg, MLPConfig) else UNet(cfg)
        return model.to(device=self.device, dtype=self.dtype)

    def get_params(self, model) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    def set_params(self, model, params: dict[str, np.ndarray]):
        own = model.state_dict()
        if set(own) != set(params):
            raise ValueError(f"parameter names differ: missing {sorted(set(own) - set(params))}, "
                             f"unexpected {sorted(set(params) - set(own))}")
        model.load_state_dict({k: torch.as_tensor(params[k], dtype=own[k].dtype, device=self.device)
                               for k in own})
        return model

    def count_params(self, model) -> int:
        return sum(p.numel() for p in model.parameters())

    # -- compilation ----------------------------------------------------------
    @staticmethod
    def _compile(fn: Callable) -> Callable:
        """``fn`` run without gradient tracking (eager torch compiles nothing)."""
        def no_grad(*args, **kwargs):
            with torch.no_grad():
                return fn(*args, **kwargs)
        return no_grad

    @staticmethod
    def _eagerly():
        return contextlib.nullcontext()  # eager torch traces nothing

    # -- training -------------------------------------------------------------
    def init_train_state(self, model, lr: float, ema_decay, target_decay=None, grad_clip: float | None = None,
                         mixed_precision: bool = False):
        def average():
            return copy.deepcopy(model).requires_grad_(False)
        # fused: one kernel for all parameters (the per-tensor loop dominates small models)
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        return TrainState(model=model, ema=average(), target=None if target_decay is None else average(),
                          optimizer=opt, opt_state=None, ema_decay=ema_decay, target_decay=target_decay,
                          grad_clip=grad_clip, mixed_precision=mixed_precision)

    def train_step(self, loss_fn, state: TrainState, data: dict, idx, key):
        model, opt = state.model, state.optimizer
        idx = torch.as_tensor(idx, device=self.device)
        batch = {k: None if v is None else v[idx] for k, v in data.items()}
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=state.mixed_precision):
            loss, aux = loss_fn(model, state.target_net, batch, self.fold_in(key, state.step), state.step)
        loss.backward()
        if self.topology.world_size > 1:
            loss, aux = self._average_over_workers(model, loss, aux)
        if state.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
        opt.step()
        with torch.no_grad():
            params = list(model.parameters())
            for average, decay in ((state.ema, state.ema_decay), (state.target, state.target_decay)):
                if average is not None:
                    torch._foreach_lerp_(list(average.parameters()), params, 1.0 - ema_decay_at(decay, state.step))
        state.step += 1
        return state, loss.detach(), {k: v.detach() for k, v in aux.items()}

    def _average_over_workers(self, model, loss, aux: dict):
        """Average the gradients, the loss and the aux values of every worker with one all-reduce; the
        mean of the workers' row-means is the mean over the global batch (equal rows per worker)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        names = list(aux)
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [loss.detach().reshape(1).to(grads[0].dtype)]
                         + [aux[k].detach().reshape(1).to(grads[0].dtype) for k in names])
        dist.all_reduce(flat)
        flat /= self.topology.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset], {k: flat[offset + 1 + i] for i, k in enumerate(names)}

    def save(self, state: TrainState, path: str) -> None:
        blob = {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
                "target": None if state.target is None else state.target.state_dict(),
                "opt": state.optimizer.state_dict(), "step": state.step, "backend": self.name,
                "history": state.history, "evals": state.evals}
        atomic_write(path, lambda f: torch.save(blob, f))

    def load(self, state: TrainState, path: str) -> TrainState:
        try:
            blob = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 -- torch raises several unrelated types for a foreign file
            raise ValueError(f"{path} is not a torch onestep checkpoint ({type(e).__name__})") from None
        if not isinstance(blob, dict) or blob.get("backend") != self.name:
            raise ValueError(f"{path} is not a torch onestep checkpoint "
                             f"(backend={blob.get('backend') if isinstance(blob, dict) else '?'})")
        if (blob.get("target") is None) != (state.target is None):
            raise ValueError(f"checkpoint {path} {'has no' if state.target is not None else 'has a'} target "
                             f"network, unlike this run; it belongs to another method or preset")
        try:
            state.model.load_state_dict(blob["model"])
            state.ema.load_state_dict(blob["ema"])
            if state.target is not None:
                state.target.load_state_dict(blob["target"])
            state.optimizer.load_state_dict(blob["opt"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not match the model: {e}") from None
        state.step = int(blob["step"])
        state.history, state.evals = list(blob.get("history", [])), list(blob.get("evals", []))
        return state

    # -- data parallelism -----------------------------------------------------
    def local_rows(self, tree: dict, n: int) -> dict:
        return local_rows(tree, n, self.topology.rank, self.topology.world_size, lambda a, rows: a[rows])

    def batch_statistic(self, x):
        x = x.detach()
        if self.topology.world_size == 1:
            return x
        total = x.clone()
        dist.all_reduce(total)
        return total / self.topology.world_size

    def local_key(self, key):
        return key if self.topology.world_size == 1 else self.fold_in(key, self.topology.rank)

    def scatter_rows(self, x):
        if self.topology.world_size == 1:
            return x
        size = block_size(len(x), self.topology.world_size)
        block = x[self.topology.rank * size:(self.topology.rank + 1) * size]
        if len(block) < size:  # the last workers' blocks are padded with copies of row 0
            block = torch.cat([block, x[:1].expand(size - len(block), *x.shape[1:])])
        return block

    def gather_rows(self, x, n: int) -> np.ndarray:
        if self.topology.world_size == 1:
            return self.to_numpy(x)[:n]
        parts = [torch.empty_like(x) for _ in range(self.topology.world_size)]
        dist.all_gather(parts, x.contiguous())
        return self.to_numpy(torch.cat(parts))[:n]

    def _sum_over_processes(self, a: np.ndarray) -> np.ndarray:
        if self.topology.world_size == 1:
            return a
        t = torch.as_tensor(np.ascontiguousarray(a), device=self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def any_process(self, flag: bool) -> bool:
        return bool(self._sum_over_processes(np.asarray([float(flag)]))[0] > 0)

    def barrier(self) -> None:
        if self.topology.world_size > 1:
            dist.barrier()
