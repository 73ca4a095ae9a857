"""Every file the harness writes goes through here: atomic writes, locked CSV appends, paths as results show them.

- ``atomic_write(path, write)`` and its typed forms (``write_text``, ``write_json``, ``write_png``, ``save_torch``):
  the bytes go to a temporary file in the same folder, which is then renamed over ``path``, so a reader (or a
  crash) sees the old file or the new one, never half of one; the temporary file is removed on any failure.
- ``ResultsFile``: a results CSV declared by a row schema (a dataclass). Appends hold a file lock (the
  ``filelock`` package) and add lines to the end without rewriting what is there, so concurrent writers lose
  nothing; a file whose header is not ours (garbage, binary, other columns) is refused with one line, before any
  work (``check``) and again at the append, and is never rewritten. A file written by an older version of the
  schema (a subset of today's columns) is migrated once, under the lock, to the full header, its rows kept as they
  are. Reading checks every row against the schema (field count, numbers where numbers belong, the columns
  ``bench.rows.REQUIRED`` names) and names a damaged one by file, line and column; columns that later versions added
  are filled as ``bench.rows.MIGRATIONS`` says.
- ``display_path``: a path as result files record it (relative to the working folder, or under ``~``), so that
  committed results name no machine's layout; ``tidy`` does the same inside free text.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from bench.errors import BenchError
from bench.rows import MIGRATIONS, REQUIRED

LOCK_TIMEOUT_S = 120  # a writer that holds a results file longer than this is stuck: give up with one line


# ---------------------------------------------------------------------------------------------- atomic writes

TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o666  # what open() asks for; the umask takes its bits away, as for any plain write


def _creation_mode() -> int:
    """The mode a plain write would give a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return FILE_MODE & ~mask


def _pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def clean_temporaries(folder: str | os.PathLike, name: str = "*") -> None:
    """Remove the temporary files of atomic writes (of ``name``) in ``folder`` whose writing process is gone."""
    for tmp in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
        pid = tmp.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(pid) == 3 and pid[1].isdigit() and _pid_alive(int(pid[1])):
            continue  # another process is writing it now
        with contextlib.suppress(OSError):
            tmp.unlink()


class _WriteErrors:
    """A binary file that remembers the first OSError of its writes, so that a library that swallows it (torch's
    zip writer reports a full disk as 'unexpected pos') cannot hide the cause."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.raw, name)


def _open_temporary(fd: int, target: Path):
    """The binary file an atomic write of ``target`` fills (a seam for fault-injection tests)."""
    return os.fdopen(fd, "wb")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the mode a plain write would give (the existing file's, else 0666 less the umask); the temporary
    file is removed on any failure, and temporaries left by killed processes are removed by the next write here.
    A write error (a full disk) is raised as the OSError it is, whatever ``write`` made of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent, path.name)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = _creation_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, mode)
        f = _WriteErrors(_open_temporary(fd, path))
        try:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except Exception:
                if f.error is not None:
                    raise f.error from None
                raise
        finally:
            f.raw.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def strict_json(obj: Any) -> Any:
    """A copy that JSON can hold strictly: NaN and infinities become None, tuples lists, paths and the rest text."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return strict_json(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # numpy and torch scalars
        return strict_json(obj.item())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (no bare NaN: such values are written as null), indented, written atomically."""
    return write_text(path, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON; a missing, unreadable or malformed file is a one-line error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{display_path(path)} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"{display_path(path)} is not a readable {what} ({type(e).__name__}); it is corrupt or "
                         f"not written by sis-bench: move it away and redo the step that writes it") from None


def write_png(path: str | os.PathLike, array) -> Path:
    """An (H, W, 3) or (H, W) uint8 array as a PNG."""
    from PIL import Image

    picture = Image.fromarray(array)
    return atomic_write(path, lambda f: picture.save(f, "PNG"))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save, atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def to_uint8(images):
    """Images in [-1, 1] (B, 3, H, W) tensor -> uint8 (B, 3, H, W): what PNGs and torch-fidelity take."""
    import torch

    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_images(images, paths: Iterable[str | os.PathLike]) -> None:
    """Images in [-1, 1] (B, 3, H, W), one PNG each."""
    pix = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for p, path in zip(pix, paths):
        write_png(path, p)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- paths

def display_path(path: str | os.PathLike) -> str:
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


def tidy(text: Any) -> str:
    """Free text with the working folder's path dropped and the home folder written as ~."""
    text = str(text)
    cwd = str(Path.cwd().resolve())
    text = text.replace(cwd + os.sep, "").replace(cwd, ".")
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("/", "") else text


def contained(path: str | os.PathLike, folder: str | os.PathLike, what: str) -> Path:
    """``path`` (relative paths taken from ``folder``) if it resolves inside ``folder``; a one-line error if not."""
    folder = Path(folder).expanduser().resolve()
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else folder / p).resolve()
    if p != folder and folder not in p.parents:
        raise BenchError(f"{what} names {path}, which is outside {display_path(folder)}; the file was edited or "
                         f"comes from elsewhere: restore it or redo the step that writes it")
    return p


