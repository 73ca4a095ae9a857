"""``bench train``: parse the options, make the run's config, train."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import at_least, command, offline_option, options_from
from bench.errors import BenchError
from bench.plan import apply, describe
from bench.runtime import DEVICE_HELP, set_threads
from bench.train import DEFAULT_PRESET, TrainConfig, TrainingInterrupted, make_config, option_fields, train
from bench.variants import parse_variant

DEFAULT_RUN_ROOT = Path("runs")


@command("train")
@options_from(TrainConfig, option_fields(), after="model")  # one option per field, with the field's help
def train_cmd(
    model: str = typer.Argument(..., help="Backbone or variant to train: sisma, dit, sdm, or e.g. "
                                "sisma:scan=raster (see `bench models`)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of each GPU (e.g. 24GiB): `bench plan` "
                                             "chooses --micro-batch and --checkpointing so that the batch fits it, "
                                             "and the run config records the plan."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/MODEL-PRESET)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt; "
                                "options that would change its trajectory must match."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of torch (default: torch's choice)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = offline_option(),
    **options,
):
    """Train a backbone with flow matching; checkpoints, loss.csv and sample grids go to the run folder.

    The recipe (steps, batch, lr, EMA, ...) comes from the preset's table for the backbone (`bench run --dry-run`
    prints it); every option overrides it. Multi-process: `torchrun --nproc-per-node N $(which bench) train ...`
    (gloo on CPU, NCCL on GPU).
    """
    if gpu_memory and (options["micro_batch"] is not None or options["checkpointing"] is not None):
        raise BenchError("--gpu-memory chooses --micro-batch and --checkpointing; give either it or them")
    at_least(0, seed=options["seed"])
    at_least(1, synth_n=options["synth_n"], threads=threads)
    set_threads(threads)
    variant = parse_variant(model)
    run_dir = out or DEFAULT_RUN_ROOT / f"{variant.slug}-{options['preset'] or DEFAULT_PRESET}"
    cfg = make_config(variant, run_dir, resume, **options)
    if gpu_memory:
        chosen = apply(cfg, gpu_memory, processes=int(os.environ.get("WORLD_SIZE", "1")), resume=resume)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(describe(chosen), err=True)
    try:
        result = train(cfg, run_dir, resume=resume, device=device)
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(128 + e.signum) from None
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f", last loss {result['loss']:.4f}" if result["loss"] is not None else " (nothing to do)"
        typer.echo(f"{run_dir}: step {result['step']}{loss}, {result['wall_s']:.1f} s of training")
