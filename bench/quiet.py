"""Is the machine quiet enough to time on? Competing CPU use, a calibration workload, and the gate before a sweep.

Two signals, both read while nothing of ours but the timing process runs:

- ``LoadMonitor``: CPU time used by *other* processes, in CPUs, over a window: the machine's busy time from
  ``/proc/stat`` (user, nice, system, irq, softirq and steal: a hypervisor taking cores away counts too) less this
  process's own (``/proc/self/stat``, all its threads). Unlike the load average it is not raised by the timing's own
  threads and does not lag by a minute. Linux only; elsewhere it reads None and decides nothing.
- ``calibrate``: GFLOP/s of a square matmul of fixed size at the timing's thread count and precision (best of a few
  calls; ``bench.rounds`` calibrates before and after each round and keeps the faster). A machine that has slowed
  (another process, throttling, a GPU shared with another job) computes it more slowly than the best seen in the
  sweep; single slow calibrations of 1.5 to 2.0 times the best were seen on a quiet two-core machine after large
  models, hence the threshold.

``Quietness.verdict`` turns both into the reason a measurement is busy ("" when quiet): another process using more
CPUs than the timing leaves free (plus ``BUSY_SPARE_CPUS``), or a calibration ``CALIBRATION_SLOWDOWN`` times slower
than the sweep's best. ``wait_for_quiet`` is the gate before a sweep: it waits up to ``seconds`` for a quiet window,
and returns the last reason if none came. ``competitors`` names the processes that used the most CPU in a window.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WINDOW_S = 1.0  # the shortest window a CPU-use reading covers (clock ticks are 10 ms: ~1% resolution)
BUSY_SPARE_CPUS = 0.5  # other processes may use the CPUs the timing leaves free plus this much
CALIBRATION_SLOWDOWN = 2.0  # a calibration this many times slower than the sweep's best marks the machine busy
CALIBRATION_CALLS = 3  # matmuls per calibration; the fastest counts
CALIBRATION_SIZE = {"cpu": 512, "cuda": 4096}  # n of the n x n matmul: a few ms on a laptop core, on an H100 ~0.1 ms
WAIT_POLL_S = 2.0  # how often the gate looks again while it waits
TOP_COMPETITORS = 3  # processes named in a busy message
BUSY_STAT_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal in /proc/stat's cpu line
PROC = Path("/proc")


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> int | None:
    try:
        fields = (PROC / "stat").read_text().splitlines()[0].split()[1:]
        return sum(int(fields[i]) for i in BUSY_STAT_FIELDS if i < len(fields))
    except (OSError, IndexError, ValueError):
        return None


def _process_ticks(pid: str = "self") -> tuple[str, int] | None:
    """(command name, user + system ticks of all threads) of a process; None if it is gone or unreadable."""
    try:
        text = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    name, _, rest = text.partition("(")[2].rpartition(")")
    fields = rest.split()
    try:
        return name, int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (IndexError, ValueError):
        return None


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LoadMonitor:
    """CPU use of other processes since the last ``mark`` (in CPUs), over windows of at least WINDOW_S."""

    def __init__(self):
        self.available = _machine_busy_ticks() is not None and _process_ticks() is not None
        self.marks: list[tuple[float, int, int]] = []
        self.mark()

    def _now(self) -> tuple[float, int, int] | None:
        if not self.available:
            return None
        return time.perf_counter(), _machine_busy_ticks(), _process_ticks()[1]

    def mark(self) -> None:
        """Start (or continue) a window here."""
        now = self._now()
        if now is not None:
            self.marks.append(now)
            self.marks = [m for m in self.marks if now[0] - m[0] <= 4 * WINDOW_S] or [now]

    def other_cpus(self) -> float | None:
        """CPUs used by other processes from the latest mark at least WINDOW_S ago (or the oldest) until now."""
        now = self._now()
        if now is None or not self.marks:
            return None
        start = next((m for m in reversed(self.marks) if now[0] - m[0] >= WINDOW_S), self.marks[0])
        seconds = now[0] - start[0]
        if seconds <= 0:
            return None
        other = (now[1] - start[1]) - (now[2] - start[2])
        return max(0.0, other / _ticks() / seconds)


def calibrate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n matmul at this process's threads and ``dtype`` (fastest of CALIBRATION_CALLS)."""
    n = CALIBRATION_SIZE.get(device.type, CALIBRATION_SIZE["cpu"])
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    best = float("inf")
    for _ in range(CALIBRATION_CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


@dataclass
class Quietness:
    """The thresholds of one sweep: the threads it times with and the best calibration seen so far."""

    threads: int
    best_gflops: float = 0.0

    @property
    def spare(self) -> float:
        """CPUs other processes may use before the timing is disturbed."""
        return max(0, cpu_count() - self.threads) + BUSY_SPARE_CPUS

    def verdict(self, other_cpus: float | None, gflops: float | None) -> str:
        """Why a measurement with these readings is busy; '' when it is quiet. Updates the best calibration."""
        reasons = []
        if other_cpus is not None and other_cpus > self.spare:
            reasons.append(f"other processes used {other_cpus:.1f} of {cpu_count()} CPUs")
        if gflops:
            if self.best_gflops and gflops * CALIBRATION_SLOWDOWN < self.best_gflops:
                reasons.append(f"calibration {self.best_gflops / gflops:.1f}x slower than the sweep's best")
            self.best_gflops = max(self.best_gflops, gflops)
        return "; ".join(reasons)


def load_text() -> str:
    """The load average as a phrase, for messages (it includes our own threads, so it decides nothing)."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {cpu_count()} CPUs"
    except (OSError, AttributeError):
        return f"{cpu_count()} CPUs"


def _all_process_ticks() -> dict[str, tuple[str, int]]:
    out = {}
    for entry in PROC.glob("[0-9]*"):
        found = _process_ticks(entry.name)
        if found is not None:
            out[entry.name] = found
    return out


def competitors(seconds: float = WINDOW_S) -> str:
    """The processes (other than this one) that used the most CPU over ``seconds``, e.g. 'python (pid 42) 98%'."""
    if not PROC.is_dir():
        return ""
    before = _all_process_ticks()
    time.sleep(seconds)
    after = _all_process_ticks()
    me, used = str(os.getpid()), []
    for pid, (name, ticks) in after.items():
        if pid != me and pid in before:
            share = (ticks - before[pid][1]) / _ticks() / seconds
            if share >= 0.05:
                used.append((share, f"{name} (pid {pid}) {share:.0%}"))
    return ", ".join(text for _, text in sorted(used, reverse=True)[:TOP_COMPETITORS])


def check(quiet: Quietness, device: torch.device, dtype: torch.dtype) -> tuple[str, float | None, float]:
    """One reading over WINDOW_S: (busy reason or '', other processes' CPUs, calibration GFLOP/s)."""
    monitor = LoadMonitor()
    time.sleep(WINDOW_S)
    other = monitor.other_cpus()
    gflops = calibrate(device, dtype)
    return quiet.verdict(other, gflops), other, gflops


def wait_for_quiet(quiet: Quietness, device: torch.device, dtype: torch.dtype, seconds: float, echo=print) -> str:
    """Wait up to ``seconds`` for a quiet reading; '' once one comes, else the busy message naming the load."""
    deadline = time.monotonic() + seconds
    reason, _, _ = check(quiet, device, dtype)
    said = False
    while reason and time.monotonic() < deadline:
        if not said:
            echo(f"waiting up to {seconds:.0f} s for a quiet machine ({reason}; {load_text()})")
            said = True
        time.sleep(WAIT_POLL_S)
        reason, _, _ = check(quiet, device, dtype)
    if not reason:
        return ""
    names = competitors()
    return f"{reason}; {load_text()}" + (f"; busiest: {names}" if names else "")
