"""Every number a run or a chapter uses, keyed by (method or chapter, data set, scale).

Notebooks and the CLI read their settings from here and never hard-code them.  Scales: ``smoke``
(seconds, CI), ``book`` (minutes on a laptop CPU; what the rendered book shows) and ``full`` (GPU
hours); what changes with the scale is one :class:`Scale` table each.  A method's ``Config``
defaults are its paper's values; the presets below list only the deviations, each with its reason.
``ONESTEP_SCALE`` overrides the scale a notebook asks for, so a whole-book build can run at smoke scale.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .backends.architectures import MLPConfig, UNetConfig
from .data import DATASETS, dataset_info
from .methods import alphaflow, ayf, check_variant, cm, ctm, fm, get_method, meanflow, shortcut
from .train import TrainConfig

SCALES = ("smoke", "book", "full")


def resolve_scale(scale: str) -> str:
    """The scale to use: ``$ONESTEP_SCALE`` when set, else ``scale``; validated."""
    scale = os.environ.get("ONESTEP_SCALE") or scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; accepted: {', '.join(SCALES)}")
    return scale


@dataclass(frozen=True)
class Scale:
    """What changes with the scale."""

    mlp_2d: tuple[int, int]  # (width, depth) of the MLP for 2-D sets
    mlp_digits: tuple[int, int] | None  # 8×8 digits as flat pixels on a CPU; None: the U-Net
    unet_base: int | None  # U-Net base width for every image set (None: the set's own, below)
    train_2d: TrainConfig
    train_images: TrainConfig
    n_train_2d: int  # size of the sampled training set of a 2-D data set
    n_eval: int  # samples scored by W2 / MMD, and noise points of the flow-map error
    n_map: int
    n_images: int  # generated images per Fréchet distance
    redraws: int  # fresh noise draws of one trained model: its sampler's own spread of a score
    ict_n_end: int  # iCT's last grid size: fewer doublings in shorter runs (the paper: 1280 over 400k steps)
    target_ema: float  # an EMA that is a target network must be short against the run (CTM: 0.999)
    longer_runs: dict = field(default_factory=dict)  # data set -> training steps, where the default is short


# The EMA's half-life must be short against the run: after n steps the initial weights still carry
# decay**n of the average (0.999 over 2000 steps left 14% and ruined samples).
SCALE_TABLE = {
    "smoke": Scale(mlp_2d=(64, 2), mlp_digits=(128, 2), unet_base=16,
                   train_2d=TrainConfig(steps=400, batch_size=256, lr=3e-3, ema_decay=0.99, log_every=50,
                                        ckpt_every=100),
                   train_images=TrainConfig(steps=400, batch_size=256, lr=3e-3, ema_decay=0.99, log_every=50,
                                            ckpt_every=100),
                   n_train_2d=20_000, n_eval=500, n_map=300, n_images=300, redraws=2, ict_n_end=80, target_ema=0.99),
    "book": Scale(mlp_2d=(128, 3), mlp_digits=(256, 3), unet_base=None,
                  train_2d=TrainConfig(steps=3000, batch_size=512, lr=2e-3, ema_decay=0.998, log_every=250,
                                       ckpt_every=500),
                  train_images=TrainConfig(steps=2000, batch_size=256, lr=2e-3, ema_decay=0.995, log_every=250,
                                           ckpt_every=500),
                  n_train_2d=100_000, n_eval=2000, n_map=2000, n_images=1000, redraws=4, ict_n_end=320, target_ema=0.995),
    "full": Scale(mlp_2d=(512, 4), mlp_digits=None, unet_base=None,
                  train_2d=TrainConfig(steps=20_000, batch_size=4096, lr=1e-3, ema_decay=0.9995, log_every=500,
                                       ckpt_every=5000),
                  train_images=TrainConfig(steps=60_000, batch_size=128, lr=2e-4, ema_decay=0.9999, grad_clip=1.0,
                                           log_every=1000, ckpt_every=10_000),
                  n_train_2d=1_000_000, n_eval=10_000, n_map=10_000, n_images=10_000, redraws=4, ict_n_end=1280,
                  target_ema=0.999, longer_runs={"cifar10": 200_000}),
}
# base width, channel multipliers, attention resolutions.  CIFAR-10: DDPM++'s 128 channels over four
# levels (32, 16, 8, 4) with attention at 16×16, but one residual block per level (theirs: four)
UNET = {"digits": (64, (1, 2), ()), "mnist": (64, (1, 2, 2), ()), "cifar10": (128, (1, 2, 2, 2), (16,))}
# CIFAR-10 at full scale, as the papers report it: FID-50k of the EMA against the training set at the end,
# FID-10k every 10k steps in the run log, bf16 autocast (torch) around everything but the JVPs
FID_RUNS = {"cifar10": {"eval_n": 50_000, "periodic_eval_n": 10_000, "eval_every": 10_000}}
EVAL_STEPS = {"fm": 32}  # sampler steps the CLI evaluates a run with; one step for every other method
LABEL_DROPOUT = 0.1  # class-conditional runs train 10% of rows unconditionally (classifier-free guidance)
CT_BOOK_CHANGES = {"target": "online", "weighting": "inv_dsigma"}  # CT as the book trains it (see _method_cfg)
# iCT's last grid in Chapter 2's 1500-step runs: the largest last size whose mean one-step W2 is within one
# seed-spread of the best in the chapter's study (both backends; the scale's 320 is for 3000-step runs)
BOOK_ICT_N_END = 80


@dataclass(frozen=True)
class RunPreset:
    """Everything needed to train one method on one data set and evaluate it."""

    method: str
    dataset: str
    model: Any  # MLPConfig | UNetConfig
    train: TrainConfig
    method_cfg: Any  # the method's Config
    n_train: int | None = None  # size of the sampled training set for synthetic data
    variant: str = ""  # the method's variant (e.g. cm: ict, ct, cd, sct, scd)
    eval_steps: int = 1  # sampler steps of the CLI's evaluation
    eval_n: int = 2000  # samples of the CLI's evaluation
    periodic_eval_n: int = 1000  # samples of each evaluation during training (every ``train.eval_every`` steps)


def _is_2d(dataset: str) -> bool:
    return len(dataset_info(dataset).shape) == 1


def _model(dataset: str, scale: Scale, n_cond: int, conditional: bool):
    info = dataset_info(dataset)
    n_classes = info.n_classes if conditional else 0
    if _is_2d(dataset):
        width, depth = scale.mlp_2d
        return MLPConfig(data_dim=info.shape[0], n_cond=n_cond, width=width, depth=depth, emb_dim=32,
                         n_classes=n_classes)
    channels, size, _ = info.shape
    if dataset == "digits" and scale.mlp_digits:
        width, depth = scale.mlp_digits
        return MLPConfig(data_dim=channels * size * size, n_cond=n_cond, width=width, depth=depth,
                         n_classes=n_classes)
    base, mults, attention = UNET[dataset]
    return UNetConfig(channels=channels, size=size, n_cond=n_cond, base=scale.unet_base or base, mults=mults,
                      n_classes=n_classes, attention=attention)


def _method_cfg(method: str, variant: str, dataset: str, scale: Scale, conditional: bool, autoguided: bool = False):
    """The method's paper config with this book's deviations."""
    label_dropout = LABEL_DROPOUT if conditional else 0.0
    if method == "ayf":
        return _ayf_cfg(variant, label_dropout, autoguided)
    sigma_data = dataset_info(dataset).rms  # the papers' σ_d = 0.5 is the RMS of their images
    if method == "fm":
        return fm.Config(label_dropout=label_dropout)
    if method == "cm":
        if variant == "ict":
            return cm.variant_config(variant, sigma_data=sigma_data, label_dropout=label_dropout,
                                     n_end=scale.ict_n_end)
        if variant in ("sct", "scd"):  # sCM warms the tangent up over 10k of its 400k steps; ours, 10% of the run
            return cm.variant_config(variant, sigma_data=sigma_data, label_dropout=label_dropout,
                                     warmup_fraction=0.1)
        if variant == "ct":
            # CT's μ(k) averages over ~700 steps at N = 150 (0.1% of its 800k-step run, half of ours): the target
            # is the online net under stop-gradient; and with an L2 distance the pair loss shrinks like Δσ², so
            # uniform weights leave the fine links near the data untrained in a short run: iCT's λ = 1/Δσ
            return cm.variant_config(variant, sigma_data=sigma_data, label_dropout=label_dropout,
                                     **CT_BOOK_CHANGES)
        return cm.variant_config(variant, sigma_data=sigma_data, label_dropout=label_dropout)
    if method == "ctm":
        return ctm.Config(sigma_data=sigma_data, label_dropout=label_dropout)
    if method == "meanflow":
        # The adaptive weight 1/sg((‖Δ‖² + ε)^p) was tuned on 3072- and 4096-dimensional images, where the
        # per-row sum ‖Δ‖² concentrates and the weight is nearly the same for every row; on 2-D points it
        # varies by orders of magnitude between rows and pulls the regression off the conditional mean
        # (Chapter 6's study), so the 2-D sets use p = 0.  The same study finds one-step samples better
        # with fewer rows at r = t than the ImageNet code's 75%; the 2-D sets use the CIFAR-10 code's 25%.
        # Images keep 75%: guidance trained in reads the diagonal u(z, t, t), which the r = t rows train.
        if _is_2d(dataset):
            return meanflow.Config(norm_p=0.0, border_fraction=0.25, label_dropout=label_dropout)
        return meanflow.Config(label_dropout=label_dropout)
    if method == "alphaflow":
        # The 2-D sets as MeanFlow's, for the same reasons (Chapter 6's study): p = 0, so the rows with
        # r < t carry the paper's weight 1/α, and 25% of rows at r = t (the code's B-2 run with guidance
        # trained in uses 25% too).  On images the code's ε = 1e-3 applies to the per-dimension mean of the
        # squared error; ours is on the sum, so ε = 1e-3·D gives the code's weight.
        if _is_2d(dataset):
            return alphaflow.Config(norm_p=0.0, border_fraction=0.25, label_dropout=label_dropout)
        return alphaflow.Config(norm_eps=1e-3 * math.prod(dataset_info(dataset).shape), label_dropout=label_dropout)
    # The paper's 1/4 of each batch bootstraps (the code: 1/8), so a batch of 512 gives each of the 7
    # bootstrap levels ~18 rows, not ~9.  The bootstrap targets come from the online network under
    # stop-gradient, not the EMA: each level learns from the one below, so an EMA target delays the
    # coarsest level by about 7 EMA time constants, longer than a book run.  The code's ±4 clip is for
    # unit-scale data (images in [−1, 1], latents); we widen it to 4·σ_d on wider data (8gaussians).
    return shortcut.Config(bootstrap_every=4, clip=4.0 * max(1.0, sigma_data), ema_target=False,
                           label_dropout=label_dropout)


AUTOGUIDANCE = (1.0, 3.0)  # λ ~ U[1, 3] (a re-implementation's reading of the paper; unverified)


def _ayf_cfg(variant: str, label_dropout: float, autoguided: bool) -> ayf.Config:
    """Align Your Flow: the paper's tangent settings (c = 0.1, r_max = 0.99).  Our tangent warmup takes the
    first 10% of the run (sCM's is 10k of 400k steps; AYF's length is not given)."""
    return ayf.Config(variant=variant, warmup_fraction=0.1, label_dropout=label_dropout,
                      guidance=AUTOGUIDANCE if autoguided else None)


def _train(method: str, method_cfg, dataset: str, scale: Scale) -> TrainConfig:
    """The scale's optimisation settings with the method's target network, if it keeps one."""
    base = scale.train_2d if _is_2d(dataset) else scale.train_images
    train = replace(base, steps=scale.longer_runs.get(dataset, base.steps))
    if method == "cm" and cm.target_decay(method_cfg) is not None:
        # CD (and the paper's CT) read their target network from an EMA at μ (CT: μ(k)), kept apart from
        # the average the samples come from, as in the official code (target_ema vs ema_rate)
        return replace(train, target_decay=cm.target_decay(method_cfg))
    if method == "ctm":  # the EMA is CTM's target network and its sampler
        return replace(train, ema_decay=scale.target_ema, target_decay=scale.target_ema)
    return train


def run_preset(method: str, dataset: str, scale: str, conditional: bool = False, variant: str | None = None,
               autoguided: bool = False, **train_overrides) -> RunPreset:
    """The settings for training ``method`` (``variant``: its default when None) on ``dataset`` at ``scale``;
    ``autoguided``: distil an autoguided teacher (ayf only); ``train_overrides`` replace fields of the
    ``TrainConfig`` (e.g. ``steps``)."""
    module = get_method(method)
    variant = check_variant(method, variant)
    if autoguided and method != "ayf":
        raise ValueError(f"method {method!r} has no autoguidance; a weak teacher (--weak-teacher) is for --method ayf")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    table = SCALE_TABLE[resolve_scale(scale)]
    if conditional and not dataset_info(dataset).n_classes:
        raise ValueError(f"dataset {dataset!r} has no labels; class-conditional training needs one of "
                         f"{', '.join(d for d in DATASETS if dataset_info(d).n_classes)}")
    method_cfg = _method_cfg(method, variant, dataset, table, conditional, autoguided)
    train = _train(method, method_cfg, dataset, table)
    two_d = _is_2d(dataset)
    sizes = {"eval_n": 2000 if two_d else 1000}
    if dataset in FID_RUNS and resolve_scale(scale) == "full":
        sizes = {k: v for k, v in FID_RUNS[dataset].items() if k != "eval_every"}
        train = replace(train, eval_every=FID_RUNS[dataset]["eval_every"], mixed_precision=True)
    model = _model(dataset, table, module.n_cond(method_cfg), conditional)
    if method == "cm" and method_cfg.weighting == "adaptive":  # sCM's learned loss weight w(τ) is a head of the net
        model = replace(model, log_weight_head=True)
    return RunPreset(method=method, dataset=dataset, model=model,
                     train=replace(train, **train_overrides), method_cfg=method_cfg,
                     n_train=table.n_train_2d if two_d else None, variant=variant,
                     eval_steps=EVAL_STEPS.get(method, 1), **sizes)


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
    redraws: int = 4  # fresh noise draws of one trained model: its sampler's own spread of W2
    seeds: tuple = (0, 1, 2)  # training seeds of the committed batch runs the chapter summarises


def _sizes(scale: str) -> dict:
    table = SCALE_TABLE[scale]
    return {"n_eval": table.n_eval, "n_map": table.n_map, "n_images": table.n_images}


def _redraws(scale: str) -> dict:
    """The noise redraws of Chapters 1–4, which score one trained model on fresh sampler noise."""
    return {"redraws": SCALE_TABLE[scale].redraws}


def flow_matching_chapter(scale: str) -> FlowMatchingChapter:
    scale = resolve_scale(scale)
    sets = {"smoke": ("digits",), "book": ("digits",), "full": ("digits", "mnist")}[scale]
    runs = {"8gaussians": run_preset("fm", "8gaussians", scale),
            "checkerboard": run_preset("fm", "checkerboard", scale),
            **{name: run_preset("fm", name, scale, conditional=True) for name in sets}}
    if scale == "full":  # the digits U-Net converges long before MNIST's 60k steps
        runs["digits"] = replace(runs["digits"], train=replace(runs["digits"].train, steps=20_000))
    per_scale = {"smoke": {"step_counts": (1, 2, 4, 8), "image_step_counts": (1, 4), "anim_frames": 4},
                 "book": {}, "full": {"image_sets": sets}}
    return FlowMatchingChapter(runs=runs, **_sizes(scale), **_redraws(scale), **per_scale[scale])


@dataclass(frozen=True)
class ConsistencyChapter:
    """Chapter 2: the runs it trains (and their teachers) and the sizes of its checks."""

    runs: dict = field(default_factory=dict)  # name -> RunPreset: "fm_teacher" and the CM runs
    teachers: dict = field(default_factory=dict)  # distilled run -> "exact" or the name of an fm run
    compare: tuple = ("cd", "cd_fm", "ct", "ict", "sct", "scd")  # the runs trained and compared
    # (run, its ablation): CT as the book trains it vs as published; iCT's target with and without
    # stop-gradient; sCM's learned weighting vs none
    ablations: tuple = (("ct", "ct_paper"), ("ict", "ict_unstopped"), ("sct", "sct_uniform"))
    tradeoff_grids: tuple = (4, 24, 150)  # CT at a fixed N, small, medium, large: the tradeoff in training
    n_eval: int = 2000  # samples for W2
    n_map: int = 2000  # noise points for the one-step flow-map error
    step_counts: tuple = (1, 2, 4)  # sampler steps compared on 8gaussians
    grid_sizes: tuple = (1, 2, 4, 8, 16, 32, 64)  # N of the discretisation tradeoff
    n_paths: int = 400  # exact trajectories the tradeoff is measured on
    gap_ratios: tuple = tuple(2.0**-k for k in range(1, 11))  # Δσ/σ of the CT-vs-CD target check
    n_gap: int = 64  # points of that check
    fd_steps: tuple = (1e-2, 1e-3)  # central-difference steps in τ for the sCM tangent check
    gaussian_cfg: Any = None  # the cm.Config whose sampler the Gaussian multistep analysis runs
    gaussian_steps: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    perturbations: tuple = (0.01, 0.03, 0.1)  # size δ of a consistency function's scale error
    error_profiles: tuple = (1, 2)  # the scale error grows like δ·t^p along the path
    image_sets: tuple = ()  # class-conditional image runs (with image_variant)
    image_variant: str = "sct"
    image_step_counts: tuple = (1, 2, 4)
    n_images: int = 1000
    redraws: int = 4  # fresh noise draws of one trained model: its sampler's own spread of W2
    seeds: tuple = (0, 1, 2)  # training seeds of the committed batch runs the chapter summarises
    # the study of where iCT stops doubling: its last grid sizes, trained on seeds the comparison does not use
    ict_n_ends: tuple = (20, 40, 80, 160, 320)
    study_seeds: tuple = (10, 11, 12)
    study: str = "run"  # "run": train the study here; "results": read it from the committed book run


def consistency_chapter(scale: str) -> ConsistencyChapter:
    scale = resolve_scale(scale)
    # 1500 steps per run keeps the chapter's runs within the book's CPU budget; their samples come from an
    # EMA with a window of 100 steps (0.99): the scale's 0.998 is set for 3000-step runs and would average
    # over a third of these (the papers' 0.9999 over 600k-800k steps averages over ~1.5% of the run)
    steps = {"smoke": {"steps": 150}, "book": {"steps": 1500, "ema_decay": 0.99}, "full": {}}[scale]
    variant = "sct"  # the teacher-free variant on class-conditional images
    sets = {"smoke": (), "book": ("digits",), "full": ("digits", "mnist")}[scale]
    runs = {"fm_teacher": run_preset("fm", "8gaussians", scale, **steps),
            **{v: run_preset("cm", "8gaussians", scale, variant=v, **steps) for v in cm.VARIANTS},
            **{name: run_preset("cm", name, scale, conditional=True, variant=variant, **steps) for name in sets}}
    runs["cd_fm"] = runs["cd"]
    if scale == "book":  # the chapter's study of where iCT stops doubling, on seeds the comparison does not use
        runs["ict"] = replace(runs["ict"], method_cfg=replace(runs["ict"].method_cfg, n_end=BOOK_ICT_N_END))
    runs["ict_unstopped"] = replace(runs["ict"], method_cfg=replace(runs["ict"].method_cfg, target="unstopped"))
    paper_ct = run_preset("cm", "8gaussians", scale, variant="ct", **steps)
    paper_cfg = cm.variant_config("ct", sigma_data=paper_ct.method_cfg.sigma_data)  # as published
    runs["ct_paper"] = replace(paper_ct, method_cfg=paper_cfg,
                               train=replace(paper_ct.train, target_decay=cm.target_decay(paper_cfg)))
    runs["sct_uniform"] = replace(runs["sct"], method_cfg=replace(runs["sct"].method_cfg, weighting="uniform"),
                                  model=replace(runs["sct"].model, log_weight_head=False))
    per_scale = {
        # one run per code path (network teacher, discrete, continuous): each run costs a JAX compilation
        "smoke": {"compare": ("cd_fm", "ict", "sct"), "ablations": (),
                  "tradeoff_grids": (), "grid_sizes": (1, 2, 4, 8, 16, 32), "n_paths": 100,
                  "gap_ratios": (1 / 8, 1 / 32, 1 / 128), "n_gap": 16, "ict_n_ends": (20,), "study_seeds": (10,)},
        # sCD's tangent is checked in the chapter; its run is left to full scale to make room for the digits;
        # the study's 15 runs do not fit the book's budget: the book reads the committed run
        "book": {"compare": ("cd", "cd_fm", "ct", "ict", "sct"), "study": "results"},
        "full": {},
    }[scale]
    for n in per_scale.get("tradeoff_grids", ConsistencyChapter.tradeoff_grids):
        # the paper's uniform weights (with the book's online target): the tradeoff as CT meets it
        fixed = replace(runs["ct"].method_cfg, curriculum="fixed", n_start=n, n_end=n, weighting="uniform")
        runs[f"ct_n{n}"] = replace(runs["ct"], method_cfg=fixed,  # half a run each, to fit the CPU budget
                                   train=replace(runs["ct"].train, steps=runs["ct"].train.steps // 2))
    return ConsistencyChapter(runs=runs, teachers={"cd": "exact", "cd_fm": "fm_teacher", "scd": "exact"},
                              gaussian_cfg=run_preset("cm", "gaussian", scale, variant="sct").method_cfg,
                              image_sets=sets, image_variant=variant, **_sizes(scale), **_redraws(scale),
                              **per_scale)


@dataclass(frozen=True)
class ConsistencyTrajectoryChapter:
    """Chapter 3: CTM distilled on 8gaussians from the exact field and from an FM teacher."""

    runs: dict = field(default_factory=dict)  # "exact" / "fm": CTM runs; "fm_teacher": the FM run; images
    teacher_eval_steps: int = 32  # Heun steps the FM teacher is scored with
    n_eval: int = 2000  # samples for W2
    n_map: int = 1000  # noise points for the flow-map error against the exact map
    gammas: tuple = (0.0, 0.5, 1.0)
    step_counts: tuple = (1, 2, 4)
    split_points: int = 25  # values of the split point u in the semigroup animation and defect curve
    n_particles: int = 12  # particles drawn in the animation
    image_sets: tuple = ()  # class-conditional image runs, each distilled from an FM run "<set>_teacher"
    image_step_counts: tuple = (1, 2, 4)
    n_images: int = 1000
    redraws: int = 4  # fresh noise draws of one trained model: its sampler's own spread of W2
    seeds: tuple = (0, 1, 2)  # training seeds of the committed batch runs the chapter summarises


def consistency_trajectory_chapter(scale: str) -> ConsistencyTrajectoryChapter:
    scale = resolve_scale(scale)
    steps = {"smoke": {"steps": 200}, "book": {"steps": 1500}, "full": {}}[scale]
    # the FM teacher's 1500-step run samples from an EMA of 100 steps, as Chapter 2's runs (see there)
    teacher_steps = {**steps, "ema_decay": 0.99} if scale == "book" else steps
    # digits do not fit the book's 3-minute budget next to the two 2-D runs: full scale only
    sets = {"smoke": (), "book": (), "full": ("digits", "mnist")}[scale]
    runs = {"fm_teacher": run_preset("fm", "8gaussians", scale, **teacher_steps),
            "exact": run_preset("ctm", "8gaussians", scale, **steps)}
    runs["fm"] = runs["exact"]
    for name in sets:
        runs[f"{name}_teacher"] = run_preset("fm", name, scale, conditional=True)
        runs[name] = run_preset("ctm", name, scale, conditional=True)
    per_scale = {"smoke": {"teacher_eval_steps": 8, "n_map": 300, "split_points": 4},
                 "book": {"n_map": 1000, "split_points": 16}, "full": {}}[scale]
    return ConsistencyTrajectoryChapter(runs=runs, image_sets=sets, **{**_sizes(scale), **_redraws(scale), **per_scale})


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
    redraws: int = 4  # fresh noise draws of one trained model: its sampler's own spread of W2
    seeds: tuple = (0, 1, 2)  # training seeds of the committed batch runs the chapter summarises


def shortcut_chapter(scale: str) -> ShortcutChapter:
    scale = resolve_scale(scale)
    sets = {"smoke": (), "book": ("digits",), "full": ("digits", "mnist")}[scale]  # smoke: ≤ 30 s
    runs = {"8gaussians": run_preset("shortcut", "8gaussians", scale),
            "cm": run_preset("cm", "8gaussians", scale, variant="cd"),
            **{name: run_preset("shortcut", name, scale, conditional=True) for name in sets}}
    per_scale = {"smoke": {"n_order": 50, "step_counts": (1, 4, 16, 128)}, "book": {},
                 "full": {}}[scale]
    return ShortcutChapter(runs=runs, image_sets=sets, **_sizes(scale), **_redraws(scale), **per_scale)


@dataclass(frozen=True)
class AlignYourFlowChapter:
    """Chapter 5: AYF distilled on 8gaussians (three objectives, two teachers), the step-count comparison with
    CM and shortcut models, and autoguided class-conditional digits.  ``live`` runs train on every execution;
    the rest form the study, trained for every seed in ``seeds`` when the chapter runs with ``study=True``."""

    runs: dict = field(default_factory=dict)  # name -> RunPreset
    teachers: dict = field(default_factory=dict)  # run -> "exact", an fm run's name, or (teacher, weak teacher)
    live: tuple = ("emd",)
    objectives: tuple = ("emd", "lmd", "emd+lmd")  # AYF runs with the exact teacher
    seeds: tuple = (0, 1, 2)
    n_eval: int = 2000  # samples for W2 and the mode statistics
    n_map: int = 2000  # noise points of the flow-map error against the exact map
    step_counts: tuple = (1, 2, 4, 8, 16)
    teacher_steps: int = 32  # Heun steps of the FM teachers when they are scored or sampled
    limit_gaps: tuple = (1e-1, 1e-2, 1e-3)  # t − s of the s → t limit check
    rk4_steps: int = 100  # RK4 steps of the exact mixture map in the fixed-point check (error ~2e-7)
    guidance_scales: tuple = (1.0, 1.5, 2.0, 3.0)
    image_step_counts: tuple = (1, 4)
    n_images: int = 1000


def align_your_flow_chapter(scale: str) -> AlignYourFlowChapter:
    scale = resolve_scale(scale)
    two_d = {"smoke": {"steps": 150}, "book": {}, "full": {}}[scale]
    images = {"smoke": {"steps": 100}, "book": {}, "full": {}}[scale]
    runs = {**{v: run_preset("ayf", "8gaussians", scale, variant=v, **two_d) for v in ayf.VARIANTS},
            "fm_teacher": run_preset("fm", "8gaussians", scale, **two_d),
            "cm": run_preset("cm", "8gaussians", scale, variant="cd", **two_d),
            "shortcut": run_preset("shortcut", "8gaussians", scale, **two_d),
            "digits_teacher": run_preset("fm", "digits", scale, conditional=True, **images),
            "digits": run_preset("ayf", "digits", scale, conditional=True, autoguided=True, **images)}
    runs["emd_fm"] = runs["emd"]
    # the weak teacher: the same FM network after a fifth of the teacher's training (autoguidance's "fewer steps")
    weak_steps = max(runs["digits_teacher"].train.steps // 5, 1)
    runs["digits_weak"] = replace(runs["digits_teacher"], train=replace(runs["digits_teacher"].train, steps=weak_steps))
    teachers = {**{v: "exact" for v in ayf.VARIANTS}, "emd_fm": "fm_teacher", "cm": "exact",
                "digits": ("digits_teacher", "digits_weak")}
    per_scale = {"smoke": {"seeds": (0,), "n_map": 300, "step_counts": (1, 2, 4), "teacher_steps": 8,
                           "guidance_scales": (1.0, 3.0), "image_step_counts": (1,), "n_images": 300},
                 "book": {}, "full": {"seeds": (0, 1, 2, 3, 4)}}[scale]
    sizes = {k: v for k, v in _sizes(scale).items() if k != "n_images"}
    return AlignYourFlowChapter(runs=runs, teachers=teachers, **{**sizes, **per_scale})


@dataclass(frozen=True)
class MeanFlowChapter:
    """Chapter 6: MeanFlow on the 2-D sets over several seeds, the study of its border-case fraction and
    adaptive weight, the JVP's cost, and guidance trained in on class-conditional digits."""

    runs: dict = field(default_factory=dict)  # "8gaussians", "checkerboard", image sets: MeanFlow; "fm": FM
    seeds: tuple = (0, 1, 2)  # training seeds of the 2-D runs
    n_eval: int = 2000  # samples for W2
    n_map: int = 2000  # noise points for the flow-map error against the exact map
    step_counts: tuple = (1, 2, 4)
    error_grid: int = 5  # the learned jump's error is mapped on the (r, t) grid of spacing 1/error_grid
    n_grid: int = 300  # points per (r, t) cell of that map
    n_regression: int = 20_000  # Monte-Carlo pairs of the naive regression of u(z1, 0, 1) on x1 − x0
    n_identity: int = 64  # points of the identity checks on the mixture (each a JVP through an RK4 solve)
    rk4_steps: int = 200  # steps of that solve (error ~1e-8; 50 steps: ~3e-6)
    border_fractions: tuple = (0.0, 0.25, 0.5, 0.75)  # the study's fractions of rows with r = t
    norm_powers: tuple = (0.0, 0.5, 1.0)  # the study's powers p of the adaptive weight
    time_laws: tuple = ((0.0, 1.6),)  # the study's wider logit-normal (mean, std) of t and r
    study_seeds: tuple = (0, 1, 2)
    study_steps: int = 3000  # training steps of each study run
    trace_points: int = 10  # points of the study's loss and gradient-norm traces
    study: str = "run"  # "run": train the study grid here; "results": read it from the committed book run
    timing_steps: int = 100  # steps timed per method for the JVP's cost
    image_sets: tuple = ("digits",)  # class-conditional image runs (guidance trained in)
    image_step_counts: tuple = (1, 2)
    # effective guidance scales ω/(1 − κ) trained in, at the preset's κ (1: no guidance, ω = 1, κ = 0)
    guidance_scales: tuple = (1.0, 1.5, 2.0, 3.0)
    cfg_steps: int = 32  # Heun steps of the flow-matching model sampled with CFG at the same scales
    n_images: int = 1000


