"""Pieces shared by the backbones: embedders, the adaLN-Zero block, final layer and the token-backbone skeleton.

SISMA and DiT-SIS patchify the input into a square grid of tokens, add a fixed 2-D sin-cos position embedding,
encode the one-hot mask to one token per grid cell with a single conv, embed the timestep, run ``depth``
``AdaLNZeroBlock``s conditioned on (timestep embedding c, mask tokens m) and map the tokens back to patches.
The block is the same class in both; only the two mixers it is given differ (``TokenBackbone.make_mixers``),
so "only the mixer differs" is the structure itself. SDM shares the sinusoidal timestep features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The sinusoidal timestep embedding was designed for integer diffusion steps 0..999: its periods span
# 1..10000. Flow-matching time t lies in [0, 1], where the high frequencies would barely move and the
# embedding of every t would look alike, so t is scaled by 1000 before it is embedded.
TIME_SCALE = 1000.0
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features (DiT's choice)
MAX_PERIOD = 10000.0  # longest period of the sinusoids, for timesteps and positions alike
LN_EPS = 1e-6


@dataclass(frozen=True)
class TokenConfig:
    """Fields shared by the token backbones; a preset is one instance (see each backbone's PRESETS)."""

    space: str  # "latent" (SD-VAE latents) or "pixel"
    in_channels: int  # channels of the model-space input (4 latent, 3 pixel)
    input_size: int  # height = width of the model-space input
    image_size: int  # pixel resolution of images and masks
    patch_size: int
    width: int  # token width D
    depth: int  # number of blocks
    num_classes: int = 19  # K, mask classes
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"space must be 'latent' or 'pixel', got {self.space!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.image_size % self.grid_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by the token grid {self.grid_size}")
        if self.width % 4:
            raise ValueError(f"width must be a multiple of 4 (2-D sin-cos position embedding), got {self.width}")

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.patch_size


