"""α-Flow: the two ends of the objective (α = 1 is trajectory flow matching, α → 0 MeanFlow, α = 0
MeanFlow exactly), the split of the loss into trajectory flow matching and trajectory consistency,
the curriculum, the MeanFlow identity on the cosine path with exact objects, float64 backend parity
of the loss and its gradients, convergence at smoke scale against a broken target, the CLI, and bad
input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from parity import assert_same, assert_same_loss_and_grads, backend64, make_pair

from onestep import BACKENDS, analytic, get_backend, metrics
from onestep.backends.architectures import MLPConfig
from onestep.cli import main
from onestep.evaluation import reference
from onestep.methods import alphaflow, meanflow, twotime
from onestep.paths import COSINE, LINEAR
from onestep.presets import run_preset
from onestep.runs import fit
from onestep.train import run_keys

NET = MLPConfig(data_dim=3, n_cond=alphaflow.n_cond(alphaflow.Config()), width=32, depth=3, emb_dim=16, n_classes=4)
CFG = alphaflow.Config(border_fraction=0.25, norm_p=0.75, norm_eps=1e-3, omega=0.8, kappa=0.3,
                       guidance_interval=(0.1, 0.9), label_dropout=0.3)
PLAIN = replace(CFG, norm_p=0.0, omega=1.0, kappa=0.0)  # no adaptive weight, no guidance
SHARED = [f for f in meanflow.Config.__dataclass_fields__]  # the settings both objectives read


def as_meanflow(cfg):
    return meanflow.Config(**{f: getattr(cfg, f) for f in SHARED})


def fixed_draws(bk, cfg, n, alpha, seed=3, dim=3):
    """Draws as ``alphaflow.draw`` makes them (r ≤ t, r = t on the first rows) with a given α, from numpy."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(size=(2, n))
    t, r = np.maximum(a, b), np.minimum(a, b)
    r[: twotime.border_rows(cfg, n)] = t[: twotime.border_rows(cfg, n)]
    return {"t": bk.from_numpy(t), "r": bk.from_numpy(r), "x1": bk.from_numpy(rng.normal(size=(n, dim))),
            "drop": bk.from_numpy(rng.uniform(size=n) < cfg.label_dropout), "alpha": bk.from_numpy(np.asarray(alpha))}


def batch(bk, n=12, seed=5, labels=True):
    rng = np.random.default_rng(seed)
    return {"x": bk.from_numpy(rng.normal(size=(n, 3))),
            "y": bk.from_numpy(rng.integers(0, NET.n_classes, n)) if labels else None}


def loss_and_grads(bk, loss, model):
    value, _, grads = bk.value_and_grad(loss, model)
    return float(value), {k: np.asarray(g) for k, g in grads.items()}


def flat(grads):
    return np.concatenate([grads[k].ravel() for k in sorted(grads)])


# -- the ends of the objective ----------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_alpha_one_is_trajectory_flow_matching(name):
    """At α = 1 every row regresses u_θ(z_t, r, t) onto the (guided) velocity ṽ: the loss and its
    gradients are those of mean ‖u_θ − ṽ‖² (no adaptive weight)."""
    bk = backend64(name)
    model = bk.make_model(NET, bk.key(1))
    data, draws = batch(bk), fixed_draws(bk, CFG, 12, 1.0)
    cfg = replace(CFG, norm_p=0.0)

    def tfm(m):
        z, v, y = twotime.inputs(bk, cfg, m, data, draws)
        u = twotime.average_velocity(bk, m, cfg, z, draws["r"], draws["t"], y)
        return bk.xp.mean(twotime.row_squared_error(bk, u, bk.stop_gradient(v))), {}

    a_loss, a_grads = loss_and_grads(bk, lambda m: alphaflow.loss_from_draws(bk, cfg, m, None, data, draws), model)
    t_loss, t_grads = loss_and_grads(bk, tfm, model)
    assert abs(a_loss - t_loss) < 1e-12
    assert np.max(np.abs(flat(a_grads) - flat(t_grads))) < 1e-12


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cfg", [CFG, PLAIN], ids=["guided", "plain"])
def test_alpha_zero_is_meanflow(name, cfg):
    bk = backend64(name)
    model = bk.make_model(NET, bk.key(1))
    data, draws = batch(bk), fixed_draws(bk, cfg, 12, 0.0)
    a_loss, a_grads = loss_and_grads(bk, lambda m: alphaflow.loss_from_draws(bk, cfg, m, None, data, draws), model)
    m_loss, m_grads = loss_and_grads(
        bk, lambda m: meanflow.loss_from_draws(bk, as_meanflow(cfg), m, None, data, draws), model)
    assert abs(a_loss - m_loss) < 1e-12
    assert np.max(np.abs(flat(a_grads) - flat(m_grads))) < 1e-12


