"""The one table of what each size preset spends: training recipes per backbone, and the rest of a run.

``RECIPES[preset][model]``: how a backbone is optimised at a preset (``Recipe``), with the source of each
entry. ``BUDGETS[preset]``: everything else a preset decides (``Budget``): the trainer's bookkeeping (checkpoint,
log and sample-grid cadence, data-loader workers, the size of the synthetic set) and what ``bench run`` spends on
samples, the face parser, quality and speed. ``bench train`` and ``bench run`` both read these tables, so a backbone
trains the same way whichever command starts it; every field can be overridden on the command line, and each
field's help text is stored with the field (``help_text``).

A backbone without an entry of its own (a plugin, say) uses the preset's ``DEFAULT`` recipe; a variant such as
``sisma:scan=raster`` uses its backbone's recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError

DEFAULT = "*"  # key of the recipe used by backbones without one of their own


def doc(text: str, **kw) -> Any:
    """A dataclass field with its help text in the metadata (``help_text`` reads it back)."""
    return field(metadata={"help": text}, **kw)


def help_text(cls: type, name: str) -> str:
    """The help text stored with field ``name`` of dataclass ``cls``."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


@dataclass(frozen=True)
class Recipe:
    """How one backbone is optimised at one preset, and where that recipe comes from."""

    steps: int = doc("Training steps (on resume: train up to this step).")
    batch_size: int = doc("Global batch, split evenly over DDP processes.")
    lr: float = doc("AdamW learning rate (no weight decay).")
    warmup: int = doc("Linear learning-rate warm-up steps.")
    ema_decay: float = doc("EMA decay of the weights used for sampling.")
    precision: str = doc("fp32, bf16 (autocast) or fp16 (autocast + grad scaler).")
    p_uncond: float = doc("Probability of training a sample on the null mask (classifier-free guidance).")
    grad_clip: float = doc("Max global gradient norm (0: no clipping).")
    source: str = doc("Where the recipe comes from.", default="")


@dataclass(frozen=True)
class Budget:
    """What one preset spends beyond the recipes: the trainer's bookkeeping and `bench run`'s other stages."""

    note: str = doc("What the preset is for.")
    synth_n: int = doc("Faces in the default synthetic set (1 in 15 in the test split).")
    ckpt_every: int = doc("Checkpoint interval in steps: how much an interrupted run can lose.")
    keep_every: int = doc("Keep a snapshot step_N.pt every N steps (0: only last.pt).")
    sample_every: int = doc("Interval of the trainer's own sample grids (steps).")
    log_every: int = doc("Append a loss.csv row every N steps.")
    grid_masks: int = doc("Test masks in the trainer's sample grids (two samples each).")
    grid_steps: int = doc("Euler steps of the trainer's sample grids.")
    workers: int = doc("DataLoader worker processes of the trainer.")
    parser_steps: int = doc("Face-parser training steps (mask mIoU).")
    parser_batch: int = doc("Face-parser batch.")
    sample_masks: int = doc("Test masks in the report's sample grid (one sample per model each).")
    sample_steps: int = doc("Euler steps of the report's grid samples.")
    quality_masks: int = doc("Test masks scored (0: the whole test split).")
    quality_samples: int = doc("Samples per mask (diversity; sample 0 for FID).")
    quality_steps: int = doc("Euler steps of the scored samples.")
    speed_steps: int = doc("Euler steps of one timed image (the paper's 200).")
    speed_batch_sizes: tuple = doc("Batch sizes timed: batch 1 for latency, the largest for images/s.")
    speed_scales: tuple = doc("Extra resolutions (times the preset's) timed per NFE at batch 1 (scaling).")
    speed_warmup: int = doc("Untimed evaluations before timing.")
    speed_repeats: int = doc("Timed evaluations per setting.")
    speed_scale_repeats: int = doc("Timed evaluations at the extra resolutions.")
    speed_image_repeats: int = doc("Timed whole images per setting.")
    full_image_max_seconds: float = doc("A whole image projected to take longer is projected, not measured (s).")
    paper_flops: bool = doc("Also count FLOPs of the paper presets at 256/512/1024 px (meta device).")


# Field names of Budget that are TrainConfig fields too: the trainer's bookkeeping.
TRAINER_FIELDS = ("synth_n", "ckpt_every", "keep_every", "sample_every", "log_every", "grid_masks", "grid_steps",
                  "workers")

PAPER_SOURCE = "SISMA paper (batch 8, lr 4e-3, 150k iterations); EMA 0.9999 and bf16 as in DiT"
SMALL_SOURCE = ("one shared small-scale recipe: lr 1e-3 with a short warm-up (4e-3 over so few steps makes the "
                "loss jump at these widths), EMA fast enough for the short run, 10% mask drop for guidance")

