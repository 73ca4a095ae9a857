"""``bench sample``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import at_least, command, offline_option
from bench.runtime import DEVICE_HELP


@command("sample")
def sample_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="Run folder written by `bench train`."),
    steps: int = typer.Option(200, "--steps", help="Integration steps on t_i = i/steps (Euler: NFE = steps)."),
    n: int = typer.Option(8, "--n", help="Number of images; sample i uses mask i (cycled)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default RUN/generated-METHOD-STEPS)."),
    method: str = typer.Option("euler", "--method", help="euler (1 NFE per step) or heun (2 NFE per step)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale s (1: off)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of label PNGs (class indices 0-18); default: "
                                         "the run's test split."),
    seed: int = typer.Option(0, "--seed", help="Seed; sample i's noise depends only on (seed, i)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per network call (does not change images)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (default: the run's "
                                            "training precision); the model is cast to it once."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file (default "
                                              "RUN/checkpoints/last.pt)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = offline_option(),
):
    """Generate images from a run's EMA model; writes PNGs, the masks used (masks/*.png), grid.png and samples.json."""
    from bench.runtime import check_precision, resolve_device
    from bench.sample import check_guidance, load_run, write_samples

    at_least(0, seed=seed)
    at_least(1, steps=steps, n=n, batch_size=batch_size)
    if precision is not None:
        check_precision(precision)
    check_guidance(guidance)
    run = load_run(run_dir, resolve_device(device), checkpoint, precision)
    if guidance != 1.0 and run.config.get("p_uncond", 0) == 0:
        typer.echo(f"warning: {run_dir} was trained without mask dropout (p_uncond 0); its unconditional "
                   f"velocity is untrained, so guidance {guidance} extrapolates from noise", err=True)
    out = out or run_dir / f"generated-{method}-{steps}"
    record = write_samples(run, out, n, steps, method, guidance, seed, batch_size, precision, masks, progress=True)
    typer.echo(f"wrote {n} images ({method}, {steps} steps, NFE {record['nfe']}, guidance {guidance}) to {out}")
