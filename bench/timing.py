"""Timing and memory primitives of ``bench speed``: wall-clock or CUDA-event timing, peak memory, kernel probes.

- ``time_calls``: seconds per call after untimed warm-up calls; CUDA events after synchronising on GPU,
  ``time.perf_counter`` on CPU.
- ``peak_memory``: CUDA ``max_memory_allocated`` of one call and its rise above ``memory_allocated`` just before it,
  or on CPU the highest resident set above the level just before the call, sampled every millisecond by a
  background thread (Linux; a lower bound).
- ``no_recompiles``: a block in which a torch.compile recompilation is an error (timed regions).
- ``probe_kernels``: which selective-scan implementation and which SDPA kernel one eager forward actually ran.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import torch

from bench.errors import BenchError
from models.ssm import reset_used_backends, used_backends

MIB = 2 ** 20
RSS_SAMPLE_INTERVAL_S = 1e-3
SDPA_KERNELS = {  # aten operator chosen by scaled_dot_product_attention -> kernel name
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "_scaled_dot_product_efficient_attention": "mem-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "fused-overrideable",
}


def time_calls(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones.

    CUDA: events recorded around each call, read after synchronising; CPU: time.perf_counter.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def load_average() -> float | None:
    """The system's 1-minute load average when the row was measured: a busy machine slows CPU timings."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def no_recompiles(active: bool = True):
    """Inside the block, a torch.compile recompilation raises a one-line BenchError instead of being timed.

    Through ``torch.compiler.set_stance("fail_on_recompile")`` (torch >= 2.6; older versions time without the check).
    Compiled functions must be warmed (compiled) before the block, in its grad mode and at its shapes.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not active or set_stance is None:
        yield
        return
    try:
        with set_stance("fail_on_recompile"):
            yield
    except RuntimeError as e:
        if "recompile" not in str(e).lower():
            raise
        first = str(e).strip().splitlines()[0]
        raise BenchError(f"torch.compile recompiled inside a timed region ({first}); the timing would include "
                         f"compilation: time without --compile") from None


def sdpa_enabled(device: torch.device) -> str:
    """SDPA backends enabled on CUDA (what the dispatcher may choose from); 'n/a' on CPU."""
    if device.type != "cuda":
        return "n/a"
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "mem-efficient": b.mem_efficient_sdp_enabled(),
             "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: False)(), "math": b.math_sdp_enabled()}
    return ",".join(k for k, on in flags.items() if on)


def probe_kernels(model: torch.nn.Module, x, t, mask) -> dict:
    """One eager forward that records which scan implementation and which SDPA kernel actually ran."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class SdpaCalls(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    class AtenOps(TorchDispatchMode):
        names: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    reset_used_backends()
    sdpa, ops = SdpaCalls(), AtenOps()
    ops.names = set()
    with sdpa, ops:
        model(x, t, mask)
    kernels = sorted({SDPA_KERNELS[n] for n in ops.names if n in SDPA_KERNELS})
    # SDPA called but no fused kernel dispatched: the math fallback (decomposed into bmm + softmax).
    attention = ",".join(kernels) if kernels else ("math" if sdpa.calls else "none")
    scan = ",".join(sorted(used_backends())) or "none"
    return {"scan_backend": scan, "attention_kernel": attention}


# ---------------------------------------------------------------------------------------------- memory

class PeakRSS:
    """Highest resident set size above the starting level while the block runs, sampled every millisecond."""

    STATM = Path("/proc/self/statm")

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return int(self.STATM.read_text().split()[1]) * self.page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(RSS_SAMPLE_INTERVAL_S)

    def __enter__(self):
        gc.collect()
        trim_heap()
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self.rss())
        self._stop.set()
        self._thread.join()

    @property
    def delta(self) -> int:
        return self.peak - self.start


def trim_heap() -> None:
    """Give freed heap back to the system (glibc), so that the RSS baseline is not inflated by cached pages."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn, device: torch.device) -> dict:
    """Peak memory of one call of ``fn`` (see the module docstring for what each column means)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_cuda_allocated_mib": peak / MIB, "peak_cuda_delta_mib": (peak - before) / MIB}
    if not PeakRSS.STATM.exists():
        return {}
    with PeakRSS() as rss:
        fn()
    return {"peak_rss_delta_mib": rss.delta / MIB}


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA OOM, a failed CPU allocation, or MemoryError."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
