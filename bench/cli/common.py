"""The root Typer app, one-line errors and the options several commands share."""
from __future__ import annotations

import functools
import sys

import typer

from bench.errors import BenchError
from bench.presets import help_text


app = typer.Typer(
    name="bench",
    help="Benchmark diffusion backbones (SISMA, DiT-SIS, SDM) for semantic face image synthesis: "
    "data, training, sampling, speed, quality and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def one_line_errors(fn):
    """Wrap a command so that bad input (the harness's own error types) ends in one line on stderr and exit 2.

    Anything else is a bug and keeps its traceback. A progress bar still open is closed first, so the line is not
    glued to it.
    """
    from models import UnknownModel

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BenchError, UnknownModel) as e:
            close_progress_bars()
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def close_progress_bars() -> None:
    """Close every tqdm bar still on screen and end its line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    bars = list(getattr(tqdm, "_instances", []))
    for bar in bars:
        bar.close()
    if bars:
        sys.stderr.flush()


def command(name: str, parent: typer.Typer = app, **kw):
    """Register the decorated function as command ``name`` of ``parent``, with one-line errors."""

    def deco(fn):
        parent.command(name, **kw)(one_line_errors(fn))
        return fn

    return deco


def _go_offline(offline: bool) -> bool:
    if offline:
        from bench.weights import set_offline

        set_offline(True)
    return offline


def offline_option():
    """``--offline``: weights come only from the caches (and explicit paths), nothing is fetched in this command."""
    return typer.Option(False, "--offline", callback=_go_offline,
                        help="Fetch no weights: use only what is in the caches or given by path (the same as "
                        "SIS_BENCH_OFFLINE=1 or HF_HUB_OFFLINE=1); a missing file leaves its metric missing.")


def field_help(cls: type, name: str) -> str:
    """A config field's help text, as stored with the field."""
    return help_text(cls, name)


def split_list(text: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def int_list(text: str | None, option: str) -> list[int] | None:
    """'1,4' -> [1, 4]; None or '' -> None; a one-line error for anything else."""
    if text is None or not text.strip():
        return None
    try:
        return [int(v) for v in split_list(text)]
    except ValueError:
        raise BenchError(f"{option} takes comma-separated integers, e.g. 1,4; got {text!r}") from None


