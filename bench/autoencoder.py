"""The space the flow runs in: pixels as they are, or latents of a frozen diffusers ``AutoencoderKL``.

Latents are the posterior mean times the VAE's scaling factor (0.18215 for the SD VAE, read from its
config): the mean is deterministic, so a latent can be cached per image and a resumed run sees the same
data, and the SD VAE's posterior standard deviation is small next to the spread of the means.
``--vae`` names a local diffusers folder, or a hub id: that one is taken from the Hugging Face cache, where
``bench.weights`` fetches it on first use (unless downloads are off) and checks every file's hash before use.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from bench import weights
from bench.errors import BenchError
from bench.io import save_torch

SD_VAE = "stabilityai/sd-vae-ft-mse"  # the SD VAE (paper: "a pre-trained VAE", as in DiT)
SD_VAE_SCALE = 0.18215  # scaling factor of the SD VAE: latents of unit variance


class PixelSpace(nn.Module):
    """The identity: the flow runs on images in [-1, 1]."""

    name = "pixel"
    channels = 3
    downsample = 1

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x.clamp(-1, 1)


class LatentSpace(nn.Module):
    """A frozen AutoencoderKL: images (B, 3, S, S) in [-1, 1] <-> latents (B, C, S/f, S/f) times the scale."""

    def __init__(self, vae: nn.Module, name: str):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALE)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (posterior.mean * self.scale).float()

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.vae.decode((x / self.scale).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def load_vae(name_or_path: str):
    """A diffusers AutoencoderKL from a local folder, or a hub id from the Hugging Face cache (fetched there on first
    use); ``bench.weights.WeightsMissing`` (one line, with the reason) when it is absent and cannot be fetched."""
    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
        if looks_like_path:
            raise BenchError(f"VAE folder {name_or_path} does not exist; pass --vae with a diffusers AutoencoderKL "
                             f"folder or a hub id such as {SD_VAE}")
        path = weights.resolve_snapshot(weights.hub_snapshot_for(name_or_path))
    try:
        with warnings.catch_warnings():  # diffusers' deprecation chatter is not news
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path} is not a diffusers AutoencoderKL folder (config.json + "
                         f"diffusion_pytorch_model.safetensors): {str(e).splitlines()[0]}") from None


def load_space(space: str, vae: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """PixelSpace, or the LatentSpace of the VAE ``vae`` (local folder or hub id), on ``device``."""
    if space == "pixel":
        return PixelSpace().to(device)
    if space != "latent":
        raise BenchError(f"unknown space {space!r}; use pixel or latent")
    if not vae:
        raise BenchError(f"latent space needs a VAE: pass --vae FOLDER or a hub id (e.g. {SD_VAE})")
    return LatentSpace(load_vae(vae), vae).to(device)


class LatentCache:
    """Latents of dataset images, one file per (split, index), encoded once and reused by later epochs."""

    def __init__(self, folder: Path, space: nn.Module, split: str):
        self.space = space
        tag = hashlib.sha1(space.name.encode()).hexdigest()[:8]  # a different VAE never reads stale latents
        self.folder = Path(folder) / f"{split}-{tag}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.pt"

    def encode(self, images: Tensor, indices: list[int]) -> Tensor:
        """Latents of ``images`` (B, 3, S, S), read from the cache where present, encoded and stored otherwise."""
        found = {i: self.path(i) for i in indices if self.path(i).exists()}
        missing = [k for k, i in enumerate(indices) if i not in found]
        out: list[Tensor | None] = [None] * len(indices)
        if missing:
            fresh = self.space.encode(images[missing])
            for k, z in zip(missing, fresh):
                z = z.cpu().clone()
                save_torch(self.path(indices[k]), z)
                out[k] = z
        for k, i in enumerate(indices):
            if out[k] is None:
                out[k] = torch.load(found[i], map_location="cpu", weights_only=True)
        latents = torch.stack(out)
        if images.is_cuda:  # pinned, so that the copy does not wait for the device
            return latents.pin_memory().to(images.device, non_blocking=True)
        return latents