# ---------------------------------------------------------------------------------------------- results CSVs

def columns(schema: type) -> list[str]:
    """Column names of a row schema (a dataclass), in declaration order."""
    return [f.name for f in dataclasses.fields(schema)]


def column_kinds(schema: type) -> dict[str, type]:
    """Each column's value type, from the schema's annotations: bool, int, float, or str for anything else."""
    hints = typing.get_type_hints(schema)
    kinds = {}
    for name in columns(schema):
        held = typing.get_args(hints[name]) or (hints[name],)
        kinds[name] = next((kind for kind in (bool, int, float) if kind in held), str)
    return kinds


def _cell(value: Any) -> str:
    """CSV text of one value: empty for None and NaN, floats in full (repr) precision."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return _cell(value.item())
    return str(value)


def _is_number(text: str) -> bool:
    """Whether ``text`` reads as a number as both float() and pandas read it (1, 2.5e-3, inf, nan; not 1_000)."""
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


SHOWN_CHARS = 40  # of a bad cell, in an error: enough to recognise it, short enough for one line
BOOLEAN_TEXT = ("true", "false")  # how the writer spells a bool (any case), as pandas reads it


def _shown(text: str) -> str:
    """A cell as an error quotes it: in repr (newlines escaped), cut at SHOWN_CHARS."""
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


class ResultsFile:
    """A results CSV of one row schema: locked appends, a refusal for files that are not ours, checked reads."""

    def __init__(self, path: str | os.PathLike, schema: type):
        self.path = Path(path)
        self.schema = schema
        self.columns = columns(schema)
        self.kinds = column_kinds(schema)
        self.required = REQUIRED.get(schema, ())

    def _lock(self):
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.with_name(f".{self.path.name}.lock")), timeout=LOCK_TIMEOUT_S)

    def header(self) -> list[str] | None:
        """The file's header, None when the file is absent or empty; one-line error when it is not ours."""
        if self.path.is_dir():
            raise BenchError(f"{display_path(self.path)} is a folder; give a CSV file path such as "
                             f"{display_path(self.path / 'results.csv')}")
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:  # the first line alone: bytes further on are damaged rows, which reading names by their line
            with self.path.open("rb") as f:
                header = next(csv.reader([f.readline().decode("utf-8")], strict=True), None)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise self._foreign(f"not a text CSV ({type(e).__name__})") from None
        if not header:
            raise self._foreign("no header line")
        unknown = [c for c in header if c not in self.columns]
        if unknown or len(set(header)) != len(header):
            raise self._foreign(f"unexpected column {unknown[0]!r}" if unknown else "repeated columns")
        return header

    def _foreign(self, why: str) -> BenchError:
        return BenchError(f"{display_path(self.path)} is not a sis-bench {self.schema.__name__} file ({why}); "
                          f"nothing was written to it: move it away or give another --out")

    def _damaged(self, line: int, what: str) -> BenchError:
        """The one-line error for a damaged row: the file, its line (the header is line 1), and how to go on."""
        return BenchError(f"{display_path(self.path)} line {line}: {what}; fix or delete line {line}, or move the "
                          f"file away")

    def check(self) -> None:
        """Refuse, before any work is done, a file that an append or a read would refuse."""
        if self.header() is not None:
            self._records(self._text())

    def _text(self) -> str:
        """The file's text; bytes that are not UTF-8 are a one-line error naming their line."""
        raw = self.path.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._damaged(raw[: e.start].count(b"\n") + 1, "bytes that are not UTF-8 text") from None

    def _records(self, text: str) -> tuple[list[str], list[list[str]]]:
        """The header and every non-blank row, each checked against the schema (one-line error naming the first
        damaged line)."""
        reader = csv.reader(io.StringIO(text), strict=True)
        header = next(reader)
        missing = [c for c in self.required if c not in header]
        if missing:
            raise BenchError(f"{display_path(self.path)} line 1 (the header) lacks column {missing[0]!r}, which every "
                             f"{self.schema.__name__} needs and no migration derives; the file comes from an unknown "
                             f"version or was edited: restore the column, or move the file away and write it again")
        rows, start = [], reader.line_num + 1
        while True:
            try:
                fields = next(reader, None)
            except csv.Error as e:
                raise self._damaged(start, f"not valid CSV ({e})") from None
            if fields is None:
                return header, rows
            if fields:
                self._check_row(header, fields, start)
                rows.append(fields)
            start = reader.line_num + 1

    def _check_row(self, header: list[str], fields: list[str], line: int) -> None:
        """A one-line error if the row at ``line`` has the wrong number of fields, an empty required cell, or text
        where the schema holds a number or a bool."""
        if len(fields) != len(header):
            raise self._damaged(line, f"{len(fields)} field{'s' if len(fields) != 1 else ''} where the header has "
                                      f"{len(header)} (cut short or garbled)")
        for name, text in zip(header, fields):
            kind, value = self.kinds[name], text.strip()
            if not value:
                if name in self.required:
                    raise self._damaged(line, f"column {name!r} is empty, and every {self.schema.__name__} needs it")
            elif kind is bool and value.lower() not in BOOLEAN_TEXT:
                raise self._damaged(line, f"column {name!r} holds {_shown(text)} where True or False belongs")
            elif kind in (int, float) and not _is_number(value):
                raise self._damaged(line, f"column {name!r} holds {_shown(text)} where a number belongs")

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add ``rows`` at the end of the file (created with the schema's header), under the file lock."""
        rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
        for row in rows:
            unknown = set(row) - set(self.columns)
            if unknown:
                raise ValueError(f"{self.schema.__name__} has no column {sorted(unknown)[0]!r}")
        with self._lock():
            header = self.header()
            if header is not None and header != self.columns and set(header) != set(self.columns):
                header = self._migrate(header)
            if header is None:
                header = self.columns
                text = self._lines([dict(zip(header, header))], header)
            else:
                text = ""
                with self.path.open("rb") as f:  # a file cut short of its last newline gets one first
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) not in (b"\n", b"\r"):
                        text = "\n"
            text += self._lines(rows, header)
            with self.path.open("a", newline="", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def _lines(self, rows: list[Mapping[str, Any]], header: list[str]) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in header])
        return buffer.getvalue()

    def _migrate(self, header: list[str]) -> list[str]:
        """Rewrite a file of an older schema (a subset of the columns) with the full header, every row's text kept;
        a damaged row stops it, named by its line, before anything is written. The caller holds the lock."""
        _, old = self._records(self._text())
        full = header + [c for c in self.columns if c not in header]
        write_text(self.path, self._lines([dict(zip(full, full))] + [dict(zip(header, row)) for row in old], full))
        return full

    def read(self):
        """The rows as a pandas DataFrame with every schema column: each row checked (one-line error naming the
        first damaged line), the columns of later versions filled as ``bench.rows.MIGRATIONS`` says, the rest of
        the absent ones empty."""
        import pandas as pd

        if self.header() is None:
            return pd.DataFrame(columns=self.columns)
        text = self._text()
        self._records(text)
        try:
            df = pd.read_csv(io.StringIO(text), low_memory=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise self._foreign(f"unparseable: {type(e).__name__}") from None
        return self._migrated(df.reindex(columns=self.columns))

    def _migrated(self, df):
        """``df`` with each column of ``bench.rows.MIGRATIONS`` filled where a row leaves it empty."""
        for column, derive in MIGRATIONS.get(self.schema, {}).items():
            empty = df[column].isna()
            if empty.any():
                values = df[column].astype(object)
                values[empty] = [derive(row) for row in df[empty].to_dict("records")]
                df[column] = values
        return df


# ---------------------------------------------------------------------------------------------- folder locks

FOLDER_LOCK_NAME = ".lock"
OWNER_SUFFIX = ".owner"


def _busy(folder: Path, what: str, advice: str) -> BenchError:
    """The one-line error for a folder whose lock another process holds, naming it from its owner record."""
    try:
        holder = json.loads((folder / (FOLDER_LOCK_NAME + OWNER_SUFFIX)).read_text())
        who = f"process {holder['pid']} (started {holder['started']})"
    except (OSError, ValueError, TypeError, KeyError):
        who = "another process"
    return BenchError(f"{display_path(folder)} ({what}) is in use by {who}; {advice}")


def check_folder_free(folder: str | os.PathLike, what: str, advice: str) -> None:
    """A one-line error now if another process holds ``folder``'s lock; creates nothing (a first look before work
    that may fail; the work itself runs under ``folder_lock``)."""
    from filelock import FileLock, Timeout

    path = Path(folder) / FOLDER_LOCK_NAME
    if not path.is_file():
        return
    try:
        with FileLock(str(path), timeout=0):
            pass
    except Timeout:
        raise _busy(Path(folder), what, advice) from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, advice: str):
    """Hold ``folder``'s lock (``FOLDER/.lock``, the ``filelock`` package) while the block runs; a second process
    gets a one-line error naming the holder's PID and start time and ``advice``, never a silent overwrite. The
    holder is recorded in ``.lock.owner`` while the lock is held (removed at release)."""
    import datetime

    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / FOLDER_LOCK_NAME), timeout=0)
    owner = folder / (FOLDER_LOCK_NAME + OWNER_SUFFIX)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(folder, what, advice) from None
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        write_json(owner, {"pid": os.getpid(), "started": started})
        yield folder
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()
