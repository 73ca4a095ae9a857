"""Face parser: a compact UNet that segments a face image into the 19 classes, for mask-adherence mIoU.

It is trained on the train split of the same data set the backbones learn from, at the evaluation resolution, and
scored on real test images: that score is the ceiling for the mIoU of generated images, which are parsed by the same
network and compared with the masks they were generated from. mIoU is defined in ``bench.metrics``.

Checkpoints hold the network configuration, the resolution and the test mIoU beside the weights, and are written
atomically. The default location is ``results/parser/parser-{size}px.pt``, where ``bench quality`` looks for it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.data import CLASS_NAMES, FLIP_PERMUTATION, NUM_CLASSES, FaceDataset
from bench.errors import BenchError
from bench.io import save_torch, to_uint8
from bench.metrics import confusion_matrix, miou

CHECKPOINT_FORMAT = "sis-bench-face-parser/1"
DEFAULT_DIR = Path("results/parser")
GROUPS = 8  # GroupNorm groups
BOTTLENECK_PX = 8    # default depth: downsample until about 8 x 8 cells, whose receptive field spans the whole face
WIDE_UP_TO_PX = 32   # default width: 32 channels at full resolution up to this size, 16 above (a step stays cheap)


def default_parser_path(size: int) -> Path:
    """Where ``bench parser train`` saves, and ``bench quality`` looks for, the parser of a resolution."""
    return DEFAULT_DIR / f"parser-{size}px.pt"


# --------------------------------------------------------------------------- network
@dataclass
class ParserConfig:
    """Shape of the parser network."""

    size: int = 32                 # image resolution it is trained and run at
    width: int = 32                # channels at full resolution; doubled at each level down
    levels: int = 2                # number of 2x downsamplings
    num_classes: int = NUM_CLASSES

    @classmethod
    def for_size(cls, size: int) -> "ParserConfig":
        """The default network for a resolution: 32 px -> width 32, 2 levels; 64 -> 16, 3; 128 -> 16, 4.

        Depth grows with the size because left and right parts (eyes, brows, ears) look alike and differ only by
        where they sit in the face, which the bottleneck must see whole.
        """
        levels = max(2, int(math.log2(max(size, 1) / BOTTLENECK_PX)))
        while levels > 2 and size % 2 ** levels:
            levels -= 1
        return cls(size=size, width=32 if size <= WIDE_UP_TO_PX else 16, levels=levels)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv -> GroupNorm -> SiLU layers."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(GROUPS, cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(GROUPS, cout), nn.SiLU(),
        )


class FaceParser(nn.Module):
    """UNet: image (B, 3, S, S) in [-1, 1] -> class logits (B, K, S, S)."""

    def __init__(self, config: ParserConfig):
        super().__init__()
        if config.size % (2 ** config.levels):
            raise BenchError(f"parser size {config.size} is not divisible by 2^{config.levels}; "
                             f"use a multiple of {2 ** config.levels}")
        self.config = config
        widths = [config.width * 2 ** i for i in range(config.levels + 1)]
        self.encoder = nn.ModuleList([ConvBlock(3, widths[0])] +
                                     [ConvBlock(widths[i], widths[i + 1]) for i in range(config.levels)])
        self.decoder = nn.ModuleList([ConvBlock(widths[i + 1] + widths[i], widths[i])
                                      for i in reversed(range(config.levels))])
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))   # (B, w_i, S/2^i, S/2^i)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skips.pop()], dim=1))    # (B, w_i, S/2^i, S/2^i)
        return self.head(x)                                  # (B, K, S, S)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Label map (B, S, S) int64 of images in [-1, 1], resized to the parser's resolution if needed."""
        size = self.config.size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self(images).argmax(1)


# --------------------------------------------------------------------------- training
@dataclass
class ParserTrainConfig:
    """Optimisation settings of ``bench parser train``."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100              # linear learning-rate warm-up steps, then cosine decay to 0
    dice: float = 1.0              # weight of the soft-Dice term added to the cross-entropy
    seed: int = 0


def load_split(data: Path, split: str, size: int, limit: int | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` faces of a split held in memory: images (N, 3, S, S) uint8, labels (N, S, S) uint8.

    Holding a split as uint8 makes each training step a tensor index instead of JPEG decodes (the whole
    CelebAMask-HQ train split at 256 px is about 7 GB). An empty split is a one-line error from FaceDataset.
    """
    from tqdm import tqdm

    ds = FaceDataset(data, split=split, size=size)
    n = len(ds) if limit is None else min(limit, len(ds))
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, size, size, dtype=torch.uint8)
    for i in tqdm(range(n), desc=f"loading {split}", unit="face", disable=not progress):
        item = ds[i]
        images[i] = to_uint8(item["image"][None])[0]
        labels[i] = item["label"]
    return images, labels


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless random batches (images in [-1, 1], int64 labels), each face mirrored with probability 1/2."""
    flip_classes = torch.as_tensor(FLIP_PERMUTATION)
    while True:
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x, y = images[idx].float() / 127.5 - 1, labels[idx].long()
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        y[flip] = flip_classes[y[flip].flip(-1)]  # a mirrored face swaps its left and right parts
        yield x, y


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the batch: unlike the cross-entropy, which small parts
    (lips, brows, earrings) barely move, every class weighs the same here, as it does in mIoU."""
    probs = logits.softmax(1)                                                    # (B, K, S, S)
    target = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * target).sum((0, 2, 3))                                      # (K,)
    dice = (2 * inter + eps) / (probs.sum((0, 2, 3)) + target.sum((0, 2, 3)) + eps)
    return 1 - dice[target.sum((0, 2, 3)) > 0].mean()


