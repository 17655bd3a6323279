"""The small image U-Net, as a torch ``nn.Module``.

Its ``state_dict`` keys and shapes (``down.{i}.block.conv1.weight``, ``emb_in.weight``,
...) are the exchange format shared with the JAX backend's U-Net.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..architectures import UNetConfig, group_count, unet_levels
from ..embedding import embed_conditions, frequencies


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
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Residual self-attention over the pixels: GroupNorm, a 1×1 conv to queries, keys and values,
    ``softmax(q·k/√d)`` per head, a 1×1 output conv that starts at zero.  Written with einsum and
    softmax: the fused kernels of ``F.scaled_dot_product_attention`` have no forward-mode AD, which
    ``bk.jvp`` needs."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(ch), ch, eps=1e-5)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x):
        n, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, d, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("nhdi,nhdj->nhij", q, k) / math.sqrt(d), dim=-1)
        return x + self.proj(torch.einsum("nhij,nhdj->nhdi", weights, v).reshape(n, c, h, w))


class Down(nn.Module):
    """One level of the down path: a residual block (and attention), then 2×2 average pooling unless deepest."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, pool: bool, heads: int = 0):
        super().__init__()
        self.block = ResBlock(c_in, c_out, emb_dim)
        self.attn = Attention(c_out, heads) if heads else None
        self.pool = pool

    def forward(self, x, emb):
        """Return ``(skip, h)``: the block's output and its (pooled) continuation."""
        skip = self.block(x, emb)
        if self.attn is not None:
            skip = self.attn(skip)
        return skip, (F.avg_pool2d(skip, 2) if self.pool else skip)


class Up(nn.Module):
    """One level of the up path: nearest ×2 upsampling unless deepest, concat skip, residual block (and attention)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, upsample: bool, heads: int = 0):
        super().__init__()
        self.block = ResBlock(c_in + c_out, c_out, emb_dim)
        self.attn = Attention(c_out, heads) if heads else None
        self.upsample = upsample

    def forward(self, x, skip, emb):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.block(torch.cat([x, skip], dim=1), emb)
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
        emb = self.emb_out(F.silu(self.emb_in(embed_conditions(torch, cond, self.freqs))))
        if self.cfg.n_classes:
            if y is None:
                y = torch.full((x.shape[0],), self.cfg.n_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        h = unet_levels(h, emb, self.down, self.middle, self.up)
        return self.conv_out(F.silu(self.norm_out(h)))

    def middle(self, h, emb):
        """The deepest block, then attention when the network has any."""
        h = self.mid(h, emb)
        return h if self.mid_attn is None else self.mid_attn(h)
