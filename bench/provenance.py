"""What was measured on what: device, versions, precision and commit, recorded with every result row."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

CODE_PATHS = ("bench", "models", "pyproject.toml")


@lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of the checkout this package runs from ('unknown' outside git), '+dirty' if its code is modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        # Only the code counts: results and reports that a run rewrote do not make the measurement's code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    """Human-readable name of a device: the GPU model on CUDA, the CPU model and torch's threads on CPU."""
    name = machine_name(device)
    if torch.device(device).type == "cuda":
        return name
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'s' if threads != 1 else ''})"


def machine_name(device: torch.device | str) -> str:
    """The GPU model on CUDA, the CPU model on CPU (without the thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def machine_fingerprint() -> str:
    """A short hash of what makes timings comparable: this host, its CPU or GPU, torch's version and threads.

    It names no machine (only the hash is kept); a stage keyed by it runs again on another machine.
    """
    import hashlib

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = "|".join([platform.node(), device_name(device), torch.__version__, str(torch.version.cuda)])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def provenance(device: torch.device | str, precision: str, batch_size: int | None = None,
               steps: int | None = None, nfe: int | None = None, seed: int | None = None) -> dict:
    """The provenance columns of one result row."""
    device = torch.device(device)
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "precision": precision,
        "batch_size": batch_size,
        "steps": steps,
        "nfe": nfe,
        "seed": seed,
        "commit": git_commit(),
        "host_os": f"{platform.system()} {platform.release()}",
    }
