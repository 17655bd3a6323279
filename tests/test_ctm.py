"""Consistency trajectory models: the jump's boundary and σ-notation identities, the exact map's
semigroup property, float64 backend parity of the loss and its gradients, the γ-sampler's
mechanics, convergence at smoke scale, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from parity import assert_same_loss_and_grads, backend64, make_pair

from onestep import BACKENDS, analytic, get_backend, metrics
from onestep.backends.architectures import MLPConfig
from onestep.evaluation import reference
from onestep.methods import ctm, flowmap, make_loss
from onestep.presets import run_preset
from onestep.runs import fit
from onestep.teachers import oracle_teacher
from onestep.train import run_keys

CFG = ctm.Config(sigma_data=2.0, teacher_steps=3)
NET = MLPConfig(data_dim=2, n_cond=ctm.n_cond(ctm.Config()), width=32, depth=2, n_classes=4)


def jump(bk, model, z, *times):
    """The learned map along ``times`` (one jump per pair of neighbours)."""
    return flowmap.sample_jumps(bk, ctm.average_velocity, model, CFG, z, times)


def rows(n=64, seed=0):
    """Random points and per-row times ``1 ≥ t ≥ u ≥ r ≥ 0``."""
    rng = np.random.default_rng(seed)
    t, a, b = rng.uniform(size=(3, n))
    t = 0.02 + 0.98 * t
    u = t * a
    return rng.normal(size=(n, 2)) * 2, t, u, u * b


@pytest.mark.parametrize("name", BACKENDS)
def test_boundary_holds_for_an_untrained_net(name):
    bk = backend64(name)
    model = bk.make_model(NET, bk.key(0))
    z, t, u, _ = rows()
    Z, T = bk.from_numpy(z), bk.from_numpy(t)
    same = bk.to_numpy(ctm.flow_map(bk, model, CFG, Z, T, T))
    assert np.array_equal(same, z)
    moved = bk.to_numpy(ctm.flow_map(bk, model, CFG, Z, T, bk.from_numpy(u)))
    assert np.abs(moved - z).min() > 0  # away from r = t the net does move the points


@pytest.mark.parametrize("name", BACKENDS)
def test_flow_map_form_equals_ctm_sigma_form(name):
    """``f(z, t, r) = (1 − r)·G(z/(1 − t), σ_t, σ_r)`` with ``g = z − t·U`` (CTM's parameterisation)."""
    bk = backend64(name)
    model = bk.make_model(NET, bk.key(1))
    z, t, r, _ = rows(seed=1)
    t, r = np.minimum(t, 0.98), np.minimum(r, 0.97)
    Z, T, R = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(r)
    U = ctm.average_velocity(bk, model, CFG, Z, R, T)
    g = flowmap.ctm_g(Z, T, U)
    x, sigma_t, sigma_r = z / (1 - t)[:, None], t / (1 - t), r / (1 - r)  # CTM's EDM variables, by hand
    G = (sigma_r / sigma_t)[:, None] * x + (1 - sigma_r / sigma_t)[:, None] * bk.to_numpy(g)
    ours = bk.to_numpy(ctm.flow_map(bk, model, CFG, Z, T, R))
    assert np.max(np.abs(ours - (1 - r)[:, None] * G)) < 1e-12
    assert np.max(np.abs(bk.to_numpy(flowmap.ctm_jump(Z, T, R, g)) - ours)) < 1e-12
    assert np.max(np.abs(bk.to_numpy(flowmap.average_velocity_from_g(Z, T, g) - U))) < 1e-12


def test_exact_map_is_a_semigroup():
    gmm = analytic.eight_gaussians()
    z, t, u, r = rows(n=200, seed=2)
    direct = gmm.flow_map(z, t, r)
    composed = gmm.flow_map(gmm.flow_map(z, t, u), u, r)
    assert np.max(np.abs(direct - composed)) < 1e-8
    assert np.max(np.abs(direct - z)) > 0.1  # the map is not the identity


def _fixed_draws(bk, n, seed=3):
    rng = np.random.default_rng(seed)
    t = 1 - rng.uniform(size=n)
    u = t * rng.uniform(size=n)
    return {"t": bk.from_numpy(t), "u": bk.from_numpy(u), "s": bk.from_numpy(u * rng.uniform(size=n)),
            "x1": bk.from_numpy(rng.normal(size=(n, 2))), "dsm_t": bk.from_numpy(rng.uniform(size=n)),
            "dsm_x1": bk.from_numpy(rng.normal(size=(n, 2))), "drop": bk.from_numpy(rng.uniform(size=n) < 0.3)}


@pytest.fixture(scope="module")
def pair():
    return make_pair(NET)


@pytest.mark.parametrize("balance", ctm.BALANCES)
def test_loss_and_gradient_parity(pair, balance):
    """Same float64 weights (online and a different EMA net), data and draws: same loss, parts and
    parameter gradients in torch and JAX; no gradient reaches the EMA net."""
    cfg = ctm.Config(sigma_data=2.0, teacher_steps=3, dsm_balance=balance)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 2)) * 2, rng.integers(0, 4, 16)

    def loss(bk, model, ema):
        batch = {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}
        return ctm.loss_from_draws(bk, cfg, model, ema, batch, _fixed_draws(bk, 16), oracle_teacher(bk, "8gaussians"))

    assert_same_loss_and_grads(pair, loss)
    assert all(p.grad is None for p in pair[0].ema.parameters())
    _, aux = loss(pair[0].bk, pair[0].model, pair[0].ema)
    assert float(aux["ctm"]) > 1e-3 and float(aux["dsm"]) > 1e-3


