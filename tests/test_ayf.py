"""Align Your Flow: the boundary by construction, EMD at its two ends (s = 0: the continuous-time
consistency gradient; s → t: flow matching), the exact map as a fixed point of EMD and LMD, float64
backend parity of every variant (guided too), the draws, convergence at smoke scale, bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from parity import assert_same, assert_same_loss_and_grads, backend64, make_pair

from onestep import BACKENDS, analytic, get_backend, metrics
from onestep.backends.architectures import MLPConfig
from onestep.conventions import t_from_tau
from onestep.data import oracle
from onestep.evaluation import reference
from onestep.methods import ayf, cm, make_loss
from onestep.notebooks import ROOT, execute
from onestep.presets import run_preset
from onestep.runs import fit, load_teacher
from onestep.teachers import autoguided_teacher, oracle_teacher

NET = MLPConfig(data_dim=2, n_cond=ayf.n_cond(ayf.Config()), width=32, depth=2, emb_dim=16, n_classes=3)
GUIDED_NET = replace(NET, n_cond=3)
GMM = analytic.eight_gaussians()


def config(variant: str = "emd", **changes) -> ayf.Config:
    """The smoke preset of a variant (so the presets are exercised too), with changes."""
    return replace(run_preset("ayf", "8gaussians", "smoke", variant=variant).method_cfg, **changes)


@pytest.fixture(scope="module")
def pair():
    return make_pair(NET, weight_noise=0.1)


@pytest.fixture(scope="module")
def guided_pair():
    return make_pair(GUIDED_NET, weight_noise=0.1)


def points(n=16, seed=0):
    """``(z_t, t, x0, x1)`` with t in [0.05, 1]."""
    rng = np.random.default_rng(seed)
    x0, x1 = GMM.sample(n, seed + 1), rng.normal(size=(n, 2))
    t = rng.uniform(0.05, 1.0, n)
    return (1 - t)[:, None] * x0 + t[:, None] * x1, t, x0, x1


def tangent_of(bk, cfg, F, teacher, z, t, s, r=1.0, lmd=None):
    lmd = bk.xp.full_like(t, float(cfg.variant == "lmd")) if lmd is None else lmd
    return ayf.tangent(bk, cfg, F, teacher, z, t, s, None, lmd, r)


def net_F(bk, model, cfg):
    return lambda z, t, s: ayf.average_velocity(bk, model, cfg, z, s, t)


# -- the flow map ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("guided", [False, True])
def test_boundary_holds_for_an_untrained_network(name, guided):
    bk = backend64(name)
    cfg = config(guidance=(1.0, 3.0) if guided else None)
    model = bk.make_model(GUIDED_NET if guided else NET, bk.key(3))
    z, t, _, _ = points()
    Z, T = bk.from_numpy(z), bk.from_numpy(t)
    lam = bk.from_numpy(np.full(len(t), 2.0)) if guided else None
    assert np.array_equal(bk.to_numpy(ayf.flow_map(bk, model, cfg, Z, T, T, guidance=lam)), z)
    assert np.abs(bk.to_numpy(ayf.flow_map(bk, model, cfg, Z, T, 0 * T, guidance=lam)) - z).max() > 1e-2


def test_f_is_the_jump_with_F_as_the_average_velocity():
    """The paper's x_t + (s − t)·F is the book's z − (t − s)·u with u = F (no sign change)."""
    bk = backend64("torch")
    model = bk.make_model(NET, bk.key(0))
    cfg = config()
    z, t, _, _ = points()
    Z, T, S = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(0.3 * t)
    F = bk.to_numpy(ayf.average_velocity(bk, model, cfg, Z, S, T))
    assert np.allclose(bk.to_numpy(ayf.flow_map(bk, model, cfg, Z, T, S)), z + (0.3 * t - t)[:, None] * F,
                       rtol=0, atol=1e-14)


# -- EMD at its two ends --------------------------------------------------------------------
def test_emd_at_s_zero_is_the_continuous_time_consistency_gradient():
    """At s = 0 the EMD gradient of F = (z − f)/t, with f Chapter 2's TrigFlow consistency function, is a
    positive multiple of sCD's gradient, the factor given by the change of variables t ↔ τ."""
    bk = backend64("torch")
    scd = run_preset("cm", "8gaussians", "smoke", variant="scd")
    cfg_s, sd = replace(scd.method_cfg, weighting="uniform"), scd.method_cfg.sigma_data  # without the learned w(τ)
    net = bk.make_model(replace(NET, n_cond=1, n_classes=0), bk.key(1))
    teacher = oracle_teacher(bk, "8gaussians")
    cfg = config()
    _, _, x0s, x1s = points(4, seed=2)
    for i, tau in enumerate((0.3, 0.7, 1.0, 1.3)):
        t = float(t_from_tau(np, tau, sd))
        x0, x1 = bk.from_numpy(x0s[i:i + 1]), bk.from_numpy(x1s[i:i + 1])
        draws = {"noise": x1, "tau": bk.from_numpy(np.array([tau])), "warmup": bk.from_numpy(np.asarray(1.0))}
        _, aux, g_scd = bk.value_and_grad(
            lambda m, x0=x0, draws=draws: cm.continuous_loss(bk, cfg_s, m, {"x": x0}, draws, teacher), net)

        def emd(m, t=t, x0=x0, x1=x1):
            def F(z, tt, ss):
                return (z - cm.consistency(bk, m, cfg_s, z, tt)) / tt[:, None]
            z = (1 - t) * x0 + t * x1
            u, g = tangent_of(bk, cfg, F, teacher, z, bk.from_numpy(np.array([t])), bk.from_numpy(np.zeros(1)))
            return bk.xp.mean((u - bk.stop_gradient(u - g)) ** 2), {}

        _, _, g_emd = bk.value_and_grad(emd, net)
        sigma = sd * np.tan(tau)
        factor = t * np.cos(tau) * sd / (np.cos(tau) ** 2 * (1 + sigma) ** 2) / (
            sd * np.sin(tau) * (float(aux["tangent_norm"]) + cfg_s.tangent_norm))
        a = np.concatenate([g_scd[k].ravel() for k in sorted(g_scd)])
        b = np.concatenate([g_emd[k].ravel() for k in sorted(g_emd)])
        assert np.abs(a - factor * b).max() < 1e-10 * np.abs(a).max(), (tau, np.abs(a - factor * b).max())


