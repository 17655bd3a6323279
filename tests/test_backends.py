"""Backend parity (same float64 weights and inputs => same numbers) and backend mechanics."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from parity import TOL, assert_same, assert_same_loss_and_grads, backend64, make_pair

from onestep import get_backend
from onestep.backends.architectures import MLPConfig, UNetConfig
from onestep.backends.embedding import embed_conditions, frequencies
from onestep.methods import fm
from onestep.ode import integrate

CFG = MLPConfig(data_dim=3, n_cond=2, width=32, depth=3, n_classes=4)
FM_CFG = MLPConfig(data_dim=3, n_cond=fm.n_cond(fm.Config()), width=32, depth=3, n_classes=4)


@pytest.fixture(scope="module")
def pair():
    return make_pair(CFG)


@pytest.fixture(scope="module")
def fm_pair():
    return make_pair(FM_CFG)


def inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, CFG.data_dim)), rng.uniform(size=(n, CFG.n_cond)), rng.integers(0, 5, n)


def test_embedding_parity():
    t = np.random.default_rng(1).uniform(size=(7, 2))
    f = frequencies(16)
    a = embed_conditions(torch, torch.as_tensor(t), torch.as_tensor(f)).numpy()
    jb = backend64("jax")  # enables float64 in JAX
    b = np.asarray(embed_conditions(jb.xp, jb.from_numpy(t), jb.from_numpy(f)))
    assert a.shape == (7, 32)
    assert np.max(np.abs(a - b)) < TOL
    assert np.allclose(a[:, 0], np.cos(1000 * t[:, 0]))  # first frequency is 1
    assert np.allclose(a[:, 8 + 3], np.sin(1000 * t[:, 0] * f[3]))  # sines follow the cosines
    assert np.allclose(a[:, 16 + 5], np.cos(1000 * t[:, 1] * f[5]))  # then the second column


def test_parameter_names_and_counts(pair):
    (tb, tm, _), (jb, jm, _) = (vars(side).values() for side in pair)
    pt, pj = tb.get_params(tm), jb.get_params(jm)
    assert pt.keys() == pj.keys()
    assert all(pt[k].shape == pj[k].shape for k in pt)
    assert tb.count_params(tm) == jb.count_params(jm) == sum(v.size for v in pt.values())


def test_forward_parity(pair):
    x, c, y = inputs()
    out = assert_same(pair, lambda bk, m, ema: m(bk.from_numpy(x), bk.from_numpy(c), bk.from_numpy(y)))
    assert np.abs(out).max() > 1e-3  # the outputs are not trivially zero


def test_jvp_parity_and_finite_differences(pair):
    x, c, y = inputs()
    rng = np.random.default_rng(2)
    # The time embedding has frequencies up to 1000, so a unit time tangent makes the
    # third derivative ~1e9 and central differences useless; a 1e-3 tangent keeps it O(1).
    dx, dc = rng.normal(size=x.shape), 1e-3 * rng.normal(size=c.shape)

    def run(bk, m, ema):
        yy = bk.from_numpy(y)
        return bk.jvp(lambda a, b: m(a, b, yy), (bk.from_numpy(x), bk.from_numpy(c)),
                      (bk.from_numpy(dx), bk.from_numpy(dc)))

    _, tt = assert_same(pair, run)
    tb, tm = pair[0].bk, pair[0].model
    h = 1e-6

    def f(eps):
        return tb.to_numpy(tm(tb.from_numpy(x + eps * dx), tb.from_numpy(c + eps * dc), tb.from_numpy(y)))

    fd = (f(h) - f(-h)) / (2 * h)
    assert np.max(np.abs(fd - tt)) < 1e-7 * max(1.0, np.abs(tt).max())


HEADS = {"mlp": MLPConfig(data_dim=3, n_cond=1, width=16, depth=2, emb_dim=16, n_classes=4, log_weight_head=True),
         "unet": UNetConfig(channels=1, size=8, n_cond=1, base=8, mults=(1, 2), emb_dim=16, n_classes=4,
                            log_weight_head=True)}


@pytest.mark.parametrize("kind", HEADS)
def test_log_weight_head(kind):
    """sCM's weight head: the same w(cond) in both backends, a linear layer on the sinusoidal time
    embedding, and no influence on the network's output (a net without the head, given the other
    weights, returns the same)."""
    cfg = HEADS[kind]
    pair = make_pair(cfg, weight_noise=0.01)
    rng = np.random.default_rng(5)
    cond = rng.uniform(size=(6, 1)) * 1.5e-3  # TrigFlow's τ/1000, as the sCM loss passes it
    w = assert_same(pair, lambda bk, m, ema: m.log_weight(bk.from_numpy(cond)))
    assert w.shape == (6,) and np.ptp(w) > 1e-4
    bk, model = pair[0].bk, pair[0].model
    params = bk.get_params(model)
    emb = embed_conditions(np, cond, frequencies(cfg.emb_dim))
    assert np.abs(w - (emb @ params["log_weight_head.weight"][0] + params["log_weight_head.bias"][0])).max() < TOL
    plain = bk.set_params(bk.make_model(replace(cfg, log_weight_head=False), bk.key(0)),
                          {k: v for k, v in params.items() if not k.startswith("log_weight_head.")})
    x = rng.normal(size=(6, cfg.data_dim) if kind == "mlp" else (6, 1, 8, 8))
    y = bk.from_numpy(rng.integers(0, 5, 6))
    with_head, without = (bk.to_numpy(m(bk.from_numpy(x), bk.from_numpy(cond), y)) for m in (model, plain))
    assert np.array_equal(with_head, without)


def _fixed_draws(bk, n, seed=3):
    rng = np.random.default_rng(seed)
    return {"t": bk.from_numpy(rng.uniform(size=n)), "x1": bk.from_numpy(rng.normal(size=(n, CFG.data_dim))),
            "drop": bk.from_numpy(rng.uniform(size=n) < 0.3)}


def test_fm_loss_and_gradient_parity(fm_pair):
    x, _, y = inputs(8)
    y = y % CFG.n_classes
    assert_same_loss_and_grads(fm_pair, lambda bk, m, ema: fm.loss_from_draws(
        bk, fm.Config(), m, ema, {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}, _fixed_draws(bk, 8)))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_parity(fm_pair, solver):
    z = np.random.default_rng(4).normal(size=(5, CFG.data_dim))
    y = np.array([0, 1, 2, 3, 4])  # label 4 is the "no label" class
    paths = assert_same(fm_pair, lambda bk, m, ema: integrate(bk, m, fm.velocity, bk.from_numpy(z), 4, solver,
                                                             y=bk.from_numpy(y), trajectory=True))
    assert paths.shape == (5, 5, CFG.data_dim)


@pytest.mark.parametrize("target_decay", [None, 0.5])
def test_train_step_parity(fm_pair, target_decay):
    """Adam (torch) and optax.adam compute the same updates, and the EMAs the same averages; the loss
    reads the target network when the state keeps one."""
    x, _, y = inputs(8)
    y = y % CFG.n_classes

    def three_steps(bk, model, ema):
        m = bk.set_params(bk.make_model(FM_CFG, bk.key(1)), bk.get_params(model))
        state = bk.init_train_state(m, lr=1e-2, ema_decay=lambda step: 0.9 - 0.1 * step, target_decay=target_decay)
        draws = _fixed_draws(bk, 8)
        batch = {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}

        def loss_fn(model, target, batch, key, step, bk=bk, draws=draws):
            fm_loss, aux = fm.loss_from_draws(bk, fm.Config(), model, target, batch, draws)
            # ties the loss to the target network, so the test sees which network the step passed
            return fm_loss + bk.xp.mean(target(batch["x"], draws["t"][:, None], None) ** 2), aux

        for i in range(3):
            state, loss, _ = bk.train_step(loss_fn, state, batch, np.arange(8), bk.key(i))
        averages = {"ema": bk.get_params(state.ema)}
        if target_decay is not None:
            averages["target"] = bk.get_params(state.target)
        return {"model": bk.get_params(state.model), **averages, "loss": loss}

    out = assert_same(fm_pair, three_steps)
    start = fm_pair[0].bk.get_params(fm_pair[0].model)
    assert max(np.abs(out["model"][k] - start[k]).max() for k in start) > 1e-3  # it moved
    if target_decay is not None:  # the two averages used different decays
        assert max(np.abs(out["ema"][k] - out["target"][k]).max() for k in start) > 1e-4


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_keys_are_deterministic_and_independent(name):
    bk = get_backend(name)
    k = bk.key(7)
    a, b = bk.split(k, 2)
    same = bk.to_numpy(bk.normal(bk.fold_in(k, 3), (1000,)))
    assert np.array_equal(same, bk.to_numpy(bk.normal(bk.fold_in(bk.key(7), 3), (1000,))))
    assert not np.array_equal(bk.to_numpy(bk.normal(a, (10,))), bk.to_numpy(bk.normal(b, (10,))))
    assert not np.array_equal(same, bk.to_numpy(bk.normal(bk.fold_in(k, 4), (1000,))))
    u = bk.to_numpy(bk.uniform(k, (20000,)))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert same.dtype == np.float32


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'tf'.*torch, jax"):
        get_backend("tf")
