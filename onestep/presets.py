"""Every number a run or a chapter uses, keyed by (method or chapter, data set, scale).

Notebooks and the CLI read their settings from here and never hard-code them.
Scales: ``smoke`` (seconds, CI), ``book`` (minutes on a laptop CPU; what the rendered
book shows) and ``full`` (GPU hours).  ``ONESTEP_SCALE`` overrides the scale a
notebook asks for, so a whole-book build can run at smoke scale.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from .backends.base import MLPConfig, UNetConfig
from .data import DATASETS, dataset_info
from .methods import get_method
from .train import TrainConfig

SCALES = ("smoke", "book", "full")


def resolve_scale(scale: str) -> str:
    """The scale to use: ``$ONESTEP_SCALE`` when set, else ``scale``; validated."""
    scale = os.environ.get("ONESTEP_SCALE") or scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; accepted: {', '.join(SCALES)}")
    return scale


@dataclass(frozen=True)
class RunPreset:
    """Everything needed to train one method on one data set."""

    method: str
    dataset: str
    model: Any  # MLPConfig | UNetConfig
    train: TrainConfig
    method_cfg: Any
    n_train: int | None = None  # size of the sampled training set for synthetic data


# -- networks, by kind of data and scale --------------------------------------------
def _model(dataset: str, scale: str, n_cond: int, conditional: bool):
    info = dataset_info(dataset)
    n_classes = info.n_classes if conditional else 0
    if len(info.shape) == 1:
        width, depth = {"smoke": (64, 2), "book": (128, 3), "full": (512, 4)}[scale]
        return MLPConfig(data_dim=info.shape[0], n_cond=n_cond, width=width, depth=depth, emb_dim=32,
                         n_classes=n_classes)
    channels, size, _ = info.shape
    if dataset == "digits" and scale != "full":
        # 8x8 digits are small enough for an MLP on flat pixels, far cheaper on a CPU.
        width, depth = {"smoke": (128, 2), "book": (256, 3)}[scale]
        return MLPConfig(data_dim=channels * size * size, n_cond=n_cond, width=width, depth=depth,
                         n_classes=n_classes)
    base, mults = {"digits": (64, (1, 2)), "mnist": (64, (1, 2, 2)), "cifar10": (128, (1, 2, 2, 2))}[dataset]
    if scale == "smoke":
        base = 16
    return UNetConfig(channels=channels, size=size, n_cond=n_cond, base=base, mults=mults,
                      n_classes=n_classes)


def _train(dataset: str, scale: str) -> TrainConfig:
    # The EMA's half-life must be short against the run: after n steps the initial weights
    # still carry decay**n of the average (0.999 over 2000 steps left 14% and ruined samples).
    synthetic = len(dataset_info(dataset).shape) == 1
    if scale == "smoke":
        return TrainConfig(steps=400, batch_size=256, lr=3e-3, ema_decay=0.99, log_every=50)
    if scale == "book":
        if synthetic:
            return TrainConfig(steps=3000, batch_size=512, lr=2e-3, ema_decay=0.998, log_every=250)
        return TrainConfig(steps=2000, batch_size=256, lr=2e-3, ema_decay=0.995, log_every=250)
    if synthetic:
        return TrainConfig(steps=20000, batch_size=4096, lr=1e-3, ema_decay=0.9995, log_every=500,
                           ckpt_every=5000)
    return TrainConfig(steps=200_000 if dataset == "cifar10" else 60_000, batch_size=128, lr=2e-4,
                       ema_decay=0.9999, grad_clip=1.0, log_every=1000, ckpt_every=10_000)


def _method_cfg(method: str, conditional: bool):
    if method == "fm":
        from .methods.fm import FMConfig
        return FMConfig(time_sampler="uniform", label_dropout=0.1 if conditional else 0.0)
    raise ValueError(f"no preset for method {method!r}")


def run_preset(method: str, dataset: str, scale: str, conditional: bool = False) -> RunPreset:
    """The settings for training ``method`` on ``dataset`` at ``scale``."""
    module = get_method(method)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    scale = resolve_scale(scale)
    if conditional and not dataset_info(dataset).n_classes:
        raise ValueError(f"dataset {dataset!r} has no labels; class-conditional training needs one of "
                         f"{', '.join(d for d in DATASETS if dataset_info(d).n_classes)}")
    method_cfg = _method_cfg(method, conditional)
    n_train = {"smoke": 20_000, "book": 100_000, "full": 1_000_000}[scale]
    return RunPreset(method=method, dataset=dataset, model=_model(dataset, scale, module.N_COND, conditional),
                     train=_train(dataset, scale), method_cfg=method_cfg,
                     n_train=n_train if len(dataset_info(dataset).shape) == 1 else None)


# -- chapters ------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowMatchingChapter:
    """Chapter 1: what it trains and how much it evaluates."""

    runs: dict = field(default_factory=dict)  # name -> RunPreset
    n_eval: int = 2000  # samples for W2 / MMD / likelihood
    n_map: int = 2000  # noise points for the flow-map error against the exact map
    step_counts: tuple = (1, 2, 4, 8, 16, 32, 64, 128)
    image_sets: tuple = ("digits",)  # class-conditional image runs
    image_step_counts: tuple = (1, 2, 4, 16, 64)
    n_images: int = 1000  # generated images for the classifier-feature Fréchet distance
    anim_frames: int = 25


def flow_matching_chapter(scale: str) -> FlowMatchingChapter:
    scale = resolve_scale(scale)
    runs = {"8gaussians": run_preset("fm", "8gaussians", scale),
            "checkerboard": run_preset("fm", "checkerboard", scale),
            "digits": run_preset("fm", "digits", scale, conditional=True)}
    if scale == "smoke":
        return FlowMatchingChapter(runs=runs, n_eval=500, n_map=300, step_counts=(1, 2, 4, 8),
                                   image_step_counts=(1, 4), n_images=300, anim_frames=4)
    if scale == "book":
        return FlowMatchingChapter(runs=runs)
    runs["mnist"] = run_preset("fm", "mnist", scale, conditional=True)
    runs["digits"] = replace(runs["digits"], train=replace(runs["digits"].train, steps=20_000))
    return FlowMatchingChapter(runs=runs, n_eval=10_000, n_map=10_000, n_images=10_000,
                               image_sets=("digits", "mnist"))


CHAPTERS = {"flow_matching": flow_matching_chapter}


def chapter_preset(chapter: str, scale: str):
    """The preset of a chapter (by its short name, e.g. ``flow_matching``) at ``scale``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; accepted: {', '.join(CHAPTERS)}")
    return CHAPTERS[chapter](scale)
