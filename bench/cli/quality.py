"""``bench quality``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import at_least, command, offline_option
from bench.metrics import ALEXNET_WEIGHTS, INCEPTION_WEIGHTS
from bench.quality import DEFAULT_OUT, REQUIRABLE
from bench.runtime import DEVICE_HELP


@command("quality")
def quality_cmd(
    runs: Optional[list[Path]] = typer.Option(None, "--runs", help="Run folder (repeatable) (default: every run "
                                              "under runs/ and results/runs/)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder for masks and real images (default: "
                                        "the data set each run trained on)."),
    split: str = typer.Option("test", "--split", help="Split whose masks and real images are used."),
    n_masks: int = typer.Option(0, "--n-masks", help="Number of masks of the split (its first ones); 0: all."),
    samples_per_mask: int = typer.Option(10, "--samples-per-mask", help="Samples per mask for the diversity "
                                         "metrics (pairs: n(n-1)/2); sample 0 also serves FID and KID."),
    steps: int = typer.Option(200, "--steps", help="Sampling steps (Euler: NFE = steps)."),
    method: str = typer.Option("euler", "--method", help="euler or heun."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale (1: off)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per network call (sampling and metrics)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Sampling precision: fp32, bf16 or fp16 "
                                            "(default: each run's training precision; the model is cast to it once)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torch-fidelity Inception "
                                                     f"file (default: the hub cache's {INCEPTION_WEIGHTS.filename})."),
    alexnet_weights: Optional[Path] = typer.Option(None, "--alexnet-weights", help="torchvision AlexNet file "
                                                   f"(default: the hub cache's {ALEXNET_WEIGHTS.filename}, fetched "
                                                   "there on first use)."),
    parser: Optional[Path] = typer.Option(None, "--parser", help="Face parser checkpoint (default: "
                                          "results/parser/parser-{size}px.pt, trained there first if absent)."),
    require: str = typer.Option("", "--require", help="Comma list of metrics that must be computed "
                                f"({','.join(REQUIRABLE)}); missing weights are then an error."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="CSV the rows are appended to (created with a header)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = offline_option(),
):
    """Score runs: FID/KID, LPIPS and pixel diversity, mask mIoU (and its ceiling); appends one row per run."""
    import pandas as pd

    from bench.quality import SUMMARY_COLUMNS, find_resources, parse_require, score_runs
    from bench.runtime import resolve_device

    at_least(0, seed=seed, n_masks=n_masks)
    at_least(1, samples_per_mask=samples_per_mask, steps=steps, batch_size=batch_size)
    resources = find_resources(inception_weights, alexnet_weights, parse_require(require))
    settings = dict(split=split, n_masks=n_masks, samples_per_mask=samples_per_mask, steps=steps, method=method,
                    guidance=guidance, seed=seed, precision=precision)
    rows = score_runs(runs or [], data, settings, resources, parser, resolve_device(device), batch_size, out,
                      echo=lambda line: typer.echo(line, err=True))
    typer.echo(pd.DataFrame(rows)[SUMMARY_COLUMNS].to_markdown(index=False, floatfmt=".4f"))
    for row in rows:
        for key in ("fid_status", "lpips_status"):
            if row[key] != "ok":
                typer.echo(f"{row['model']}: {key.removesuffix('_status')} {row[key]}", err=True)
    typer.echo(f"appended {len(rows)} rows to {out}")
