"""The U-Net: same names, shapes, sizes and float64 outputs (and JVPs) in both backends."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from onestep.backends import get_backend
from onestep.backends.base import UNetConfig

torch.set_num_threads(1)

DIGITS = UNetConfig(channels=1, size=8, n_cond=2, mults=(1, 2), n_classes=10)
MNIST = UNetConfig(channels=1, size=28, n_cond=2, mults=(1, 2, 2), n_classes=10)
CONFIGS = pytest.mark.parametrize("cfg", [DIGITS, MNIST], ids=["digits", "mnist"])
N = 3


@functools.cache
def _backends():
    return get_backend("torch", precision="float64"), get_backend("jax", precision="float64")


@functools.cache
def _models(cfg: UNetConfig, randomise: bool):
    """Torch and JAX models holding the same weights: torch's initial ones, or those perturbed."""
    tb, jb = _backends()
    tm = tb.make_model(cfg, tb.key(0))
    jm = jb.make_model(cfg, jb.key(0))
    params = tb.get_params(tm)
    if randomise:  # every weight moves, the zero-initialised output conv included
        rng = np.random.default_rng(1)
        params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in params.items()}
        tm = tb.set_params(tm, params)
    return tm, jb.set_params(jm, params)


def _inputs(cfg: UNetConfig, seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, cfg.channels, cfg.size, cfg.size))
    cond = rng.uniform(size=(N, cfg.n_cond))
    y = np.array([0, 7, cfg.n_classes])  # the last one is "no label"
    return x, cond, y


@functools.cache
def _compiled(backend):
    """The forward pass and the JVP w.r.t. (x, cond), through ``backend.inference`` (jitted in JAX)."""

    def jvp(model, x, cond, y, tx, tcond):
        return backend.jvp(lambda x, c: model(x, c, y), (x, cond), (tx, tcond))

    return backend.inference(lambda model, x, cond, y: model(x, cond, y)), backend.inference(jvp)


def _forward(backend, model, x, cond, y):
    y = None if y is None else backend.from_numpy(y)
    out = _compiled(backend)[0](model, backend.from_numpy(x), backend.from_numpy(cond), y)
    return backend.to_numpy(out)


@CONFIGS
def test_names_shapes_and_sizes_agree(cfg):
    tb, jb = _backends()
    tm, jm = _models(cfg, False)
    tp, jp = tb.get_params(tm), jb.get_params(jm)
    assert set(tp) == set(jp)
    assert {k: v.shape for k, v in tp.items()} == {k: v.shape for k, v in jp.items()}
    assert "down.0.block.conv1.weight" in tp and "label_emb.weight" in tp
    assert tb.count_params(tm) == jb.count_params(jm) == sum(v.size for v in tp.values())


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_jax_params_take_the_backend_dtype(precision):
    jb = get_backend("jax", precision=precision)
    params = jb.get_params(jb.make_model(DIGITS, jb.key(0)))
    assert {v.dtype for v in params.values()} == {np.dtype(precision)}


@CONFIGS
def test_initial_output_is_zero(cfg):
    """The output conv starts at zero, so a fresh model predicts zeros of the input's shape."""
    tb, jb = _backends()
    tm, jm = _models(cfg, False)
    x, cond, y = _inputs(cfg)
    for backend, model in ((tb, tm), (jb, jm)):
        out = _forward(backend, model, x, cond, y)
        assert out.shape == x.shape
        assert not out.any()


@CONFIGS
def test_outputs_agree_float64(cfg):
    tb, jb = _backends()
    tm, jm = _models(cfg, True)
    x, cond, y = _inputs(cfg)
    out_t, out_j = _forward(tb, tm, x, cond, y), _forward(jb, jm, x, cond, y)
    assert out_t.shape == x.shape
    assert np.abs(out_t).max() > 0.1
    np.testing.assert_allclose(out_j, out_t, rtol=0, atol=1e-10)


def test_no_labels_means_the_null_label():
    cfg = DIGITS
    x, cond, _ = _inputs(cfg)
    null = np.full(N, cfg.n_classes)
    for backend, model in zip(_backends(), _models(cfg, True)):
        np.testing.assert_array_equal(_forward(backend, model, x, cond, None),
                                      _forward(backend, model, x, cond, null))


def test_jvp_agrees_float64():
    cfg = DIGITS
    tb, jb = _backends()
    x, cond, y = _inputs(cfg)
    tx, tcond, _ = _inputs(cfg, seed=3)
    results = []
    for backend, model in zip((tb, jb), _models(cfg, True)):
        args = [backend.from_numpy(a) for a in (x, cond, y, tx, tcond)]
        results.append([backend.to_numpy(a) for a in _compiled(backend)[1](model, *args)])
    (out_t, tan_t), (out_j, tan_j) = results
    assert np.abs(tan_t).max() > 0.1
    np.testing.assert_allclose(out_j, out_t, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tan_j, tan_t, rtol=0, atol=1e-10)


def test_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*\\(levels-1\\) = 8"):
        UNetConfig(channels=1, size=28, mults=(1, 2, 2, 2))  # 28 is not a multiple of 2**3
