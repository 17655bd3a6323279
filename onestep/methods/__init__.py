"""One module per method; each writes its math once against the Backend protocol.

A method module provides:

- ``N_COND``: how many times the network sees (1: t; 2: two times or t and a step size);
- ``VARIANTS``: the variants ``presets.run_preset`` accepts (the first is the default);
- ``make_loss(bk, cfg, teacher=None)``: the loss ``(model, ema, batch, key, step) -> (loss, aux)``;
  ``teacher`` is a velocity field ``(z, t, y) -> v`` for methods that distil one;
- ``ema_decay(cfg, default)``: the EMA decay, a constant or a schedule over steps;
- ``sample(bk, model, cfg, x1, steps, y=None, solver=None, seed=0)``: samples from noise ``x1``
  (``solver`` for ODE samplers, ``seed`` for samplers that renoise);
- ``EVAL_STEPS``: the sampler steps ``python -m onestep train`` evaluates with.
"""
from __future__ import annotations

import importlib

METHODS = ("fm", "cm", "ctm", "shortcut")


def get_method(name: str):
    """The method module by name (``fm``, ``cm``, ...)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")


def check_variant(method: str, variant: str | None) -> str:
    """``variant`` (or the method's default when None), validated against the method's list."""
    variants = get_method(method).VARIANTS
    if variant is None:
        return variants[0]
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of method {method!r}; accepted: {', '.join(variants)}")
    return variant


def no_solver(method: str, solver: str | None) -> None:
    """Refuse an ODE solver for a method that samples by jumps."""
    if solver is not None:
        raise ValueError(f"method {method!r} samples by jumps, not with an ODE solver; "
                         f"drop the solver ({solver!r}); solvers apply to fm only")
