"""Consistency models: the boundary by construction, the targets at their limits, the sCM tangent
against finite differences, float64 backend parity of every variant's loss, convergence, bad input."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from parity import assert_same_loss_and_grads, backend64, make_pair

from onestep import get_backend, metrics
from onestep.analytic import eight_gaussians
from onestep.backends.architectures import MLPConfig
from onestep.conventions import sigma_from_t, t_from_sigma, t_from_tau, tau_from_t, trigflow_scale
from onestep.evaluation import reference
from onestep.methods import cm, make_loss
from onestep.ode import ode_step
from onestep.presets import run_preset
from onestep.runs import fit, sample_run
from onestep.teachers import oracle_teacher
from onestep.train import run_keys

NET = MLPConfig(data_dim=2, n_cond=cm.n_cond(cm.Config()), width=32, depth=2, emb_dim=16, n_classes=3)
SIGMA_D = 2.0


def config(variant: str, **changes) -> cm.Config:
    """The smoke preset of a variant (so the presets are exercised too), with changes."""
    return replace(run_preset("cm", "8gaussians", "smoke", variant=variant).method_cfg, **changes)


@pytest.fixture(scope="module")
def pair():
    return make_pair(NET)


def points(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) * SIGMA_D, rng.normal(size=(n, 2)), rng.integers(0, NET.n_classes + 1, n)


def f_np(bk, model, cfg, z, t, y=None):
    t = np.full(len(z), t, dtype=float)
    return bk.to_numpy(cm.consistency(bk, model, cfg, bk.from_numpy(z), bk.from_numpy(t),
                                      None if y is None else bk.from_numpy(y)))


@pytest.mark.parametrize("variant", ["ict", "sct"])
@pytest.mark.parametrize("name", ["torch", "jax"])
def test_boundary_holds_for_an_untrained_network(variant, name):
    bk = backend64(name)
    cfg = config(variant)
    model = bk.make_model(NET, bk.key(3))
    z, _, y = points()
    c_skip, c_out, _ = cm.coefficients(np, cfg, np.array([cfg.t_min]))
    assert c_skip[0] == pytest.approx(1.0, abs=1e-15) and c_out[0] == pytest.approx(0.0, abs=1e-15)
    assert np.max(np.abs(f_np(bk, model, cfg, z, cfg.t_min, y) - z)) < 1e-13
    # away from the boundary the network matters: the identity is not trivially true everywhere
    assert np.max(np.abs(f_np(bk, model, cfg, z, 0.5, y) - z)) > 1e-2


def test_edm_form_in_our_time_is_the_sigma_form_rescaled(pair):
    """``f_t(z, t) = (1 − ε)·f_σ(z/(1 − t), σ(t))`` with the EDM/CM weights written on σ."""
    bk, model = pair[0].bk, pair[0].model
    cfg = config("ict", sigma_data=SIGMA_D)
    z, _, _ = points()
    sd, s_min = cfg.sigma_data, cfg.sigma_min
    for t in (0.01, 0.3, 0.9, cfg.t_max):
        sigma = sigma_from_t(t)
        x = z / (1 - t)
        c_skip = sd**2 / ((sigma - s_min) ** 2 + sd**2)
        c_out = sd * (sigma - s_min) / np.sqrt(sigma**2 + sd**2)
        c_in = 1 / np.sqrt(sigma**2 + sd**2)
        network = bk.to_numpy(model(bk.from_numpy(c_in * x), bk.from_numpy(np.full((len(z), 1), t)), None))
        f_sigma = c_skip * x + c_out * network
        assert np.max(np.abs(f_np(bk, model, cfg, z, t) - (1 - cfg.t_min) * f_sigma)) < 1e-12


def test_trig_form_in_our_time_is_trigflow(pair):
    """``f_t(z, t) = cos τ·x_τ − σ_d sin τ·F(x_τ/σ_d, τ)`` with ``x_τ = a(τ)·z`` (sCM's form)."""
    bk, model = pair[0].bk, pair[0].model
    cfg = config("sct", sigma_data=SIGMA_D)
    z, _, _ = points()
    for t in (0.05, 0.5, 0.95, 1.0):
        tau = tau_from_t(np, t, SIGMA_D)
        x_tau = trigflow_scale(np, tau, SIGMA_D) * z
        F = bk.to_numpy(cm.trig_network(bk, model, cfg, None)(bk.from_numpy(x_tau / SIGMA_D),
                                                            bk.from_numpy(np.full(len(z), tau))))
        expected = np.cos(tau) * x_tau - SIGMA_D * np.sin(tau) * F
        assert np.max(np.abs(f_np(bk, model, cfg, z, t) - expected)) < 1e-12
    assert t_from_tau(np, tau_from_t(np, 0.37, SIGMA_D), SIGMA_D) == pytest.approx(0.37, abs=1e-15)


def _discrete_draws(bk, n, s_lo, s_hi, seed=0):
    rng = np.random.default_rng(seed)
    return {"noise": bk.from_numpy(rng.normal(size=(n, 2))), "sigma_lo": bk.from_numpy(np.full(n, s_lo)),
            "sigma_hi": bk.from_numpy(np.full(n, s_hi))}


def test_targets_at_their_limits(pair):
    bk, model = pair[0].bk, pair[0].model
    x0, _, _ = points(32)
    batch = {"x": bk.from_numpy(x0)}
    cfg = config("ct", sigma_data=SIGMA_D, target="online", distance="l2", weighting="uniform")
    # the lower end is the boundary: the target is the cleaner point itself
    s_hi = 0.5
    draws = _discrete_draws(bk, 32, cfg.sigma_min, s_hi)
    noise = bk.to_numpy(draws["noise"])
    loss, _ = cm.discrete_loss(bk, cfg, model, model, batch, draws)
    z_lo = (1 - cfg.t_min) * x0 + cfg.t_min * noise
    t_hi = t_from_sigma(s_hi)
    expected = np.mean(np.sum((f_np(bk, model, cfg, (1 - t_hi) * x0 + t_hi * noise, t_hi) - z_lo) ** 2, 1) / 2)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    # a zero-width interval with the online target: nothing to learn
    loss, _ = cm.discrete_loss(bk, cfg, model, model, batch, _discrete_draws(bk, 32, 0.7, 0.7))
    assert abs(float(loss)) < 1e-24


def test_teacher_heun_step_is_third_order():
    """One Heun step of the exact field from t to s misses the exact flow map by O(h³)."""
    oracle = eight_gaussians()
    bk = backend64("torch")
    teacher = oracle_teacher(bk, "8gaussians")
    z = oracle.sample(64, 0) * 0.6 + 0.8 * np.random.default_rng(1).normal(size=(64, 2))
    errors = []
    for h in (0.04, 0.02, 0.01):
        t, s = np.full(64, 0.6), np.full(64, 0.6 - h)
        step = bk.to_numpy(ode_step(teacher, bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(s), None, "heun"))
        errors.append(np.max(np.abs(step - oracle.flow_map(z, t, s))))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 2.7), orders


