"""Teachers for distillation: velocity fields ``(z, t, y) -> v`` on backend arrays.

A teacher is either a trained flow-matching network (the usual, imperfect teacher) or the
exact velocity of an analytic data set (a perfect teacher, so the student's error is its own).
"""
from __future__ import annotations

import os

from .analytic import GaussianMixture, exact_teacher
from .data import oracle
from .methods import fm


def network_teacher(bk, model):
    """A trained FM network's velocity; the methods apply stop-gradient to what it returns."""
    def field(z, t, y=None):
        return fm.velocity(bk, model, z, t, y)
    return field


def oracle_teacher(bk, dataset: str):
    """The exact velocity of ``dataset`` on backend arrays (the Gaussian-mixture data sets)."""
    exact = oracle(dataset)
    if not isinstance(exact, GaussianMixture):  # a bad data-set name, so a ValueError
        raise ValueError(  # noqa: TRY004
            f"data set {dataset!r} has no exact velocity a backend can evaluate (exact teachers: "
            f"8gaussians, clusters-k); use a trained flow-matching run as the teacher instead (--teacher RUN_DIR)")
    return exact_teacher(bk, exact)


def load_teacher(bk, spec: str | None, preset, device: str = "auto"):
    """The teacher named by ``spec``: None (no teacher), ``"exact"``, or the directory of a trained
    ``fm`` run on the same data set and labels as ``preset``, trained with backend ``bk``."""
    if spec is None:
        return None
    if spec == "exact":
        return oracle_teacher(bk, preset.dataset)
    from .runs import load_run
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"teacher run directory {spec} does not exist; train one with "
                                f"python -m onestep train --method fm --dataset {preset.dataset} --out {spec}")
    _, model, teacher_preset, info = load_run(spec, device, backend=bk)
    if info["method"] != "fm":
        raise ValueError(f"the teacher must be a flow-matching (fm) run; {spec} is a {info['method']!r} run")
    if info["dataset"] != preset.dataset or bool(teacher_preset.model.n_classes) != bool(preset.model.n_classes):
        raise ValueError(f"teacher {spec} was trained on {info['dataset']!r} (conditional={info['conditional']}); "
                         f"the student needs {preset.dataset!r} (conditional={bool(preset.model.n_classes)})")
    return network_teacher(bk, model)
