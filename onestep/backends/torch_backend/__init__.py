"""PyTorch implementation of the Backend protocol (see ``onestep.backends.base``)."""
from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from ..base import MLPConfig, TrainState, UNetConfig, ema_decay_at
from ..checkpoint import atomic_write
from ..keys import fold_in_seed, split_seed
from . import tangent
from .mlp import MLP
from .unet import UNet

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchBackend:
    """Eager PyTorch; random keys are 63-bit integer seeds for a ``torch.Generator``."""

    name = "torch"
    xp = torch

    def __init__(self, device: str = "auto", precision: str = "float32"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.set_precision(precision)

    # -- arrays ---------------------------------------------------------------
    def set_precision(self, dtype: str) -> None:
        self.dtype = _DTYPES[dtype]

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

    def randint(self, key, shape, high: int):
        return torch.randint(0, high, shape, generator=self._gen(key), device=self.device)

    # -- autodiff -------------------------------------------------------------
    def jvp(self, fn: Callable, primals: tuple, tangents: tuple):
        """``(primal_out, tangent_out)``: the primal output keeps its graph to the parameters, the
        tangent is stop-gradient. Our networks carry tangents by hand (see ``tangent``): about the
        cost of one more forward, where ``torch.func.jvp`` also records the tangent for backward."""
        return tangent.jvp(fn, primals, tangents)

    def stop_gradient(self, x):
        return x.detach()

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

    # -- training -------------------------------------------------------------
    def init_train_state(self, model, lr: float, ema_decay: float, grad_clip: float | None = None):
        ema = copy.deepcopy(model).requires_grad_(False)
        # fused: one kernel for all parameters (the per-tensor loop dominates small models)
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        return TrainState(model=model, ema=ema, opt_state=opt, step=0,
                          extra={"ema_decay": ema_decay, "grad_clip": grad_clip})

    def train_step(self, loss_fn, state: TrainState, data: dict, idx, key):
        model, opt = state.model, state.opt_state
        idx = torch.as_tensor(idx, device=self.device)
        batch = {k: None if v is None else v[idx] for k, v in data.items()}
        opt.zero_grad(set_to_none=True)
        loss, aux = loss_fn(model, state.ema, batch, self.fold_in(key, state.step), state.step)
        loss.backward()
        if state.extra.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), state.extra["grad_clip"])
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(state.ema.parameters()), list(model.parameters()),
                                 1.0 - ema_decay_at(state.extra["ema_decay"], state.step))
        state.step += 1
        return state, loss.detach(), {k: v.detach() for k, v in aux.items()}

    def inference(self, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            with torch.no_grad():
                return fn(*args, **kwargs)
        return wrapped

    def save(self, state: TrainState, path: str) -> None:
        blob = {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
                "opt": state.opt_state.state_dict(), "step": state.step, "backend": self.name}
        atomic_write(path, lambda f: torch.save(blob, f))

    def load(self, state: TrainState, path: str) -> TrainState:
        try:
            blob = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 -- torch raises several unrelated types for a foreign file
            raise ValueError(f"{path} is not a torch onestep checkpoint ({type(e).__name__})") from None
        if not isinstance(blob, dict) or blob.get("backend") != self.name:
            raise ValueError(f"{path} is not a torch onestep checkpoint "
                             f"(backend={blob.get('backend') if isinstance(blob, dict) else '?'})")
        try:
            state.model.load_state_dict(blob["model"])
            state.ema.load_state_dict(blob["ema"])
            state.opt_state.load_state_dict(blob["opt"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not match the model: {e}") from None
        state.step = int(blob["step"])
        return state