def test_emd_tends_to_flow_matching_on_the_teacher_as_s_tends_to_t(pair):
    bk, model = pair[0].bk, pair[0].model
    cfg, teacher = config(), oracle_teacher(bk, "8gaussians")
    z, t, _, _ = points(32)
    Z, T = bk.from_numpy(z), bk.from_numpy(t)

    def emd(m, s):
        u, g = tangent_of(bk, cfg, net_F(bk, m, cfg), teacher, Z, T, s)
        return bk.xp.mean((u - bk.stop_gradient(u - g)) ** 2), {}

    def fm_loss(m):
        return bk.xp.mean((ayf.average_velocity(bk, m, cfg, Z, T, T) - teacher(Z, T)) ** 2), {}

    value_fm, _, grad_fm = bk.value_and_grad(fm_loss, model)
    value, _, grad = bk.value_and_grad(lambda m: emd(m, T), model)
    assert value == value_fm and all(np.array_equal(grad[k], grad_fm[k]) for k in grad)  # s = t: one loss
    gaps = []
    for h in (1e-2, 1e-3, 1e-4):
        _, _, grad = bk.value_and_grad(lambda m, h=h: emd(m, (1 - h) * T), model)
        gaps.append(max(np.abs(grad[k] - grad_fm[k]).max() for k in grad))
    orders = np.log10(np.array(gaps[:-1]) / np.array(gaps[1:]))
    assert np.all((orders > 0.9) & (orders < 1.1)), (gaps, orders)


def test_emd_tangent_is_minus_the_total_derivative_of_f(pair):
    """g = −df/dt along the teacher's exact ODE (r = 1): a central difference converges to it like h²."""
    bk, model = pair[0].bk, pair[0].model
    cfg, teacher = config(), oracle_teacher(bk, "8gaussians")
    z, t, _, _ = points(8, seed=3)
    t = np.clip(t, 0.3, 0.9)
    s = 0.4 * t
    _, g = tangent_of(bk, cfg, net_F(bk, model, cfg), teacher, bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(s))
    g = bk.to_numpy(g)

    def f_at(h):
        zh = GMM.flow_map(z, t, t + h)
        return bk.to_numpy(ayf.flow_map(bk, model, cfg, bk.from_numpy(zh), bk.from_numpy(t + h), bk.from_numpy(s)))

    errors = [np.abs(-(f_at(h) - f_at(-h)) / (2 * h) - g).max() for h in (1e-2, 1e-3)]
    assert errors[1] < 1e-4 * np.abs(g).max() and errors[0] / errors[1] > 50, errors