_PAPER = Recipe(steps=150_000, batch_size=8, lr=4e-3, warmup=0, ema_decay=0.9999, precision="bf16", p_uncond=0.0,
                grad_clip=1.0, source=PAPER_SOURCE)
_CPU = Recipe(steps=600, batch_size=8, lr=1e-3, warmup=20, ema_decay=0.98, precision="fp32", p_uncond=0.1,
              grad_clip=1.0, source=SMALL_SOURCE)
_TINY = Recipe(steps=20, batch_size=4, lr=1e-3, warmup=0, ema_decay=0.9, precision="fp32", p_uncond=0.1,
               grad_clip=1.0, source=SMALL_SOURCE)

RECIPES: dict[str, dict[str, Recipe]] = {
    "paper": {DEFAULT: _PAPER, "sisma": _PAPER, "dit": _PAPER, "sdm": _PAPER},
    "cpu": {DEFAULT: _CPU, "sisma": _CPU, "dit": _CPU, "sdm": _CPU},
    "tiny": {DEFAULT: _TINY, "sisma": _TINY, "dit": _TINY, "sdm": _TINY},
}

BUDGETS: dict[str, Budget] = {
    # CI's end-to-end test: under a minute of CPU time (one thread, quiet machine).
    "tiny": Budget(
        note="a smoke test of the whole pipeline: 0.3M-parameter models at 16 px, 20 training steps, 4 test "
             "masks, 10 sampling steps; its numbers say nothing about the backbones.",
        synth_n=64, ckpt_every=10, keep_every=0, sample_every=10, log_every=1, grid_masks=4, grid_steps=8,
        workers=0, parser_steps=100, parser_batch=16, sample_masks=4, sample_steps=20, quality_masks=4,
        quality_samples=2, quality_steps=10, speed_steps=200, speed_batch_sizes=(1, 4), speed_scales=(2,),
        speed_warmup=1, speed_repeats=3, speed_scale_repeats=3, speed_image_repeats=1, full_image_max_seconds=5.0,
        paper_flops=False),
    # The embedded default: about 20 minutes on two CPU cores.
    "cpu": Budget(
        note="about 3.4M-parameter models at 32 px in pixel space (256 tokens, like the paper's latent grid), "
             "trained for a few hundred steps on synthetic faces: a small-scale comparison under one trainer, "
             "sampler, timer and protocol, not a reproduction of the paper's numbers. Quality uses fewer masks, "
             "samples and sampling steps than the paper's protocol (see the budget table).",
        synth_n=2000, ckpt_every=50, keep_every=0, sample_every=200, log_every=10, grid_masks=4, grid_steps=50,
        workers=1, parser_steps=1000, parser_batch=32, sample_masks=6, sample_steps=50, quality_masks=24,
        quality_samples=4, quality_steps=20, speed_steps=200, speed_batch_sizes=(1, 8), speed_scales=(2, 4),
        speed_warmup=2, speed_repeats=10, speed_scale_repeats=3, speed_image_repeats=2, full_image_max_seconds=15.0,
        paper_flops=True),
    # The paper's experiment, with --data CelebAMask-HQ on a GPU machine: days of training.
    "paper": Budget(
        note="the paper's setting (150k steps at batch 8, EMA 0.9999, the whole test split, 10 samples per mask, "
             "200 steps); meant for a GPU and the real CelebAMask-HQ (--data).",
        synth_n=30_000, ckpt_every=5000, keep_every=50_000, sample_every=5000, log_every=100, grid_masks=4,
        grid_steps=50, workers=4, parser_steps=3000, parser_batch=32, sample_masks=8, sample_steps=200,
        quality_masks=0, quality_samples=10, quality_steps=200, speed_steps=200, speed_batch_sizes=(1, 8),
        speed_scales=(2,), speed_warmup=5, speed_repeats=20, speed_scale_repeats=10, speed_image_repeats=3,
        full_image_max_seconds=120.0, paper_flops=True),
}


def presets() -> list[str]:
    """Preset names the tables know."""
    return list(BUDGETS)


def budget(preset: str) -> Budget:
    """The budget of a preset; one-line error listing the presets otherwise."""
    if preset not in BUDGETS:
        raise BenchError(f"unknown preset {preset!r}; available: {', '.join(BUDGETS)}")
    return BUDGETS[preset]


def recipe(preset: str, model: str) -> Recipe:
    """The recipe of backbone ``model`` (a registered name, not a variant) at ``preset``."""
    budget(preset)
    table = RECIPES[preset]
    return table.get(model, table[DEFAULT])


def train_defaults(preset: str, model: str) -> dict:
    """TrainConfig defaults of ``model`` at ``preset``: its recipe and the preset's trainer bookkeeping."""
    r, b = recipe(preset, model), budget(preset)
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(Recipe) if f.name != "source"}
    out.update({name: getattr(b, name) for name in TRAINER_FIELDS})
    return out
