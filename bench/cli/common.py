"""The root Typer app, one-line errors and the options several commands share."""
from __future__ import annotations

import errno
import functools
import inspect
import math
import sys
import typing
from typing import Optional

import typer
from tqdm import tqdm

from bench.errors import BenchError
from bench.io import display_path
from bench.presets import help_text
from bench.weights import OFFLINE_ENV, env_switch, set_offline
from models import UnknownModel

app = typer.Typer(
    name="bench",
    help="Benchmark diffusion backbones (SISMA, DiT-SIS, SDM) for semantic face image synthesis: "
    "data, training, sampling, speed, quality and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# What to do about an operating-system error, by errno: the line names the path and this.
OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space (or give a folder on another disk) and run again",
    errno.EDQUOT: "disk quota exceeded: free space (or give a folder on another disk) and run again",
    errno.EROFS: "the file system is read-only: give a writable folder",
    errno.EACCES: "permission denied: give a folder you can write to, or change its permissions",
    errno.EPERM: "operation not permitted: give a folder you can write to, or change its permissions",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file is expected: give a file path",
}


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: the path(s) it concerns and what to do."""
    paths = " -> ".join(display_path(p) for p in (e.filename, e.filename2) if p not in (None, ""))
    advice = OS_ADVICE.get(e.errno, f"{e.strerror or type(e).__name__}: check the path and its disk")
    where = f"{paths}: " if paths else ""
    return f"{where}{advice} ({e.strerror or e})" if e.errno in OS_ADVICE else f"{where}{advice}"


def one_line_errors(fn):
    """Wrap a command so that bad input ends in one line on stderr and exit 2: the harness's own error types, and
    operating-system errors (a full disk, a read-only or forbidden folder, a missing path) with the path and what
    to do. Anything else is a bug and keeps its traceback. A progress bar still open is closed first, so the line
    is not glued to it.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_environment()
            return fn(*args, **kwargs)
        except (BenchError, UnknownModel) as e:
            fail(str(e))
        except OSError as e:
            fail(os_error_line(e))

    return wrapper


def check_environment() -> None:
    """The harness's on/off environment variables parse (a one-line error before any work if one does not)."""
    for name in OFFLINE_ENV:
        env_switch(name)


def fail(message: str) -> None:
    """Print ``error: message`` on one line (progress bars closed first) and exit 2."""
    close_progress_bars()
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


def close_progress_bars() -> None:
    """Close every tqdm bar still on screen and end its line."""
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
        set_offline(True)
    return offline


def offline_option():
    """``--offline``: weights come only from the caches (and explicit paths), nothing is fetched in this command."""
    return typer.Option(False, "--offline", callback=_go_offline,
                        help="Fetch no weights: use only what is in the caches or given by path (the same as "
                        "SIS_BENCH_OFFLINE=1 or HF_HUB_OFFLINE=1); a missing file leaves its metric missing.")


def at_least(minimum: int, **options) -> None:
    """One-line error for the first option (given as ``name=value``, ``_`` for ``-``) below ``minimum``."""
    for name, value in options.items():
        if value is not None and value < minimum:
            what = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise BenchError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def positive(**options) -> None:
    """One-line error for the first option (``name=value``) that is not a finite number above 0."""
    for name, value in options.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BenchError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def options_from(cls: type, names: list[str], after: str):
    """Decorator: the command also takes one ``--name`` option per field ``names`` of dataclass ``cls`` that it does
    not declare itself, typed like the field (``--name/--no-name`` for a flag, repeatable for a list), with the help
    text stored with the field and None when not given. They are listed after the command's parameter ``after``
    and reach it as its ``**options``."""
    types = typing.get_type_hints(cls)

    def deco(fn):
        own = inspect.signature(fn).parameters
        # all keyword-only, so that options may follow the argument (Typer passes every parameter by name)
        declared = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.values()
                    if p.kind is not inspect.Parameter.VAR_KEYWORD]
        derived = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[plain(types[name])],
                                     default=typer.Option(None, flag(name, plain(types[name])),
                                                          help=help_text(cls, name)))
                   for name in names if name not in own]
        cut = list(own).index(after) + 1
        fn.__signature__ = inspect.Signature(declared[:cut] + derived + declared[cut:])
        return fn

    return deco


def plain(annotation) -> type:
    """The type inside ``Optional[...]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def flag(name: str, kind: type) -> str:
    """The option's spelling: ``--name``, or ``--name/--no-name`` for a bool."""
    option = "--" + name.replace("_", "-")
    return f"{option}/--no-{option[2:]}" if kind is bool else option


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