# -- the exact map is a fixed point ---------------------------------------------------------
def _gaussian_fields(bk):
    gauss = oracle("gaussian")
    lam, basis = np.linalg.eigh(gauss.cov)
    mu, lam, basis = (bk.from_numpy(a) for a in (gauss.mean, lam, basis))

    def velocity(z, t, y=None):
        t = t[:, None]
        c = (z - (1 - t) * mu) @ basis
        return -mu + ((t - (1 - t) * lam) / ((1 - t) ** 2 * lam + t**2) * c) @ basis.T

    def F(z, t, s):
        t_, s_ = t[:, None], s[:, None]
        c = (z - (1 - t_) * mu) @ basis
        ratio = bk.xp.sqrt(((1 - s_) ** 2 * lam + s_**2) / ((1 - t_) ** 2 * lam + t_**2))
        return (z - (1 - s_) * mu - (ratio * c) @ basis.T) / (t_ - s_)

    return gauss, velocity, F


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("variant", ["emd", "lmd"])
def test_exact_gaussian_map_is_a_fixed_point(name, variant):
    bk = backend64(name)
    gauss, velocity, F = _gaussian_fields(bk)
    z, t, _, _ = points(32, seed=4)
    s = t * np.random.default_rng(5).uniform(0, 0.95, len(t))
    Z, T, S = bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(s)
    assert np.allclose(bk.to_numpy(F(Z, T, S)), gauss.average_velocity(z, s, t), rtol=0, atol=1e-12)
    cfg = config(variant)
    _, g = tangent_of(bk, cfg, F, velocity, Z, T, S)
    assert np.abs(bk.to_numpy(g)).max() < 1e-12
    _, g_off = tangent_of(bk, cfg, lambda *a: 1.01 * F(*a), velocity, Z, T, S)
    assert np.abs(bk.to_numpy(g_off)).max() > 1e-3
    _, g_rmax = tangent_of(bk, cfg, F, velocity, Z, T, S, r=cfg.tangent_max)  # r_max < 1 keeps a residual
    assert np.abs(bk.to_numpy(g_rmax)).max() > 1e-3


@pytest.mark.parametrize("variant", ["emd", "lmd"])
def test_exact_mixture_map_is_a_fixed_point_to_solver_precision(variant):
    bk = backend64("jax")
    u = analytic.exact_average_velocity(bk, GMM, steps=100)
    z, t, _, _ = points(16, seed=6)
    s = 0.5 * t
    _, g = tangent_of(bk, config(variant), lambda zz, tt, ss: u(zz, ss, tt), oracle_teacher(bk, "8gaussians"),
                      bk.from_numpy(z), bk.from_numpy(t), bk.from_numpy(s))
    assert np.abs(bk.to_numpy(g)).max() < 1e-6


# -- parity, draws, gradients ---------------------------------------------------------------
def _draws(bk, cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.05, 1.0, n)
    s = t * rng.uniform(0, 1, n)
    s[:2], s[2:4] = t[:2], 0.0
    draws = {"t": bk.from_numpy(t), "s": bk.from_numpy(s), "x1": bk.from_numpy(rng.normal(size=(n, 2))),
             "lmd": bk.from_numpy(ayf.lmd_rows(cfg, n).astype(float)), "warmup": bk.from_numpy(np.asarray(0.7)),
             "drop": bk.from_numpy(rng.uniform(size=n) < 0.3)}
    if cfg.guidance is not None:
        draws["guidance"] = bk.from_numpy(rng.uniform(*cfg.guidance, n))
    return draws


def _teacher(bk, guided):
    exact = oracle_teacher(bk, "8gaussians")
    return autoguided_teacher(exact, lambda z, t, y=None: 0.5 * exact(z, t, y)) if guided else exact


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("variant", ayf.VARIANTS)
def test_loss_and_gradient_parity(pair, guided_pair, variant, guided):
    cfg = config(variant, label_dropout=0.3, guidance=(1.0, 3.0) if guided else None, lmd_weight=0.5)
    _, _, x0, _ = points(12, seed=7)
    y = np.arange(12) % NET.n_classes

    def loss(bk, model, ema):
        batch = {"x": bk.from_numpy(x0), "y": bk.from_numpy(y)}
        return ayf.loss_from_draws(bk, cfg, model, ema, batch, _draws(bk, cfg, 12), _teacher(bk, guided))

    value = assert_same_loss_and_grads(guided_pair if guided else pair, loss)
    assert np.isfinite(value) and value > 0


