"""``bench plan``."""
from __future__ import annotations

from typing import Optional

import typer

from bench.cli.common import at_least, command
from bench.errors import BenchError


@command("plan")
def plan_cmd(
    preset: str = typer.Option("paper", "--preset", "-p", help="Size preset: paper, cpu or tiny."),
    models: str = typer.Option("sisma,dit,sdm", "--models", "-m", help="Comma-separated backbones or variants "
                               "(e.g. sisma,sisma:scan=raster,dit,sdm)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global training batch, kept by the plan "
                                             "(default: the preset's recipe); also the sampling batch."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (default: the recipe's)."),
    gpu_memory: str = typer.Option("24GiB", "--gpu-memory", help="Memory of one GPU, e.g. 24GiB, 80GB or 16384MiB "
                                   "(default: the paper's RTX 4090)."),
    margin: float = typer.Option(0.1, "--margin", help="Part of --gpu-memory kept free for the CUDA context, "
                                 "allocator fragmentation and kernel workspaces."),
    processes: int = typer.Option(1, "--processes", help="DDP processes (GPUs) sharing the global batch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
):
    """Predicted peak GPU memory of training and sampling per model, without a GPU, and the micro-batch,
    gradient accumulation and activation checkpointing that keep the global batch and fit --gpu-memory."""
    from bench.plan import plan, table

    at_least(1, batch_size=batch_size, processes=processes)
    if not 0 <= margin < 1:
        raise BenchError(f"--margin {margin}: give the part of --gpu-memory kept free, in [0, 1)")
    def progress(text: str) -> None:
        if not quiet:
            typer.echo(f"simulating {text}", err=True)

    plans = plan(models, preset, batch_size, precision, gpu_memory, margin, processes, progress=progress)
    typer.echo(table(plans), nl=False)
