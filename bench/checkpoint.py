"""Checkpoints: written atomically with a SHA-256 digest beside them, verified when read, read on the CPU first,
with every random state a resume needs.

torch does not check a checkpoint's bytes (a zip's CRC is not verified on load), so a file damaged in the middle
would load and resume training from a corrupt optimiser state. Each checkpoint ``X.pt`` therefore has ``X.pt.sha256``;
``load`` recomputes the digest and refuses a file that does not match, naming the newest intact snapshot to resume from.

Checkpoint and digest change as one unit: the new checkpoint is written to a temporary file and hashed, then the
digest is rewritten (atomically) to list both the new hash and the old one, then the checkpoint is renamed into place,
then the digest is rewritten with the new hash alone. Whichever step a crash or a full disk stops, the file in place
matches a hash its digest lists, and a failure before the rename leaves the previous checkpoint the one loaded.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.io import atomic_write, clean_temporaries, display_path, sha256_file, write_text

DIGEST_SUFFIX = ".sha256"


def digest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + DIGEST_SUFFIX)


MIB = 1 << 20


def _listed(path: Path) -> list[str]:
    """The hashes the digest of ``path`` lists (none when it is absent or unreadable)."""
    try:
        return digest_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def save_atomic(obj, path: Path) -> None:
    """torch.save and its digest as one unit (see the module docstring); a full disk is a one-line error naming the
    folder and the space needed, and the previous checkpoint stays in place, verified."""
    import hashlib

    path = Path(path)
    staged: dict = {}

    def write(f) -> None:
        buffer = staged["buffer"] = _Hashing(f, hashlib.sha256())
        torch.save(obj, buffer)
        staged["sha"] = buffer.hash.hexdigest()
        old = [h for h in _listed(path) if path.is_file()][:1]
        write_text(digest_path(path), "\n".join([staged["sha"]] + old) + "\n")  # both: before and after the rename

    try:
        atomic_write(path, write)
        write_text(digest_path(path), staged["sha"] + "\n")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = staged["buffer"].bytes if "buffer" in staged else 0
        needed = max(written, path.stat().st_size if path.is_file() else 0)
        free = shutil.disk_usage(path.parent).free
        kept = (f"{display_path(path)} still holds the previous checkpoint" if path.is_file() and verified(path)
                else "no checkpoint was written")
        raise BenchError(f"disk full in {display_path(path.parent)}: a checkpoint needs at least {size_text(needed)} "
                         f"and {size_text(free)} are free; {kept}: free space, then continue with --resume") from None


def size_text(n: int) -> str:
    """A byte count as people read it: 512 KiB, 40.2 MiB."""
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{max(1, round(n / 1024))} KiB"


class _Hashing:
    """A binary file that hashes and counts what is written through it."""

    def __init__(self, f, hash_):
        self.f, self.hash, self.bytes = f, hash_, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.hash.update(memoryview(data)[:n] if n is not None else data)
        self.bytes += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def snapshot(path: Path, target: Path) -> None:
    """Keep a copy of checkpoint ``path`` (and its digest) as ``target``: a hard link where possible."""
    for src, dst in ((path, target), (digest_path(path), digest_path(target))):
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)  # no copy, and it survives the next save of last.pt (a new file replaces it)
        except OSError:
            shutil.copyfile(src, dst)


def verified(path: Path) -> bool:
    """True when the checkpoint's bytes match its digest (a checkpoint without a digest counts as intact)."""
    digest = digest_path(path)
    if not digest.is_file():
        return True
    listed = _listed(path)
    try:
        return bool(listed) and sha256_file(path) in listed
    except OSError:
        return False


def newest_intact(folder: Path, exclude: Path) -> Path | None:
    """The snapshot step_N.pt with the highest N in ``folder`` whose digest verifies."""
    for candidate in sorted(Path(folder).glob("step_*.pt"), reverse=True):
        if candidate != exclude and verified(candidate):
            return candidate
    return None


def clean_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files an interrupted save (a killed process) may have left in a checkpoint folder."""
    clean_temporaries(folder)


def load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint on the CPU, its digest verified; ``mmap`` maps it instead of reading it (read-only use)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no checkpoint at {display_path(path)}; train first (bench train ... --out "
                         f"{display_path(path.parent.parent)})")
    if not verified(path):
        intact = newest_intact(path.parent, path)
        fix = (f"the newest intact snapshot is {display_path(intact)}: copy it (and its {DIGEST_SUFFIX}) over "
               f"{path.name} to resume from it" if intact else "no intact snapshot is left: train again")
        raise BenchError(f"checkpoint {display_path(path)} is damaged (its SHA-256 does not match "
                         f"{digest_path(path).name}); {fix}")
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a checkpoint")
        return state
    except Exception as e:  # any unreadable file is bad input, not a crash
        reason = (str(e).splitlines() or [""])[0][:200]
        raise BenchError(f"cannot read checkpoint {display_path(path)} ({type(e).__name__}: {reason}); "
                         f"it is corrupt or from another program: restore it or train again") from None


IDENTITY = ("model", "preset", "variant")  # what a checkpoint and the run that reads it must agree on


def identity(config: dict) -> str:
    """A run's backbone, preset and variant as one text, e.g. 'sdm/tiny (sdm)'."""
    return f"{config.get('model')}/{config.get('preset')} ({config.get('variant') or config.get('model')})"


def load_weights(module: torch.nn.Module, weights: dict, state: dict, run_config: dict, path: Path) -> None:
    """``module.load_state_dict(weights)`` for checkpoint ``path`` of a run whose config is ``run_config``; a
    checkpoint of another backbone, preset or variant (or whose tensors do not fit) is a one-line error naming both."""
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    differs = [k for k in IDENTITY if k in saved and k in run_config and saved[k] != run_config[k]]
    if differs:
        raise BenchError(f"{display_path(path)} is a foreign checkpoint: it holds {identity(saved)}, the run is "
                         f"{identity(run_config)}; give a checkpoint of this run or train one")
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise BenchError(f"{display_path(path)} does not fit {identity(run_config)} (a foreign checkpoint: "
                         f"{reason}); give a checkpoint of this run or train one") from None


def rng_state() -> dict:
    """The global random states: torch (CPU and every CUDA device), numpy and Python's ``random``."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state as tensors and plain numbers, so that the checkpoint loads with weights_only=True
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
