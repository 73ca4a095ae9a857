"""DiT-SIS: the attention baseline, SISMA with attention where SISMA has Mamba.

Block (``models.layers.AdaLNZeroBlock``, the same class as SISMA's, 9 modulation vectors):
    x = x + gate_s * SelfAttention(modulate(LN(x), shift_s, scale_s))
    x = x + gate_c * CrossAttention(modulate(LN(x), shift_c, scale_c), m)   # keys/values: mask tokens m
    x = x + gate_f * MLP(modulate(LN(x), shift_f, scale_f))
With ``cond="add"`` the cross sub-layer is ``MaskAdd`` (x = x + gate_c * W m, the mask token of each position
added at that position; 7 modulation vectors): an aligned baseline that need not learn where a mask token
belongs. Attention runs through torch's scaled_dot_product_attention, so fused (flash / memory-efficient)
kernels engage on GPU. Everything else is shared with SISMA (models/layers.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.layers import TokenBackbone, TokenConfig
from models.registry import register_model

CONDS = ("cross", "add")


@dataclass(frozen=True)
class DiTConfig(TokenConfig):
    """TokenConfig plus the number of attention heads."""

    num_heads: int = 16
    cond: str = "cross"  # how blocks read the mask tokens: "cross" (cross-attention) or "add" (MaskAdd)

    def __post_init__(self):
        super().__post_init__()
        if self.cond not in CONDS:
            raise ValueError(f"unknown cond {self.cond!r}; available: {', '.join(CONDS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


PRESETS = {
    # Same width, depth and tokens as SISMA's paper preset; 16 heads of 64 channels.
    "paper": DiTConfig(space="latent", in_channels=4, input_size=32, image_size=256, patch_size=2,
                       width=1024, depth=24, num_heads=16),
    # An attention block has ~25 width^2 parameters against SISMA's ~34 width^2: at SISMA's cpu width,
    # 8 blocks instead of 6 give the same parameter count (within 1%). Heads of 32 channels.
    "cpu": DiTConfig(space="pixel", in_channels=3, input_size=32, image_size=32, patch_size=2,
                     width=128, depth=8, num_heads=4),
    # SISMA's tiny width with 3 blocks instead of 2, for the same reason (within 7%). Heads of 16 channels.
    "tiny": DiTConfig(space="pixel", in_channels=3, input_size=16, image_size=16, patch_size=2,
                      width=64, depth=3, num_heads=4),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention over the image tokens."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Multi-head attention with queries from the image tokens and keys/values from the mask tokens."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        k, v = self.kv(m).view(B, m.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, Lm, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class MaskAdd(nn.Module):
    """Aligned conditioning: the projected mask token of each position, added at that position.

    It is cross-attention in which query l may attend only to mask token l: the softmax over one key is 1, so
    the output is W_o W_v m_l, here one Linear. Like Cross-Mamba (which reads mask token l at scan step l) and
    SPADE (per pixel), the mask arrives where it belongs instead of being found through position embeddings.
    """

    reads_x = False  # AdaLNZeroBlock gives it only m

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: None, m: Tensor) -> Tensor:
        return self.proj(m)


class DiTSIS(TokenBackbone):
    """DiT-SIS backbone: ``forward(x, t, mask) -> v`` (see TokenBackbone)."""

    config: DiTConfig

    def make_mixers(self, index: int) -> tuple[SelfAttention, nn.Module]:
        cfg = self.config
        cross = CrossAttention(cfg.width, cfg.num_heads) if cfg.cond == "cross" else MaskAdd(cfg.width)
        return SelfAttention(cfg.width, cfg.num_heads), cross


@register_model("dit", presets=PRESETS)
def dit(preset: str = "paper", **overrides) -> DiTSIS:
    """DiT-SIS at a size preset; keyword overrides replace fields of the preset's DiTConfig."""
    return DiTSIS(dataclasses.replace(PRESETS[preset], **overrides))
