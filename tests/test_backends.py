"""Backend parity (same float64 weights and inputs => same numbers) and backend mechanics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import TOL, assert_same_loss_and_grads, make_pair

from onestep import get_backend
from onestep.backends.base import MLPConfig
from onestep.backends.embedding import embed_conditions, frequencies
from onestep.methods import fm
from onestep.sample import integrate

CFG = MLPConfig(data_dim=3, n_cond=2, width=32, depth=3, n_classes=4)
FM_CFG = MLPConfig(data_dim=3, n_cond=fm.N_COND, width=32, depth=3, n_classes=4)


@pytest.fixture(scope="module")
def pair():
    return make_pair(CFG)


@pytest.fixture(scope="module")
def fm_pair():
    return make_pair(FM_CFG)


def inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, CFG.data_dim)), rng.uniform(size=(n, CFG.n_cond)), rng.integers(0, 5, n)


def both(pair, fn):
    tb, tm, jb, jm = pair
    return fn(tb, tm), fn(jb, jm)


def test_embedding_parity():
    t = np.random.default_rng(1).uniform(size=(7, 2))
    f = frequencies(16)
    a = embed_conditions(torch, torch.as_tensor(t), torch.as_tensor(f)).numpy()
    jb = get_backend("jax", precision="float64")  # enables float64 in JAX
    b = np.asarray(embed_conditions(jb.xp, jb.from_numpy(t), jb.from_numpy(f)))
    assert a.shape == (7, 32)
    assert np.max(np.abs(a - b)) < TOL
    assert np.allclose(a[:, 0], np.cos(1000 * t[:, 0]))  # first frequency is 1
    assert np.allclose(a[:, 8 + 3], np.sin(1000 * t[:, 0] * f[3]))  # sines follow the cosines
    assert np.allclose(a[:, 16 + 5], np.cos(1000 * t[:, 1] * f[5]))  # then the second column


def test_parameter_names_and_counts(pair):
    tb, tm, jb, jm = pair
    pt, pj = tb.get_params(tm), jb.get_params(jm)
    assert pt.keys() == pj.keys()
    assert all(pt[k].shape == pj[k].shape for k in pt)
    assert tb.count_params(tm) == jb.count_params(jm) == sum(v.size for v in pt.values())


def test_forward_parity(pair):
    x, c, y = inputs()

    def run(bk, m):
        return bk.to_numpy(m(bk.from_numpy(x), bk.from_numpy(c), bk.from_numpy(y)))

    a, b = both(pair, run)
    assert np.abs(a).max() > 1e-3  # the outputs are not trivially zero
    assert np.max(np.abs(a - b)) < TOL


def test_jvp_parity_and_finite_differences(pair):
    x, c, y = inputs()
    rng = np.random.default_rng(2)
    # The time embedding has frequencies up to 1000, so a unit time tangent makes the
    # third derivative ~1e9 and central differences useless; a 1e-3 tangent keeps it O(1).
    dx, dc = rng.normal(size=x.shape), 1e-3 * rng.normal(size=c.shape)

    def run(bk, m):
        yy = bk.from_numpy(y)
        out, tan = bk.jvp(lambda a, b: m(a, b, yy), (bk.from_numpy(x), bk.from_numpy(c)),
                          (bk.from_numpy(dx), bk.from_numpy(dc)))
        return bk.to_numpy(out), bk.to_numpy(tan)

    (ot, tt), (oj, tj) = both(pair, run)
    assert np.max(np.abs(ot - oj)) < TOL and np.max(np.abs(tt - tj)) < TOL
    tb, tm, _, _ = pair
    h = 1e-6

    def f(eps):
        return tb.to_numpy(tm(tb.from_numpy(x + eps * dx), tb.from_numpy(c + eps * dc), tb.from_numpy(y)))

    fd = (f(h) - f(-h)) / (2 * h)
    assert np.max(np.abs(fd - tt)) < 1e-7 * max(1.0, np.abs(tt).max())


def _fixed_draws(bk, n, seed=3):
    rng = np.random.default_rng(seed)
    return {"t": bk.from_numpy(rng.uniform(size=n)), "x1": bk.from_numpy(rng.normal(size=(n, CFG.data_dim))),
            "drop": bk.from_numpy(rng.uniform(size=n) < 0.3)}


def test_fm_loss_and_gradient_parity(fm_pair):
    x, _, y = inputs(8)
    y = y % CFG.n_classes
    assert_same_loss_and_grads(fm_pair, lambda bk, m: fm.loss_from_draws(
        bk, m, {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}, _fixed_draws(bk, 8)))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_parity(fm_pair, solver):
    z = np.random.default_rng(4).normal(size=(5, CFG.data_dim))
    y = np.array([0, 1, 2, 3, 4])  # label 4 is the "no label" class

    def run(bk, m):
        return integrate(bk, m, fm.velocity, bk.from_numpy(z), 4, solver, y=bk.from_numpy(y), trajectory=True)

    a, b = both(fm_pair, run)
    assert a.shape == (5, 5, CFG.data_dim)
    assert np.max(np.abs(a - b)) < TOL


def test_train_step_parity(fm_pair):
    """Adam (torch) and optax.adam compute the same updates, and the EMA the same average."""
    x, _, y = inputs(8)
    y = y % CFG.n_classes
    tb, tm = fm_pair[0], fm_pair[1]
    results = []
    for bk in (fm_pair[0], fm_pair[2]):
        m = bk.set_params(bk.make_model(FM_CFG, bk.key(1)), tb.get_params(tm))
        state = bk.init_train_state(m, lr=1e-2, ema_decay=0.9)
        draws = _fixed_draws(bk, 8)
        batch = {"x": bk.from_numpy(x), "y": bk.from_numpy(y)}

        def loss_fn(model, ema, batch, key, step, bk=bk, draws=draws):
            return fm.loss_from_draws(bk, model, batch, draws)

        for i in range(3):
            state, loss, _ = bk.train_step(loss_fn, state, batch, np.arange(8), bk.key(i))
        results.append((bk.get_params(state.model), bk.get_params(state.ema), float(loss)))
    (pt, et, lt), (pj, ej, lj) = results
    assert abs(lt - lj) < TOL
    for k in pt:
        assert np.max(np.abs(pt[k] - pj[k])) < TOL, k
        assert np.max(np.abs(et[k] - ej[k])) < TOL, k
    assert max(np.abs(pt[k] - tb.get_params(tm)[k]).max() for k in pt) > 1e-3  # it moved


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
