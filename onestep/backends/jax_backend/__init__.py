"""JAX/Equinox implementation of the Backend protocol (see ``onestep.backends.base``).

float64 is enabled process-wide so the derivation checks can run in double
precision; training arrays and parameters are created in ``self.dtype`` (float32 by
default) explicitly, never by JAX's default dtype.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax

from ...files import atomic_write
from ..architectures import MLPConfig, UNetConfig
from ..base import CompileCache, TrainState, ema_decay_at
from .mlp import MLP
from .params import from_flat, to_flat
from .unet import UNet

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
_MAGIC = b"onestep-jax-checkpoint\n"


def _is_float_array(x) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


class JaxBackend(CompileCache):
    """JAX with jitted train steps (``eqx.filter_jit``) and ``jax.random`` keys."""

    name = "jax"
    xp = jnp

    def __init__(self, device: str = "auto", precision: str = "float32"):
        platform = jax.default_backend() if device in ("auto", "cuda", "gpu") else device
        self.device = jax.devices(platform)[0]
        self.dtype = _DTYPES[precision]
        super().__init__()

    # -- arrays ---------------------------------------------------------------
    def from_numpy(self, a, dtype: str | None = None):
        a = np.asarray(a)
        if a.dtype.kind == "f":
            return jnp.asarray(a, dtype=_DTYPES[dtype] if dtype else self.dtype)
        return jnp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
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
            return MLP(cfg, key, self.dtype)
        if isinstance(cfg, UNetConfig):
            return UNet(cfg, key, self.dtype)
        raise TypeError(f"unknown model config {type(cfg).__name__}; expected MLPConfig or UNetConfig")

    def get_params(self, model) -> dict[str, np.ndarray]:
        return to_flat(model)

    def set_params(self, model, params: dict[str, np.ndarray]):
        return from_flat(model, params)

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
    def init_train_state(self, model, lr: float, ema_decay, target_decay=None, grad_clip: float | None = None):
        opt = optax.adam(lr)
        if grad_clip:
            opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
        opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
        return TrainState(model=model, ema=model, target=None if target_decay is None else model, optimizer=opt,
                          opt_state=opt_state, ema_decay=ema_decay, target_decay=target_decay, grad_clip=grad_clip)

    def _compiled_step(self, loss_fn, opt):
        cache_key = (loss_fn, opt)  # an optax transformation is a hashable tuple
        if cache_key not in self._cache:
            def average(avg, model, decay):
                return jax.tree.map(lambda e, p: e + (1.0 - decay).astype(p.dtype) * (p - e)
                                    if _is_float_array(p) else e, avg, model)

            @eqx.filter_jit
            def step(model, ema, target, opt_state, data, idx, key, step_no, ema_decay, target_decay):
                batch = {k: None if v is None else v[idx] for k, v in data.items()}
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
        model, ema, target, opt_state, loss, aux = fn(state.model, state.ema, state.target, state.opt_state, data,
                                                      np.asarray(idx), key, np.asarray(state.step, np.uint32),
                                                      *decays)
        new = replace(state, model=model, ema=ema, target=target, opt_state=opt_state, step=state.step + 1)
        return new, loss, aux

    def save(self, state: TrainState, path: str) -> None:
        def write(f):
            f.write(_MAGIC + int(state.step).to_bytes(8, "little"))
            eqx.tree_serialise_leaves(f, (state.model, state.ema, state.target, state.opt_state))

        atomic_write(path, write)

    def load(self, state: TrainState, path: str) -> TrainState:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{path} is not a jax onestep checkpoint")
            step = int.from_bytes(f.read(8), "little")
            try:
                model, ema, target, opt_state = eqx.tree_deserialise_leaves(
                    f, (state.model, state.ema, state.target, state.opt_state))
            except (RuntimeError, ValueError, EOFError) as e:
                raise ValueError(f"checkpoint {path} does not match the model: {e}") from None
        return replace(state, model=model, ema=ema, target=target, opt_state=opt_state, step=step)
