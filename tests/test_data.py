"""Checks of onestep.data: shapes, ranges, seeding, the exact 8-Gaussian spec, the image files."""
import os
import pickle

import numpy as np
import pytest

from onestep.data import DATASETS, batch_indices, dataset_info, in_checkerboard, load

TWO_D = ["8gaussians", "checkerboard", "spirals", "moons", "gaussian", "clusters-3"]


@pytest.mark.parametrize("name", TWO_D)
def test_2d_sets_shape_dtype_and_seeding(name):
    a = load(name, n=500, seed=3)
    assert a.x.shape == (500, 2) and a.x.dtype == np.float32 and a.shape == (2,)
    assert a.y is None and a.n_classes == 0 and np.all(np.isfinite(a.x))
    assert np.all(np.abs(a.x) < 8)
    np.testing.assert_array_equal(a.x, load(name, n=500, seed=3).x)
    assert not np.allclose(a.x, load(name, n=500, seed=4).x)
    assert not np.allclose(a.x, load(name, n=500, seed=3, split="test").x)


def test_exact_sets_expose_their_oracle_and_sample_from_it():
    for name in ["8gaussians", "gaussian", "clusters-3"]:
        d = load(name, n=100, seed=7)
        np.testing.assert_allclose(d.x, d.oracle.sample(100, 7), rtol=1e-6)
    assert load("moons", n=10).oracle is None
    assert len(load("clusters-5", n=10).oracle.means) == 5


def test_8gaussians_matches_the_spec_per_component():
    n = 40_000
    x = load("8gaussians", n=n, seed=0).x.astype(np.float64)
    angles = np.deg2rad(45.0 * np.arange(8))
    means = 4.0 / np.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    std = 0.5 / np.sqrt(2.0)
    nearest = np.argmin(((x[:, None] - means) ** 2).sum(-1), axis=1)
    for k in range(8):
        xk = x[nearest == k]
        assert abs(len(xk) - n / 8) < 4 * np.sqrt(n / 8)
        # mean error ~ std / sqrt(5000) = 0.005; covariance error ~ std^2 * sqrt(2 / 5000) = 0.0018
        np.testing.assert_allclose(xk.mean(0), means[k], atol=0.025)
        np.testing.assert_allclose(np.cov(xk, rowvar=False), std**2 * np.eye(2), atol=0.01)


def test_gaussian_moments():
    d = load("gaussian", n=50_000, seed=1)
    x = d.x.astype(np.float64)
    np.testing.assert_allclose(x.mean(0), d.oracle.mean, atol=0.03)
    np.testing.assert_allclose(np.cov(x, rowvar=False), d.oracle.cov, atol=0.03)


def test_checkerboard_fills_exactly_the_occupied_cells():
    x = load("checkerboard", n=20_000, seed=0).x
    assert in_checkerboard(x).all()
    cells = np.floor((x + 4.0) / 2.0).astype(int)
    counts = np.zeros((4, 4))
    np.add.at(counts, (cells[:, 0], cells[:, 1]), 1)
    occupied = (np.add.outer(np.arange(4), np.arange(4)) % 2) == 0
    assert np.all(counts[~occupied] == 0)
    np.testing.assert_allclose(counts[occupied] / len(x), 1 / 8, atol=0.01)
    assert not in_checkerboard(np.array([[-3.0, -1.0], [4.5, 0.0]])).any()


def test_moons_angles_are_random_not_a_grid():
    x = load("moons", n=2000, seed=0).x
    assert len(np.unique(np.round(x[:, 0], 3))) > 1500
    assert abs(x[:, 0].mean()) < 0.2 and abs(x[:, 1].mean()) < 0.2


def test_2d_sets_need_a_sample_count():
    with pytest.raises(ValueError, match="n"):
        load("moons")


def test_digits_counts_range_and_labels():
    train, test = load("digits", split="train"), load("digits", split="test")
    assert train.x.shape == (3823, 1, 8, 8) and test.x.shape == (1797, 1, 8, 8)
    for d in (train, test):
        assert d.x.dtype == np.float32 and d.x.min() == -1.0 and d.x.max() == 1.0
        assert d.shape == (1, 8, 8) and d.n_classes == 10 and set(np.unique(d.y)) == set(range(10))
        # optdigits pixels are counts 0..16, so the scaled values lie on a grid of 1/8
        np.testing.assert_array_equal((d.x + 1) * 8, np.round((d.x + 1) * 8))
    assert np.bincount(train.y)[0] == 376 and np.bincount(test.y)[0] == 178


