"""onestep: one-step generative models on two backends (PyTorch and JAX/Equinox)."""
from .backends import BACKENDS, get_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "__version__", "get_backend"]
