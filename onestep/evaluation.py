"""The standard evaluation of generated samples, by kind of data set.

2-D sets: exact W2 and MMD against fresh data (and, for exact mixtures, the mean
log-likelihood and mode coverage; for the checkerboard, the fraction in support).
Images: Fréchet distance in the features of the data set's reference classifier and,
for class-conditional samples, the classifier's accuracy on the intended labels; CIFAR-10
(no reference classifier): FID against the Inception statistics of its training set.
"""
from __future__ import annotations

import numpy as np

from . import metrics
from .data import dataset_info, load, oracle

# Fresh reference data never shares a seed with the training set.
_REFERENCE_SEED = 10_007
FID_DATASETS = ("cifar10",)  # scored by FID against their training set (no reference classifier)


def reference(dataset: str, n: int, seed: int = 0):
    """``n`` fresh data points (2-D sets) or the test split (images) to compare against."""
    if len(dataset_info(dataset).shape) == 1:
        return load(dataset, n=n, seed=_REFERENCE_SEED + seed).x.astype(np.float64)
    return load(dataset, split="test").x[:n].astype(np.float64)


def data_floor(dataset: str, n: int, seed: int = 0) -> dict:
    """W2 and MMD between two independent data samples of size n: the best a model can score."""
    a = reference(dataset, n, seed)
    b = load(dataset, n=n, seed=2 * _REFERENCE_SEED + seed).x.astype(np.float64)
    return {"w2": metrics.w2(a, b), "mmd": metrics.mmd(a, b)}


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
