"""``bench doctor``."""
from __future__ import annotations

from typing import Optional

import typer

from bench.cli.common import command


@command("doctor")
def doctor_cmd(
    preset: str = typer.Option("paper", "--preset", "-p", help="Preset whose memory plan is shown."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory to plan for (default: GPU 0's, "
                                             "or 24GiB without a GPU)."),
    plan: bool = typer.Option(True, "--plan/--no-plan", help="Include the memory plan (about a minute on a CPU)."),
):
    """What a GPU run will use here and what is missing: torch and CUDA, GPUs, mamba-ssm and causal-conv1d
    kernels, SDPA backends, weight files, and the memory plan of --preset."""
    from bench.doctor import checks, report

    typer.echo(report(checks(preset if plan else None, gpu_memory)), nl=False)