def _lr_factor(step: int, cfg: ParserTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def train_parser(data: Path, config: ParserConfig, train: ParserTrainConfig, device: torch.device | str = "cpu",
                 progress: bool = True) -> FaceParser:
    """Train a parser on the train split of ``data`` (random horizontal flips): cross-entropy plus soft Dice."""
    from tqdm import tqdm

    device = torch.device(device)
    torch.manual_seed(train.seed)
    model = FaceParser(config).to(device)  # before loading, so that a size the network cannot take fails at once
    images, labels = load_split(data, "train", config.size, progress=progress)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, train))
    batches = _batches(images, labels, train.batch_size, torch.Generator().manual_seed(train.seed))
    model.train()
    with tqdm(range(train.steps), desc="parser", unit="step", disable=not progress) as bar:
        for step in bar:
            x, y = (t.to(device) for t in next(batches))
            logits = model(x)
            loss = F.cross_entropy(logits, y) + train.dice * soft_dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def parser_confusion(model: FaceParser, images: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 64) -> torch.Tensor:
    """Confusion matrix of the parser on uint8 images (N, 3, S, S) against label maps (N, S, S)."""
    return per_image_confusion(model, images, labels, batch_size).sum(0)


@torch.no_grad()
def per_image_confusion(model: FaceParser, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 64) -> torch.Tensor:
    """(N, K, K) confusion matrices of the parser, one per uint8 image (N, 3, S, S) against its label map."""
    device = next(model.parameters()).device
    K = model.config.num_classes
    out = torch.zeros(len(images), K, K, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 127.5 - 1
        pred = model.predict(x).cpu()
        for k, (p_, t_) in enumerate(zip(pred, labels[start:start + batch_size])):
            out[start + k] = confusion_matrix(p_, t_, K)
    return out


def evaluate(model: FaceParser, data: Path, split: str = "test", limit: int | None = None,
             batch_size: int = 64) -> float:
    """mIoU of the parser on the real images of a split (the first ``limit`` of them)."""
    images, labels = load_split(data, split, model.config.size, limit)
    return miou(parser_confusion(model, images, labels, batch_size))


# --------------------------------------------------------------------------- save / load
def save_parser(model: FaceParser, path: Path, meta: dict) -> None:
    """Write the parser with its config, resolution, class names and ``meta`` (training facts) atomically."""
    save_torch(path, {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(model.config),
        "size": model.config.size,
        "class_names": list(CLASS_NAMES),
        "state_dict": model.state_dict(),
        "meta": meta,
    })


def load_parser(path: Path, device: torch.device | str = "cpu") -> tuple[FaceParser, dict]:
    """(parser, meta) from a file written by ``save_parser``; a missing or foreign file is a one-line error."""
    path = Path(path)
    fix = f"train one with: bench parser train --data DIR --out {path}"
    if not path.is_file():
        raise BenchError(f"no face parser at {path}; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(ckpt.get("format"))
        model = FaceParser(ParserConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the fix is the same
        raise BenchError(f"{path} is not a readable sis-bench face parser ({type(e).__name__}); {fix}") from e
    return model.to(device).eval(), ckpt.get("meta", {})


def train_and_save(data: Path, size: int, train: ParserTrainConfig, out: Path | None = None, width: int | None = None,
                   levels: int | None = None, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Train the parser for ``size`` px on the train split of ``data``, score it on the test split, save it to
    ``out`` (default ``default_parser_path(size)``); returns {path, test_miou, seconds}."""
    out = Path(out) if out is not None else default_parser_path(size)
    FaceDataset(data, split="test", size=size)  # an empty test split fails now, not after training
    started = time.perf_counter()
    config = ParserConfig.for_size(size)
    config = dataclasses.replace(config, width=config.width if width is None else width,
                                 levels=config.levels if levels is None else levels)
    model = train_parser(data, config, train, device, progress)
    seconds = time.perf_counter() - started
    test_miou = evaluate(model, data, "test")
    save_parser(model, out, {"data": str(data), **dataclasses.asdict(train), "train_seconds": round(seconds, 1),
                             "test_miou": test_miou})
    return {"path": out, "test_miou": test_miou, "seconds": seconds}
