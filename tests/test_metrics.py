"""Checks of onestep.metrics against closed forms and against each other."""
import os

import numpy as np
import pytest

from onestep import metrics
from onestep.analytic import GaussianMixture, eight_gaussians
from onestep.data import load


def gauss(n, d=2, seed=0, shift=0.0):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


# -- W2 -------------------------------------------------------------------------------------
def test_w2_of_identical_sets_is_zero():
    x = gauss(300)
    assert metrics.w2(x, x) == pytest.approx(0.0, abs=1e-7)
    assert metrics.w2(x, x[::-1]) == pytest.approx(0.0, abs=1e-7)


def test_w2_of_a_translated_set_is_the_shift():
    x = gauss(200, seed=1)
    shift = np.array([3.0, -4.0])
    assert metrics.w2(x, x + shift) == pytest.approx(5.0, rel=1e-9)


def test_w2_in_1d_is_the_sorted_matching():
    x, y = gauss(150, d=1, seed=2), gauss(150, d=1, seed=3) * 2 + 1
    exact = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert metrics.w2(x, y) == pytest.approx(exact, rel=1e-9)


def test_w2_is_symmetric_and_handles_unequal_sizes():
    x, y = gauss(120, seed=4), gauss(77, seed=5, shift=0.5)
    assert metrics.w2(x, y) == pytest.approx(metrics.w2(y, x), rel=1e-9)
    # duplicating every point leaves the empirical measure, hence W2, unchanged
    assert metrics.w2(np.repeat(x, 2, axis=0), y) == pytest.approx(metrics.w2(x, y), rel=1e-9)


def test_w2_refuses_an_unconverged_solve(monkeypatch):
    monkeypatch.setattr(metrics, "_EMD_MAX_ITER", 5)
    with pytest.raises(RuntimeError, match="numItermax"):
        metrics.w2(gauss(50, seed=1), gauss(50, seed=2))


def test_w2_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(10,\)"):
        metrics.w2(np.zeros(10), np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        metrics.w2(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.w2(np.full((5, 2), np.nan), np.zeros((5, 2)))


# -- MMD ------------------------------------------------------------------------------------
def test_mmd_separates_distributions():
    same = metrics.mmd(gauss(1500, seed=6), gauss(1500, seed=7))
    shifted = metrics.mmd(gauss(1500, seed=6), gauss(1500, seed=8, shift=0.5))
    wide = metrics.mmd(gauss(1500, seed=6), 1.5 * gauss(1500, seed=9))
    assert abs(same) < 2e-3
    assert shifted > 20 * abs(same) and wide > 20 * abs(same)


def test_mmd_matches_a_direct_double_sum():
    x, y, h = gauss(40, seed=10), gauss(30, seed=11, shift=0.3), (0.5, 2.0)

    def k(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s**2)) for s in h)

    kxx, kyy = k(x, x), k(y, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (40 * 39) + (kyy.sum() - np.trace(kyy)) / (30 * 29)
              - 2 * k(x, y).mean())
    assert metrics.mmd(x, y, bandwidths=h) == pytest.approx(direct, rel=1e-10)
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(x, y, bandwidths=(1.0, 0.0))


# -- exact mixtures -------------------------------------------------------------------------
def test_mode_coverage_of_exact_samples_and_of_a_collapse():
    gmm = eight_gaussians()
    good = metrics.mode_coverage(gmm.sample(4000, 0), gmm)
    assert good["counts"].sum() == 4000 and good["counts"].shape == (8,)
    assert good["chi2"] < 24.3  # the 0.999 quantile of chi2 with 7 degrees of freedom
    assert good["quality"] == pytest.approx(1 - np.exp(-4.5), abs=0.006)
    collapsed = metrics.mode_coverage(np.repeat(gmm.means[:1], 4000, axis=0), gmm)
    assert collapsed["chi2"] == pytest.approx(4000 * 7)
    assert collapsed["quality"] == 1.0
    spread = metrics.mode_coverage(gauss(4000, seed=1) * 10, gmm)
    assert spread["quality"] < 0.2


def test_mode_coverage_uses_the_weights():
    gmm = GaussianMixture([[-5.0, 0.0], [5.0, 0.0]], 0.5, [0.2, 0.8])
    x = np.repeat([[-5.0, 0.0], [5.0, 0.0]], [200, 800], axis=0)
    assert metrics.mode_coverage(x, gmm)["chi2"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\(7, 3\)"):
        metrics.mode_coverage(np.zeros((7, 3)), gmm)


def test_gmm_log_likelihood_is_the_mean_log_density():
    gmm = eight_gaussians()
    x = gmm.sample(1000, 3)
    assert metrics.gmm_log_likelihood(x, gmm) == pytest.approx(gmm.log_prob(x).mean())
    # for exact samples it estimates minus the entropy: ~ log(1/8) - log(2 pi e std^2)
    entropy = np.log(8) + np.log(2 * np.pi * np.e * 0.125)
    assert metrics.gmm_log_likelihood(x, gmm) == pytest.approx(-entropy, abs=0.1)


def test_checkerboard_support():
    assert metrics.checkerboard_support(load("checkerboard", n=1000).x) == 1.0
    x = np.array([[-3.0, -3.0], [-3.0, -1.0], [1.0, 1.0], [9.0, 9.0]])
    assert metrics.checkerboard_support(x) == 0.5


def test_flow_map_rmse():
    pred = np.zeros((2, 1, 2, 2))
    exact = np.stack([np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2))])  # errors of norm 1 and 0
    assert metrics.flow_map_rmse(pred, exact) == pytest.approx(np.sqrt(0.5))
    with pytest.raises(ValueError, match="share a shape"):
        metrics.flow_map_rmse(np.zeros((3, 2)), np.zeros((2, 2)))


