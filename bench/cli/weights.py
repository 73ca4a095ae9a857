"""``bench weights list|fetch``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import app, command

weights_app = typer.Typer(help="Weight files of FID/KID, LPIPS and the SD-VAE: where they are looked for, and "
                          "fetching them ahead of time.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@command("list", parent=weights_app)
def list_cmd():
    """Each weight file: what uses it, where it was looked for, whether it is there, its size and whether its hash
    is right."""
    from bench.weights import inventory_text

    typer.echo(inventory_text())


@command("fetch", parent=weights_app)
def fetch_cmd(
    names: Optional[list[str]] = typer.Argument(None, metavar="[NAME]...", help="Which files (inception, alexnet, "
                                                "sd-vae; default: all of them)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Fetch into DIR/torch/hub/checkpoints and "
                                        "DIR/huggingface/hub instead of this machine's caches; where there is no "
                                        "internet, point TORCH_HOME=DIR/torch and HF_HUB_CACHE=DIR/huggingface/hub "
                                        "at a copy of DIR."),
):
    """Fetch every file a run needs (hash-checked) into the caches, e.g. on a login node for compute nodes without
    internet."""
    from bench.weights import fetch_all

    fetch_all(names, dest, echo=typer.echo)
