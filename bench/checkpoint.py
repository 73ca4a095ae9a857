"""Checkpoints: written atomically, read on the CPU first, with every random state a resume needs."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.io import save_torch


def save_atomic(obj, path: Path) -> None:
    """torch.save through bench.io: a reader never sees half a file."""
    save_torch(path, obj)


def load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint on the CPU; ``mmap`` maps it instead of reading it (for read-only use of large files)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no checkpoint at {path}; train first (bench train ... --out {path.parent.parent})")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # any unreadable file is bad input, not a crash
        raise BenchError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
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
