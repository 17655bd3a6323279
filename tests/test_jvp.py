"""The backends' JVP: primal output with gradient, tangent under stop-gradient, at the cost of one
more forward. Torch's hand-written tangent path against ``torch.func.jvp`` in float64 (values and
the gradients of JVP objectives), torch against JAX, and the work a JVP step adds in each backend."""
from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch
from parity import assert_same_loss_and_grads, make_pair
from torch.utils.flop_counter import FlopCounterMode

from onestep import get_backend
from onestep.backends.architectures import MLPConfig, UNetConfig, model_shape
from onestep.backends.embedding import EMBEDDING_TIME_SCALE
from onestep.backends.torch_backend import tangent
from onestep.methods import cm, make_loss, meanflow, method_of
from onestep.paths import LINEAR, expand

torch.set_num_threads(1)

TOL = 1e-10
NETS = {
    "mlp-1": MLPConfig(data_dim=3, n_cond=1, width=32, depth=3, n_classes=4),
    "mlp-2": MLPConfig(data_dim=3, n_cond=2, width=32, depth=3, n_classes=4),
    "unet-2": UNetConfig(channels=2, size=8, n_cond=2, base=8, mults=(1, 2), emb_dim=16, n_classes=4,
                        attention=(4,), head_channels=8),  # two heads at 4×4 and in the middle
}
TWO_TIME = ["mlp-2", "unet-2"]
N = 5


def reference_jvp(fn, primals, tangents):
    """What the fast path must equal: ``torch.func.jvp``'s tangent, detached, and a separate plain
    forward with graph for the primal."""
    _, tan = torch.func.jvp(fn, primals, tangents)
    return fn(*primals), tan.detach()


def perturbed(params: dict, seed: int = 1) -> dict:
    """Every weight moved (the U-Net's zero-initialised output conv included)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.1 * rng.normal(size=v.shape) for k, v in params.items()}


def torch_model(name: str):
    tb = get_backend("torch", precision="float64")
    model = tb.make_model(NETS[name], tb.key(0))
    return tb, tb.set_params(model, perturbed(tb.get_params(model)))


def draws(cfg, seed: int = 2) -> dict:
    """Data, noise, times ``r ≤ t`` in (0, 1) and labels (the last one "no label")."""
    rng = np.random.default_rng(seed)
    shape = (N, *model_shape(cfg))
    t = rng.uniform(0.1, 0.9, N)
    return {"x0": rng.normal(size=shape), "x1": rng.normal(size=shape), "t": t, "r": t * rng.uniform(size=N),
            "y": np.array([0, 1, 2, 3, cfg.n_classes])}


# -- objectives, written once against the protocol, with the jvp's primal output as the prediction ---
def meanflow_loss(bk, model, d):
    """``‖u(z, r, t) − sg(v − (t − r)·du/dt)‖²``, ``du/dt`` the JVP with tangent ``(v, 0, 1)`` on ``(z, r, t)``."""
    x0, x1, t, r, y = (bk.from_numpy(d[k]) for k in ("x0", "x1", "t", "r", "y"))
    v = x1 - x0
    u, du_dt = bk.jvp(lambda z, r_, t_: model(z, bk.xp.stack([r_, t_], axis=1), y),
                      (LINEAR.sample(bk.xp, x0, x1, t), r, t), (v, bk.xp.zeros_like(r), bk.xp.ones_like(t)))
    target = bk.stop_gradient(v - expand(t - r, v) * du_dt)
    return bk.xp.mean((u - target) ** 2), {}


def sct_loss(bk, model, d, sigma_d: float = 0.5, c: float = 0.1):
    """sCT's shape in TrigFlow time: ``‖F − sg(F) − g/(‖g‖ + c)‖²`` with
    ``g = −cos²τ·(σ_d F⁻ − dx/dτ) − cos τ sin τ·(x_τ + σ_d dF/dτ)``; every time column is τ in
    the network's time (``cm.trig_network``)."""
    xp = bk.xp
    x0, noise, tau, y = bk.from_numpy(d["x0"]), bk.from_numpy(d["x1"]), bk.from_numpy(d["t"]), bk.from_numpy(d["y"])
    cos, sin, cs = expand(xp.cos(tau), x0), expand(xp.sin(tau), x0), xp.cos(tau) * xp.sin(tau)
    x_tau, dx_dtau = cos * x0 + sin * sigma_d * noise, cos * sigma_d * noise - sin * x0

    def F(x_in, s):
        return model(x_in, xp.stack([s / EMBEDDING_TIME_SCALE] * model.cfg.n_cond, axis=1), y)

    F_out, dF = bk.jvp(F, (x_tau / sigma_d, tau), (expand(cs, x_tau) * dx_dtau / sigma_d, cs))
    F_minus = bk.stop_gradient(F_out)
    g = -(cos**2) * (sigma_d * F_minus - dx_dtau) - (expand(cs, x_tau) * x_tau + sigma_d * dF)
    g = g / (expand(xp.sqrt(xp.sum((g**2).reshape((N, -1)), axis=1)), g) + c)
    return xp.mean((F_out - F_minus - g) ** 2), {}