# -- Fréchet distances ----------------------------------------------------------------------
def test_frechet_distance_identity_and_1d_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    s = a @ a.T + 0.1 * np.eye(6)
    mu = rng.standard_normal(6)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    diag = metrics.frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
    assert diag == pytest.approx(2.0 + 1.0 + 1.0)
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(mu, s, mu, s[:5, :5])


@pytest.mark.parametrize("n1, n2", [(9, 14), (60, 80)])
def test_feature_frechet_distance_agrees_with_the_stats_form(n1, n2):
    d = 20  # (9, 14): fewer samples than dimensions, the nuclear-norm path
    f1, f2 = gauss(n1, d, seed=1), gauss(n2, d, seed=2, shift=0.3) * 1.2
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    stats = metrics.frechet_distance(f1.mean(0), s1, f2.mean(0), s2)
    assert metrics.feature_frechet_distance(f1, f2) == pytest.approx(stats, rel=1e-6)
    assert metrics.feature_frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)


# -- reference classifier -------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A fresh cache folder, and the digits classifier trained once into it."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return cache, metrics.ClassifierFeatures.for_dataset("digits", cache_dir=cache)


@pytest.fixture(scope="module")
def digits_classifier(digits_cache):
    return digits_cache[1]


def test_digits_classifier_is_accurate(digits_classifier):
    test = load("digits", split="test")
    accuracy = float((digits_classifier.predict(test.x) == test.y).mean())
    assert accuracy > 0.9 and accuracy == pytest.approx(digits_classifier.test_accuracy)
    assert digits_classifier.features(test.x[:5]).shape == (5, 128)
    assert digits_classifier.features(test.x.reshape(len(test.x), 64)).shape == (1797, 128)
    with pytest.raises(ValueError, match="64 values"):
        digits_classifier.features(np.zeros((3, 1, 28, 28)))


def test_digits_classifier_reloads_from_disk(digits_cache):
    cache, trained = digits_cache
    assert os.listdir(cache) == ["classifier-digits-v1.npz"]  # written atomically: no temp files left
    metrics._classifier.cache_clear()
    again = metrics.ClassifierFeatures.for_dataset("digits", cache_dir=cache)
    assert again is not trained
    assert again is metrics.ClassifierFeatures.for_dataset("digits", cache_dir=cache)
    x = load("digits", split="test", n=50).x
    np.testing.assert_array_equal(again.features(x), trained.features(x))
    assert again.test_accuracy == trained.test_accuracy


def test_classifier_fd_and_class_accuracy(digits_classifier, monkeypatch):
    test, train = load("digits", split="test"), load("digits", split="train")
    same = digits_classifier.fd(train.x, test.x)
    zeros_only = digits_classifier.fd(train.x[train.y == 0], test.x)
    assert zeros_only > 10 * same
    monkeypatch.setattr(metrics.ClassifierFeatures, "for_dataset",
                        classmethod(lambda cls, dataset: digits_classifier))
    assert metrics.class_accuracy(test.x, test.y, "digits") > 0.9
    assert metrics.class_accuracy(test.x, (test.y + 1) % 10, "digits") < 0.1
    with pytest.raises(ValueError, match=r"\(1797,\)"):
        metrics.class_accuracy(test.x, test.y[:10], "digits")


def test_classifier_only_for_supported_sets():
    with pytest.raises(ValueError, match="cifar10.*digits, mnist"):
        metrics.ClassifierFeatures.for_dataset("cifar10")


# -- FID ------------------------------------------------------------------------------------
def test_fid_on_a_handful_of_images():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    digits = load("digits", split="test").x
    a, b = digits[:3], digits[3:6]
    fa, fb = metrics.inception_features(a, batch_size=2), metrics.inception_features(b)
    assert fa.shape == (3, 2048) and fa.dtype == np.float64 and np.all(np.isfinite(fa))
    rgb = metrics.inception_features(np.repeat(b[:1], 3, axis=1))  # grey means three equal channels
    np.testing.assert_allclose(rgb, fb[:1], rtol=1e-4, atol=1e-4)
    assert metrics.feature_frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    between = metrics.fid(a[:2], b[:2])
    assert between > 1.0
    assert between == pytest.approx(metrics.feature_frechet_distance(fa[:2], fb[:2]), rel=1e-4)
    with pytest.raises(ValueError, match="1 or 3"):
        metrics.inception_features(np.zeros((2, 2, 8, 8)))
