"""Checkpoints: written atomically with a SHA-256 digest beside them, verified when read, read on the CPU first,
with every random state a resume needs.

torch does not check a checkpoint's bytes (a zip's CRC is not verified on load), so a file damaged in the middle
would load and resume training from a corrupt optimiser state. Each checkpoint ``X.pt`` therefore has ``X.pt.sha256``
(written after it, atomically); ``load`` recomputes the digest and refuses a file that does not match, naming the
newest intact snapshot to resume from.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.io import display_path, save_torch, sha256_file, write_text

DIGEST_SUFFIX = ".sha256"


def digest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + DIGEST_SUFFIX)


def save_atomic(obj, path: Path) -> None:
    """torch.save through bench.io (a reader never sees half a file), then its digest beside it."""
    save_torch(path, obj)
    write_text(digest_path(path), sha256_file(path) + "\n")


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
    try:
        return digest.read_text().split()[0] == sha256_file(path)
    except (OSError, IndexError):
        return False


def newest_intact(folder: Path, exclude: Path) -> Path | None:
    """The snapshot step_N.pt with the highest N in ``folder`` whose digest verifies."""
    for candidate in sorted(Path(folder).glob("step_*.pt"), reverse=True):
        if candidate != exclude and verified(candidate):
            return candidate
    return None


def clean_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files an interrupted save (a killed process) may have left in a checkpoint folder."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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