def gradient_gaps(bk, cfg, alphas):
    """‖∇L_α − ∇L_MF‖/‖∇L_MF‖ for each α, on the same network, batch and draws."""
    model = bk.make_model(NET, bk.key(1))
    data = batch(bk, labels=False)
    _, mf = loss_and_grads(bk, lambda m: meanflow.loss_from_draws(bk, as_meanflow(cfg), m, None, data,
                                                                  fixed_draws(bk, cfg, 12, 0.0)), model)
    gaps = []
    for alpha in alphas:
        draws = fixed_draws(bk, cfg, 12, alpha)
        _, g = loss_and_grads(bk, lambda m, d=draws: alphaflow.loss_from_draws(bk, cfg, m, None, data, d), model)
        gaps.append(np.linalg.norm(flat(g) - flat(mf)) / np.linalg.norm(flat(mf)))
    return gaps


@pytest.mark.parametrize("norm_p, eps", [(0.0, 1e-3), (0.75, 1e-30), (1.0, 1e-30)])
def test_small_alpha_gradient_tends_to_meanflow(norm_p, eps):
    """With the row weight α^(2p − 1) the gradient at small α differs from MeanFlow's by O(α): the
    relative gap falls tenfold per decade of α, at p = 0 (the paper's 1/α), p = 0.75 and p = 1 (the
    code's α), with ε negligible against α²‖R‖².  Measured: 7.0e-6, 7.0e-7, 7.0e-8 at p = 0."""
    gaps = gradient_gaps(backend64("jax"), replace(PLAIN, norm_p=norm_p, norm_eps=eps), (1e-2, 1e-3, 1e-4))
    assert gaps[0] < 1e-4, gaps
    assert 8 < gaps[0] / gaps[1] < 12 and 8 < gaps[1] / gaps[2] < 12, gaps


def swapped_weight_gap(bk, cfg, alpha, weight):
    """The gap of ``gradient_gaps`` at one α with ``weight`` (a number) in place of α^(2p − 1) on the rows with r < t."""
    model = bk.make_model(NET, bk.key(1))
    data, draws = batch(bk, labels=False), fixed_draws(bk, cfg, 12, alpha)
    jump = bk.from_numpy(np.arange(12) >= twotime.border_rows(cfg, 12))

    def loss(m):
        u, target, _ = alphaflow.prediction_and_target(bk, cfg, m, data, draws)
        sq = twotime.row_squared_error(bk, u, target)
        return bk.xp.mean(bk.xp.where(jump, weight, 1.0) * twotime.adaptive_weight(bk, cfg, sq) * sq), {}

    _, mf = loss_and_grads(bk, lambda m: meanflow.loss_from_draws(bk, as_meanflow(cfg), m, None, data,
                                                                  fixed_draws(bk, cfg, 12, 0.0)), model)
    _, g = loss_and_grads(bk, loss, model)
    return np.linalg.norm(flat(g) - flat(mf)) / np.linalg.norm(flat(mf))


def test_the_limit_needs_the_right_weight_and_a_small_eps():
    """The weights swapped (the code's α without the adaptive weight, the paper's 1/α with it at p = 1)
    leave the gradient far from MeanFlow's at small α; and at p = 1 with ε = 1e-3 the α-step rows fade
    out of the gradient once α²‖R‖² ≲ ε, before the snap at 0.005 hands them to the JVP target."""
    bk = backend64("jax")
    assert swapped_weight_gap(bk, replace(PLAIN, norm_p=0.0), 1e-3, 1e-3) > 0.5  # vanishes like α²
    assert swapped_weight_gap(bk, replace(PLAIN, norm_p=1.0, norm_eps=1e-30), 1e-3, 1e3) > 100  # blows up like 1/α²
    faded = gradient_gaps(bk, replace(PLAIN, norm_p=1.0, norm_eps=1e-3), (1e-1, 1e-2, 1e-3))
    assert faded[0] < 0.1 and faded[2] > 0.5, faded


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_loss_splits_into_trajectory_flow_matching_and_consistency(alpha):
    """‖u − u_tgt‖² = TFM + TC + (‖u_tgt‖² − ‖ṽ‖²) per row, and the last term carries no gradient."""
    bk = backend64("torch")
    model = bk.make_model(NET, bk.key(2))
    data, draws = batch(bk), fixed_draws(bk, PLAIN, 12, alpha)
    u, target, _ = alphaflow.prediction_and_target(bk, PLAIN, model, data, draws)
    _, v, _ = twotime.inputs(bk, PLAIN, model, data, draws)
    tfm, tc = (bk.to_numpy(a) for a in alphaflow.trajectory_terms(bk, PLAIN, model, data, draws))
    u, target, v = (bk.to_numpy(a) for a in (u, target, v))
    const = np.sum(target**2, axis=1) - np.sum(v**2, axis=1)
    assert np.max(np.abs(np.sum((u - target) ** 2, axis=1) - (tfm + tc + const))) < 1e-12
    assert np.max(np.abs(tc)) > 1e-3 and np.max(np.abs(const)) > 1e-3
    jump = slice(twotime.border_rows(PLAIN, 12), None)
    _, g_sq = loss_and_grads(bk, lambda m: (bk.xp.mean(twotime.row_squared_error(
        bk, *alphaflow.prediction_and_target(bk, PLAIN, m, data, draws)[:2])[jump]), {}), model)
    _, g_terms = loss_and_grads(bk, lambda m: (bk.xp.mean(sum(alphaflow.trajectory_terms(
        bk, PLAIN, m, data, draws))[jump]), {}), model)
    assert np.max(np.abs(flat(g_sq) - flat(g_terms))) < 1e-12


