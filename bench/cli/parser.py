"""``bench parser train``."""
from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import app, at_least, command, positive
from bench.parser import ParserTrainConfig, train_and_save
from bench.runtime import DEVICE_HELP, resolve_device

parser_app = typer.Typer(help="Face parser used to score mask adherence (mIoU).", no_args_is_help=True)
app.add_typer(parser_app, name="parser")


@command("train", parent=parser_app)
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Data set folder (CelebAMask-HQ layout or synthetic); trains on "
                                                  "its train split, reports mIoU on its test split."),
    size: int = typer.Option(32, "--size", help="Resolution in px; use the image size of the runs you will evaluate "
                                                "(32 for the cpu preset, 16 tiny, 256 paper)."),
    steps: int = typer.Option(ParserTrainConfig.steps, "--steps", help="Optimisation steps."),
    batch_size: int = typer.Option(ParserTrainConfig.batch_size, "--batch-size", help="Images per step."),
    width: int = typer.Option(None, "--width", help="UNet channels at full resolution [default: 32 up to 32 px, "
                                                    "16 above]."),
    levels: int = typer.Option(None, "--levels", help="UNet downsamplings [default: down to about 8 x 8: 2 at "
                                                      "32 px, 3 at 64, 4 at 128]."),
    lr: float = typer.Option(ParserTrainConfig.lr, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    seed: int = typer.Option(ParserTrainConfig.seed, "--seed", help="Seed for initialisation and batch order."),
    out: Path = typer.Option(None, "--out", help="Checkpoint file (default: results/parser/parser-{size}px.pt)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Train the face parser on the train split and save it; prints its mIoU on real test images."""
    at_least(0, seed=seed)
    at_least(1, size=size, steps=steps, batch_size=batch_size, width=width, levels=levels)
    positive(lr=lr)
    result = train_and_save(data, size, ParserTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed), out,
                            width, levels, resolve_device(device))
    typer.echo(f"parser ({size} px) trained in {result['seconds']:.0f} s; mIoU on real test images "
               f"{result['test_miou']:.4f}; saved {result['path']}")
