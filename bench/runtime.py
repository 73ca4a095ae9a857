"""Where and how models run: the device choice, precisions and CPU threads, decided in one place."""
from __future__ import annotations

import contextlib

import torch

from bench.errors import BenchError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N."


def resolve_device(choice: str | None = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; cpu, cuda and cuda:N as given. A one-line error for anything else,
    or for CUDA on a machine without it."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise BenchError(f"--device {choice}: use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {choice}: no CUDA device is visible (torch {torch.__version__}, CUDA build "
                             f"{torch.version.cuda or 'none'}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_precision(precision: str) -> torch.dtype:
    """The dtype of a precision name; one-line error naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise BenchError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str):
    """bf16/fp16: torch.autocast on the device; fp32: nothing."""
    device = torch.device(device)
    if check_precision(precision) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads (None: leave torch's choice); one-line error for less than one."""
    if threads is None:
        return
    if threads < 1:
        raise BenchError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
