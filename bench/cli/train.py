"""``bench train``: parse the options, make the run's config, train."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import at_least, command, offline_option
from bench.errors import BenchError
from bench.presets import help_text
from bench.runtime import DEVICE_HELP
from bench.train import TrainConfig

DEFAULT_RUN_ROOT = Path("runs")


def h(name: str) -> str:
    return help_text(TrainConfig, name)


@command("train")
def train_cmd(
    model: str = typer.Argument(..., help="Backbone or variant to train: sisma, dit, sdm, or e.g. "
                                "sisma:scan=raster (see `bench models`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=h("preset") + " [default: cpu]"),
    data: Optional[Path] = typer.Option(None, "--data", help=h("data") + " Default: a synthetic set in ./data, "
                                        "generated on first use."),
    synth_n: Optional[int] = typer.Option(None, "--synth-n", help=h("synth_n")),
    steps: Optional[int] = typer.Option(None, "--steps", help=h("steps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=h("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help=h("lr")),
    warmup: Optional[int] = typer.Option(None, "--warmup", help=h("warmup")),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help=h("ema_decay")),
    seed: Optional[int] = typer.Option(None, "--seed", help=h("seed")),
    precision: Optional[str] = typer.Option(None, "--precision", help=h("precision")),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help=h("grad_clip")),
    p_uncond: Optional[float] = typer.Option(None, "--p-uncond", help=h("p_uncond")),
    time_dist: Optional[str] = typer.Option(None, "--time-dist", help=h("time_dist")),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help=h("ckpt_every")),
    keep_every: Optional[int] = typer.Option(None, "--keep-every", help=h("keep_every")),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help=h("sample_every")),
    log_every: Optional[int] = typer.Option(None, "--log-every", help=h("log_every")),
    grid_steps: Optional[int] = typer.Option(None, "--grid-steps", help=h("grid_steps")),
    space: Optional[str] = typer.Option(None, "--space", help=h("space") + " Default: the model's own (paper: "
                                        "latent for sisma and dit, pixel for sdm; cpu and tiny: pixel)."),
    vae: Optional[str] = typer.Option(None, "--vae", help=h("vae")),
    cache_latents: Optional[bool] = typer.Option(None, "--cache-latents/--no-cache-latents", help=h("cache_latents")),
    workers: Optional[int] = typer.Option(None, "--workers", help=h("workers")),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help=h("micro_batch")),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help=h("checkpointing")),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of each GPU (e.g. 24GiB): `bench plan` "
                                             "chooses --micro-batch and --checkpointing so that the batch fits it, "
                                             "and the run config records the plan."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/MODEL-PRESET)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt; "
                                "options that would change its trajectory must match."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of torch (default: torch's choice)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = offline_option(),
):
    """Train a backbone with flow matching; checkpoints, loss.csv and sample grids go to the run folder.

    The recipe (steps, batch, lr, EMA, ...) comes from the preset's table for the backbone (`bench run --dry-run`
    prints it); every option overrides it. Multi-process: `torchrun --nproc-per-node N $(which bench) train ...`
    (gloo on CPU, NCCL on GPU).
    """
    from bench.runtime import set_threads
    from bench.train import TrainingInterrupted, make_config, train
    from bench.variants import parse_variant

    if gpu_memory and (micro_batch is not None or checkpointing is not None):
        raise BenchError("--gpu-memory chooses --micro-batch and --checkpointing; give either it or them")
    at_least(0, seed=seed)
    at_least(1, synth_n=synth_n, threads=threads)
    set_threads(threads)
    variant = parse_variant(model)
    run_dir = out or DEFAULT_RUN_ROOT / f"{variant.slug}-{preset or 'cpu'}"
    options = dict(preset=preset, data=str(data) if data else None, synth_n=synth_n, steps=steps,
                   batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, seed=seed, precision=precision,
                   grad_clip=grad_clip, p_uncond=p_uncond, time_dist=time_dist, ckpt_every=ckpt_every,
                   keep_every=keep_every, sample_every=sample_every, log_every=log_every, grid_steps=grid_steps,
                   space=space, vae=vae, cache_latents=cache_latents, workers=workers, micro_batch=micro_batch,
                   checkpointing=checkpointing)
    cfg = make_config(variant, run_dir, resume, **options)
    if gpu_memory:
        from bench.plan import apply, describe

        chosen = apply(cfg, gpu_memory, processes=int(os.environ.get("WORLD_SIZE", "1")), resume=resume)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(describe(chosen), err=True)
    try:
        result = train(cfg, run_dir, resume=resume, device=device)
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(128 + e.signum)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f", last loss {result['loss']:.4f}" if result["loss"] is not None else " (nothing to do)"
        typer.echo(f"{run_dir}: step {result['step']}{loss}, {result['wall_s']:.1f} s of training")
