"""``bench gpu-check``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import command, split_list


@command("gpu-check")
def gpu_check_cmd(
    out: Path = typer.Option(Path("results/gpu-check"), "--out", "-o", help="Folder of the table (gpu-check.md), "
                             "the raw results (gpu-check.json), each step's log and the speed rows."),
    timeout_per_step: Optional[float] = typer.Option(None, "--timeout-per-step", help="Seconds each step may run "
                                                     "(default: pytest 240, speed 100, memory 100, fused-mamba 40; "
                                                     "8 minutes in all)."),
    skip: str = typer.Option("", "--skip", help="Comma-separated steps to leave out: pytest, speed, memory, "
                             "fused-mamba."),
):
    """Check a CUDA machine end to end and print one table: pytest -m gpu, bench speed at the paper preset (ms per
    NFE, kernels), training peak memory against bench plan, the fused Self-Mamba against its reference. Exit code 1
    when a step fails, 2 without CUDA."""
    from bench.gpucheck import GpuCheckConfig, run_gpu_check
    from bench.io import display_path

    check = run_gpu_check(GpuCheckConfig(out=out, timeout_per_step=timeout_per_step, skip=split_list(skip)),
                          progress=lambda text: typer.echo(text, err=True))
    typer.echo(f"{check.text}\nwritten: {display_path(check.markdown)}, {display_path(check.json)}")
    if not check.ok:
        raise typer.Exit(1)