@pytest.mark.parametrize("name", BACKENDS)
def test_draws_are_ordered(name):
    bk = get_backend(name)
    d = {k: bk.to_numpy(v) for k, v in ctm.draw(bk, CFG, bk.key(0), {"x": bk.from_numpy(np.zeros((4000, 2)))},
                                                   0, 100).items()}
    assert np.all(d["t"] <= 1) and np.all(d["s"] >= 0)
    assert np.all(d["s"] <= d["u"]) and np.all(d["u"] <= d["t"])
    assert d["t"].max() > 0.999 and d["t"].min() < 0.01  # t spans (0, 1]
    assert np.mean(d["u"] < 0.5 * d["t"]) > 0.4  # the teacher often runs far


@pytest.mark.parametrize("name", BACKENDS)
def test_gamma_sampler_mechanics(name):
    """γ = 0 chains deterministic jumps on the grid; γ = 1 jumps to the data and renoises to the
    next time (consistency-model multistep); 0 < γ < 1 jumps to σ' = √(1 − γ²)σ and renoises."""
    bk = backend64(name)
    model = bk.make_model(NET, bk.key(2))
    x1 = np.random.default_rng(5).normal(size=(32, 2))
    X1 = bk.from_numpy(x1)

    def out(**kw):
        return bk.to_numpy(ctm.sample(bk, CFG, model, X1, 2, bk.key(7), **kw))

    deterministic = jump(bk, model, X1, 1.0, 0.5, 0.0)
    assert np.max(np.abs(out(gamma=0.0) - bk.to_numpy(deterministic))) < 1e-12
    eps = bk.normal(bk.split(bk.key(7), 2)[0], (32, 2))  # the noise of the first renoising
    renoised = 0.5 * jump(bk, model, X1, 1.0, 0.0) + 0.5 * eps
    assert np.max(np.abs(out(gamma=1.0) - bk.to_numpy(jump(bk, model, renoised, 0.5, 0.0)))) < 1e-12
    gamma = 0.6
    t_jump = ctm.gamma_jump_time(0.5, gamma)
    assert abs(t_jump / (1 - t_jump) - np.sqrt(1 - gamma**2) * 1.0) < 1e-12  # σ' = √(1 − γ²)·σ(0.5)
    assert ctm.gamma_jump_time(1.0, gamma) == 1.0 and ctm.gamma_jump_time(0.5, 1.0) == 0.0
    mid = jump(bk, model, X1, 1.0, t_jump) / (1 - t_jump) + gamma * eps
    expected = jump(bk, model, 0.5 * mid, 0.5, 0.0)
    assert np.max(np.abs(out(gamma=gamma) - bk.to_numpy(expected))) < 1e-12
    assert np.array_equal(out(), out(gamma=CFG.gamma))  # the config's γ is the default


@pytest.mark.parametrize("name", BACKENDS)
def test_ctm_converges_at_smoke_scale(name):
    """Smoke-scale CTM distilled from the exact 8gaussians field: one-step W2 to fresh data
    (n = 1000, fixed seeds) is well below an untrained net's and the noise's.

    Measured W2 (torch / jax): trained 0.79 / 0.77, untrained 1.68 / 1.64, noise 1.65; the
    data-vs-data floor at n = 1000 is about 0.3.  A jump in the wrong direction scores ≥ 1.6.
    """
    bk = get_backend(name)
    preset = run_preset("ctm", "8gaussians", "smoke")
    state, _, _ = fit(bk, preset, seed=0, teacher=oracle_teacher(bk, "8gaussians"))
    noise = np.random.default_rng(1).normal(size=(1000, 2))
    ref = reference("8gaussians", 1000)

    def w2_of(model):
        return metrics.w2(bk.to_numpy(ctm.sample(bk, preset.method_cfg, model, bk.from_numpy(noise), 1, bk.key(0))),
                          ref)

    untrained = bk.make_model(preset.model, run_keys(bk, 0)[0])
    trained_w2, untrained_w2, noise_w2 = w2_of(state.ema), w2_of(untrained), metrics.w2(noise, ref)
    print(f"{name}: W2 trained {trained_w2:.3f}, untrained {untrained_w2:.3f}, noise {noise_w2:.3f}")
    assert trained_w2 < 0.6 * untrained_w2, (trained_w2, untrained_w2)
    assert trained_w2 < 0.6 * noise_w2, (trained_w2, noise_w2)


def test_bad_input():
    bk = get_backend("torch")
    with pytest.raises(ValueError, match="needs a teacher.*--teacher exact.*RUN_DIR"):
        make_loss(bk, CFG, 100)
    model = bk.make_model(NET, bk.key(0))
    x1 = bk.from_numpy(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*got 1.5"):
        ctm.sample(bk, CFG, model, x1, 2, bk.key(0), gamma=1.5)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*got -0.1"):
        ctm.Config(gamma=-0.1)
    with pytest.raises(ValueError, match=r"0 ≤ r ≤ t ≤ 1, got t = 0.3, r = 0.6"):
        jump(bk, model, x1, 0.3, 0.6)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        ctm.sample(bk, CFG, model, x1, 0, bk.key(0))
    with pytest.raises(ValueError, match="unknown dsm_balance 'gradnorm'; accepted: adaptive, fixed"):
        ctm.Config(dsm_balance="gradnorm")
