"""The contract every backbone keeps, built in or plugged in (tests/test_backbone_contract.py checks it).

A backbone is an ``nn.Module`` built by a registered constructor ``fn(preset, **overrides)`` from a config
dataclass; the trainer, sampler, timer and metrics rely on nothing else than these attributes and ``forward``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

SPACES = ("pixel", "latent")


@runtime_checkable
class Backbone(Protocol):
    """``forward(x, t, mask) -> v``: x (B, C, H, W) in the model's space, t (B,) in [0, 1] (noise at 0, data at 1),
    mask (B, num_classes, image_size, image_size) one-hot (all zeros: the null mask of guidance); v, the
    velocity, has x's shape. A wrong shape of x or mask raises ValueError naming the expected one."""

    config: Any  # a dataclass; its fields are the overrides the constructor and variants accept
    space: str  # "pixel" or "latent"
    input_shape: tuple[int, int, int]  # (C, H, W) of x
    image_size: int  # pixel resolution of images and masks
    num_classes: int  # K, mask classes
    num_tokens: int | None  # sequence length of token backbones, None for convolutional ones

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor, t: Tensor, mask: Tensor) -> Tensor: ...