def test_scm_tangent_is_cos_tau_times_the_total_derivative(pair):
    """``g = cos τ·df⁻/dτ`` along the exact ODE: a central difference converges to it like h²."""
    bk, model = pair[0].bk, pair[0].model
    cfg = config("scd", sigma_data=SIGMA_D)
    oracle = eight_gaussians()
    rng = np.random.default_rng(0)
    tau = rng.uniform(0.2, 1.3, 8)
    t = t_from_tau(np, tau, SIGMA_D)
    z = (1 - t)[:, None] * oracle.sample(8, 1) + t[:, None] * rng.normal(size=(8, 2))
    x_tau = trigflow_scale(np, tau, SIGMA_D)[:, None] * z
    X, T = bk.from_numpy(x_tau), bk.from_numpy(tau)
    dx = cm.trig_velocity(bk, cfg, oracle_teacher(bk, "8gaussians"), X, T, None)
    _, g = cm.trig_tangent(bk, cfg, model, X, dx, T, None, 1.0)
    g = bk.to_numpy(g)

    def f_along(h):
        t_h = t_from_tau(np, tau + h, SIGMA_D)
        return f_np(bk, model, cfg, oracle.flow_map(z, t, t_h), t_h)

    errors = [np.max(np.abs(g - np.cos(tau)[:, None] * (f_along(h) - f_along(-h)) / (2 * h))) for h in (1e-3, 1e-4)]
    assert errors[1] < 1e-4 * np.abs(g).max() + 1e-9
    assert errors[0] / errors[1] > 50  # second order: ×100 per decade of h