def meanflow_chapter(scale: str) -> MeanFlowChapter:
    scale = resolve_scale(scale)
    sets = {"smoke": ("digits",), "book": ("digits",), "full": ("digits", "mnist")}[scale]
    steps = {"smoke": {"steps": 200}, "book": {}, "full": {}}[scale]  # smoke: every code path within 30 s
    image_steps = {"smoke": {"steps": 100}, "book": {}, "full": {}}[scale]
    # the checkerboard's runs are shorter at book scale to keep the chapter near its CPU budget
    checker = {"smoke": steps, "book": {"steps": 2000}, "full": {}}[scale]
    runs = {"8gaussians": run_preset("meanflow", "8gaussians", scale, **steps),
            "checkerboard": run_preset("meanflow", "checkerboard", scale, **checker),
            "fm": run_preset("fm", "8gaussians", scale, **steps),
            **{name: run_preset("meanflow", name, scale, conditional=True, **image_steps) for name in sets},
            **{f"fm_{name}": run_preset("fm", name, scale, conditional=True, **image_steps) for name in sets}}
    per_scale = {
        "smoke": {"seeds": (0,), "border_fractions": (), "norm_powers": (1.0,), "time_laws": (),
                  "study_seeds": (0,), "study_steps": 100, "trace_points": 2, "timing_steps": 20,
                  "n_regression": 4000, "n_identity": 16, "rk4_steps": 50, "error_grid": 2, "n_grid": 50,
                  "guidance_scales": (1.0, 2.0), "cfg_steps": 4, "n_images": 300},
        # the study's 21 runs take longer than the chapter's budget: the book reads the committed run
        "book": {"study": "results"},
        "full": {"study_steps": SCALE_TABLE["full"].train_2d.steps},
    }[scale]
    return MeanFlowChapter(runs=runs, image_sets=sets, **{**_sizes(scale), **per_scale})