LOSSES = {"meanflow": meanflow_loss, "sct": sct_loss}
CASES = [("meanflow", n) for n in TWO_TIME] + [("sct", n) for n in NETS]


# -- values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["both", "x", "cond"])
@pytest.mark.parametrize("name", list(NETS))
def test_primal_and_tangent_equal_torch_func_jvp(name, which):
    """Tangents in the input, the times or both (a missing one is zero inside the network)."""
    tb, model = torch_model(name)
    d = draws(NETS[name])
    rng = np.random.default_rng(3)
    x, dx = tb.from_numpy(d["x0"]), tb.from_numpy(rng.normal(size=d["x0"].shape))
    cond = tb.from_numpy(rng.uniform(size=(N, NETS[name].n_cond)))
    dcond = tb.from_numpy(rng.normal(size=(N, NETS[name].n_cond)) / 100)  # frequencies reach 1000
    y = tb.from_numpy(d["y"])
    fn, primals, tangents = {"both": (lambda a, c: model(a, c, y), (x, cond), (dx, dcond)),
                             "x": (lambda a: model(a, cond, y), (x,), (dx,)),
                             "cond": (lambda c: model(x, c, y), (cond,), (dcond,))}[which]
    out, tan = tb.jvp(fn, primals, tangents)
    ref_out, ref_tan = torch.func.jvp(fn, primals, tangents)
    assert tan.abs().max() > 1e-3 and out.abs().max() > 1e-3  # not trivially zero
    assert (out - ref_out).abs().max() < TOL
    assert (tan - ref_tan).abs().max() < TOL
    assert out.grad_fn is not None  # the primal carries gradients to the parameters ...
    assert tan.grad_fn is None and not tan.requires_grad  # ... the tangent is stop-gradient


def test_the_reference_does_not_run_the_hand_written_rules(monkeypatch):
    """A wrong SiLU derivative in the fast path shows against ``torch.func.jvp``: the parity above can fail."""
    tb, model = torch_model("mlp-2")
    silu = tangent.silu

    def wrong_silu(h, dh):
        out, dout = silu(h, dh)
        return out, None if dout is None else 2 * dout

    monkeypatch.setattr(tangent, "silu", wrong_silu)
    x, cond = tb.from_numpy(draws(NETS["mlp-2"])["x0"]), tb.from_numpy(np.full((N, 2), 0.5))
    args = (lambda a: model(a, cond), (x,), (torch.ones_like(x),))
    ref = torch.func.jvp(*args)[1]
    assert (tb.jvp(*args)[1] - ref).abs().max() > 0.1 * ref.abs().max()


def test_method_math_around_the_network_uses_torch_forward_ad():
    """Elementwise math outside our networks (and a second network call) is differentiated too."""
    tb, model = torch_model("mlp-2")
    x = tb.from_numpy(draws(NETS["mlp-2"])["x0"])
    t = tb.from_numpy(np.linspace(0.2, 0.8, N))

    def fn(z, s):
        cond = torch.stack([s, s**2], dim=1)
        return torch.cos(s)[:, None] * z + torch.sin(s)[:, None] * model(z * (1 + s[:, None]), cond) + model(z, cond)

    args = fn, (x, t), (torch.ones_like(x), torch.ones_like(t))
    (out, tan), (ref_out, ref_tan) = tb.jvp(*args), torch.func.jvp(*args)
    assert (out - ref_out).abs().max() < TOL and (tan - ref_tan).abs().max() < TOL


