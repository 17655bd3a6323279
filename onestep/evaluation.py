"""The standard evaluation of generated samples, by kind of data set.

2-D sets: exact W2 and MMD against fresh data (and, for exact mixtures, the mean
log-likelihood and mode coverage; for the checkerboard, the fraction in support).
Images: Fréchet distance in the features of the data set's reference classifier and,
for class-conditional samples, the classifier's accuracy on the intended labels; CIFAR-10
(no reference classifier): FID against the Inception statistics of its training set.
``perfect_sampler_score`` scores real data the same way (what a perfect sampler gets at that n);
``noise_redraw_score`` scores one model over fresh draws of its sampler's noise;
``over_seeds`` and ``committed_seeds`` gather a chapter's numbers over training seeds, ``committed_study``
finds a chapter's committed study run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .data import dataset_info, load, oracle

# Fresh reference data never shares a seed with the training set.
_REFERENCE_SEED = 10_007
_REDRAW_SEED = 20_011  # nor does the sampler noise of a redraw
FID_DATASETS = ("cifar10",)  # scored by FID against their training set (no reference classifier)


def reference(dataset: str, n: int, seed: int = 0):
    """``n`` fresh data points (2-D sets) or the test split (images) to compare against."""
    if len(dataset_info(dataset).shape) == 1:
        return load(dataset, n=n, seed=_REFERENCE_SEED + seed).x.astype(np.float64)
    return load(dataset, split="test").x[:n].astype(np.float64)


def mode_spread(x, gmm) -> float:
    """Sharpness of samples ``x`` ``(n, d)`` of an isotropic mixture: the RMS distance of each sample to
    its nearest component mean, per dimension, in units of that component's std.  About 1 for exact
    samples of well-separated components; above 1 for blurred modes or mass between them; below 1 for
    modes drawn too tight."""
    x = np.asarray(x, dtype=np.float64)
    dist2 = ((x[:, None, :] - gmm.means[None]) ** 2).sum(-1)  # (n, k)
    nearest = dist2.argmin(axis=1)
    scaled = dist2[np.arange(len(x)), nearest] / gmm.stds[nearest] ** 2
    return float(np.sqrt(scaled.mean() / x.shape[1]))


def perfect_sampler_score(dataset: str, n: int, seed: int = 0, draws: int = 5, score=None) -> dict:
    """What a perfect sampler scores: ``draws`` independent sets of ``n`` real data points, each scored
    exactly as ``n`` model samples are: by ``score(x, labels) -> {metric: value}`` when given (pass the
    function the models are scored with), else by ``evaluate`` (same reference, same size).

    Not a lower bound: a finite sample of the data sits at some distance from the finite reference,
    and a model's score can fall below the mean of these draws by chance (or by drawing its modes too
    tight).  2-D sets draw fresh points from the data distribution; image sets draw ``n`` training
    images (the reference is the test split) with their labels.  Returns
    ``{metric: {"mean", "std", "values"}}`` over the draws (std with ``ddof=1``)."""
    _check_draws(draws)
    if score is None:
        def score(x, labels):
            return evaluate(dataset, x, labels, seed=seed)
    scores = []
    for k in range(draws):
        data = load(dataset, n=n, seed=2 * _REFERENCE_SEED + 97 * seed + k, split="train")
        scores.append(score(data.x, data.y))
    return _spread(scores)


def noise_redraw_score(sample, score, shape: tuple, draws: int, seed: int = 0) -> dict:
    """How much one trained model's scores move with its sampler's noise alone: ``score(sample(z))`` for
    ``draws`` independent standard-normal noise arrays ``z`` of ``shape`` (numpy), drawn from ``seed``.
    Set beside the spread over training seeds, it says how much of that spread the noise draw explains.
    Returns ``{metric: {"mean", "std", "values"}}`` like ``perfect_sampler_score``."""
    _check_draws(draws)
    return _spread([score(sample(np.random.default_rng([_REDRAW_SEED, seed, k]).normal(size=shape)))
                    for k in range(draws)])


def _check_draws(draws) -> None:
    if not (isinstance(draws, int) and draws >= 2):
        raise ValueError(f"draws must be an integer ≥ 2 (a spread needs two draws), got {draws!r}")


def _spread(scores: list[dict]) -> dict:
    """``{metric: {"mean", "std", "values"}}`` of a list of ``{metric: value}`` (std with ddof=1)."""
    out = {}
    for key in scores[0]:
        values = [float(s[key]) for s in scores]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}
    return out


def evaluate(dataset: str, samples, labels=None, seed: int = 0) -> dict:
    """The standard metrics of ``samples`` (numpy, shape ``(n, *shape)``) for ``dataset``."""
    x = np.asarray(samples, dtype=np.float64)
    info = dataset_info(dataset)
    if not np.all(np.isfinite(x)):
        return {"finite_fraction": float(np.isfinite(x.reshape(len(x), -1)).all(axis=1).mean())}
    if len(info.shape) == 1:
        ref = reference(dataset, len(x), seed)
        out = {"w2": metrics.w2(x, ref), "mmd": metrics.mmd(x, ref)}
        exact = oracle(dataset)
        if exact is not None and hasattr(exact, "responsibilities"):  # an exact mixture
            out["log_likelihood"] = metrics.gmm_log_likelihood(x, exact)
            out.update({f"modes_{k}": v for k, v in metrics.mode_coverage(x, exact).items()
                        if np.isscalar(v)})
            out["mode_spread"] = mode_spread(x, exact)
        if dataset == "checkerboard":
            out["in_support"] = metrics.checkerboard_support(x)
        return out
    if dataset in FID_DATASETS:
        return {"fid": metrics.fid_to_reference(x, metrics.fid_reference(dataset))}
    feats = metrics.ClassifierFeatures.for_dataset(dataset)
    out = {"fd": feats.fd(x, reference(dataset, max(len(x), 1000)))}
    if labels is not None:
        out["class_accuracy"] = metrics.class_accuracy(x, np.asarray(labels), dataset)
    return out


# -- training seeds ----------------------------------------------------------------------------
RESULTS = Path(__file__).resolve().parent.parent / "results"


def seed_run_dir(chapter: str, backend: str, scale: str, seed: int, root: Path = RESULTS) -> Path:
    """Where ``seed_command`` leaves a chapter's run for one training seed:
    ``results/seeds/seed{seed}/{chapter}-{backend}-{scale}``."""
    return Path(root) / "seeds" / f"seed{seed}" / f"{chapter}-{backend}-{scale}"


def seed_command(chapter: str, backend: str, scale: str, seeds) -> str:
    """The shell command that runs ``chapter`` once per training seed into ``seed_run_dir``."""
    return (f"for s in {' '.join(map(str, seeds))}; do python -m onestep batch --scale {scale} --backend {backend} "
            f"--chapters {chapter} --seed $s --out results/seeds/seed$s --overwrite; done")


def committed_seeds(chapter: str, backend: str, scale: str, seeds, root: Path = RESULTS) -> dict:
    """``{seed: metrics}`` of the committed per-seed runs of ``chapter`` that exist (see ``seed_run_dir``)."""
    out = {}
    for seed in seeds:
        path = seed_run_dir(chapter, backend, scale, seed, root) / "metrics.json"
        if path.is_file():
            out[seed] = json.loads(path.read_text())
    return out


def committed_book_run(chapter: str, backend: str, root: Path = RESULTS) -> dict:
    """``chapter``'s committed book-scale run of training seed 0 (``seed_run_dir``), this backend's when
    present, else the other's: its metrics with ``"file"``, the path read, relative to the repository;
    ``{}`` when neither is committed.  Later chapters set their numbers against it."""
    for b in dict.fromkeys((backend, "torch", "jax")):
        path = seed_run_dir(chapter, b, "book", 0, root) / "metrics.json"
        if path.is_file():
            return json.loads(path.read_text()) | {"file": path.relative_to(Path(root).parent)}
    return {}


def study_command(chapter: str, backend: str) -> str:
    """The shell command that trains ``chapter``'s study at book scale into ``results/studies``."""
    return (f"python -m onestep batch --chapters {chapter} --backend {backend} --scale book --param study=run "
            "--out results/studies")


