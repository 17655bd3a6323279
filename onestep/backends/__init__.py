"""Backends: ``get_backend("torch" | "jax")`` returns an object implementing ``base.Backend``."""
from __future__ import annotations

BACKENDS = ("torch", "jax")


def get_backend(name: str, device: str = "auto", precision: str = "float32"):
    """Create a backend by name; the framework is imported only when asked for."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(device=device, precision=precision)
    if name == "jax":
        from .jax_backend import JaxBackend
        return JaxBackend(device=device, precision=precision)
    raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
