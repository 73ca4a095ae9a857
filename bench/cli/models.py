"""``bench models``."""
from __future__ import annotations

import typer

from bench.cli.common import command
from bench.errors import BenchError


@command("models")
def models_cmd(
    preset: list[str] = typer.Option(["paper", "cpu", "tiny"], "--preset", "-p", help="Presets to list (repeatable)."),
):
    """List registered backbones with parameters (counted on the meta device), input space and tokens."""
    from models.info import models_table

    try:
        typer.echo(models_table(presets=preset))
    except ValueError as e:
        raise BenchError(str(e)) from None