# -- the curriculum -----------------------------------------------------------------------------------
def test_sigmoid_schedule():
    cfg = alphaflow.Config()
    alpha = alphaflow.alpha_schedule(cfg, 10_000)
    assert alpha[0] == 1.0 and alpha[-1] == 0.0 and np.all(np.diff(alpha) <= 0)
    assert abs(alpha[5000] - 0.5) < 1e-12
    # γ = 25 and the snap at 0.005: α is exactly 1 until p = −0.2117 of the ramp, exactly 0 after +0.2117
    edge = np.log(1 / 0.005 - 1) / 25
    assert abs(np.mean(alpha == 1.0) - (0.5 - edge)) < 2e-4 and abs(np.mean(alpha == 0.0) - (0.5 - edge)) < 2e-4
    assert np.min(alpha[alpha > 0]) >= 0.005 and np.max(alpha[alpha < 1]) <= 0.995
    late = alphaflow.alpha_schedule(replace(cfg, ramp=(0.5, 1.0)), 1000)
    assert np.all(late[:500] == 1.0) and abs(late[750] - 0.5) < 1e-12
    assert np.all(alphaflow.alpha_schedule(replace(cfg, alpha_start=0.3, alpha_end=0.3), 50) == 0.3)
    assert np.all(alphaflow.alpha_schedule(replace(cfg, alpha_start=0.004, alpha_end=0.004), 50) == 0.0)


@pytest.mark.parametrize("name", BACKENDS)
def test_draw_reads_the_step_alpha(name):
    bk = get_backend(name)
    cfg = alphaflow.Config(border_fraction=0.5)
    data = {"x": bk.from_numpy(np.zeros((10, 2)))}
    want = alphaflow.alpha_schedule(cfg, 100)
    for step in (0, 50, 60, 99, 150):
        got = float(bk.to_numpy(alphaflow.draw(bk, cfg, bk.key(0), data, step, 100)["alpha"]))
        assert abs(got - want[min(step, 99)]) < 1e-6, step
    draws = alphaflow.draw(bk, cfg, bk.key(0), data, 0, 100)
    t, r = bk.to_numpy(draws["t"]), bk.to_numpy(draws["r"])
    assert np.array_equal(r[:5], t[:5]) and np.all(r[5:] < t[5:])


# -- the cosine path ------------------------------------------------------------------------------
def test_identity_on_the_cosine_path():
    """The conditional average velocity of the cosine path is (z_t − z_r)/(t − r), and the marginal
    average velocity of the mixture on that path (RK4 through the exact field) satisfies
    u = v − (t − r)·du/dt, du/dt by torch's JVP (both backends' JVPs agree by the parity tests;
    Chapter 7 runs this check in each backend)."""
    bk = backend64("torch")
    gmm = analytic.eight_gaussians(path=COSINE)
    rng = np.random.default_rng(0)
    n = 8
    t = rng.uniform(0.2, 1.0, n)
    r = t * rng.uniform(0.0, 0.9, n)
    x0, x1 = gmm.sample(n, 1), rng.normal(size=(n, 2))
    chord = (COSINE.sample(np, x0, x1, t) - COSINE.sample(np, x0, x1, r)) / (t - r)[:, None]
    assert np.max(np.abs(COSINE.average_velocity(np, x0, x1, r, t) - chord)) < 1e-12
    assert np.max(np.abs(chord - COSINE.velocity(np, x0, x1, t))) > 0.1  # not the velocity, unlike LINEAR
    z = COSINE.sample(np, x0, x1, t)
    v = gmm.velocity(z, t)
    u_fn = analytic.exact_average_velocity(bk, gmm, steps=40)
    u, du_dt = bk.jvp(u_fn, tuple(map(bk.from_numpy, (z, r, t))), tuple(map(bk.from_numpy, (v, 0 * r, 1 + 0 * t))))
    u, du_dt = bk.to_numpy(u), bk.to_numpy(du_dt)
    assert np.max(np.abs(u - (v - (t - r)[:, None] * du_dt))) < 1e-5  # RK4 with 40 steps: ~1e-5 on this path
    assert np.max(np.abs(u - v)) > 0.1


