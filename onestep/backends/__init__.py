"""Backends: ``get_backend("torch" | "jax")`` returns an object implementing ``base.Backend``."""
from __future__ import annotations

BACKENDS = ("torch", "jax")


def get_backend(name: str, device: str = "auto", precision: str = "float32", devices: int | str = "all"):
    """Create a backend by name; the framework is imported only when asked for.

    ``devices``: how many devices this process trains on, data-parallel (``"all"``: every device of
    the platform for JAX; torch drives one device per process, and more through ``torchrun``).
    """
    if name == "torch":
        from .torch_backend import TorchBackend
        if devices not in ("all", 1):
            raise ValueError(f"the torch backend drives one device per process, got devices={devices!r}; for N "
                             f"devices launch N processes: torchrun --nproc_per_node N -m onestep train ...")
        return TorchBackend(device=device, precision=precision)
    if name == "jax":
        from .jax_backend import JaxBackend
        return JaxBackend(device=device, precision=precision, devices=devices)
    raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
