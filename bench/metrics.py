"""Image-quality metrics: FID/KID (torch-fidelity), LPIPS and pixel diversity, mIoU, and the weight files they need.

Weight files come from an explicit path or torch's hub cache (``torch.hub.get_dir()/checkpoints``), where
``bench.weights`` fetches them on first use unless downloads are off; their SHA-256 must match the published file
before they are used. A file that is missing and cannot be fetched raises ``WeightsMissing`` (with the reason) so the
caller can record the metric as missing instead of silently substituting a proxy; a file with the wrong hash is
always an error.

mIoU is defined over an accumulated confusion matrix: IoU_c = TP_c / (TP_c + FP_c + FN_c) for every class c that
occurs in the target or the prediction (anywhere in the evaluated set), and mIoU is their unweighted mean. Classes
absent from both are left out, so a perfect parser scores exactly 1.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bench import weights
from bench.errors import BenchError
from bench.weights import ALEXNET, INCEPTION, WeightFile, WeightsMissing, hub_checkpoint_dir, sha256_file  # noqa: F401

INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's TF-compatible Inception-v3, the standard FID network
LPIPS_MIN_SIZE = 64  # AlexNet's pooling stack needs >= 32 px; smaller images are upsampled to this size for LPIPS
KID_MAX_SUBSET = 1000  # torch-fidelity's default subset size, capped at the number of images available
KID_SUBSETS = 100  # torch-fidelity's default number of subsets


# --------------------------------------------------------------------------- weight files
WeightSpec = WeightFile  # the registry's record of a published file (bench.weights)
INCEPTION_WEIGHTS = INCEPTION
ALEXNET_WEIGHTS = ALEXNET


def resolve_weights(spec: WeightSpec, explicit: Path | str | None = None) -> Path:
    """Path of ``spec``'s file (``explicit``, or the hub cache, fetched there on first use) after checking its
    SHA-256; ``WeightsMissing`` with the reason when it is absent and cannot be fetched."""
    return weights.resolve(spec, explicit)


class _Images(Dataset):
    """A fixed set of uint8 images as the map-style dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# --------------------------------------------------------------------------- FID / KID
def fid_kid(real: torch.Tensor, fake: torch.Tensor, weights: Path | None, device: torch.device | str = "cpu",
            batch_size: int = 64, extractor: str = INCEPTION_EXTRACTOR, seed: int = 0) -> dict:
    """FID, KID and KID's std between two uint8 image sets (N, 3, H, W), computed by torch-fidelity.

    ``weights`` is the local Inception file (from ``resolve_weights``); it is required for the standard extractor so
    torch-fidelity never falls back to downloading. Another registered ``extractor`` (tests) receives it unchanged.
    """
    import torch_fidelity

    if extractor == INCEPTION_EXTRACTOR and weights is None:
        raise ValueError("the Inception extractor needs a local weights file (resolve_weights(INCEPTION_WEIGHTS))")
    if min(len(real), len(fake)) < 2:
        raise BenchError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated; "
                         "raise --n-masks")
    out = torch_fidelity.calculate_metrics(
        input1=_Images(real), input2=_Images(fake), fid=True, kid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=None if weights is None else str(weights),
        kid_subset_size=min(KID_MAX_SUBSET, len(real), len(fake)), kid_subsets=KID_SUBSETS,
        cuda=torch.device(device).type == "cuda", batch_size=batch_size,
        cache=False, save_cpu_ram=True,  # no feature cache on disk, no DataLoader worker processes
        rng_seed=seed, verbose=False,
    )
    return {
        "fid": float(out["frechet_inception_distance"]),
        "kid": float(out["kernel_inception_distance_mean"]),
        "kid_std": float(out["kernel_inception_distance_std"]),
    }


# --------------------------------------------------------------------------- diversity
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (P, 3, H, W) x2 -> (P,)


def pairwise_mean(samples: torch.Tensor, distance: Distance, batch_size: int = 64) -> float:
    """Mean of ``distance`` over all unordered pairs of ``samples`` (S, 3, H, W): S*(S-1)/2 pairs."""
    pairs = list(itertools.combinations(range(len(samples)), 2))
    if not pairs:
        raise ValueError(f"diversity needs at least 2 samples per mask, got {len(samples)}")
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        i, j = zip(*pairs[start:start + batch_size])
        total += float(distance(samples[list(i)], samples[list(j)]).sum())
    return total / len(pairs)


def diversity(groups: Iterable[torch.Tensor], distance: Distance, batch_size: int = 64) -> float:
    """Per-mask pairwise mean distance, averaged over masks (each group: the samples of one mask)."""
    per_mask = [pairwise_mean(g, distance, batch_size) for g in groups]
    if not per_mask:
        raise ValueError("diversity needs at least one mask")
    return float(np.mean(per_mask))


def pixel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per pair of images in [-1, 1]: (P, 3, H, W) x2 -> (P,). Needs no weights."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def load_lpips(alexnet_weights: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """LPIPS v0.1 (AlexNet): linear layers from the lpips wheel, AlexNet trunk from a local torchvision file."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)  # trunk random: no download
    try:
        state = torch.load(alexnet_weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-input problem
        raise BenchError(f"cannot read AlexNet weights {alexnet_weights} ({type(e).__name__}); "
                         f"pass {ALEXNET_WEIGHTS.option} with torchvision's {ALEXNET_WEIGHTS.filename}") from e
    # lpips splits torchvision's `features` Sequential into slices but keeps the layer indices:
    # slice{k}.{i}.weight is features.{i}.weight.
    trunk = {name: state.get("features." + name.split(".", 1)[1]) for name, _ in model.net.named_parameters()}
    absent = [k for k, v in trunk.items() if v is None]
    if absent:
        raise BenchError(f"{alexnet_weights} is not a torchvision AlexNet state dict (no features.* for {absent[0]}); "
                         f"pass {ALEXNET_WEIGHTS.option} with {ALEXNET_WEIGHTS.filename}")
    model.net.load_state_dict(trunk)
    return model.to(device).eval().requires_grad_(False)


def lpips_distance(model: torch.nn.Module, device: torch.device | str = "cpu") -> Distance:
    """A pairwise distance from an LPIPS model; images below LPIPS_MIN_SIZE are upsampled (bilinear) first."""

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.to(device).float(), b.to(device).float()
        if a.shape[-1] < LPIPS_MIN_SIZE:
            a = F.interpolate(a, size=LPIPS_MIN_SIZE, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=LPIPS_MIN_SIZE, mode="bilinear", align_corners=False)
        return model(a, b).flatten().cpu()

    return distance


# --------------------------------------------------------------------------- mIoU
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = target class, columns = predicted class, over all pixels of label maps."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def class_iou(conf: torch.Tensor) -> torch.Tensor:
    """IoU per class from a confusion matrix; NaN for classes absent from both target and prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def inter_union(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class intersection (true positives) and union (TP + FP + FN) of a confusion matrix, as int64 (K,)."""
    conf = conf.long()
    tp = conf.diag()
    return tp, conf.sum(0) + conf.sum(1) - tp


def miou(conf: torch.Tensor) -> float:
    """Mean IoU over the classes present in the target or the prediction (see the module docstring)."""
    iou = class_iou(conf)
    present = ~iou.isnan()
    if not present.any():
        raise ValueError("empty confusion matrix: no pixels were evaluated")
    return float(iou[present].mean())

