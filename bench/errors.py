"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

from pathlib import Path


class BenchError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""


def portable(path: Path | str) -> str:
    """A path as result files record it: relative to the working folder when inside it, else under ~ when in the
    home folder, else absolute. Files written this way carry no machine's layout and read back from the folder the
    commands run in (relative paths) or on any account (``~``, expanded when read)."""
    p = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~")):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        if str(base) != "/":
            return str(Path(prefix) / rel) if prefix else (str(rel) if str(rel) != "." else ".")
    return str(p)
