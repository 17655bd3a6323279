"""The networks both backends build: their configurations and the parts written once.

A network is called as ``model(x, cond, y)``: ``x`` has shape ``(n, *model_shape(cfg))``,
``cond`` ``(n, n_cond)`` holds the times the method conditions on (each embedded
sinusoidally), ``y`` is ``None`` or integer labels ``(n,)`` where label ``n_classes`` means
"no label" (classifier-free guidance).  With ``log_weight_head`` a network also has
``model.log_weight(cond)``: one scalar per row from a linear layer on the sinusoidal embedding of
``cond`` (sCM's learned loss weight ``w(τ)``), a separate head that the network's output ignores.  Each backend implements the layers; the
configurations, the GroupNorm group rule and the U-Net's skip wiring live here, once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLPConfig:
    """A residual-free MLP on flat vectors: ``depth`` hidden layers of ``width``, SiLU."""

    data_dim: int
    n_cond: int = 1
    width: int = 256
    depth: int = 4
    emb_dim: int = 64
    n_classes: int = 0
    log_weight_head: bool = False  # sCM's adaptive loss weight w(cond): model.log_weight(cond)


@dataclass(frozen=True)
class UNetConfig:
    """A U-Net for ``(channels, size, size)`` images with time/label embedding: one residual block per
    level, and self-attention after the blocks of the levels whose resolution is in ``attention``
    (and in the middle, when any), as the CIFAR-10 U-Nets of DDPM++ and its successors at 16×16."""

    channels: int
    size: int
    n_cond: int = 1
    base: int = 32
    mults: tuple[int, ...] = (1, 2)
    emb_dim: int = 128
    n_classes: int = 0
    log_weight_head: bool = False  # sCM's adaptive loss weight w(cond): model.log_weight(cond)
    attention: tuple[int, ...] = ()  # resolutions (feature-map sizes) with a self-attention block
    head_channels: int = 64  # channels per attention head

    def __post_init__(self):
        factor = 2 ** (len(self.mults) - 1)
        if self.size % factor:
            raise ValueError(f"UNet: image size {self.size} is not divisible by 2**(levels-1) = {factor} "
                             f"(mults={self.mults}); use fewer levels or another size")
        sizes = self.resolutions()
        if any(r not in sizes for r in self.attention):
            raise ValueError(f"UNet: attention resolutions {self.attention} must be among the levels' "
                             f"resolutions {sizes}")
        if not (isinstance(self.head_channels, int) and self.head_channels > 0):
            raise ValueError(f"UNet: head_channels must be a positive integer, got {self.head_channels!r}")

    def resolutions(self) -> tuple[int, ...]:
        """The feature-map size of each level, from the input's down."""
        return tuple(self.size // 2**i for i in range(len(self.mults)))

    def attends(self, level: int) -> bool:
        """Whether U-Net level ``level`` has a self-attention block."""
        return self.resolutions()[level] in self.attention

    def heads(self, channels: int) -> int:
        """Attention heads at ``channels`` channels: ``channels // head_channels`` (at least one)."""
        return max(1, channels // self.head_channels)


ModelConfig = MLPConfig | UNetConfig


def model_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Per-sample array shape a network takes and returns (flat for an MLP)."""
    if isinstance(cfg, MLPConfig):
        return (cfg.data_dim,)
    return (cfg.channels, cfg.size, cfg.size)


def group_count(channels: int) -> int:
    """GroupNorm groups of the U-Net: ``min(8, channels)``, lowered until it divides ``channels``."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def unet_levels(h, emb, down, mid, up):
    """The U-Net's skip wiring, the same in both backends: each ``down`` level returns
    ``(skip, h)``, ``mid`` transforms the deepest ``h``, and ``up[i]`` consumes ``down[i]``'s skip."""
    skips = []
    for level in down:
        skip, h = level(h, emb)
        skips.append(skip)
    h = mid(h, emb)
    for level, skip in zip(reversed(up), reversed(skips)):
        h = level(h, skip, emb)
    return h