@dataclass(frozen=True)
class AlphaFlowChapter:
    """Chapter 7: α-Flow's objective and its limits, the gradient conflict inside MeanFlow's loss, the
    curriculum against fixed α on 8gaussians, MeanFlow on the cosine path, and guided digits.  The
    ``live`` trace runs on every execution; the study (every schedule and path for every seed, and the
    image runs) is trained when ``study == "run"`` and read from the committed book run otherwise."""

    runs: dict = field(default_factory=dict)  # "curriculum", "meanflow" (α = 0), "tfm" (α = 1), "cosine", images
    seeds: tuple = (0, 1, 2)  # training seeds of the study's 2-D runs
    schedules: tuple = ("curriculum", "meanflow", "tfm")  # the α settings compared
    n_eval: int = 2000  # samples for W2
    n_map: int = 2000  # noise points of the flow-map error against the exact map
    step_counts: tuple = (1, 2)
    trace_points: int = 10  # points of the loss, gradient-norm and gradient-cosine traces
    probe_rows: int = 4096  # rows (all r < t) of the fixed probe batch of those traces
    limit_alphas: tuple = (1e-1, 1e-2, 1e-3, 1e-4)  # α of the α → 0 check
    n_identity: int = 64  # points of the identity check on the cosine path (a JVP through an RK4 solve)
    rk4_steps: int = 200
    study: str = "run"  # "run": train the study here; "results": read it from the committed book run
    image_sets: tuple = ("digits",)
    image_step_counts: tuple = (1, 2)
    n_images: int = 1000


