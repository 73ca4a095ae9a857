"""``bench data synth|check|preview``."""
from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import app, at_least, command

data_app = typer.Typer(help="Face data: synthetic faces in the CelebAMask-HQ layout, and checks of a data folder.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
DATA_HELP = "Data folder: CelebAMask-HQ layout or SEAN/SDM {train,test}/{images,labels}."


@command("synth", parent=data_app)
def synth_cmd(
    out: Path = typer.Option(..., "--out",
                             help="Folder to write the set into (new, empty, or an earlier synthetic set)."),
    n: int = typer.Option(2000, "--n", help="Number of faces."),
    size: int = typer.Option(256, "--size", help="Image size in pixels (even); masks are written at half of it."),
    seed: int = typer.Option(0, "--seed", help="Seed: face i depends only on (seed, i), not on --n or --workers."),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0: one per available core, up to 8)."),
):
    """Generate synthetic faces in the CelebAMask-HQ layout (images, one binary PNG per part)."""
    from bench.synth import generate_synthetic

    at_least(0, seed=seed, workers=workers)
    at_least(1, n=n, size=size)
    root = generate_synthetic(out, n, size, seed, workers=workers or None)
    typer.echo(f"wrote {n} faces ({size} px images, {size // 2} px masks) to {root}")


@command("check", parent=data_app)
def check_cmd(
    root: Path = typer.Argument(..., help=DATA_HELP),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0: one per available core, up to 4)."),
):
    """Count faces, list resolutions and per-class pixel frequencies, and report every problem (exit 1 if any)."""
    from bench.data import check_dataset

    at_least(0, workers=workers)
    report = check_dataset(root, workers=workers or None)
    typer.echo(report.tables())
    if report.problems:
        raise typer.Exit(1)


@command("preview", parent=data_app)
def preview_cmd(
    root: Path = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Option(Path("preview.png"), "--out", help="PNG file to write."),
    n: int = typer.Option(16, "--n", help="Number of faces to show."),
    size: int = typer.Option(128, "--size", help="Size in pixels each face is loaded at."),
    split: str = typer.Option("train", "--split", help="Split to show: train, test or all."),
):
    """Save a picture of the first faces of a split, each image above its colour-coded label map."""
    from bench.data import FaceDataset, preview_grid
    from bench.io import write_png

    at_least(1, n=n, size=size)
    write_png(out, preview_grid(FaceDataset(root, split=split, size=size, flip=False), n))
    typer.echo(f"wrote {out}")
