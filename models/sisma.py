"""SISMA: a DiT-style flow-matching backbone whose blocks use Mamba instead of attention.

Block (three adaLN-Zero residual sub-layers, 9 modulation vectors from the timestep embedding):
    x = x + gate_s * SelfMamba(modulate(LN(x), shift_s, scale_s))
    x = x + gate_c * CrossMamba(modulate(LN(x), shift_c, scale_c), m)   # B, C from the mask tokens m
    x = x + gate_f * MLP(modulate(LN(x), shift_f, scale_f))
Patchify, position embedding, mask encoder, timestep embedder and final layer are shared with DiT-SIS
(models/layers.py); see DESIGN.md for the paper configuration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

from models.layers import LN_EPS, Mlp, TokenBackbone, TokenConfig, adaln_zero, modulate
from models.mamba import SCAN_ORDERS, CrossMamba, SelectiveSSM, SelfMamba, scan_orders
from models.registry import register_model


@dataclass(frozen=True)
class SismaConfig(TokenConfig):
    """TokenConfig plus the Mamba settings."""

    d_state: int = 16  # N
    expand: int = 2  # d_inner = expand * width
    d_conv: int = 4  # width of the depthwise causal conv
    dt_rank: int | None = None  # None: ceil(width / 16), as in Mamba
    scan: str = "raster"  # token order of the scans: see models/mamba.py

    def __post_init__(self):
        super().__post_init__()
        if self.scan not in SCAN_ORDERS:
            raise ValueError(f"unknown scan order {self.scan!r}; available: {', '.join(SCAN_ORDERS)}")


PRESETS = {
    # The paper: SD-VAE latents of 256 px images, 16 x 16 tokens of width 1024, 24 blocks.
    "paper": SismaConfig(space="latent", in_channels=4, input_size=32, image_size=256, patch_size=2,
                         width=1024, depth=24),
    # 32 px RGB, again 16 x 16 tokens; a training step at batch 16 takes about a second on two cores.
    "cpu": SismaConfig(space="pixel", in_channels=3, input_size=32, image_size=32, patch_size=2,
                       width=128, depth=6),
    # 16 px RGB, 8 x 8 tokens, for unit tests.
    "tiny": SismaConfig(space="pixel", in_channels=3, input_size=16, image_size=16, patch_size=2,
                        width=64, depth=2),
}


class SismaBlock(nn.Module):
    """Self-Mamba -> Cross-Mamba (mask) -> FFN, each an adaLN-Zero residual."""

    def __init__(self, cfg: SismaConfig, orders: list):
        super().__init__()
        mamba = dict(orders=orders, d_state=cfg.d_state, expand=cfg.expand, d_conv=cfg.d_conv, dt_rank=cfg.dt_rank)
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=LN_EPS)
        self.self_mamba = SelfMamba(cfg.width, **mamba)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=LN_EPS)
        self.cross_mamba = CrossMamba(cfg.width, **mamba)
        self.norm3 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.adaLN_modulation = adaln_zero(cfg.width, 9)

    def forward(self, x: Tensor, c: Tensor, m: Tensor) -> Tensor:
        """x (B, L, D), c (B, D), m (B, L, D) -> (B, L, D)."""
        (shift_s, scale_s, gate_s, shift_c, scale_c, gate_c,
         shift_f, scale_f, gate_f) = self.adaLN_modulation(c).chunk(9, dim=-1)  # (B, D) each
        x = x + gate_s.unsqueeze(1) * self.self_mamba(modulate(self.norm1(x), shift_s, scale_s))
        x = x + gate_c.unsqueeze(1) * self.cross_mamba(modulate(self.norm2(x), shift_c, scale_c), m)
        x = x + gate_f.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_f, scale_f))
        return x


class Sisma(TokenBackbone):
    """SISMA backbone: ``forward(x, t, mask) -> v`` (see TokenBackbone)."""

    config: SismaConfig

    def make_block(self, index: int) -> SismaBlock:
        cfg = self.config
        return SismaBlock(cfg, scan_orders(cfg.scan, cfg.grid_size, index))

    def initialize_weights(self) -> None:
        """DiT's init for the shared parts and Linear layers, then Mamba's own init of A, D and dt."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, SelectiveSSM):
                module.reset_ssm_parameters()


@register_model("sisma", presets=PRESETS)
def sisma(preset: str = "paper", **overrides) -> Sisma:
    """SISMA at a size preset; keyword overrides replace fields of the preset's SismaConfig."""
    return Sisma(dataclasses.replace(PRESETS[preset], **overrides))
