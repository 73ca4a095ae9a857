"""SISMA: a DiT-style flow-matching backbone whose blocks use Mamba instead of attention.

Block (``models.layers.AdaLNZeroBlock``: three adaLN-Zero residual sub-layers, 9 modulation vectors):
    x = x + gate_s * SelfMamba(modulate(LN(x), shift_s, scale_s))
    x = x + gate_c * CrossMamba(modulate(LN(x), shift_c, scale_c), m)   # B, C from the mask tokens m
    x = x + gate_f * MLP(modulate(LN(x), shift_f, scale_f))
Patchify, position embedding, mask encoder, timestep embedder, block and final layer are shared with
DiT-SIS (models/layers.py); the scan order and conv of the Mamba layers are options (models/mamba.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.layers import TokenBackbone, TokenConfig
from models.mamba import CONVS, SCAN_ORDERS, CrossMamba, SelectiveSSM, SelfMamba, scan_orders
from models.registry import register_model


@dataclass(frozen=True)
class SismaConfig(TokenConfig):
    """TokenConfig plus the Mamba settings."""

    d_state: int = 16  # N
    expand: int = 2  # d_inner = expand * width
    d_conv: int = 4  # width of the causal 1-D conv (conv "causal1d")
    dt_rank: int | None = None  # None: ceil(width / 16), as in Mamba
    # Token mixing (models/mamba.py). The default was chosen by the ablation `bench run` reports (docs/design.md,
    # "SISMA's token mixing"): one snake per block, consecutive blocks from opposite corners, and a 3 x 3 conv on the
    # token grid; raster + causal1d (strictly causal) is kept as an option.
    scan: str = "zigzag"
    conv: str = "grid2d"

    def __post_init__(self):
        super().__post_init__()
        if self.scan not in SCAN_ORDERS:
            raise ValueError(f"unknown scan order {self.scan!r}; available: {', '.join(SCAN_ORDERS)}")
        if self.conv not in CONVS:
            raise ValueError(f"unknown conv {self.conv!r}; available: {', '.join(CONVS)}")


PRESETS = {
    # The paper: SD-VAE latents of 256 px images, 16 x 16 tokens of width 1024, 24 blocks.
    "paper": SismaConfig(space="latent", in_channels=4, input_size=32, image_size=256, patch_size=2,
                         width=1024, depth=24),
    # 32 px RGB, again 16 x 16 tokens; a training step at the cpu recipe's batch 8 takes about half a second on two
    # threads (docs/timing.md).
    "cpu": SismaConfig(space="pixel", in_channels=3, input_size=32, image_size=32, patch_size=2,
                       width=128, depth=6),
    # 16 px RGB, 8 x 8 tokens, for unit tests.
    "tiny": SismaConfig(space="pixel", in_channels=3, input_size=16, image_size=16, patch_size=2,
                        width=64, depth=2),
}


class Sisma(TokenBackbone):
    """SISMA backbone: ``forward(x, t, mask) -> v`` (see TokenBackbone)."""

    config: SismaConfig

    def make_mixers(self, index: int) -> tuple[SelfMamba, CrossMamba]:
        cfg = self.config
        mamba = dict(orders=scan_orders(cfg.scan, cfg.grid_size, index), conv=cfg.conv, grid=cfg.grid_size,
                     d_state=cfg.d_state, expand=cfg.expand, d_conv=cfg.d_conv, dt_rank=cfg.dt_rank)
        return SelfMamba(cfg.width, **mamba), CrossMamba(cfg.width, **mamba)

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
