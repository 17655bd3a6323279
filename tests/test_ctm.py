"""Consistency trajectory models: the jump's boundary and σ-notation identities, the exact map's
semigroup property, float64 backend parity of the loss and its gradients, the γ-sampler's
mechanics, convergence at smoke scale, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from onestep import analytic, get_backend, metrics
from onestep.backends.base import MLPConfig
from onestep.evaluation import reference
from onestep.methods import ctm
from onestep.presets import run_preset
from onestep.teachers import oracle_teacher
from onestep.train import fit, run_keys

BACKENDS = ["torch", "jax"]
TOL = 1e-10
CFG = ctm.CTMConfig(sigma_data=2.0, teacher_steps=3)
NET = MLPConfig(data_dim=2, n_cond=ctm.N_COND, width=32, depth=2, n_classes=4)


def rows(n=64, seed=0):
    """Random points and per-row times ``1 ≥ t ≥ u ≥ r ≥ 0``."""
    rng = np.random.default_rng(seed)
    t, a, b = rng.uniform(size=(3, n))
    t = 0.02 + 0.98 * t
    u = t * a
    return rng.normal(size=(n, 2)) * 2, t, u, u * b


@pytest.mark.parametrize("name", BACKENDS)
def test_boundary_holds_for_an_untrained_net(name):
    bk = get_backend(name, precision="float64")
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
    bk = get_backend(name, precision="float64")
    model = bk.make_model(NET, bk.key(1))
    z, t, r, _ = rows(seed=1)
    t, r = np.minimum(t, 0.98), np.minimum(r, 0.97)
    Z, T, R = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(r)
    U = ctm.average_velocity(bk, model, CFG, Z, T, R)
    g = ctm.ctm_g(Z, T, U)
    G = ctm.ctm_jump(Z / (1 - T)[:, None], T / (1 - T), R / (1 - R), g)
    ours = bk.to_numpy(ctm.flow_map(bk, model, CFG, Z, T, R))
    assert np.max(np.abs(ours - bk.to_numpy((1 - R)[:, None] * G))) < 1e-12
    assert np.max(np.abs(bk.to_numpy(ctm.average_velocity_from_g(Z, T, g) - U))) < 1e-12


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


@pytest.mark.parametrize("balance", ctm.BALANCES)
def test_loss_and_gradient_parity(balance):
    """Same float64 weights (online and a different EMA net), data and draws: same loss, parts and
    parameter gradients in torch and JAX."""
    import equinox as eqx

    from onestep.backends.jax_backend.params import to_flat

    cfg = ctm.CTMConfig(sigma_data=2.0, teacher_steps=3, dsm_balance=balance)
    tb, jb = get_backend("torch", precision="float64"), get_backend("jax", precision="float64")
    params = tb.get_params(tb.make_model(NET, tb.key(0)))
    ema_params = tb.get_params(tb.make_model(NET, tb.key(1)))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 2)) * 2, rng.integers(0, 4, 16)

    def setup(bk):
        state = bk.init_train_state(bk.set_params(bk.make_model(NET, bk.key(0)), params), lr=1e-3,
                                    ema_decay=0.9)  # the EMA as training holds it (frozen in torch)
        model, ema = state.model, bk.set_params(state.ema, ema_params)
        batch = {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}
        return model, ema, batch, oracle_teacher(bk, "8gaussians"), _fixed_draws(bk, 16)

    model, ema, batch, teacher, draws = setup(tb)
    loss_t, aux_t = ctm.loss_from_draws(tb, cfg, teacher, model, ema, batch, draws)
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert all(p.grad is None for p in ema.parameters())

    model, ema, batch, teacher, draws = setup(jb)
    (loss_j, aux_j), grads_j = eqx.filter_value_and_grad(
        lambda m: ctm.loss_from_draws(jb, cfg, teacher, m, ema, batch, draws), has_aux=True)(model)
    grads_j = to_flat(grads_j)

    assert abs(loss_t.item() - float(loss_j)) < TOL
    for k in ("ctm", "dsm", "dsm_weight"):
        assert abs(aux_t[k].item() - float(aux_j[k])) < TOL, k
    assert aux_t["ctm"].item() > 1e-3 and aux_t["dsm"].item() > 1e-3
    assert grads_t.keys() == grads_j.keys()
    for k, grad in grads_t.items():
        assert np.max(np.abs(grad - grads_j[k])) < TOL, k
    assert max(np.abs(g).max() for g in grads_t.values()) > 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_draws_are_ordered(name):
    bk = get_backend(name)
    d = {k: bk.to_numpy(v) for k, v in ctm.draw(bk, bk.key(0), {"x": bk.from_numpy(np.zeros((4000, 2)))},
                                                   CFG).items()}
    assert np.all(d["t"] <= 1) and np.all(d["s"] >= 0)
    assert np.all(d["s"] <= d["u"]) and np.all(d["u"] <= d["t"])
    assert d["t"].max() > 0.999 and d["t"].min() < 0.01  # t spans (0, 1]
    assert np.mean(d["u"] < 0.5 * d["t"]) > 0.4  # the teacher often runs far


@pytest.mark.parametrize("name", BACKENDS)
def test_gamma_sampler_mechanics(name):
    """γ = 0 chains deterministic jumps on the grid; γ = 1 jumps to the data and renoises to the
    next time (consistency-model multistep); 0 < γ < 1 jumps to σ' = √(1 − γ²)σ and renoises."""
    bk = get_backend(name, precision="float64")
    model = bk.make_model(NET, bk.key(2))
    x1 = np.random.default_rng(5).normal(size=(32, 2))
    X1 = bk.from_numpy(x1)

    def out(**kw):
        return bk.to_numpy(ctm.sample(bk, model, CFG, X1, 2, seed=7, **kw))

    deterministic = ctm.jump(bk, model, CFG, ctm.jump(bk, model, CFG, X1, 1.0, 0.5), 0.5, 0.0)
    assert np.max(np.abs(out(gamma=0.0) - bk.to_numpy(deterministic))) < 1e-12
    eps = bk.from_numpy(np.random.default_rng(7).standard_normal((32, 2)))
    renoised = 0.5 * ctm.jump(bk, model, CFG, X1, 1.0, 0.0) + 0.5 * eps
    assert np.max(np.abs(out(gamma=1.0) - bk.to_numpy(ctm.jump(bk, model, CFG, renoised, 0.5, 0.0)))) < 1e-12
    gamma = 0.6
    t_jump = ctm.gamma_jump_time(0.5, gamma)
    assert abs(t_jump / (1 - t_jump) - np.sqrt(1 - gamma**2) * 1.0) < 1e-12  # σ' = √(1 − γ²)·σ(0.5)
    mid = ctm.jump(bk, model, CFG, X1, 1.0, t_jump) / (1 - t_jump) + gamma * eps
    expected = ctm.jump(bk, model, CFG, 0.5 * mid, 0.5, 0.0)
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
        return metrics.w2(bk.to_numpy(ctm.sample(bk, model, preset.method_cfg, bk.from_numpy(noise), 1)), ref)

    untrained = bk.make_model(preset.model, run_keys(bk, 0)[0])
    trained_w2, untrained_w2, noise_w2 = w2_of(state.ema), w2_of(untrained), metrics.w2(noise, ref)
    print(f"{name}: W2 trained {trained_w2:.3f}, untrained {untrained_w2:.3f}, noise {noise_w2:.3f}")
    assert trained_w2 < 0.6 * untrained_w2, (trained_w2, untrained_w2)
    assert trained_w2 < 0.6 * noise_w2, (trained_w2, noise_w2)


def test_bad_input():
    bk = get_backend("torch")
    with pytest.raises(ValueError, match="needs a teacher.*--teacher exact.*RUN_DIR"):
        ctm.make_loss(bk, CFG)
    model = bk.make_model(NET, bk.key(0))
    x1 = bk.from_numpy(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*got 1.5"):
        ctm.sample(bk, model, CFG, x1, 2, gamma=1.5)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*got -0.1"):
        ctm.CTMConfig(gamma=-0.1)
    with pytest.raises(ValueError, match=r"0 ≤ r ≤ t ≤ 1, got t = 0.3, r = 0.6"):
        ctm.jump(bk, model, CFG, x1, 0.3, 0.6)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        ctm.sample(bk, model, CFG, x1, 0)
    with pytest.raises(ValueError, match="samples by jumps"):
        ctm.sample(bk, model, CFG, x1, 1, solver="heun")
    with pytest.raises(ValueError, match="unknown dsm_balance 'gradnorm'; accepted: adaptive, fixed"):
        ctm.CTMConfig(dsm_balance="gradnorm")
