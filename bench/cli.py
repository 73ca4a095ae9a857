"""The ``bench`` command line: one Typer app; each concern's commands live in that concern's module.

Every command turns a ``BenchError`` (bad input) into one line on stderr and exit code 2.
"""
from __future__ import annotations

import functools
import sys

import typer

from bench.errors import BenchError

app = typer.Typer(
    name="bench",
    help="Benchmark diffusion backbones (SISMA, DiT-SIS, SDM) for semantic face image synthesis: "
    "data, training, sampling, speed, quality and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def one_line_errors(fn):
    """Wrap a command so that bad input ends in a one-line message and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BenchError, KeyError, FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            typer.echo(f"error: {msg}", err=True)
            sys.exit(2)

    return wrapper


def command(name: str, parent: typer.Typer = app, **kw):
    """Register ``fn`` as a command of ``parent`` with one-line error handling."""

    def deco(fn):
        parent.command(name, **kw)(one_line_errors(fn))
        return fn

    return deco


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


# --- commands of each concern (each module registers its own; imported for the side effect) ---
from bench import data, synth  # noqa: E402,F401  (bench data ...)
from bench import train  # noqa: E402,F401  (bench train)
from bench import sample  # noqa: E402,F401  (bench sample)
from bench import speed  # noqa: E402,F401  (bench speed)
from bench import parser, quality  # noqa: E402,F401  (bench parser train, bench quality)
from bench import pipeline, report  # noqa: E402,F401  (bench run, bench report)
