"""One module per method; each writes its math once against the Backend protocol."""
from __future__ import annotations

METHODS = ("fm",)


def get_method(name: str):
    """The method module by name (``fm``, ...)."""
    if name == "fm":
        from . import fm
        return fm
    raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
