"""A few training steps of several methods on however many data-parallel workers this process is part
of; process 0 saves the weights.  ``tests/test_distributed.py`` runs it under ``torchrun`` (torch,
gloo, two processes) and with two host devices (JAX), and compares with one worker in-process.

    python tests/data_parallel_worker.py BACKEND OUT.npz    (float64 and float32 runs, keys prefixed)
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np

from onestep import get_backend
from onestep.backends.architectures import MLPConfig
from onestep.presets import run_preset
from onestep.runs import fit
from onestep.teachers import oracle_teacher

STEPS, BATCH = 3, 8
# (method, variant, data set, class-conditional): FM with labels (label dropout), the JVP method
# sCT, Shortcut (bootstrap rows, a prefix of the batch) and CTM (a batch-mean loss weight)
CASES = {"fm": ("fm", None, "digits", True), "sct": ("cm", "sct", "8gaussians", False),
         "shortcut": ("shortcut", None, "8gaussians", False), "ctm": ("ctm", None, "8gaussians", False)}


def train_cases(bk) -> dict[str, np.ndarray]:
    """``{case/net/parameter: weights}`` after ``STEPS`` steps of global batch ``BATCH``, and the loss history."""
    out = {}
    for name, (method, variant, dataset, conditional) in CASES.items():
        preset = run_preset(method, dataset, "smoke", conditional=conditional, variant=variant, steps=STEPS,
                            batch_size=BATCH, log_every=1, lr=1e-2)
        preset = replace(preset, model=replace(preset.model, width=16, depth=2) if isinstance(preset.model, MLPConfig)
                         else preset.model, n_train=256 if preset.n_train else None)
        teacher = oracle_teacher(bk, dataset) if method in ("ctm",) else None
        state, history, _ = fit(bk, preset, seed=1, teacher=teacher, progress=False)
        for net in ("model", "ema"):
            out.update({f"{name}/{net}/{k}": v for k, v in bk.get_params(getattr(state, net)).items()})
        out[f"{name}/loss"] = np.asarray([loss for _, loss in history])
    return out


if __name__ == "__main__":
    backend, path = sys.argv[1:3]
    weights = {}
    for precision in ("float64", "float32"):
        bk = get_backend(backend, precision=precision)
        weights.update({f"{precision}/{k}": v for k, v in train_cases(bk).items()})
    if bk.topology.is_main:
        np.savez(path, **weights)
        with open(path + ".json", "w") as f:
            json.dump(bk.topology.record(), f)
