"""The small image U-Net, as an Equinox module acting on batches.

Its pytree paths (``down.{i}.block.conv1.weight``, ``emb_in.weight``, ...) and shapes
equal the torch U-Net's ``state_dict`` (conv weights are OIHW), which is what lets
``params.to_flat``/``from_flat`` exchange weights between the backends.  Images are
NCHW at the interface, like torch's, but NHWC inside: XLA's convolutions are faster so.

The layers are written here, batched, rather than taken from ``eqx.nn``, so that their
initial weights can come from NumPy, drawn by a generator seeded with the JAX key (with
torch's default distributions).  ``jax.random`` and ``jnp.ones`` compile one XLA program
per shape, which made building a U-Net take tens of seconds on CPU.
"""
from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..architectures import UNetConfig, group_count, unet_levels
from ..embedding import embed_conditions, frequencies


def _param(a, dtype) -> jax.Array:
    """NumPy data as a JAX array of ``dtype``, converted and copied without XLA compilation."""
    return jax.device_put(np.asarray(a, dtype=dtype))


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return _param(rng.uniform(-bound, bound, shape), dtype)


class Linear(eqx.Module):
    weight: jax.Array  # (out, in)
    bias: jax.Array

    def __init__(self, n_in: int, n_out: int, rng, dtype):
        self.weight = _uniform(rng, (n_out, n_in), n_in, dtype)
        self.bias = _uniform(rng, (n_out,), n_in, dtype)

    def __call__(self, x):
        return x @ self.weight.T + self.bias