def test_gradient_is_the_normalised_tangent_pulled_back(pair):
    """No gradient flows through the target: ∇L = (2/(nD))·Σ (∂F/∂θ)ᵀ ĝ, ĝ = g/(‖g‖ + c)."""
    bk, model = pair[0].bk, pair[0].model
    cfg = config("emd+lmd", lmd_weight=1.0)
    _, _, x0, _ = points(12, seed=8)
    draws, teacher = _draws(bk, cfg, 12), _teacher(bk, False)
    batch = {"x": bk.from_numpy(x0)}
    _, _, grad = bk.value_and_grad(lambda m: ayf.loss_from_draws(bk, cfg, m, m, batch, draws, teacher), model)
    z = (1 - draws["t"][:, None]) * batch["x"] + draws["t"][:, None] * draws["x1"]

    def pulled_back(m):
        u, g = ayf.tangent(bk, cfg, net_F(bk, m, cfg), teacher, z, draws["t"], draws["s"], None, draws["lmd"],
                           draws["warmup"])
        g_hat, _ = ayf.normalise(bk, cfg, g)
        return 2 * bk.xp.sum(u * bk.stop_gradient(g_hat)) / u.numel(), {}

    _, _, expected = bk.value_and_grad(pulled_back, model)
    for k in grad:
        assert np.abs(grad[k] - expected[k]).max() < 1e-12, k


