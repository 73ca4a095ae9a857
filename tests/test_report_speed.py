"""The report's speed section: one table per device, busy rows left out, ratios paired by round across processes."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from bench import stats
from bench.report import build_report
from bench.rows import RoundRow
from bench.speed import COLUMNS

CPU = dict(device="cpu", device_name="Test CPU (2 threads)", threads=2, precision="fp32", torch="2.x", cuda="none",
           commit="abc123")
GPU = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", threads=16, precision="bf16", torch="2.x",
           cuda="12.4", commit="abc123")
FLOPS = {"sisma": 1.3e9, "dit": 1.6e9, "sdm": 1.8e9}
RATIO = {"sisma": 1.0, "dit": 0.8, "sdm": 2.0}  # each model's time over SISMA's, every round


def write_csv(path, columns, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)


def sweep(device: dict, name: str, base: float, stamp: str, busy: str = "", processes: int = 3, rounds: int = 8):
    """Speed rows of three models at 32 px, batch 1, and their per-round times: the machine drifts by 2x from
    round to round (hitting every model alike), and each process runs at its own speed."""
    rows, times = [], []
    rng = np.random.default_rng(len(name))
    for model in FLOPS:
        mine = []
        for p in range(processes):
            for r in range(rounds):
                drift = (1 + p * 0.1) * (1 + (r % 2))  # slow processes, slow rounds
                seconds = base * RATIO[model] * drift * (1 + 0.01 * rng.standard_normal())
                mine.append(seconds)
                times.append(dict(sweep=name, process=p, round=r, position=0, model=model, resolution=32,
                                  batch_size=1, kind="nfe", seconds=seconds, busy=busy))
        median = float(np.median(mine))
        rows.append(dict(device, mode="timed", status="ok", model=model, preset="cpu", resolution=32, batch_size=1,
                         steps=200, nfe=200, compile=False, params=3.3e6, flops_per_nfe=FLOPS[model],
                         tokens_equiv=4.0, latency_nfe_median_s=median, latency_nfe_iqr_s=median / 10,
                         latency_nfe_all_s=" ".join(f"{v:.6g}" for v in mine), image_latency_projected_s=median * 200,
                         images_per_s_projected=1 / (median * 200), decode_latency_s=0.0, scan_backend="cpu",
                         attention_kernel="flash-cpu", timestamp=stamp, sweep=name, processes=processes,
                         repeats=rounds, busy=busy, calibration_gflops=100.0,
                         achieved_gflops=FLOPS[model] / median / 1e9, achieved_share=FLOPS[model] / median / 1e11,
                         profile_nfe_ms=median * 1e3, share_matmul=0.5, share_attention=0.0, share_scan=0.2,
                         share_conv=0.1, share_norm_elementwise=0.1, share_layout=0.1, share_other=0.0))
    return rows, times


@pytest.fixture
def two_devices(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    cpu_rows, cpu_times = sweep(CPU, "cpu-sweep", 0.02, "2026-01-01T00:00:00+00:00")
    gpu_rows, gpu_times = sweep(GPU, "gpu-sweep", 0.004, "2026-01-02T00:00:00+00:00")
    busy_rows, busy_times = sweep(CPU, "busy-sweep", 0.777, "2026-01-03T00:00:00+00:00",
                                  busy="busy at the start: other processes used 1.9 of 2 CPUs")
    write_csv(res / "speed.csv", COLUMNS, cpu_rows + gpu_rows + busy_rows)
    write_csv(res / "speed_rounds.csv", list(RoundRow.__dataclass_fields__), cpu_times + gpu_times + busy_times)
    return res


def test_one_speed_table_per_device_and_busy_rows_left_out(two_devices, tmp_path):
    md = build_report(two_devices, tmp_path / "reports", "t").read_text()
    headings = [line for line in md.splitlines() if line.startswith("### ") and "commit" in line]
    assert len(headings) == 2, headings
    assert headings[0].startswith("### NVIDIA H100 80GB HBM3: bf16") and "3 processes x 8 interleaved rounds" in \
        headings[0]
    assert headings[1].startswith("### Test CPU (2 threads): fp32")
    assert "Rows of 2 devices: one table each" in md
    assert "3 rows timed on a busy machine (column `busy` of speed.csv) are left out of every table and ratio" in md
    assert "777" not in md  # the busy sweep's 0.777 s per NFE reaches no table or ratio
    assert (tmp_path / "reports" / "t" / "latency.png").is_file()
    assert (tmp_path / "reports" / "t" / "breakdown.png").is_file()


def test_ratios_are_paired_by_round_and_their_interval_covers_every_process(two_devices, tmp_path):
    md = build_report(two_devices, tmp_path / "reports", "t").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| sdm ") and "yes" in line]
    assert len(lines) == 2  # one ratio line per device, paired
    # every round's SDM / SISMA is 2 (to within the 1% noise) although the machine's speed halves every other round
    value = float(lines[0].split("|")[2].split()[0])
    assert value == pytest.approx(2.0, abs=0.03)
    headline = next(line for line in md.splitlines() if "SDM / SISMA time per network evaluation:" in line)
    assert float(headline.split("evaluation: ")[1].split()[0]) == pytest.approx(2.0, abs=0.03)
    assert "mean over 3 processes of each one's median per-round ratio (8 rounds each)" in headline


def test_paired_ratio_is_the_mean_of_the_processes_with_an_interval_for_a_second_run():
    rng = np.random.default_rng(0)
    # three processes whose ratios differ (1.9, 2.0, 2.1), each tight within: the interval must reach across them
    groups = [level + 0.005 * rng.standard_normal(20) for level in (1.9, 2.0, 2.1)]
    e = stats.paired_ratio(groups)
    medians = [np.median(g) for g in groups]
    assert e.value == pytest.approx(np.mean(medians)) and e.seeds == 3 and e.masks == 60
    # t(0.975, 2 degrees of freedom) x sqrt(2) standard errors: where a second run of 3 processes reads
    half = 4.302653 * np.std(medians, ddof=1) * np.sqrt(2 / 3)
    assert (e.low, e.high) == pytest.approx((e.value - half, e.value + half))
    assert e.low < 1.9 and e.high > 2.1
    within = stats.paired_ratio([groups[1]])  # one process: only the rounds' spread
    assert within.high - within.low < 0.01 and within.seeds == 1