class Conv(eqx.Module):
    """A square ``k``×``k`` convolution on NHWC images, stride 1, "same" padding."""

    weight: jax.Array  # (out, in, k, k)
    bias: jax.Array

    def __init__(self, c_in: int, c_out: int, k: int, rng, dtype, zero: bool = False):
        shape = (c_out, c_in, k, k)
        if zero:  # the output layer starts at zero
            self.weight, self.bias = _param(np.zeros(shape), dtype), _param(np.zeros(c_out), dtype)
        else:
            self.weight = _uniform(rng, shape, c_in * k * k, dtype)
            self.bias = _uniform(rng, (c_out,), c_in * k * k, dtype)

    def __call__(self, x):
        pad = self.weight.shape[-1] // 2
        y = jax.lax.conv_general_dilated(x, self.weight, (1, 1), [(pad, pad), (pad, pad)],
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"))
        return y + self.bias


class GroupNorm(eqx.Module):
    """GroupNorm over NHWC images, ``eps`` 1e-5 as torch's."""

    weight: jax.Array
    bias: jax.Array
    groups: int = eqx.field(static=True)

    def __init__(self, ch: int, dtype):
        self.weight = _param(np.ones(ch), dtype)
        self.bias = _param(np.zeros(ch), dtype)
        self.groups = group_count(ch)

    def __call__(self, x):
        g = x.reshape(x.shape[0], -1, self.groups, x.shape[-1] // self.groups)
        g = (g - g.mean((1, 3), keepdims=True)) * jax.lax.rsqrt(g.var((1, 3), keepdims=True) + 1e-5)
        return g.reshape(x.shape) * self.weight + self.bias


class ResBlock(eqx.Module):
    """GroupNorm-SiLU-conv, plus a per-channel bias from the embedding, twice; 1×1 skip if needed."""

    norm1: GroupNorm
    conv1: Conv
    emb_proj: Linear
    norm2: GroupNorm
    conv2: Conv
    skip: Conv | None

    def __init__(self, c_in: int, c_out: int, emb_dim: int, rng, dtype):
        self.norm1 = GroupNorm(c_in, dtype)
        self.conv1 = Conv(c_in, c_out, 3, rng, dtype)
        self.emb_proj = Linear(emb_dim, c_out, rng, dtype)
        self.norm2 = GroupNorm(c_out, dtype)
        self.conv2 = Conv(c_out, c_out, 3, rng, dtype)
        self.skip = Conv(c_in, c_out, 1, rng, dtype) if c_in != c_out else None

    def __call__(self, x, emb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.emb_proj(jax.nn.silu(emb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class Attention(eqx.Module):
    """Residual self-attention over the pixels: GroupNorm, a 1×1 conv to queries, keys and values,
    ``softmax(q·k/√d)`` per head, a 1×1 output conv that starts at zero (the torch U-Net's
    ``Attention``, same parameters; the channel order of the qkv conv is (3, heads, d))."""

    norm: GroupNorm
    qkv: Conv
    proj: Conv
    heads: int = eqx.field(static=True)

    def __init__(self, ch: int, heads: int, rng, dtype):
        self.norm = GroupNorm(ch, dtype)
        self.qkv = Conv(ch, 3 * ch, 1, rng, dtype)
        self.proj = Conv(ch, ch, 1, rng, dtype, zero=True)
        self.heads = heads

    def __call__(self, x):
        n, h, w, c = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(n, h * w, 3, self.heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = jax.nn.softmax(jnp.einsum("nihd,njhd->nhij", q, k) / math.sqrt(d), axis=-1)
        return x + self.proj(jnp.einsum("nhij,njhd->nihd", weights, v).reshape(n, h, w, c))


class Down(eqx.Module):
    """One level of the down path: a residual block (and attention), then 2×2 average pooling unless deepest."""

    block: ResBlock
    attn: Attention | None
    pool: bool = eqx.field(static=True)

    def __init__(self, c_in: int, c_out: int, emb_dim: int, pool: bool, rng, dtype, heads: int = 0):
        self.block = ResBlock(c_in, c_out, emb_dim, rng, dtype)
        self.attn = Attention(c_out, heads, rng, dtype) if heads else None
        self.pool = pool

    def __call__(self, x, emb):
        """Return ``(skip, h)``: the block's output and its (pooled) continuation."""
        skip = self.block(x, emb)
        if self.attn is not None:
            skip = self.attn(skip)
        if not self.pool:
            return skip, skip
        n, h, w, c = skip.shape
        return skip, skip.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Up(eqx.Module):
    """One level of the up path: nearest ×2 upsampling unless deepest, concat skip, residual block (and attention)."""

    block: ResBlock
    attn: Attention | None
    upsample: bool = eqx.field(static=True)

    def __init__(self, c_in: int, c_out: int, emb_dim: int, upsample: bool, rng, dtype, heads: int = 0):
        self.block = ResBlock(c_in + c_out, c_out, emb_dim, rng, dtype)
        self.attn = Attention(c_out, heads, rng, dtype) if heads else None
        self.upsample = upsample

    def __call__(self, x, skip, emb):
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        h = self.block(jnp.concatenate([x, skip], axis=-1), emb)
        return h if self.attn is None else self.attn(h)


class UNet(eqx.Module):
    """``UNet(cfg, key, dtype)(x, cond, y=None)``: images ``x`` (n, C, H, W) to (n, C, H, W)."""

    emb_in: Linear
    emb_out: Linear
    label_emb: eqx.nn.Embedding | None
    conv_in: Conv
    down: list
    mid: ResBlock
    mid_attn: Attention | None
    up: list
    norm_out: GroupNorm
    conv_out: Conv
    log_weight_head: Linear | None
    cfg: UNetConfig = eqx.field(static=True)

    def __init__(self, cfg: UNetConfig, key, dtype=jnp.float32):
        self.cfg = cfg
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        chs = [cfg.base * m for m in cfg.mults]
        last = len(chs) - 1
        self.emb_in = Linear(cfg.n_cond * cfg.emb_dim, cfg.emb_dim, rng, dtype)
        self.emb_out = Linear(cfg.emb_dim, cfg.emb_dim, rng, dtype)
        self.label_emb = (eqx.nn.Embedding(weight=_param(rng.normal(size=(cfg.n_classes + 1, cfg.emb_dim)), dtype))
                          if cfg.n_classes else None)  # last row: "no label"
        self.conv_in = Conv(cfg.channels, cfg.base, 3, rng, dtype)
        self.down = [Down(c_in, c, cfg.emb_dim, i < last, rng, dtype, heads=cfg.attends(i) and cfg.heads(c))
                     for i, (c_in, c) in enumerate(zip([cfg.base] + chs[:-1], chs))]
        self.mid = ResBlock(chs[-1], chs[-1], cfg.emb_dim, rng, dtype)
        self.mid_attn = Attention(chs[-1], cfg.heads(chs[-1]), rng, dtype) if cfg.attention else None
        # up[i] mirrors down[i]; it takes the output of up[i + 1] (or of mid when deepest).
        self.up = [Up(c_in, c, cfg.emb_dim, i < last, rng, dtype, heads=cfg.attends(i) and cfg.heads(c))
                   for i, (c_in, c) in enumerate(zip(chs[1:] + chs[-1:], chs))]
        self.norm_out = GroupNorm(cfg.base, dtype)
        self.conv_out = Conv(cfg.base, cfg.channels, 3, rng, dtype, zero=True)
        self.log_weight_head = Linear(cfg.n_cond * cfg.emb_dim, 1, rng, dtype) if cfg.log_weight_head else None

    def log_weight(self, cond):
        """``w(cond)`` (n,) for ``cond`` (n, n_cond): the loss-weight head (``log_weight_head``)."""
        emb = embed_conditions(jnp, cond, jnp.asarray(frequencies(self.cfg.emb_dim), cond.dtype))
        return self.log_weight_head(emb)[:, 0]

    def __call__(self, x, cond, y=None):
        freqs = jnp.asarray(frequencies(self.cfg.emb_dim), cond.dtype)  # a constant under jit
        emb = self.emb_out(jax.nn.silu(self.emb_in(embed_conditions(jnp, cond, freqs))))
        if self.label_emb is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.cfg.n_classes, dtype=jnp.int32)
            emb = emb + self.label_emb.weight[y]
        h = self.conv_in(jnp.transpose(x, (0, 2, 3, 1)))
        h = unet_levels(h, emb, self.down, self.middle, self.up)
        return jnp.transpose(self.conv_out(jax.nn.silu(self.norm_out(h))), (0, 3, 1, 2))

    def middle(self, h, emb):
        """The deepest block, then attention when the network has any."""
        h = self.mid(h, emb)
        return h if self.mid_attn is None else self.mid_attn(h)
