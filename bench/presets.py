"""The one table of what each size preset spends: training recipes per backbone, and the rest of a run.

``RECIPES[preset][model]``: how a backbone is optimised at a preset (``Recipe``), with the source of each
entry. ``BUDGETS[preset]``: everything else a preset decides (``Budget``): the trainer's bookkeeping (checkpoint,
log and sample-grid cadence, data-loader workers, the size of the synthetic set) and what ``bench run`` spends on
samples, the face parser, quality and speed. ``bench train`` and ``bench run`` both read these tables, so a backbone
trains the same way whichever command starts it; every field can be overridden on the command line, and each
field's help text is stored with the field (``help_text``).

A backbone without an entry of its own (a plugin, say) uses the preset's ``DEFAULT`` recipe; a variant such as
``sisma:scan=raster`` uses its backbone's recipe. At ``paper`` each backbone trains with its own source's recipe
(the SISMA paper, SDM's CelebA script, the DiT paper, DiM's ImageNet-256 config); at ``cpu`` and ``tiny`` they share a
schedule and each has the learning rate that a sweep (``bench tune lr``, rows of the committed one in
results/study-cpu/lr_sweep.csv) found best for it; a backbone added later takes SISMA's and DiT-SIS's rate until it is
swept (``UNSWEPT_RATES``, said in its source).
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
    guidance: float = doc("Classifier-free guidance scale its samples are scored with (1: off).", default=1.0)
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
    quality_masks: int = doc("Test masks scored at each run's last step (0: the whole test split).")
    quality_snapshot_masks: int = doc("Test masks scored at the earlier snapshots, the first of those scored at the "
                                      "last step (0: the same masks); the curves of quality against training use "
                                      "the masks every step has.")
    quality_samples: int = doc("Samples per mask (diversity; sample 0 for FID).")
    quality_steps: int = doc("Euler steps of the scored samples.")
    quality_fractions: tuple = doc("Checkpoints scored, as fractions of each run's steps (quality against training).")
    speed_steps: int = doc("Euler steps of one timed image (the paper's 200).")
    speed_batch_sizes: tuple = doc("Batch sizes timed: batch 1 for latency, the largest for images/s.")
    speed_scales: tuple = doc("Extra resolutions (times the preset's) timed per NFE at batch 1 (scaling).")
    speed_warmup: int = doc("Untimed evaluations before timing.")
    speed_repeats: int = doc("Interleaved rounds per timing process (one timed call of every setting each).")
    speed_processes: int = doc("Timing processes, one after another (fresh interpreters when more than one).")
    speed_scale_repeats: int = doc("Timed evaluations at the extra resolutions.")
    speed_image_repeats: int = doc("Timed whole images per setting (after an untimed one).")
    full_image_max_seconds: float = doc("Whole images are timed only when the untimed one and every timed one fit "
                                        "this many seconds by the projection; otherwise projected, not measured.")
    paper_flops: bool = doc("Also count FLOPs of the paper presets at 256/512/1024 px (meta device).")


# Field names of Budget that are TrainConfig fields too: the trainer's bookkeeping.
TRAINER_FIELDS = ("synth_n", "ckpt_every", "keep_every", "sample_every", "log_every", "grid_masks", "grid_steps",
                  "workers")

# paper: each backbone's own recipe, from its source. Every run is 150k steps (the SISMA paper's length; the
# other sources do not fix one) in bf16 autocast (SDM's script uses fp16, which bf16 matches in speed without loss
# scaling): precision and steps are not allowed to differ between backbones.
PAPER = {
    "sisma": Recipe(steps=150_000, batch_size=8, lr=4e-3, warmup=0, ema_decay=0.9999, precision="bf16", p_uncond=0.0,
                    grad_clip=0.0, guidance=1.0,
                    source="SISMA paper, sec. 4.2: AdamW (default betas), batch 8, lr 4e-3, no weight decay, EMA "
                           "0.9999, 150k iterations; no mask drop or guidance, no gradient clipping mentioned"),
    "dit": Recipe(steps=150_000, batch_size=8, lr=1e-4, warmup=0, ema_decay=0.9999, precision="bf16", p_uncond=0.0,
                  grad_clip=0.0, guidance=1.0,
                  source="DiT paper: AdamW, lr 1e-4, no weight decay, no warm-up, EMA 0.9999; DiT's batch is 256, "
                         "here SISMA's batch 8 and 150k steps so that both see the same images"),
    "sdm": Recipe(steps=150_000, batch_size=32, lr=2e-5, warmup=0, ema_decay=0.9999, precision="bf16", p_uncond=0.2,
                  grad_clip=0.0, guidance=1.5,
                  source="SDM repository, scripts/celeba.sh: lr 2e-5, batch 4 on each of 8 GPUs (32), fp16, "
                         "gradient checkpointing, EMA 0.9999; its classifier-free fine-tune (mask drop 0.2) is "
                         "trained from the start here, and sampled with guidance s = 1.5 as its test script"),
}
PAPER["dim"] = Recipe(
    steps=150_000, batch_size=8, lr=2e-4, warmup=5000, ema_decay=0.9999, precision="bf16", p_uncond=0.1,
    grad_clip=1.0, guidance=1.4,
    source="DiM repository, configs/imagenet256_H_DiM.py: AdamW lr 2e-4, 5000 warm-up steps, EMA 0.9999, gradient "
           "clipping 1.0, label drop 0.1 (here the mask), guidance scale 0.4 in U-ViT's cond + s (cond - uncond), "
           "1.4 here; its weight decay 0.03 and betas (0.99, 0.99) are not applied (the one trainer's AdamW has "
           "default betas and no weight decay for every backbone); DiM's batch is 768, here SISMA's batch 8 and "
           "150k steps so that every backbone sees the same images")
PAPER[DEFAULT] = PAPER["sisma"]

# cpu and tiny: one shared schedule (steps, batch, warm-up, EMA, 10% mask drop so guidance can be tried), and a
# learning rate per backbone.
SMALL_SOURCE = "shared small-scale schedule; lr {lr:g}: {why}"
_CPU = Recipe(steps=600, batch_size=8, lr=1e-3, warmup=20, ema_decay=0.999, precision="fp32", p_uncond=0.1,
              grad_clip=1.0)
_TINY = Recipe(steps=20, batch_size=4, lr=1e-3, warmup=0, ema_decay=0.999, precision="fp32", p_uncond=0.1,
               grad_clip=1.0)


def _small(base: Recipe, lr: float, why: str) -> Recipe:
    return dataclasses.replace(base, lr=lr, source=SMALL_SOURCE.format(lr=lr, why=why))


SWEPT = ("lowest held-out flow-matching loss of its sweep over 3e-4, 1e-3, 2e-3, 4e-3, 8e-3 at 300 steps "
         "(bench tune lr --preset cpu; rows in results/study-cpu/lr_sweep.csv)")
TINY_RATE = "the cpu sweep's rate (tiny runs 20 steps, too few to tune on)"
CPU_RATES = {"sisma": 4e-3, "dit": 4e-3, "sdm": 1e-3, "dim": 2e-3}  # dim: 8e-3 diverged (a nan at step 97)
# Backbones whose cpu rate is not from the sweep yet: SISMA's and DiT-SIS's swept rate until one is run for them.
UNSWEPT = "not swept: SISMA's and DiT-SIS's swept rate, taken until `bench tune lr --preset cpu` is run for it"
UNSWEPT_RATES: dict[str, float] = {}
RECIPES: dict[str, dict[str, Recipe]] = {
    "paper": PAPER,
    "cpu": {DEFAULT: _small(_CPU, 1e-3, "not tuned for backbones without a recipe (the default small-scale rate)"),
            **{m: _small(_CPU, lr, SWEPT) for m, lr in CPU_RATES.items()},
            **{m: _small(_CPU, lr, UNSWEPT) for m, lr in UNSWEPT_RATES.items()}},
    "tiny": {DEFAULT: _small(_TINY, 1e-3, "not tuned for backbones without a recipe (the default small-scale rate)"),
             **{m: _small(_TINY, lr, TINY_RATE) for m, lr in CPU_RATES.items()},
             **{m: _small(_TINY, lr, f"the cpu preset's rate, {UNSWEPT}") for m, lr in UNSWEPT_RATES.items()}},
}

# cpu: the snapshot at half the steps is scored on the first 48 test masks (about a third of the synthetic test
# split), the last step on all of them; the curves of quality against training are drawn on those 48. (The committed
# study, results/study-cpu, scored a quarter, half and all of the steps on every mask: its state.json has its budget.)
SNAPSHOT_MASKS_CPU = 48
BUDGETS: dict[str, Budget] = {
    # CI's end-to-end test: under a minute of CPU time (one thread, quiet machine).
    "tiny": Budget(
        note="a smoke test of the whole pipeline: 0.3M-parameter models at 16 px, 20 training steps, 4 test "
             "masks, 10 sampling steps; its numbers say nothing about the backbones.",
        synth_n=64, ckpt_every=10, keep_every=0, sample_every=10, log_every=1, grid_masks=4, grid_steps=8,
        workers=0, parser_steps=100, parser_batch=16, sample_masks=4, sample_steps=20,
        quality_masks=4, quality_snapshot_masks=0, quality_samples=2, quality_steps=10, quality_fractions=(0.5, 1.0),
        speed_steps=200, speed_batch_sizes=(1, 4), speed_scales=(2,), speed_warmup=1, speed_repeats=3,
        speed_processes=1, speed_scale_repeats=3, speed_image_repeats=1, full_image_max_seconds=5.0, paper_flops=False),
    # The embedded default: about 26 minutes on two CPU cores (a fresh `bench run`, docs/run.md "Presets").
    "cpu": Budget(
        note="about 3.4M-parameter models at 32 px in pixel space (256 tokens, like the paper's latent grid), "
             "trained for a few hundred steps on synthetic faces: a small-scale comparison under one trainer, "
             "sampler, timer and protocol, not a reproduction of the paper's numbers. Quality uses fewer masks, "
             "samples and sampling steps than the paper's protocol (see the budget table).",
        synth_n=2000, ckpt_every=50, keep_every=0, sample_every=300, log_every=10, grid_masks=4, grid_steps=50,
        workers=1, parser_steps=1000, parser_batch=32, sample_masks=6, sample_steps=50,
        quality_masks=0, quality_snapshot_masks=SNAPSHOT_MASKS_CPU, quality_samples=2, quality_steps=20,
        quality_fractions=(0.5, 1.0),
        speed_steps=200, speed_batch_sizes=(1, 8), speed_scales=(2, 4), speed_warmup=2, speed_repeats=5,
        speed_processes=6, speed_scale_repeats=5, speed_image_repeats=5, full_image_max_seconds=15.0, paper_flops=True),
    # The paper's experiment, with --data CelebAMask-HQ on a GPU machine: days of training.
    "paper": Budget(
        note="the paper's setting (150k steps at batch 8, EMA 0.9999, the whole test split, 10 samples per mask, "
             "200 steps); meant for a GPU and the real CelebAMask-HQ (--data).",
        synth_n=30_000, ckpt_every=5000, keep_every=50_000, sample_every=5000, log_every=100, grid_masks=4,
        grid_steps=50, workers=4, parser_steps=3000, parser_batch=32, sample_masks=8, sample_steps=200,
        quality_masks=0, quality_snapshot_masks=0, quality_samples=10, quality_steps=200,
        quality_fractions=(0.25, 0.5, 1.0),
        speed_steps=200, speed_batch_sizes=(1, 8), speed_scales=(2,), speed_warmup=5, speed_repeats=6,
        speed_processes=5, speed_scale_repeats=10, speed_image_repeats=5, full_image_max_seconds=120.0,
        paper_flops=True),
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
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(Recipe) if f.name not in ("source", "guidance")}
    out.update({name: getattr(b, name) for name in TRAINER_FIELDS})
    return out
