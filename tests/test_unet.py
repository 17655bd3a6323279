"""The U-Net: same names, shapes, sizes and float64 outputs (and JVPs) in both backends."""
from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from parity import assert_same, make_pair

from onestep.backends import get_backend
from onestep.backends.architectures import UNetConfig

DIGITS = UNetConfig(channels=1, size=8, n_cond=2, mults=(1, 2), n_classes=10)
MNIST = UNetConfig(channels=1, size=28, n_cond=2, mults=(1, 2, 2), n_classes=10)
# attention at 4×4 (level 1) and in the middle, two heads of 16 channels
ATTENTION = UNetConfig(channels=3, size=8, n_cond=2, base=16, mults=(1, 2), n_classes=10, attention=(4,),
                       head_channels=16)
CONFIGS = pytest.mark.parametrize("cfg", [DIGITS, MNIST, ATTENTION], ids=["digits", "mnist", "attention"])
N = 3


@cache
def pair(cfg: UNetConfig, weight_noise: float):
    """Torch and JAX U-Nets with the same weights: torch's initial ones, or with every weight moved
    (the zero-initialised output conv included)."""
    return make_pair(cfg, weight_noise=weight_noise)


def _inputs(cfg: UNetConfig, seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, cfg.channels, cfg.size, cfg.size))
    cond = rng.uniform(size=(N, cfg.n_cond))
    y = np.array([0, 7, cfg.n_classes])  # the last one is "no label"
    return x, cond, y


def _forward(model, x, cond, y):
    return model(x, cond, y)


def _jvp(bk, model, x, cond, y, tx, tcond):
    return bk.jvp(lambda x, c: model(x, c, y), (x, cond), (tx, tcond))


def forward(bk, model, x, cond, y):
    """The forward pass through ``bk.inference`` (jitted in JAX), as numpy."""
    y = None if y is None else bk.from_numpy(y)
    return bk.to_numpy(bk.inference(_forward)(model, bk.from_numpy(x), bk.from_numpy(cond), y))


@CONFIGS
def test_names_shapes_and_sizes_agree(cfg):
    (tb, tm, _), (jb, jm, _) = (vars(side).values() for side in pair(cfg, 0.0))
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
    x, cond, y = _inputs(cfg)
    for side in pair(cfg, 0.0):
        out = forward(side.bk, side.model, x, cond, y)
        assert out.shape == x.shape
        assert not out.any()


@CONFIGS
def test_outputs_agree_float64(cfg):
    x, cond, y = _inputs(cfg)
    out = assert_same(pair(cfg, 0.1), lambda bk, m, ema: forward(bk, m, x, cond, y))
    assert out.shape == x.shape
    assert np.abs(out).max() > 0.1


def test_no_labels_means_the_null_label():
    x, cond, _ = _inputs(DIGITS)
    null = np.full(N, DIGITS.n_classes)
    for side in pair(DIGITS, 0.1):
        np.testing.assert_array_equal(forward(side.bk, side.model, x, cond, None),
                                      forward(side.bk, side.model, x, cond, null))


@pytest.mark.parametrize("cfg", [DIGITS, ATTENTION], ids=["digits", "attention"])
def test_jvp_agrees_float64(cfg):
    """Forward-mode AD runs through every layer, attention included, with the same tangents."""
    x, cond, y = _inputs(cfg)
    tx, tcond, _ = _inputs(cfg, seed=3)

    def run(bk, model, ema):
        return bk.inference(_jvp)(bk, model, *(bk.from_numpy(a) for a in (x, cond, y, tx, tcond)))

    _, tangent = assert_same(pair(cfg, 0.1), run)
    assert np.abs(tangent).max() > 0.1


def test_attention_blocks_sit_at_the_chosen_resolutions():
    (tb, tm, _), _ = (vars(side).values() for side in pair(ATTENTION, 0.0))
    names = {k.rsplit(".", 1)[0] for k in tb.get_params(tm) if ".attn." in k or k.startswith("mid_attn.")}
    assert names == {"down.1.attn.qkv", "down.1.attn.proj", "down.1.attn.norm", "up.1.attn.qkv", "up.1.attn.proj",
                     "up.1.attn.norm", "mid_attn.qkv", "mid_attn.proj", "mid_attn.norm"}
    assert tm.down[1].attn.heads == 2
    with pytest.raises(ValueError, match=r"attention resolutions \(16,\) must be among .* \(8, 4\)"):
        UNetConfig(channels=3, size=8, mults=(1, 2), attention=(16,))


def test_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*\\(levels-1\\) = 8"):
        UNetConfig(channels=1, size=28, mults=(1, 2, 2, 2))  # 28 is not a multiple of 2**3