def test_tangent_free_output_and_bad_calls():
    tb, model = torch_model("mlp-1")
    x, c = torch.ones(N, 3, dtype=torch.float64), torch.ones(N, 1, dtype=torch.float64)
    out, tan = tb.jvp(lambda a: model(x, c), (x,), (x,))  # the output does not depend on the input
    assert not tan.any() and tan.shape == out.shape
    with pytest.raises(RuntimeError, match="Nested forward mode AD"):  # torch's own limit
        tb.jvp(lambda a: tb.jvp(lambda b: model(b, c), (a,), (a,))[1], (x,), (x,))
    with pytest.raises(TypeError, match="one tensor"):
        tb.jvp(lambda a: (model(a, c), a), (x,), (x,))
    with pytest.raises(ValueError, match="2 primals but 1 tangents"):
        tb.jvp(lambda a, b: model(a, b), (x, c), (x,))


# -- gradients of JVP objectives ---------------------------------------------------------------------
@pytest.mark.parametrize("loss, name", CASES)
def test_objective_gradients_equal_the_reference(loss, name):
    """Through the fast path, the objectives' parameter gradients equal those through
    ``torch.func.jvp`` with a separate primal forward."""
    tb, model = torch_model(name)
    d = draws(NETS[name])
    results = []
    for jvp in (tb.jvp, reference_jvp):
        backend = get_backend("torch", precision="float64")
        backend.jvp = jvp
        model.zero_grad()
        value, _ = LOSSES[loss](backend, model, d)
        value.backward()
        results.append((float(value.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (fast, g_fast), (ref, g_ref) = results
    assert abs(fast - ref) < TOL
    assert max(g.abs().max() for g in g_ref.values()) > 1e-3
    for k in g_ref:
        assert (g_fast[k] - g_ref[k]).abs().max() < TOL, k


@pytest.mark.parametrize("loss, name", [case for case in CASES if case[1].startswith("mlp")])
def test_objective_torch_jax_parity(loss, name):
    """Both backends' JVP objectives agree (the U-Nets' forward parity, attention included, is
    test_unet's; eager JAX takes half a minute over this U-Net's JVP)."""
    pair = make_pair(NETS[name], weight_noise=0.1)
    d = draws(NETS[name])
    assert_same_loss_and_grads(pair, lambda bk, m, ema: LOSSES[loss](bk, m, d))


def test_jax_tangent_is_stop_gradient():
    import equinox as eqx
    import jax

    jb = get_backend("jax", precision="float64")
    model = jb.make_model(NETS["mlp-2"], jb.key(0))
    x, cond = jb.from_numpy(draws(NETS["mlp-2"])["x0"]), jb.from_numpy(np.full((N, 2), 0.5))

    def total(m, part):
        return jb.xp.sum(jb.jvp(lambda a: m(a, cond), (x,), (jb.xp.ones_like(x),))[part])

    grads = [jax.tree.leaves(eqx.filter_grad(lambda m, part=part: total(m, part))(model)) for part in (0, 1)]
    assert max(float(jb.xp.abs(g).max()) for g in grads[0]) > 1e-3
    assert all(not g.any() for g in grads[1])


# -- cost: one more forward, never two ----------------------------------------------------------------
def fm_loss(bk, model, d):
    """Flow matching on the same two-time network: the baseline step."""
    x0, x1, t, y = (bk.from_numpy(d[k]) for k in ("x0", "x1", "t", "y"))
    err = model(LINEAR.sample(bk.xp, x0, x1, t), bk.xp.stack([t, t], axis=1), y) - (x1 - x0)
    return bk.xp.mean(err**2), {}


@pytest.mark.parametrize("name", TWO_TIME)
def test_torch_jvp_step_adds_one_forward_of_flops(name):
    """Matmul/conv FLOPs: MeanFlow step = FM step (forward + backward) + one tangent forward, in which
    attention's two products of activations (``q·k``, ``w·v``: batched matmuls) count twice, once per
    factor's tangent."""
    tb, model = torch_model(name)
    d = draws(NETS[name])

    def flops(run):
        with FlopCounterMode(display=False) as counter:
            run()
        by_op = counter.get_flop_counts()["Global"]
        return counter.get_total_flops(), by_op.get(torch.ops.aten.bmm, 0)

    forward, products = flops(lambda: model(tb.from_numpy(d["x0"]), tb.from_numpy(np.ones((N, 2))),
                                            tb.from_numpy(d["y"])))
    assert (products > 0) == (name == "unet-2")
    (fm, _), (mf, _) = (flops(lambda loss=loss: loss(tb, model, d)[0].backward()) for loss in (fm_loss, meanflow_loss))
    assert mf == fm + forward + products, (fm, forward, products, mf)


def test_jax_jvp_step_adds_one_forward_of_matmuls():
    """The backend's jitted train step (one XLA program: one dispatch per step) of the MeanFlow
    objective holds the FM step's matmuls plus one forward's worth: XLA does not run the forward twice.
    (The U-Nets' convolutions and dots behave the same, attention's two products of activations
    counting twice, as in torch: checked once by hand, see benchmarks/README.md; their steps take
    minutes to compile.)"""
    import equinox as eqx

    jb = get_backend("jax", precision="float32")
    cfg = NETS["mlp-2"]
    model = jb.make_model(cfg, jb.key(0))
    d = draws(cfg)  # from_numpy makes float32 arrays of them
    data = {"x": jb.from_numpy(d["x0"])}

    def count(lowered):
        return collections.Counter(re.findall(r"= \S+ (dot|convolution)\(", lowered.compile().compiled.as_text()))

    forward = count(eqx.filter_jit(lambda m, x: m(x, jb.xp.ones((N, 2), x.dtype), jb.from_numpy(d["y"])))
                    .lower(model, data["x"]))
    steps = {}
    for objective, loss in (("fm", fm_loss), ("meanflow", meanflow_loss)):
        state = jb.init_train_state(model, lr=1e-3, ema_decay=0.9)
        step = jb._compiled_step(lambda m, target, batch, key, i, loss=loss: loss(jb, m, d), state.optimizer)
        steps[objective] = count(step.lower(state.model, state.ema, None, state.opt_state, data, np.arange(N),
                                            jb.key(0), np.asarray(0, np.uint32), np.float64(0.9), None))
    assert steps["meanflow"] == steps["fm"] + forward, steps


# -- the methods' own losses take the fast path ------------------------------------------------------
@pytest.mark.parametrize("cfg, weight_head", [(cm.variant_config("sct"), True), (meanflow.Config(), False)],
                         ids=["sct", "meanflow"])  # sCT learns its loss weight w(τ) with a head on the net
def test_method_losses_take_the_hand_carried_tangent(cfg, weight_head, monkeypatch):
    """sCT (Chapter 2) and MeanFlow reach the hand-carried tangent through ``bk.jvp``: every linear
    layer of the network sees a tangent, and ``torch.func.jvp`` is never called."""
    tb = get_backend("torch", precision="float64")
    net = MLPConfig(data_dim=3, n_cond=method_of(cfg).n_cond(cfg), width=16, depth=2, log_weight_head=weight_head)
    model = tb.make_model(net, tb.key(0))
    seen = []
    linear = tangent.linear

    def recording_linear(layer, h, dh):
        seen.append((layer, dh is not None))
        return linear(layer, h, dh)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func.jvp called")

    monkeypatch.setattr(tangent, "linear", recording_linear)
    monkeypatch.setattr(torch.func, "jvp", refuse)
    batch = {"x": tb.from_numpy(np.random.default_rng(0).normal(size=(8, 3))), "y": None}
    loss, _ = make_loss(tb, cfg, 100)(model, model, batch, tb.key(1), 10)
    loss.backward()
    with_tangent = {layer for layer, carried in seen if carried}
    assert with_tangent == set(model.layers), seen