def _draws_for(bk, cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    draws = {"noise": bk.from_numpy(rng.normal(size=(n, 2))), "drop": bk.from_numpy(rng.uniform(size=n) < 0.3)}
    if cfg.parameterisation == "trig":
        draws["tau"], draws["warmup"] = bk.from_numpy(rng.uniform(0.05, 1.5, n)), bk.from_numpy(np.asarray(0.4))
    else:
        lo = rng.uniform(0.01, 20.0, n)
        draws["sigma_lo"], draws["sigma_hi"] = bk.from_numpy(lo), bk.from_numpy(lo * rng.uniform(1.05, 1.5, n))
    return draws


@pytest.fixture(scope="module")
def weighted_pair():
    """Nets with sCM's weight head w(τ) (``log_weight_head``), moved off their initial weights."""
    return make_pair(replace(NET, log_weight_head=True), weight_noise=0.05)


@pytest.mark.parametrize("variant, weighting", [(v, None) for v in cm.VARIANTS]
                         + [("sct", "uniform"), ("scd", "uniform")])
def test_loss_and_gradient_parity(pair, weighted_pair, variant, weighting):
    cfg = config(variant, sigma_data=SIGMA_D, label_dropout=0.3)
    cfg = cfg if weighting is None else replace(cfg, weighting=weighting)
    x0, _, y = points(12, seed=5)
    y = y % NET.n_classes

    def loss(bk, model, ema):
        teacher = oracle_teacher(bk, "8gaussians") if cm.needs_teacher(cfg) else None
        batch = {"x": bk.from_numpy(x0), "y": bk.from_numpy(y)}
        return cm.loss_from_draws(bk, cfg, model, ema, batch, _draws_for(bk, cfg, 12), teacher)

    value = assert_same_loss_and_grads(weighted_pair if cfg.weighting == "adaptive" else pair, loss)
    assert np.isfinite(value) and (value > 0 or cfg.weighting == "adaptive")


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_adaptive_weighting_is_the_papers_objective(weighted_pair, name):
    """``e^{w(τ)}·‖F − F⁻ − g‖²/D − w(τ)``, averaged over rows, with w from the net's head; and a
    net without the head is refused by name."""
    side = weighted_pair[0] if name == "torch" else weighted_pair[1]
    bk, model = side.bk, side.model
    cfg = config("sct", sigma_data=SIGMA_D)
    assert cfg.weighting == "adaptive"
    x0, _, _ = points(12, seed=6)
    batch, draws = {"x": bk.from_numpy(x0)}, _draws_for(bk, cfg, 12)
    loss, aux = cm.loss_from_draws(bk, cfg, model, model, batch, draws)
    plain, _ = cm.loss_from_draws(bk, replace(cfg, weighting="uniform"), model, model, batch, draws)
    w = bk.to_numpy(model.log_weight(bk.from_numpy(bk.to_numpy(draws["tau"])[:, None] / 1000)))
    assert np.ptp(w) > 0 and float(aux["log_weight"]) == pytest.approx(w.mean(), rel=1e-12)
    assert float(aux["mse"]) == pytest.approx(float(plain), rel=1e-12)
    # one τ for every row: one w, so the objective is e^w·(unweighted loss) − w
    same = {**draws, "tau": bk.xp.full_like(draws["tau"], 0.7)}
    loss, _ = cm.loss_from_draws(bk, cfg, model, model, batch, same)
    plain, _ = cm.loss_from_draws(bk, replace(cfg, weighting="uniform"), model, model, batch, same)
    w = float(bk.to_numpy(model.log_weight(bk.from_numpy(np.full((1, 1), 0.7e-3))))[0])
    assert float(loss) == pytest.approx(np.exp(w) * float(plain) - w, rel=1e-12)
    with pytest.raises(ValueError, match=r"weighting 'adaptive' needs a network with log_weight_head=True"):
        cm.loss_from_draws(bk, cfg, backend64(name).make_model(NET, bk.key(0)), None, batch, draws)


def test_draws_follow_the_curriculum():
    bk = backend64("torch")
    cfg = config("ict", sigma_data=SIGMA_D, n_start=10, n_end=80)
    grids = cm.curriculum_tables(bk, cfg, 400)
    for step, n_levels in ((0, 11), (399, 81)):
        grid = cm.karras_sigmas(n_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        lo, hi = cm.draw_intervals(bk, grids, bk.key(step), 4000, step)
        lo, hi = bk.to_numpy(lo), bk.to_numpy(hi)
        index = np.searchsorted(grid, lo)
        assert np.allclose(grid[index], lo, rtol=1e-12) and np.allclose(grid[index + 1], hi, rtol=1e-12)
        p = cm.index_probabilities(cfg, grid)
        counts = np.bincount(index, minlength=len(p)) / 4000
        assert np.abs(counts - p).max() < 4 * np.sqrt(p.max() / 4000) + 1e-3


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_two_runs_of_one_config_share_its_curriculum_tables(name):
    """The curriculum's device tables are built once per backend and reused by a second compiled loss
    (a JAX table built while tracing the first step must not leak a tracer into the second)."""
    bk = get_backend(name)
    cfg = config("ict")
    data = {"x": bk.from_numpy(np.random.default_rng(0).normal(size=(16, 2))), "y": None}
    for _ in range(2):
        state = bk.init_train_state(bk.make_model(replace(NET, n_classes=0), bk.key(0)), lr=1e-3, ema_decay=0.9)
        state, loss, _ = bk.train_step(make_loss(bk, cfg, 50), state, data, np.arange(16), bk.key(1))
        assert np.isfinite(float(loss))
    assert (cm.curriculum_tables, (bk, cfg, 50)) in bk._cache


def test_curricula_grow_and_ct_target_decay_rises():
    ct = cm.variant_config("ct", sigma_data=SIGMA_D)  # CT as published: an EMA target at μ(k)
    n = cm.n_schedule(ct, 1000)
    assert n[0] == ct.n_start and n[-1] <= ct.n_end + 1 and n[-1] >= ct.n_end - 1 and np.all(np.diff(n) >= 0)
    decays = cm.target_decay(ct).table(1000)[[0, 500, 999]]
    assert decays[0] == pytest.approx(ct.mu0 ** (ct.n_start / n[0])) and decays[0] < decays[1] < decays[2] < 1
    paper = run_preset("cm", "8gaussians", "smoke", variant="ct", steps=1000)
    paper = replace(paper, method_cfg=ct, train=replace(paper.train, target_decay=cm.target_decay(ct)))
    ema, target = paper.train.decays()
    assert [target(k) for k in (0, 500, 999)] == pytest.approx(decays, abs=0)  # the run's target network follows μ(k)
    assert ema == paper.train.ema_decay and ema != target(999)  # and the samples come from another average
    # the book's CT: the online net as target (no target average) and iCT's 1/Δσ weights
    book = run_preset("cm", "8gaussians", "smoke", variant="ct")
    assert (book.method_cfg.target, book.method_cfg.weighting) == ("online", "inv_dsigma")
    assert cm.target_decay(book.method_cfg) is None and book.train.target_decay is None
    cd = run_preset("cm", "8gaussians", "book", variant="cd")
    assert cd.train.target_decay == 0.95 and cd.train.ema_decay != 0.95  # CD's target apart from its sampling EMA
    ict = config("ict", n_start=10, n_end=80)
    assert sorted(set(cm.n_schedule(ict, 1000))) == [11, 21, 41, 81]
    assert cm.target_decay(ict) is None  # iCT's target is the online network under stop-gradient
    assert cm.target_decay(config("cd")) == 0.95


def test_multistep_sampling_uses_the_schedule_and_the_key(pair):
    bk, model = pair[0].bk, pair[0].model
    cfg = config("ict", sigma_data=SIGMA_D)
    x1 = bk.from_numpy(np.random.default_rng(0).normal(size=(8, 2)))
    one = bk.to_numpy(cm.sample(bk, cfg, model, x1, 1, bk.key(0)))
    assert np.allclose(one, f_np(bk, model, cfg, cfg.t_max * bk.to_numpy(x1), cfg.t_max), atol=1e-12)
    a, b, c = (bk.to_numpy(cm.sample(bk, cfg, model, x1, 3, bk.key(s))) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    times = cm.sampling_times(cfg, 3)
    assert times[0] == pytest.approx(cfg.t_max) and np.all(np.diff(times) < 0) and times[-1] > cfg.t_min


@pytest.mark.parametrize("name, variant", [("torch", "cd"), ("jax", "sct"), ("jax", "ct")])
def test_converges_at_smoke_scale(name, variant):
    """One-step samples of a trained model beat an untrained one by a wide margin (W2 to fresh data, n = 1000)."""
    bk = get_backend(name)
    preset = run_preset("cm", "8gaussians", "smoke", variant=variant)
    teacher = oracle_teacher(bk, "8gaussians") if cm.needs_teacher(preset.method_cfg) else None
    state, _, _ = fit(bk, preset, seed=0, teacher=teacher)
    noise = np.random.default_rng(1).normal(size=(1000, 2))
    ref = reference("8gaussians", 1000)

    def w2_of(model):
        return metrics.w2(sample_run(bk, model, preset, 1000, seed=1, steps=1, noise=noise)[0], ref)

    trained, untrained = w2_of(state.ema), w2_of(bk.make_model(preset.model, run_keys(bk, 0)[0]))
    print(f"{name} {variant}: one-step W2 trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained < 0.6 * untrained, (trained, untrained)


def test_bad_input():
    with pytest.raises(ValueError, match=r"unknown variant 'xyz'.*ict, ct, cd, sct, scd"):
        cm.Config(variant="xyz")
    with pytest.raises(ValueError, match=r"must not shrink: n_end = 5 < n_start = 10"):
        cm.Config(n_start=10, n_end=5)
    with pytest.raises(ValueError, match=r"unknown variant 'cdx' of method 'cm'"):
        run_preset("cm", "8gaussians", "smoke", variant="cdx")
    bk = get_backend("torch")
    with pytest.raises(ValueError, match=r"'cm' \(variant 'cd'\).*needs a teacher.*--teacher exact.*RUN_DIR"):
        make_loss(bk, config("cd"), 100)
    with pytest.raises(ValueError, match=r"trains without a teacher"):
        make_loss(bk, config("sct"), 100, teacher=oracle_teacher(bk, "8gaussians"))
    with pytest.raises(ValueError, match=r"total_steps must be a positive integer.*got 0"):
        make_loss(bk, config("sct"), 0)
    with pytest.raises(ValueError, match=r"mu0 must be in \[0, 1\), got 1.0"):
        cm.Config(mu0=1.0)
    with pytest.raises(ValueError, match=r"positive integer, got 0"):
        cm.sampling_times(config("ict"), 0)
    with pytest.raises(ValueError, match=r"'checkerboard' has no exact velocity"):
        oracle_teacher(bk, "checkerboard")
