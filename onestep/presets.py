"""Every number a run or a chapter uses, keyed by (method or chapter, data set, scale).

Notebooks and the CLI read their settings from here and never hard-code them.
Scales: ``smoke`` (seconds, CI), ``book`` (minutes on a laptop CPU; what the rendered
book shows) and ``full`` (GPU hours).  ``ONESTEP_SCALE`` overrides the scale a
notebook asks for, so a whole-book build can run at smoke scale.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np

from .backends.base import MLPConfig, UNetConfig
from .data import DATASETS, dataset_info
from .methods import check_variant, get_method
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
    variant: str = ""  # the method's variant (e.g. cm: ict, ct, cd, sct, scd)


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


@cache
def sigma_data(dataset: str) -> float:
    """The data's root-mean-square value per coordinate (EDM's σ_d), from 2000 training samples."""
    from .data import load
    x = load(dataset, n=2000, seed=0, split="train").x
    return round(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), 2)


def _cm_cfg(variant: str, dataset: str, scale: str, train: TrainConfig, label_dropout: float):
    from .methods.cm import CMConfig
    common = {"variant": variant, "sigma_data": sigma_data(dataset), "total_steps": train.steps,
              "label_dropout": label_dropout}
    if variant == "cd":  # CM paper: fixed N = 18, EMA target at μ = 0.95, squared error
        return CMConfig(**common, curriculum="fixed", n_start=18, n_end=18, target="ema", mu0=0.95,
                        distance="l2", weighting="uniform", index_sampling="uniform")
    if variant == "ct":  # CM paper: N(k) from 2 to 150 and μ(k) from μ0 = 0.9
        return CMConfig(**common, curriculum="adaptive", n_start=2, n_end=150, mu0=0.9, target="ema",
                        distance="l2", weighting="uniform", index_sampling="uniform")
    if variant == "ict":  # iCT: N doubling 10 → 1280 (fewer doublings in short runs)
        n_end = {"smoke": 80, "book": 320, "full": 1280}[scale]
        return CMConfig(**common, curriculum="doubling", n_start=10, n_end=n_end, target="online",
                        distance="pseudo_huber", weighting="inv_dsigma", index_sampling="lognormal",
                        p_mean=-1.1, p_std=2.0)
    # sCT / sCD: TrigFlow time from tan τ = e^P/0.5, P ~ N(−1.0, 1.4²); tangent warmup over 10% of the run
    return CMConfig(**common, p_mean=-1.0, p_std=1.4, tangent_norm=0.1, warmup_fraction=0.1)


def _shortcut_cfg(dataset: str, label_dropout: float):
    """128 finest steps as in the official code, with two changes for short runs.  The paper's 1/4 of
    each batch bootstraps (the code: 1/8), so a batch of 512 gives every one of the 7 bootstrap levels
    ~18 rows, not ~9.  The bootstrap targets come from the online network under stop-gradient, not the
    EMA: each level learns from the one below, so an EMA target delays the coarsest level by about
    7 EMA time constants (7 × 500 steps at decay 0.998, longer than a book run).  The code's ±4 clip is
    for unit-scale data (images in [−1, 1], latents); we widen it to 4·σ_d on wider data (8gaussians)."""
    from .methods.shortcut import ShortcutConfig
    return ShortcutConfig(max_steps=128, bootstrap_every=4, clip=4.0 * max(1.0, sigma_data(dataset)),
                          ema_target=False, label_dropout=label_dropout)


def _ctm_cfg(dataset: str, scale: str, label_dropout: float):
    """CTM distillation: the teacher runs 4 Heun steps from t to u; EMA 0.999 at full scale (the
    paper's), shorter in shorter runs because the EMA is also the target network (see ``_train``)."""
    from .methods.ctm import CTMConfig
    ema = {"smoke": 0.99, "book": 0.995, "full": 0.999}[scale]
    return CTMConfig(sigma_data=sigma_data(dataset), teacher_steps=4, max_span=1.0, dsm_balance="adaptive",
                     ema=ema, gamma=0.0, label_dropout=label_dropout)


def _method_cfg(method: str, variant: str, dataset: str, scale: str, train: TrainConfig, conditional: bool):
    label_dropout = 0.1 if conditional else 0.0
    if method == "fm":
        from .methods.fm import FMConfig
        return FMConfig(time_sampler="uniform", label_dropout=label_dropout)
    if method == "cm":
        return _cm_cfg(variant, dataset, scale, train, label_dropout)
    if method == "shortcut":
        return _shortcut_cfg(dataset, label_dropout)
    if method == "ctm":
        return _ctm_cfg(dataset, scale, label_dropout)
    raise ValueError(f"no preset for method {method!r}")


def run_preset(method: str, dataset: str, scale: str, conditional: bool = False,
               variant: str | None = None) -> RunPreset:
    """The settings for training ``method`` (``variant``: its default when None) on ``dataset`` at ``scale``."""
    module = get_method(method)
    variant = check_variant(method, variant)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    scale = resolve_scale(scale)
    if conditional and not dataset_info(dataset).n_classes:
        raise ValueError(f"dataset {dataset!r} has no labels; class-conditional training needs one of "
                         f"{', '.join(d for d in DATASETS if dataset_info(d).n_classes)}")
    train = _train(dataset, scale)
    n_train = {"smoke": 20_000, "book": 100_000, "full": 1_000_000}[scale]
    return RunPreset(method=method, dataset=dataset, model=_model(dataset, scale, module.N_COND, conditional),
                     train=train, method_cfg=_method_cfg(method, variant, dataset, scale, train, conditional),
                     n_train=n_train if len(dataset_info(dataset).shape) == 1 else None, variant=variant)


def with_training(preset: RunPreset, **overrides) -> RunPreset:
    """``preset`` with some ``TrainConfig`` fields replaced (e.g. ``steps``); a method whose
    schedule spans the run (``total_steps``) is stretched to the new length."""
    train = replace(preset.train, **overrides)
    method_cfg = preset.method_cfg
    if hasattr(method_cfg, "total_steps"):
        method_cfg = replace(method_cfg, total_steps=train.steps)
    return replace(preset, train=train, method_cfg=method_cfg)


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
    runs["digits"] = with_training(runs["digits"], steps=20_000)
    return FlowMatchingChapter(runs=runs, n_eval=10_000, n_map=10_000, n_images=10_000,
                               image_sets=("digits", "mnist"))


# -- Chapter 2: consistency models -------------------------------------------------------
@dataclass(frozen=True)
class ConsistencyChapter:
    """Chapter 2: the runs it trains (and their teachers) and the sizes of its checks."""

    runs: dict = field(default_factory=dict)  # name -> RunPreset: "fm_teacher" and the CM runs
    teachers: dict = field(default_factory=dict)  # distilled run -> "exact" or the name of an fm run
    compare: tuple = ("cd", "cd_fm", "ct", "ict", "sct", "scd")  # the runs trained and compared
    ablation: tuple = ("ict", "ict_unstopped")  # one run with its target under stop-gradient, one without
    n_eval: int = 2000  # samples for W2
    n_map: int = 2000  # noise points for the one-step flow-map error
    step_counts: tuple = (1, 2, 4)  # sampler steps compared on 8gaussians
    grid_sizes: tuple = (1, 2, 4, 8, 16, 32, 64)  # N of the discretisation tradeoff
    n_paths: int = 400  # exact trajectories the tradeoff is measured on
    fd_steps: tuple = (1e-2, 1e-3)  # central-difference steps in τ for the sCM tangent check
    gaussian_cfg: Any = None  # the CMConfig whose sampler the Gaussian multistep analysis runs
    gaussian_steps: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    perturbations: tuple = (0.01, 0.03, 0.1)  # size δ of a consistency function's scale error
    error_profiles: tuple = (1, 2)  # the scale error grows like δ·t^p along the path
    image_sets: tuple = ()  # class-conditional image runs (with image_variant)
    image_variant: str = "sct"
    image_step_counts: tuple = (1, 2, 4)
    n_images: int = 1000


def consistency_chapter(scale: str) -> ConsistencyChapter:
    scale = resolve_scale(scale)
    # book: 1500 steps per run keeps eight runs within the chapter's CPU budget; None: the scale's default
    steps = {"smoke": 150, "book": 1500, "full": None}[scale]

    def run(method, variant=None, dataset="8gaussians", conditional=False):
        preset = run_preset(method, dataset, scale, conditional=conditional, variant=variant)
        return preset if steps is None else with_training(preset, steps=steps)

    runs = {"fm_teacher": run("fm"), "cd": run("cm", "cd")}
    runs["cd_fm"] = runs["cd"]
    runs.update({v: run("cm", v) for v in ("ct", "ict", "sct", "scd")})
    runs["ict_unstopped"] = replace(runs["ict"], method_cfg=replace(runs["ict"].method_cfg, target="unstopped"))
    teachers = {"cd": "exact", "cd_fm": "fm_teacher", "scd": "exact"}
    gaussian_cfg = run_preset("cm", "gaussian", scale, variant="sct").method_cfg
    common = {"runs": runs, "teachers": teachers, "gaussian_cfg": gaussian_cfg}
    if scale == "smoke":
        # one run per code path (network teacher, discrete, continuous): each run costs a JAX compilation
        return ConsistencyChapter(**common, compare=("cd_fm", "ict", "sct"), n_eval=500, n_map=300,
                                  grid_sizes=(1, 2, 4, 8, 16, 32), n_paths=100)
    variant = "sct"  # the teacher-free variant on class-conditional images
    if scale == "book":
        # sCD's tangent is checked above; its run is left to full scale to make room for the digits
        runs["digits"] = run("cm", variant, "digits", conditional=True)
        return ConsistencyChapter(**common, compare=("cd", "cd_fm", "ct", "ict", "sct"), image_sets=("digits",),
                                  image_variant=variant)
    sets = ("digits", "mnist")
    runs.update({name: run("cm", variant, name, conditional=True) for name in sets})
    return ConsistencyChapter(**common, n_eval=10_000, n_map=10_000, n_images=10_000, image_sets=sets,
                              image_variant=variant)



# -- Chapter 3: consistency trajectory models --------------------------------------------
@dataclass(frozen=True)
class ConsistencyTrajectoryChapter:
    """Chapter 3: CTM distilled on 8gaussians from the exact field and from an FM teacher."""

    runs: dict = field(default_factory=dict)  # "exact" / "fm": CTM runs; "fm_teacher": the FM run
    teacher_eval_steps: int = 32  # Heun steps the FM teacher is scored with
    n_eval: int = 2000  # samples for W2
    n_map: int = 1000  # noise points for the flow-map error against the exact map
    gammas: tuple = (0.0, 0.5, 1.0)
    step_counts: tuple = (1, 2, 4)
    split_points: int = 25  # values of the split point u in the semigroup animation and defect curve
    n_particles: int = 12  # particles drawn in the animation


def consistency_trajectory_chapter(scale: str) -> ConsistencyTrajectoryChapter:
    scale = resolve_scale(scale)
    steps = {"smoke": 200, "book": 1500, "full": None}[scale]  # None: the scale's default length

    def run(method):
        preset = run_preset(method, "8gaussians", scale)
        return preset if steps is None else with_training(preset, steps=steps)

    runs = {"fm_teacher": run("fm"), "exact": run("ctm"), "fm": run("ctm")}
    if scale == "smoke":
        return ConsistencyTrajectoryChapter(runs=runs, teacher_eval_steps=8, n_eval=500, n_map=300,
                                            split_points=4)
    if scale == "book":
        return ConsistencyTrajectoryChapter(runs=runs, split_points=16)
    return ConsistencyTrajectoryChapter(runs=runs, n_eval=10_000, n_map=10_000)


# -- Chapter 4: shortcut models ----------------------------------------------------------
@dataclass(frozen=True)
class ShortcutChapter:
    """Chapter 4: a shortcut model against the exact map, the data and CM multistep sampling."""

    runs: dict = field(default_factory=dict)  # "8gaussians": shortcut; "cm": CD from the exact field; images
    n_eval: int = 2000  # samples for W2
    n_map: int = 2000  # noise points for the flow-map error against the exact map
    step_counts: tuple = (1, 2, 4, 8, 16, 32, 64, 128)
    order_steps: tuple = (1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128)  # step sizes of the O(d) / O(d²) checks
    n_order: int = 200  # points of those checks
    image_sets: tuple = ("digits",)  # class-conditional image runs
    image_step_counts: tuple = (1, 4, 128)
    n_images: int = 1000


def shortcut_chapter(scale: str) -> ShortcutChapter:
    scale = resolve_scale(scale)
    runs = {"8gaussians": run_preset("shortcut", "8gaussians", scale),
            "cm": run_preset("cm", "8gaussians", scale, variant="cd"),
            "digits": run_preset("shortcut", "digits", scale, conditional=True)}
    if scale == "smoke":
        return ShortcutChapter(runs=runs, n_eval=500, n_map=300, n_order=50, step_counts=(1, 4, 16, 128),
                               image_sets=())  # ≤ 30 s
    if scale == "book":
        return ShortcutChapter(runs=runs)
    runs["mnist"] = run_preset("shortcut", "mnist", scale, conditional=True)
    return ShortcutChapter(runs=runs, n_eval=10_000, n_map=10_000, n_images=10_000, image_sets=("digits", "mnist"))


CHAPTERS = {"flow_matching": flow_matching_chapter, "consistency_models": consistency_chapter,
            "consistency_trajectory_models": consistency_trajectory_chapter, "shortcut_models": shortcut_chapter}


def chapter_preset(chapter: str, scale: str):
    """The preset of a chapter (by its short name, e.g. ``flow_matching``) at ``scale``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; accepted: {', '.join(CHAPTERS)}")
    return CHAPTERS[chapter](scale)
