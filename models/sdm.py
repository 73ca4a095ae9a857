"""SDM: a Semantic Diffusion Model style UNet (ADM backbone, mask injected by SPADE-GroupNorm).

The encoder sees only the noisy image; the middle block and every decoder residual block normalise
with SPADE-GroupNorm, whose per-pixel scale and shift come from the label map (one-hot mask plus an
edge channel). Pixel space; the network predicts the flow-matching velocity (see models/__init__.py). The timestep
features are ADM's sinusoids, shared with the token backbones (``models.layers.timestep_features``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import timestep_features
from models.registry import register_model


@dataclass(frozen=True)
class SDMConfig:
    """Sizes of one SDM UNet; every preset is one of these."""

    in_channels: int = 3
    image_size: int = 256
    num_classes: int = 19
    base_width: int = 256  # channels at the first level; the timestep embedding has 4x this
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)  # one level per entry, halving resolution
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sizes (px) that get self-attention
    head_channels: int = 64
    spade_hidden: int = 128  # width of SPADE's shared conv on the label map
    norm_groups: int = 32
    dropout: float = 0.0


# cpu and tiny keep the architecture and shrink widths and depth to match sisma/dit's parameter counts.
PRESETS = {
    "paper": SDMConfig(),
    "cpu": SDMConfig(image_size=32, base_width=32, channel_mult=(1, 2, 2), attention_resolutions=(16, 8),
                     head_channels=32, spade_hidden=32, norm_groups=8),
    "tiny": SDMConfig(image_size=16, base_width=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), head_channels=16, spade_hidden=12, norm_groups=8),
}


class SDM(nn.Module):
    """ADM UNet whose middle and decoder blocks are conditioned on the label map through SPADE."""

    space = "pixel"
    num_tokens = None

    def __init__(self, config: SDMConfig):
        super().__init__()
        self.config = c = config
        self.input_shape = (c.in_channels, c.image_size, c.image_size)
        self.image_size = c.image_size
        self.num_classes = c.num_classes
        label_channels = c.num_classes + 1  # one-hot mask plus the edge channel
        emb_dim = 4 * c.base_width

        self.time_embed = nn.Sequential(nn.Linear(c.base_width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin, cout, label=None, resample=None):
            return ResBlock(cin, cout, emb_dim, c.norm_groups, c.dropout, label, c.spade_hidden, resample)

        def attn(ch):
            return AttentionBlock(ch, c.head_channels, c.norm_groups)

        # Encoder: no mask. Each entry of `encoder` produces one skip tensor.
        ch = c.base_width
        resolution = c.image_size
        self.encoder = nn.ModuleList([Stage(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * c.base_width)]
                ch = mult * c.base_width
                if resolution in c.attention_resolutions:
                    layers.append(attn(ch))
                self.encoder.append(Stage(*layers))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                self.encoder.append(Stage(res(ch, ch, resample="down")))
                skip_channels.append(ch)
                resolution //= 2

        self.middle = Stage(res(ch, ch, label_channels), attn(ch), res(ch, ch, label_channels))

        # Decoder: every residual block (including the upsampling ones) is a SPADE block.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * c.base_width, label_channels)]
                ch = mult * c.base_width
                if resolution in c.attention_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(res(ch, ch, label_channels, resample="up"))
                    resolution *= 2
                self.decoder.append(Stage(*layers))

        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, c.in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Velocity for images x (B, C, H, W) at times t (B,) given one-hot masks (B, K, H, W)."""
        self._check_inputs(x, mask)
        emb = self.time_embed(timestep_features(t, self.config.base_width).to(x.dtype))  # (B, 4*base)
        label = torch.cat([mask, label_edges(mask)], dim=1).to(x.dtype)  # (B, K+1, H, W)

        h = x
        skips = []
        for stage in self.encoder:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb, label)
        for stage in self.decoder:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, label)
        return self.out(h)  # (B, C, H, W)

    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Raise ValueError naming the expected and the received shape."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"sdm expects x of shape (B, {c.in_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        expected = (x.shape[0], c.num_classes, c.image_size, c.image_size)
        if tuple(mask.shape) != expected:
            raise ValueError(f"sdm expects a one-hot mask of shape {expected} (B, K, H, W), got {tuple(mask.shape)}")


class Stage(nn.Sequential):
    """A run of blocks sharing the (h, emb, label) call; plain modules receive only h."""

    def forward(self, h, emb, label=None):
        for block in self:
            h = block(h, emb, label) if isinstance(block, ResBlock) else block(h)
        return h


class ResBlock(nn.Module):
    """ADM residual block with scale-shift timestep conditioning, optional SPADE norms and up/down sampling."""

    def __init__(self, cin, cout, emb_dim, groups, dropout, label_channels=None, spade_hidden=128, resample=None):
        super().__init__()

        def norm(ch):
            if label_channels is None:
                return GroupNorm(groups, ch)
            return SpadeGroupNorm(ch, label_channels, spade_hidden, groups)

        self.norm1 = norm(cin)
        self.resample = resample
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))  # scale and shift
        self.norm2 = norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))  # the block starts as its skip path
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, label=None):
        h = F.silu(self.norm1(x, label))
        if self.resample is not None:  # resample after the first norm, as ADM's resblock_updown does
            h, x = resize(h, self.resample), resize(x, self.resample)
        h = self.conv1(h)  # (B, cout, H', W')
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h, label) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the (x, label) call of SpadeGroupNorm; the label is ignored."""

    def forward(self, x, label=None):
        return super().forward(x)


class SpadeGroupNorm(nn.Module):
    """Parameter-free GroupNorm, then a per-pixel scale and shift predicted from the label map."""

    def __init__(self, channels, label_channels, hidden, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, label):
        label = F.interpolate(label, size=x.shape[-2:], mode="nearest")  # (B, K+1, h, w)
        a = self.shared(label)
        return self.norm(x) * (1 + self.gamma(a)) + self.beta(a)


class AttentionBlock(nn.Module):
    """ADM self-attention over all pixels: GroupNorm, 1x1 qkv, multi-head SDPA, zero-initialised 1x1 proj."""

    def __init__(self, channels, head_channels, groups):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention width {channels} is not a multiple of head_channels {head_channels}")
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww))  # (B, 3C, L)
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, hh * ww).permute(1, 0, 2, 4, 3)  # (3, B, h, L, d)
        # Fused SDPA kernels need the head dimension contiguous; without this they fall back to the slow path.
        q, k, v = qkv.contiguous().unbind(0)  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        y = y.transpose(-1, -2).reshape(b, c, hh * ww)
        return x + self.proj(y).reshape(b, c, hh, ww)


def label_edges(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where a pixel's label differs from one of its 4 neighbours (both sides marked)."""
    differs_w = (mask[..., :, 1:] != mask[..., :, :-1]).any(dim=1)  # (B, H, W-1)
    differs_h = (mask[..., 1:, :] != mask[..., :-1, :]).any(dim=1)  # (B, H-1, W)
    edge = torch.zeros_like(mask[:, 0], dtype=torch.bool)  # (B, H, W)
    edge[..., :, 1:] |= differs_w
    edge[..., :, :-1] |= differs_w
    edge[..., 1:, :] |= differs_h
    edge[..., :-1, :] |= differs_h
    return edge.unsqueeze(1).to(mask.dtype)


def resize(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Nearest 2x upsampling or 2x2 average pooling."""
    return F.interpolate(x, scale_factor=2, mode="nearest") if direction == "up" else F.avg_pool2d(x, 2)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so the branch it ends starts as a no-op (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@register_model("sdm", presets=PRESETS)
def sdm(preset: str = "paper", **overrides) -> SDM:
    """SDM UNet at a size preset; keyword overrides replace config fields."""
    return SDM(replace(PRESETS[preset], **overrides))
