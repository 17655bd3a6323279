"""PyTorch implementation of the Backend protocol (see ``onestep.backends.base``)."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import torch

from ...files import atomic_write
from ..architectures import MLPConfig, UNetConfig
from ..base import CompileCache, TrainState, ema_decay_at
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
        super().__init__()

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
    def init_train_state(self, model, lr: float, ema_decay, target_decay=None, grad_clip: float | None = None):
        def average():
            return copy.deepcopy(model).requires_grad_(False)
        # fused: one kernel for all parameters (the per-tensor loop dominates small models)
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        return TrainState(model=model, ema=average(), target=None if target_decay is None else average(),
                          optimizer=opt, opt_state=None, ema_decay=ema_decay, target_decay=target_decay,
                          grad_clip=grad_clip)

    def train_step(self, loss_fn, state: TrainState, data: dict, idx, key):
        model, opt = state.model, state.optimizer
        idx = torch.as_tensor(idx, device=self.device)
        batch = {k: None if v is None else v[idx] for k, v in data.items()}
        opt.zero_grad(set_to_none=True)
        loss, aux = loss_fn(model, state.target_net, batch, self.fold_in(key, state.step), state.step)
        loss.backward()
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

    def save(self, state: TrainState, path: str) -> None:
        blob = {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
                "target": None if state.target is None else state.target.state_dict(),
                "opt": state.optimizer.state_dict(), "step": state.step, "backend": self.name}
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
        return state