# -- parity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return make_pair(NET, weight_noise=0.05)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.01, 0.0])
@pytest.mark.parametrize("cfg", [CFG, replace(CFG, norm_p=0.0, embedding="r_t", path="cosine")],
                         ids=["guided", "cosine"])
def test_loss_and_gradient_parity(pair, alpha, cfg):
    loss = assert_same_loss_and_grads(pair, lambda bk, m, ema: alphaflow.loss_from_draws(
        bk, cfg, m, ema, batch(bk), fixed_draws(bk, cfg, 12, alpha)))
    assert np.isfinite(loss) and loss > 0


def test_trajectory_terms_and_sampler_parity(pair):
    terms = assert_same(pair, lambda bk, m, ema: alphaflow.trajectory_terms(
        bk, CFG, m, batch(bk), fixed_draws(bk, CFG, 12, 0.3)))
    assert np.max(np.abs(terms[1])) > 1e-3
    z = np.random.default_rng(4).normal(size=(5, 3))
    path = assert_same(pair, lambda bk, m, ema: alphaflow.sample(bk, CFG, m, bk.from_numpy(z), 2, bk.key(0),
                                                                 y=bk.from_numpy(np.arange(5)), trajectory=True))
    assert path.shape == (3, 5, 3)


# -- convergence ----------------------------------------------------------------------------------
def test_alphaflow_converges_at_smoke_scale():
    """The curriculum (α from 1 to 0) with the smoke preset on 8gaussians (JAX, 400 steps): one-step W2
    to fresh data (n = 1000, fixed seeds) well below the untrained network's and below the same run
    kept at α = 1 (trajectory flow matching, whose one-step samples head for the data mean), the
    target the curriculum starts from.  Measured: trained 0.719, α = 1 throughout 1.462, untrained 1.646."""
    bk = get_backend("jax")
    preset = run_preset("alphaflow", "8gaussians", "smoke")
    noise = bk.from_numpy(np.random.default_rng(1).normal(size=(1000, 2)))
    ref = reference("8gaussians", 1000)

    def one_step_w2(model):
        return metrics.w2(bk.to_numpy(alphaflow.sample(bk, preset.method_cfg, model, noise, 1, bk.key(0))), ref)

    trained = one_step_w2(fit(bk, preset, seed=0)[0].ema)
    untrained = one_step_w2(bk.make_model(preset.model, run_keys(bk, 0)[0]))
    stuck = replace(preset, method_cfg=replace(preset.method_cfg, alpha_start=1.0, alpha_end=1.0))
    flow_matching_only = one_step_w2(fit(bk, stuck, seed=0)[0].ema)
    print(f"one-step W2 trained {trained:.3f}, α = 1 throughout {flow_matching_only:.3f}, untrained {untrained:.3f}")
    assert trained < 0.6 * untrained, (trained, untrained)
    assert trained < 0.6 * flow_matching_only, (trained, flow_matching_only)


# -- the CLI and bad input ----------------------------------------------------------------------------
def test_cli_trains_alphaflow(tmp_path):
    assert main(["train", "--method", "alphaflow", "--dataset", "8gaussians", "--steps", "10", "--backend", "torch",
                 "--out", str(tmp_path / "run")]) == 0
    metrics_file = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics_file["steps"] == 10 and np.isfinite(metrics_file["final_loss"])


@pytest.mark.parametrize("change, message", [
    ({"alpha_start": 1.5}, r"alpha_start must be in \[0, 1\] .* got 1.5"),
    ({"alpha_end": -0.1}, r"alpha_end must be in \[0, 1\] .* got -0.1"),
    ({"alpha_start": 0.2, "alpha_end": 0.7}, r"alpha_start = 0.2 below alpha_end = 0.7"),
    ({"sigmoid_steepness": 0.0}, r"sigmoid_steepness must be positive, got 0.0"),
    ({"ramp": (0.8, 0.2)}, r"ramp must be .* got \(0.8, 0.2\)"),
    ({"alpha_snap": 0.5}, r"alpha_snap must be in \[0, 0.5\), got 0.5"),
    ({"path": "spiral"}, r"unknown path 'spiral'; accepted: linear, cosine"),
    ({"border_fraction": 1.5}, r"border_fraction .* got 1.5"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        alphaflow.Config(**change)


def test_path_is_shared_with_meanflow():
    assert LINEAR.name == alphaflow.Config().path
    with pytest.raises(ValueError, match=r"unknown path 'curved'; accepted: linear, cosine"):
        meanflow.Config(path="curved")