def test_image_subsets_are_seeded_and_copies():
    a, b = load("digits", n=100, seed=1), load("digits", n=100, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (100, 1, 8, 8) and a.y.shape == (100,)
    assert not np.array_equal(a.x, load("digits", n=100, seed=2).x)
    full = load("digits")
    full.x[:] = 0  # callers own their arrays: the in-process cache is untouched
    assert load("digits").x.max() == 1.0
    with pytest.raises(ValueError, match="4000"):
        load("digits", n=4000)


def test_mnist_counts_and_shape():
    train, test = load("mnist"), load("mnist", split="test")
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert train.y.dtype == np.int64 and np.bincount(test.y).tolist()[:2] == [980, 1135]
    assert test.x.min() == -1.0 and test.x.max() == 1.0


def test_cifar10_missing_folder_names_the_path_and_the_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("ONESTEP_CIFAR10", raising=False)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", root=missing)
    assert missing in str(err.value) and "ONESTEP_CIFAR10" in str(err.value) and "root=" in str(err.value)
    with pytest.raises(FileNotFoundError, match="ONESTEP_CIFAR10"):
        load("cifar10")


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    monkeypatch.setenv("ONESTEP_CIFAR10", str(tmp_path))
    train, test = load("cifar10"), load("cifar10", split="test", root=str(folder))
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.x.min() >= -1 and train.x.max() <= 1 and test.y.tolist() == [0, 1, 2, 9]
    # channel first: the first 1024 bytes of a row are the red plane
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        red = pickle.load(f)[b"data"][0, :1024].reshape(32, 32)
    np.testing.assert_allclose(test.x[0, 0], red / 127.5 - 1, atol=1e-6)


def test_unknown_names_list_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        load("9gaussians", n=10)
    assert "'9gaussians'" in str(err.value) and "8gaussians" in str(err.value) and "mnist" in str(err.value)
    with pytest.raises(ValueError, match="'valid'.*train, test"):
        load("moons", n=10, split="valid")
    with pytest.raises(ValueError, match="clusters-17"):
        dataset_info("clusters-17")


def test_registry_agrees_with_loaded_data():
    assert {"8gaussians", "checkerboard", "spirals", "moons", "gaussian", "clusters-3", "digits", "mnist",
            "cifar10"} <= set(DATASETS)
    for name in ["moons", "clusters-8", "digits"]:
        d = load(name, n=10)
        assert d.shape == dataset_info(name).shape == d.x.shape[1:]
        assert d.n_classes == dataset_info(name).n_classes


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "cifar10"])  # no CIFAR-10 copy on a CI machine
def test_recorded_rms_is_the_data_rms(name):
    """``DatasetInfo.rms`` (the σ_d of CM, CTM and sCM) is the RMS of 2000 training samples, to 0.01."""
    x = load(name, n=2000, seed=0).x.astype(np.float64)
    assert abs(dataset_info(name).rms - np.sqrt(np.mean(x**2))) <= 0.005 + 1e-12


def test_batch_indices_depend_only_on_seed_and_step():
    a = [batch_indices(100, 32, seed=5, step=s) for s in range(6)]
    b = [batch_indices(100, 32, seed=5, step=s) for s in reversed(range(6))][::-1]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert a[0].dtype == np.int64 and a[0].shape == (32,)
    epoch = np.concatenate(a[:3])  # one epoch: 3 disjoint batches
    assert len(np.unique(epoch)) == 96 and epoch.max() < 100
    assert not np.array_equal(np.sort(a[0]), np.sort(a[3]))
    assert not np.array_equal(a[0], batch_indices(100, 32, seed=6, step=0))


@pytest.mark.parametrize("bad", [0, -3])
def test_batch_indices_rejects_bad_batch_sizes(bad):
    with pytest.raises(ValueError, match=str(bad)):
        batch_indices(100, bad, seed=0, step=0)
    with pytest.raises(ValueError, match="101"):
        batch_indices(100, 101, seed=0, step=0)
