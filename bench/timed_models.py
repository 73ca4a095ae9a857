"""The models and decoders a timing builds: a variant in eval mode without gradients, and the decoder of its space.

Latent models decode with the SD-VAE (``--vae``, from a local folder or the Hugging Face cache, fetched there on first
use unless downloads are off: ``bench.weights``). When no weights are reachable, a randomly initialised AutoencoderKL
with the SD-VAE architecture decodes instead: weights do not change its cost, and the ``decoder`` column says so.
"""
from __future__ import annotations

import warnings

import torch

from bench.autoencoder import SD_VAE, LatentSpace, PixelSpace, load_vae
from bench.variants import build_model
from bench.weights import WeightsMissing

# SD-VAE (sd-vae-ft-mse) architecture, for decoding cost when its weights are not on this machine.
SD_VAE_ARCH = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                   block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", scaling_factor=0.18215, sample_size=256)
RANDOM_VAE_LABEL = "sd-vae-arch, random weights"
PIXEL_DECODER_LABEL = "none (pixel space)"


def eval_model(name: str, preset: str, overrides: dict, device: torch.device | str) -> torch.nn.Module:
    """The variant ``name`` with ``overrides`` on ``device``, in eval mode without gradients."""
    return build_model(name, preset, overrides, device).eval().requires_grad_(False)


def sd_vae_architecture() -> torch.nn.Module:
    """A randomly initialised AutoencoderKL with the SD-VAE architecture, on the current default device."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_ARCH)


def load_decoder(space: str, vae: str | None, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(module with .decode, label) for a model space: identity for pixels, the SD-VAE (or its architecture)."""
    if space != "latent":
        return PixelSpace().to(device), PIXEL_DECODER_LABEL
    try:
        with warnings.catch_warnings():  # the hub client's deprecation notices are not the user's concern
            warnings.simplefilter("ignore")
            return LatentSpace(load_vae(vae or SD_VAE), vae or SD_VAE).to(device), vae or SD_VAE
    except WeightsMissing:  # not cached and not fetched (offline, no network); a wrong file is still an error
        if vae:  # weights the user asked for by name must exist
            raise
    return LatentSpace(sd_vae_architecture(), RANDOM_VAE_LABEL).to(device), RANDOM_VAE_LABEL
