"""Teachers for distillation: velocity fields ``(z, t, y) -> v`` on backend arrays.

A teacher is either a trained flow-matching network (the usual, imperfect teacher) or the
exact velocity of an analytic data set (a perfect teacher, so the student's error is its own).
Loading a teacher from a run directory is the run layer's job (``runs.load_teacher``).
"""
from __future__ import annotations

from .analytic import GaussianMixture, exact_teacher
from .data import oracle
from .methods import fm
from .paths import expand


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


def autoguided_teacher(strong, weak):
    """Autoguidance (Karras et al. 2024) as a teacher: ``v_weak + λ·(v − v_weak)`` with a weaker
    ``weak`` field of the same data, λ per row ``(n,)``; without λ it is the ``strong`` field itself."""
    def field(z, t, y=None, guidance=None):
        v = strong(z, t, y)
        if guidance is None:
            return v
        v_weak = weak(z, t, y)
        return v_weak + expand(guidance, z) * (v - v_weak)
    return field
