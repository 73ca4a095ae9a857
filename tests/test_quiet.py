"""A busy machine is seen, not averaged: other processes' CPU use, the calibration, the gate and busy rounds."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from bench import quiet, rounds, speed
from bench.cli import app
from bench.errors import BenchError

SPIN = "import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass\n"


def spinners(n: int, seconds: float) -> list[subprocess.Popen]:
    """n CPU-bound processes, each spinning for ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(n)]


@pytest.mark.skipif(not quiet.LoadMonitor().available, reason="needs /proc (Linux)")
def test_other_processes_cpu_use_is_measured_and_our_own_is_not():
    monitor = quiet.LoadMonitor()
    start, busy0, cpu0 = time.perf_counter(), quiet._machine_busy_ticks(), time.process_time()
    while time.perf_counter() < start + quiet.WINDOW_S:  # our own busy loop: not another process's
        pass
    other = monitor.other_cpus()
    seconds = time.perf_counter() - start
    machine = (quiet._machine_busy_ticks() - busy0) / quiet._ticks() / seconds
    own = (time.process_time() - cpu0) / seconds  # what the loop used, by another clock
    # the CPU our loop used is subtracted (clock ticks are 10 ms: a few of them of slack), whatever else runs here
    assert own > 0.3 and machine - other == pytest.approx(own, abs=0.1)
    procs = spinners(2, 3 * quiet.WINDOW_S)
    try:
        time.sleep(0.3)
        monitor = quiet.LoadMonitor()
        time.sleep(quiet.WINDOW_S)
        seen = monitor.other_cpus()
        names = quiet.competitors(0.5)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert seen > 0.8 * min(2, quiet.cpu_count())  # two spinning processes on the machine's CPUs
    assert any(f"(pid {p.pid})" in names for p in procs), names


def test_verdict_names_competing_cpus_and_a_slow_calibration():
    q = quiet.Quietness(threads=quiet.cpu_count())
    assert q.verdict(0.1, 100.0) == "" and q.best_gflops == 100.0
    assert "other processes used 1.9" in q.verdict(1.9, 100.0)
    assert "calibration 4.0x slower than the sweep's best" in q.verdict(0.0, 25.0)
    assert q.verdict(None, None) == ""  # nothing known, nothing decided
    assert q.verdict(0.0, 120.0) == "" and q.best_gflops == 120.0
    spare = quiet.Quietness(threads=1)  # a timing on one thread leaves the other CPUs free
    assert spare.spare == max(0, quiet.cpu_count() - 1) + quiet.BUSY_SPARE_CPUS


def test_calibration_is_a_positive_rate():
    assert quiet.calibrate(torch.device("cpu")) > 0


def busy_check(reason="other processes used 1.9 of 2 CPUs"):
    def check(q, device, dtype):
        return reason, 1.9, 10.0
    return check


def small_config(tmp_path, **kw):
    base = dict(models=["dit", "sdm"], preset="tiny", steps=2, batch_sizes=[1], warmup=1, repeats=2,
                image_repeats=1, device="cpu", threads=1, out=tmp_path / "speed.csv", quiet_wait=0.0)
    return speed.SpeedConfig(**{**base, **kw})


def test_a_busy_machine_is_refused_with_one_line_and_nothing_appended(tmp_path, monkeypatch):
    monkeypatch.setattr(quiet, "check", busy_check())
    monkeypatch.setattr(quiet, "competitors", lambda seconds=1.0: "python (pid 4242) 98%")
    out = tmp_path / "speed.csv"
    result = CliRunner().invoke(app, ["speed", "--preset", "tiny", "--models", "dit,sdm", "--steps", "2",
                                      "--repeats", "2", "--quiet-wait", "0", "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: the machine is busy: other processes used 1.9 of 2 CPUs")
    assert "python (pid 4242) 98%" in lines[0] and "--allow-busy" in lines[0]
    assert not out.exists() and not speed.rounds_path(out).exists()


def test_allow_busy_times_anyway_and_flags_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(quiet, "check", busy_check())
    monkeypatch.setattr(quiet, "competitors", lambda seconds=1.0: "")
    rows = speed.run_speed(small_config(tmp_path, allow_busy=True), echo=lambda s: None)
    assert len(rows) == 2 and all(rows["busy"].str.startswith("busy at the start: other processes used 1.9"))
    assert (rows["status"] == "ok").all() and (rows["latency_nfe_median_s"] > 0).all()


def test_a_busy_round_is_thrown_away_and_timed_again_once_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(quiet, "check", lambda q, device, dtype: ("", 0.0, 100.0))  # a quiet gate
    monkeypatch.setattr(rounds, "calibrate", lambda device, dtype: 100.0)  # no calibration noise in this test
    readings = iter([5.0])  # the first round's reading is busy; every later one quiet
    monkeypatch.setattr(quiet.LoadMonitor, "other_cpus", lambda self: next(readings, 0.0))
    waited = []
    monkeypatch.setattr(rounds, "wait_for_quiet", lambda *a, **k: waited.append(1) or "")
    rows = speed.run_speed(small_config(tmp_path), echo=lambda s: None)
    assert waited == [1] and (rows["rounds_discarded"] == 1).all() and (rows["busy"].fillna("") == "").all()
    kept = speed.ResultsFile(speed.rounds_path(tmp_path / "speed.csv"), speed.RoundRow).read()
    nfe = kept[kept["kind"] == "nfe"]
    assert sorted(set(nfe["round"])) == [0, 1] and len(nfe) == 2 * 2  # two kept rounds of two models


def test_a_machine_that_stays_busy_stops_the_sweep_with_nothing_appended(tmp_path, monkeypatch):
    monkeypatch.setattr(quiet, "check", lambda q, device, dtype: ("", 0.0, 100.0))  # a quiet gate
    monkeypatch.setattr(quiet.LoadMonitor, "other_cpus", lambda self: 5.0)
    monkeypatch.setattr(rounds, "wait_for_quiet", lambda *a, **k: "other processes used 5.0 of 2 CPUs")
    with pytest.raises(BenchError, match="became busy while timing"):
        speed.run_speed(small_config(tmp_path), echo=lambda s: None)
    assert not (tmp_path / "speed.csv").exists()
