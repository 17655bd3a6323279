"""The small image U-Net, as a torch ``nn.Module``.

Its ``state_dict`` keys and shapes (``down.{i}.block.conv1.weight``, ``emb_in.weight``,
...) are the exchange format shared with the JAX backend's U-Net. The blocks take and return
(primal, tangent) pairs for the backend's cheap JVP (see ``tangent``); a ``None`` tangent is a
plain forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..architectures import UNetConfig, group_count, unet_levels
from ..embedding import embed_conditions, frequencies
from . import tangent as tg


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus a per-channel bias from the embedding, twice; 1×1 skip if needed."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in), c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(group_count(c_out), c_out, eps=1e-5)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        """Pairs ``x`` (n, c_in, H, W) and ``emb`` (n, emb_dim) -> a pair (n, c_out, H, W)."""
        h = tg.linear(self.conv1, *tg.silu(*tg.group_norm(self.norm1, *x)))
        bias = tg.linear_map(lambda e: e[:, :, None, None], tg.linear(self.emb_proj, *tg.silu(*emb)))
        h = tg.linear_map(torch.add, h, bias)
        h = tg.linear(self.conv2, *tg.silu(*tg.group_norm(self.norm2, *h)))
        return tg.linear_map(torch.add, h, tg.linear(self.skip, *x))


class Attention(nn.Module):
    """Residual self-attention over the pixels: GroupNorm, a 1×1 conv to queries, keys and values,
    ``softmax(q·k/√d)`` per head, a 1×1 output conv that starts at zero.  Written with einsum and
    softmax: the tangent needs the attention weights, and the fused kernels of
    ``F.scaled_dot_product_attention`` neither return them nor have forward-mode AD (which
    ``torch.func.jvp``, the reference the tangent is tested against, needs)."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(ch), ch, eps=1e-5)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x):
        """A pair ``x`` (n, c, H, W) -> a pair (n, c, H, W)."""
        n, c, h, w = x[0].shape
        d = c // self.heads
        qkv = tg.linear(self.qkv, *tg.group_norm(self.norm, *x))
        q, k, v = (tg.linear_map(lambda a, i=i: a.reshape(n, 3, self.heads, d, h * w)[:, i], qkv) for i in range(3))
        logits = tg.bilinear(lambda a, b: torch.einsum("nhdi,nhdj->nhij", a, b) / math.sqrt(d), q, k)
        out = tg.bilinear(lambda a, b: torch.einsum("nhij,nhdj->nhdi", a, b), tg.softmax(*logits), v)
        out = tg.linear(self.proj, *tg.linear_map(lambda a: a.reshape(n, c, h, w), out))
        return tg.linear_map(torch.add, x, out)


class Down(nn.Module):
    """One level of the down path: a residual block (and attention), then 2×2 average pooling unless deepest."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, pool: bool, heads: int = 0):
        super().__init__()
        self.block = ResBlock(c_in, c_out, emb_dim)
        self.attn = Attention(c_out, heads) if heads else None
        self.pool = pool

    def forward(self, x, emb):
        """Return pairs ``(skip, h)``: the block's output and its (pooled) continuation."""
        skip = self.block(x, emb)
        if self.attn is not None:
            skip = self.attn(skip)
        return skip, (tg.linear_map(lambda h: F.avg_pool2d(h, 2), skip) if self.pool else skip)


class Up(nn.Module):
    """One level of the up path: nearest ×2 upsampling unless deepest, concat skip, residual block (and attention)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, upsample: bool, heads: int = 0):
        super().__init__()
        self.block = ResBlock(c_in + c_out, c_out, emb_dim)
        self.attn = Attention(c_out, heads) if heads else None
        self.upsample = upsample

    def forward(self, x, skip, emb):
        """Pairs in, a pair out."""
        if self.upsample:
            x = tg.linear_map(lambda h: F.interpolate(h, scale_factor=2, mode="nearest"), x)
        h = self.block(tg.linear_map(lambda a, b: torch.cat([a, b], dim=1), x, skip), emb)
        return h if self.attn is None else self.attn(h)


class UNet(nn.Module):
    """``UNet(cfg)(x, cond, y=None)``: images ``x`` (n, C, H, W) to (n, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("freqs", torch.as_tensor(frequencies(cfg.emb_dim)), persistent=False)
        chs = [cfg.base * m for m in cfg.mults]
        last = len(chs) - 1
        self.emb_in = nn.Linear(cfg.n_cond * cfg.emb_dim, cfg.emb_dim)
        self.emb_out = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        if cfg.n_classes:
            self.label_emb = nn.Embedding(cfg.n_classes + 1, cfg.emb_dim)  # last row: "no label"
        self.conv_in = nn.Conv2d(cfg.channels, cfg.base, 3, padding=1)
        self.down = nn.ModuleList(Down(c_in, c, cfg.emb_dim, pool=i < last, heads=cfg.attends(i) and cfg.heads(c))
                                  for i, (c_in, c) in enumerate(zip([cfg.base] + chs[:-1], chs)))
        self.mid = ResBlock(chs[-1], chs[-1], cfg.emb_dim)
        self.mid_attn = Attention(chs[-1], cfg.heads(chs[-1])) if cfg.attention else None
        # up[i] mirrors down[i]; it takes the output of up[i + 1] (or of mid when deepest).
        self.up = nn.ModuleList(Up(c_in, c, cfg.emb_dim, upsample=i < last, heads=cfg.attends(i) and cfg.heads(c))
                                for i, (c_in, c) in enumerate(zip(chs[1:] + chs[-1:], chs)))
        self.norm_out = nn.GroupNorm(group_count(cfg.base), cfg.base, eps=1e-5)
        self.conv_out = nn.Conv2d(cfg.base, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if cfg.log_weight_head:
            self.log_weight_head = nn.Linear(cfg.n_cond * cfg.emb_dim, 1)

    def log_weight(self, cond):
        """``w(cond)`` (n,) for ``cond`` (n, n_cond): the loss-weight head (``log_weight_head``)."""
        return self.log_weight_head(embed_conditions(torch, cond, self.freqs))[:, 0]

    def forward(self, x, cond, y=None):
        """``x`` (n, C, H, W), ``cond`` (n, n_cond), ``y`` None or labels (n,) -> (n, C, H, W)."""
        return tg.call(self.forward_pairs, x, cond, y)

    def forward_pairs(self, x, dx, cond, dcond, y):
        """The network on (primal, tangent) pairs; ``dx = dcond = None`` is the plain forward."""
        emb = tg.linear(self.emb_out, *tg.silu(*tg.linear(self.emb_in, *tg.embed(cond, dcond, self.freqs))))
        if self.cfg.n_classes:
            if y is None:
                y = torch.full((x.shape[0],), self.cfg.n_classes, device=x.device, dtype=torch.long)
            emb = tg.linear_map(torch.add, emb, (self.label_emb(y), None))  # integer labels: no tangent
        h = unet_levels(tg.linear(self.conv_in, x, dx), emb, self.down, self.middle, self.up)
        return tg.linear(self.conv_out, *tg.silu(*tg.group_norm(self.norm_out, *h)))

    def middle(self, h, emb):
        """The deepest block, then attention when the network has any (pairs in, a pair out)."""
        h = self.mid(h, emb)
        return h if self.mid_attn is None else self.mid_attn(h)