def committed_study(chapter: str, backend: str, root: Path = RESULTS) -> Path | None:
    """The ``metrics.json`` of ``chapter``'s committed book-scale study run (one that holds a ``study``):
    this backend's, else the other backend's; None when neither is committed."""
    for b in dict.fromkeys((backend, "jax", "torch")):
        path = Path(root) / "studies" / f"{chapter}-{b}-book" / "metrics.json"
        if path.is_file() and "study" in json.loads(path.read_text()):
            return path
    return None


def over_seeds(per_seed: dict, keys, fmt: str = "{:.3f}") -> dict:
    """Mean and spread over training seeds of the numbers ``per_seed[seed][key]`` for each of ``keys``:
    ``{key: {"mean", "std", "values": {seed: value}, "text": "mean ± std"}}`` (std with ddof=1; a single
    seed has no spread and shows only its value)."""
    out = {}
    for key in keys:
        values = {seed: float(row[key]) for seed, row in sorted(per_seed.items())}
        v = np.array(list(values.values()))
        std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        text = fmt.format(v.mean()) + (f" ± {fmt.format(std)}" if len(v) > 1 else "")
        out[key] = {"mean": float(v.mean()), "std": std, "values": values, "text": text}
    return out


def perfect_over_seeds(perfect: dict, keys) -> dict:
    """``over_seeds`` of a perfect sampler's mean scores, ``perfect[seed]`` being one seed's
    ``perfect_sampler_score``: the row to set against models over the same seeds, since every seed
    scores against its own reference draw."""
    return over_seeds({s: {k: p[k]["mean"] for k in keys} for s, p in perfect.items()}, keys)


def sampling_over_seeds(per_seed: dict, keys=("fd", "class_accuracy")) -> list[dict]:
    """One row per sampler setting of image sampling tables over training seeds: ``per_seed[seed]`` is one
    seed's list of rows (``{"steps", <keys>...}``, the same settings in the same order in every seed);
    each row gives ``steps``, the ``mean ± std`` text of every key and its ``over_seeds`` ``stats``."""
    first = next(iter(per_seed.values()))
    settings = [row["steps"] for row in first]
    for seed, table in per_seed.items():
        if [row["steps"] for row in table] != settings:
            raise ValueError(f"seed {seed}'s table has steps {[row['steps'] for row in table]}; "
                             f"every seed needs the same {settings}")
    rows = []
    for k, row in enumerate(first):
        stats = over_seeds({s: table[k] for s, table in per_seed.items()}, keys)
        rows.append({"steps": row["steps"], **{key: stats[key]["text"] for key in keys}, "stats": stats})
    return rows