def alphaflow_chapter(scale: str) -> AlphaFlowChapter:
    scale = resolve_scale(scale)
    sets = {"smoke": (), "book": ("digits",), "full": ("digits", "mnist")}[scale]
    steps = {"smoke": {"steps": 150}, "book": {}, "full": {}}[scale]  # smoke: every code path within 30 s
    curriculum = run_preset("alphaflow", "8gaussians", scale, **steps)
    fixed = lambda alpha: replace(curriculum, method_cfg=replace(curriculum.method_cfg, alpha_start=alpha,
                                                                 alpha_end=alpha))
    mf = run_preset("meanflow", "8gaussians", scale, **steps)
    runs = {"curriculum": curriculum, "meanflow": fixed(0.0), "tfm": fixed(1.0),
            "cosine": replace(mf, method_cfg=replace(mf.method_cfg, path="cosine")),
            **{name: run_preset("alphaflow", name, scale, conditional=True) for name in sets}}
    per_scale = {
        "smoke": {"seeds": (0,), "trace_points": 3, "probe_rows": 512, "limit_alphas": (1e-1, 1e-2, 1e-3),
                  "n_identity": 16, "rk4_steps": 50},
        # the study's 12 runs and the image run take longer than the chapter's budget: the book reads the
        # committed run (python -m onestep batch --chapters alphaflow --scale book --param study=run)
        "book": {"study": "results"},
        "full": {},
    }[scale]
    return AlphaFlowChapter(runs=runs, image_sets=sets, **_sizes(scale), **per_scale)


CHAPTERS = {"flow_matching": flow_matching_chapter, "consistency_models": consistency_chapter,
            "consistency_trajectory_models": consistency_trajectory_chapter, "shortcut_models": shortcut_chapter,
            "align_your_flow": align_your_flow_chapter, "meanflow": meanflow_chapter,
            "alphaflow": alphaflow_chapter}


def chapter_preset(chapter: str, scale: str):
    """The preset of a chapter (by its short name, e.g. ``flow_matching``) at ``scale``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; accepted: {', '.join(CHAPTERS)}")
    return CHAPTERS[chapter](scale)
