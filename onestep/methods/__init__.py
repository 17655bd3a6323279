"""One module per method; each writes its math once against the Backend protocol.

Every method module is a :class:`Method`: a ``Config`` dataclass (defaults are the paper's values;
it validates itself), its ``VARIANTS`` (the first is the default), whether a config
``needs_teacher``, ``n_cond`` (how many scalars its network sees: times, and a guidance scale where
it takes one), ``draw`` (all randomness and every value that depends on the training step),
``loss_from_draws`` (all math, pure, so parity tests can feed both backends the same draws) and ``sample`` (which takes a random key).  ``make_loss`` assembles the
training loss of any method from its config; ``tests/test_methods.py`` checks every registered
method against the protocol.  Shared flow-map primitives live in ``flowmap``; methods never import
each other.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

METHODS = ("fm", "cm", "ctm", "shortcut", "ayf", "meanflow")

# A teacher is a velocity field ``(z, t, y) -> v`` on backend arrays (``onestep.teachers``).
Teacher = Callable[[Any, Any, Any], Any]


@runtime_checkable
class Method(Protocol):
    """What a method module provides.  ``bk`` is a Backend, ``cfg`` the module's ``Config``, ``batch``
    ``{"x": (n, *shape), "y": labels (n,) or None}``, ``model``/``target`` networks (``target``: the
    run's target network, an EMA of ``model``), ``step`` the training step (an integer array inside
    compiled code) of ``total_steps``."""

    Config: type
    VARIANTS: tuple[str, ...]
    @staticmethod
    def needs_teacher(cfg) -> bool: ...

    @staticmethod
    def n_cond(cfg) -> int: ...

    @staticmethod
    def draw(bk, cfg, key, batch: dict, step, total_steps: int) -> dict: ...

    @staticmethod
    def loss_from_draws(bk, cfg, model, target, batch: dict, draws: dict, teacher: Teacher | None = None
                        ) -> tuple[Any, dict]: ...

    @staticmethod
    def sample(bk, cfg, model, x1, steps: int, key, y=None): ...


def get_method(name: str) -> Method:
    """The method module by name (``fm``, ``cm``, ...)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")


def method_of(cfg) -> Method:
    """The method module a config belongs to (``cm.Config(...)`` -> ``cm``)."""
    module = sys.modules[type(cfg).__module__]
    if not module.__name__.startswith(f"{__name__}.") or getattr(module, "Config", None) is not type(cfg):
        raise TypeError(f"{type(cfg).__name__} is not the Config of a method in onestep.methods")
    return module


def check_variant(method: str, variant: str | None) -> str:
    """``variant`` (or the method's default when None), validated against the method's list."""
    variants = get_method(method).VARIANTS
    if variant is None:
        return variants[0]
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of method {method!r}; accepted: {', '.join(variants)}")
    return variant


def describe(cfg) -> str:
    """``method 'cm' (variant 'cd')``: how errors name a config."""
    name = method_of(cfg).__name__.rsplit(".", 1)[-1]
    variant = getattr(cfg, "variant", None)
    return f"method {name!r}" + (f" (variant {variant!r})" if variant else "")


def make_loss(bk, cfg, total_steps: int, teacher: Teacher | None = None):
    """The training loss ``(model, target, batch, key, step) -> (loss, aux)`` of ``cfg``'s method for a
    run of ``total_steps``; refuses a missing or an unwanted teacher."""
    method = method_of(cfg)
    if method.needs_teacher(cfg) and teacher is None:
        raise ValueError(f"{describe(cfg)} distils a teacher and needs a teacher velocity field: pass "
                         "--teacher exact (analytic data sets) or --teacher RUN_DIR of a trained flow-matching "
                         "run (python -m onestep train --method fm ...)")
    if not method.needs_teacher(cfg) and teacher is not None:
        raise ValueError(f"{describe(cfg)} trains without a teacher; drop the teacher")
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(f"total_steps must be a positive integer (the run's length), got {total_steps!r}")

    def loss_fn(model, target, batch, key, step):
        # the draws of the whole (global) batch, then this data-parallel worker's rows of both
        draws = method.draw(bk, cfg, key, batch, step, total_steps)
        rows = bk.local_rows({"batch": batch, "draws": draws}, batch["x"].shape[0])
        return method.loss_from_draws(bk, cfg, model, target, rows["batch"], rows["draws"], teacher)
    return loss_fn