def flat_tokens(x: Tensor) -> Tensor:
    """(B, L, C) -> (B * L, C) for products on 2-D tokens: a view (one operator call) where x is contiguous, else a
    copy."""
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, L, D) scaled and shifted per sample by (B, 1, D) vectors."""
    return x * (1 + scale) + shift


def sinusoidal_embedding(pos: Tensor, dim: int) -> Tensor:
    """(...,) positions -> (..., dim) features [cos, sin] at geometric frequencies 1 .. 1/MAX_PERIOD."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    args = pos.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(width: int, grid: int, device=None) -> Tensor:
    """Fixed 2-D position embedding (grid*grid, width): half the channels encode the row, half the column."""
    coords = torch.arange(grid, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each, raster order
    return torch.cat([sinusoidal_embedding(rows.flatten(), width // 2),
                      sinusoidal_embedding(cols.flatten(), width // 2)], dim=-1)


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Flow time t in [0, 1] (B,) -> (B, dim) sinusoidal features of TIME_SCALE * t (see TIME_SCALE)."""
    return sinusoidal_embedding(t * TIME_SCALE, dim)


def adaln_zero(width: int, n_vectors: int) -> nn.Sequential:
    """SiLU then Linear(width -> n_vectors * width): per-sample shift/scale/gate vectors from c.

    Zero-initialised by ``TokenBackbone.initialize_weights`` (adaLN-Zero: every block starts as identity).
    """
    return nn.Sequential(nn.SiLU(), nn.Linear(width, n_vectors * width))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (B,) -> (B, D): sinusoidal features of TIME_SCALE * t, then a two-layer MLP."""

    def __init__(self, width: int, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        freqs = timestep_features(t, self.freq_dim)  # (B, freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D): non-overlapping p x p patches, linearly projected."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class MaskEncoder(nn.Module):
    """One conv: one-hot mask (B, K, S, S) at image resolution -> mask tokens (B, L, D) on the token grid.

    Kernel = stride = S / grid, so each token sees exactly the mask pixels under its image patch; on a
    one-hot input the conv is a learned per-class embedding at each pixel of the patch, summed.
    """

    def __init__(self, num_classes: int, width: int, image_size: int, grid_size: int):
        super().__init__()
        cell = image_size // grid_size
        self.proj = nn.Conv2d(num_classes, width, kernel_size=cell, stride=cell)

    def forward(self, mask: Tensor) -> Tensor:
        return self.proj(mask).flatten(2).transpose(1, 2)  # (B, L, D)


class Mlp(nn.Module):
    """Feed-forward: Linear -> GELU (tanh approximation, as in DiT) -> Linear."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        # on 2-D tokens: the addmm F.linear makes of (B, L, D) (the same bits), without its two views, its own call
        # and weight.t()'s second one
        h = F.gelu(torch.addmm(self.fc1.bias, flat_tokens(x), self.fc1.weight.transpose(0, 1)), approximate="tanh")
        return torch.addmm(self.fc2.bias, h, self.fc2.weight.transpose(0, 1)).view(*x.shape[:-1], -1)


class AdaLNZeroBlock(nn.Module):
    """Self mixer -> cross mixer (reads the mask tokens m) -> MLP, each an adaLN-Zero residual sub-layer.

        x = x + gate_s * self_mixer(modulate(LN(x), shift_s, scale_s))
        x = x + gate_c * cross_mixer(modulate(LN(x), shift_c, scale_c), m)
        x = x + gate_f * mlp(modulate(LN(x), shift_f, scale_f))

    A cross mixer whose ``reads_x`` is False sees only m (an aligned add: ``x = x + gate_c * mixer(None, m)``);
    its sub-layer then has no norm, shift or scale, and the block 7 modulation vectors instead of 9.
    """

    def __init__(self, width: int, self_mixer: nn.Module, cross_mixer: nn.Module, mlp_ratio: float):
        super().__init__()
        self.cross_reads_x = getattr(cross_mixer, "reads_x", True)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.self_mixer = self_mixer
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS) if self.cross_reads_x else None
        self.cross_mixer = cross_mixer
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = adaln_zero(width, 9 if self.cross_reads_x else 7)
        # the 1 of 1 + scale as a tensor: an add of a Python number first converts the number (a cast and a copy)
        self.register_buffer("one", torch.ones(()), persistent=False)

    def forward(self, x: Tensor, c: Tensor, m: Tensor) -> Tensor:
        """x (B, L, D), c (B, D), m (B, L, D) -> (B, L, D)."""
        # (B, 1, D) each, from one view and one split: every operator call counts at batch 1, where a block's tensors
        # are small (chunk makes three per vector). Without the cross norm the vectors are shift, scale, gate, gate_c,
        # shift, scale, gate.
        (B, D), n = c.shape, 9 if self.cross_reads_x else 7
        v = self.adaLN_modulation(c).view(B, 1, n * D).split_with_sizes([D] * n, dim=-1)
        x = x + v[2] * self.self_mixer(self.norm1(x) * (self.one + v[1]) + v[0])
        if self.cross_reads_x:
            x = x + v[5] * self.cross_mixer(self.norm2(x) * (self.one + v[4]) + v[3], m)
        else:
            x = x + v[3] * self.cross_mixer(None, m)
        x = x + v[-1] * self.mlp(self.norm3(x) * (self.one + v[-2]) + v[-3])
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to patch pixels; both zero-initialised, so the model starts at v = 0."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.adaLN_modulation = adaln_zero(width, 2)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.register_buffer("one", torch.ones(()), persistent=False)  # as AdaLNZeroBlock's

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        (B, D) = c.shape
        shift, scale = self.adaLN_modulation(c).view(B, 1, 2 * D).split_with_sizes([D, D], dim=-1)  # (B, 1, D) each
        return self.linear(self.norm(x) * (self.one + scale) + shift)  # (B, L, p*p*C)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, L, p*p*C) tokens in raster order -> (B, C, H, W)."""
    B, L, _ = x.shape
    g, p = math.isqrt(L), patch_size
    x = x.reshape(B, g, g, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, g * p, g * p)


def check_inputs(model: nn.Module, x: Tensor, mask: Tensor) -> None:
    """ValueError naming the expected and the received shape when x or the mask does not fit ``model`` (its
    input_shape, num_classes and image_size)."""
    name = type(model).__name__
    if x.dim() != 4 or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(f"{name}: x must have shape (B, {', '.join(map(str, model.input_shape))}), "
                         f"got {tuple(x.shape)}")
    K, S = model.num_classes, model.image_size
    if mask.dim() != 4 or tuple(mask.shape) != (x.shape[0], K, S, S):
        raise ValueError(f"{name}: mask must be one-hot of shape (B, K, S, S) = ({x.shape[0]}, {K}, {S}, {S}) "
                         f"(K = {K} classes at the image resolution {S}), got {tuple(mask.shape)}")


class TokenBackbone(nn.Module):
    """Skeleton of SISMA and DiT-SIS: patchify + pos embed, mask tokens, timestep embedding, blocks, final layer."""

    def __init__(self, config: TokenConfig):
        super().__init__()
        cfg = self.config = config
        self.space = cfg.space
        self.input_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.image_size = cfg.image_size
        self.num_classes = cfg.num_classes
        self.num_tokens = cfg.grid_size ** 2

        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.width, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.mask_encoder = MaskEncoder(cfg.num_classes, cfg.width, cfg.image_size, cfg.grid_size)
        # Fixed, recomputed on construction, so not part of the state dict. Mask tokens get it too: the
        # mask conv alone does not tell a token where it sits, and cross-attention needs that.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.width, cfg.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(cfg.width, *self.make_mixers(i), cfg.mlp_ratio)
                                    for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.width, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()

    def make_mixers(self, index: int) -> tuple[nn.Module, nn.Module]:
        """(self mixer ``f(x) -> x``, cross mixer ``g(x, m) -> x``) of block ``index``, on (B, L, D) tokens."""
        raise NotImplementedError

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear layers, patch convs like Linear, N(0, 0.02) time MLP, zero adaLN and output."""

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        for conv in (self.x_embedder.proj, self.mask_encoder.proj):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                     self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_inputs(self, x: Tensor, mask: Tensor) -> None:
        """ValueError naming the expected and the received shape when x or the mask does not fit this model."""
        check_inputs(self, x, mask)

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], mask (B, K, S, S) one-hot -> velocity (B, C, H, W)."""
        self.check_inputs(x, mask)
        cfg = self.config
        # pos_embed first: a sum takes its layout from its first operand, and the patch embedding is a transposed
        # view; this way the residual stream is token-major, which every LayerNorm would otherwise copy it into
        x = self.pos_embed + self.x_embedder(x)  # (B, L, D)
        m = self.mask_encoder(mask.to(self.mask_encoder.proj.weight.dtype)) + self.pos_embed  # (B, L, D)
        c = self.t_embedder(t.expand(x.shape[0]))  # (B, D)
        for block in self.blocks:
            x = block(x, c, m)  # (B, L, D)
        x = self.final_layer(x, c)  # (B, L, p*p*C)
        return unpatchify(x, cfg.patch_size, cfg.in_channels)  # (B, C, H, W)