@pytest.mark.parametrize("name", BACKENDS)
def test_draws(name):
    bk = backend64(name)
    cfg = config("emd+lmd", guidance=(1.0, 3.0), warmup_fraction=0.5)
    x = bk.from_numpy(np.zeros((1000, 2)))
    d = ayf.draw(bk, cfg, bk.key(0), {"x": x}, 0, 100)
    t, s, lmd, lam = (bk.to_numpy(d[k]) for k in ("t", "s", "lmd", "guidance"))
    equal, zero = ayf.border_rows(cfg, 1000)
    assert equal.sum() == 100 and zero.sum() == 100
    assert np.array_equal(s[equal], t[equal]) and np.all(s[zero] == 0) and np.all((s <= t) & (s >= 0) & (t < 1))
    assert np.array_equal(lmd, np.arange(1000) % 2)
    assert lam.min() >= 1 and lam.max() <= 3 and abs(lam.mean() - 2) < 0.1
    warm = [float(bk.to_numpy(ayf.draw(bk, cfg, bk.key(0), {"x": x}, k, 100)["warmup"])) for k in (0, 24, 49, 99)]
    assert warm == pytest.approx([0.99 / 50, 0.99 / 2, 0.99, 0.99], abs=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sampler_parity_and_one_jump(guided_pair, steps):
    cfg = config(guidance=(1.0, 3.0))
    z = np.random.default_rng(9).normal(size=(10, 2))
    y = np.arange(10) % 3
    out = assert_same(guided_pair, lambda bk, m, e: ayf.sample(bk, cfg, m, bk.from_numpy(z), steps, bk.key(0),
                                                               bk.from_numpy(y), guidance=2.5))
    if steps == 1:
        bk, m = guided_pair[0].bk, guided_pair[0].model
        one = ayf.flow_map(bk, m, cfg, bk.from_numpy(z), bk.from_numpy(np.ones(10)), bk.from_numpy(np.zeros(10)),
                           bk.from_numpy(y), bk.from_numpy(np.full(10, 2.5)))
        assert np.allclose(out, bk.to_numpy(one), rtol=0, atol=1e-14)
        other = bk.to_numpy(ayf.sample(bk, cfg, m, bk.from_numpy(z), 1, bk.key(0), bk.from_numpy(y), guidance=1.0))
        assert np.abs(other - out).max() > 1e-3  # λ is an input


# -- convergence ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_emd_converges_at_smoke_scale(name):
    """400 smoke steps from the exact field: one-step W2 and map error well below an untrained network's
    and below the fixed bad baseline "every sample at the origin"."""
    bk = get_backend(name)
    preset = run_preset("ayf", "8gaussians", "smoke", variant="emd")
    state, _, _ = fit(bk, preset, seed=0, teacher=oracle_teacher(bk, "8gaussians"), progress=False)
    noise = np.random.default_rng(1).normal(size=(500, 2))
    fresh, exact = reference("8gaussians", 500), GMM.flow_map(noise, 1.0, 0.0)
    untrained = bk.make_model(preset.model, bk.key(0))
    scores = {}
    for label, net in (("trained", state.ema), ("untrained", untrained)):
        x = bk.to_numpy(ayf.sample(bk, preset.method_cfg, net, bk.from_numpy(noise), 1, bk.key(0)))
        scores[label] = (metrics.w2(x, fresh), metrics.flow_map_rmse(x, exact))
    origin = metrics.w2(np.zeros((500, 2)), fresh)
    assert scores["trained"][0] < 0.5 * min(scores["untrained"][0], origin), scores
    assert scores["trained"][1] < 0.5 * scores["untrained"][1], scores


# -- bad input ------------------------------------------------------------------------------
def test_bad_config():
    with pytest.raises(ValueError, match=r"unknown variant 'cmd'.*emd, lmd, emd\+lmd"):
        ayf.Config(variant="cmd")
    with pytest.raises(ValueError, match=r"guidance must be a range.*\(3.0, 1.0\)"):
        ayf.Config(guidance=(3.0, 1.0))
    with pytest.raises(ValueError, match="tangent_max must be in \\(0, 1\\], got 1.5"):
        ayf.Config(tangent_max=1.5)
    with pytest.raises(ValueError, match="sum ≤ 1, got 0.6 and 0.6"):
        ayf.Config(equal_fraction=0.6, zero_fraction=0.6)
    with pytest.raises(ValueError, match="needs a teacher velocity field"):
        make_loss(backend64("torch"), config(), 10)


def test_bad_sampling_input(guided_pair):
    bk, model = guided_pair[0].bk, guided_pair[0].model
    cfg = config(guidance=(1.0, 3.0))
    z = bk.from_numpy(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"0 ≤ r ≤ t ≤ 1, got t = 0.3, r = 0.6"):
        ayf.jump_once(bk, model, cfg, z, 0.3, 0.6)
    with pytest.raises(ValueError, match=r"λ = 3.5 is outside the range .*\[1.0, 3.0\]"):
        ayf.sample(bk, cfg, model, z, 2, bk.key(0), guidance=3.5)
    with pytest.raises(ValueError, match=r"trained without autoguidance; guidance must be 1 or None, got 2.0"):
        ayf.sample(bk, config(), model, z, 2, bk.key(0), guidance=2.0)


def test_autoguidance_presets_and_teachers():
    with pytest.raises(ValueError, match="method 'cm' has no autoguidance"):
        run_preset("cm", "8gaussians", "smoke", variant="cd", autoguided=True)
    guided = run_preset("ayf", "digits", "smoke", conditional=True, autoguided=True)
    assert guided.model.n_cond == 3 and guided.method_cfg.guidance == (1.0, 3.0)
    assert run_preset("ayf", "8gaussians", "smoke").model.n_cond == 2
    bk = backend64("torch")
    with pytest.raises(ValueError, match="needs a weak teacher: pass --weak-teacher"):
        load_teacher(bk, "exact", run_preset("ayf", "8gaussians", "smoke", autoguided=True))
    with pytest.raises(ValueError, match="a weak teacher \\(somewhere\\) is for autoguided distillation"):
        load_teacher(bk, "exact", run_preset("ayf", "8gaussians", "smoke"), weak="somewhere")


@pytest.mark.slow
def test_the_chapter_study_runs_at_smoke_scale(tmp_path):
    """The chapter's study mode (every run, every seed of the preset) works end to end and saves its numbers;
    a normal build only reads the committed study, so this is what keeps that code path alive."""
    out = tmp_path / "study"
    execute(ROOT / "book" / "05_align_your_flow.md", {"backend": "torch", "scale": "smoke", "study": True,
                                                       "out_dir": str(out)}, tmp_path / "study.ipynb")
    study = json.loads((out / "study.json").read_text())
    (seed_results,) = study["per_seed"].values()
    assert set(seed_results["two_d"]) == {"fm_teacher", *ayf.VARIANTS, "emd_fm", "cm", "shortcut"}
    assert all(np.isfinite(row["w2_1"]) for name, row in seed_results["two_d"].items() if name != "fm_teacher")
    assert {row["model"] for row in seed_results["digits"]} >= {"teacher, CFG", "teacher, autoguided"}
