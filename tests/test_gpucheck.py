"""bench gpu-check without a GPU: the one-line error, and every part of the check on made-up inputs (commands,
outputs, speed rows, memory numbers), the CPU reference standing in for the fused kernel."""
import json
import os
import sys
import time

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench import gpucheck as gc
from bench.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py
CUDA = torch.cuda.is_available()


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def done(stdout="", stderr="", code=0, seconds=1.0):
    return gc.Completed(code, stdout, stderr, seconds)


# ---------------------------------------------------------------------------------------------- the CLI

def test_without_cuda_the_cli_exits_2_with_one_line_and_writes_nothing(monkeypatch, tmp_path):
    no_cuda(monkeypatch)
    result = CliRunner().invoke(app, ["gpu-check", "--out", str(tmp_path / "check")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device: "), result.output
    assert not (tmp_path / "check").exists()


@pytest.mark.parametrize("args, text", [(["--skip", "pytest,sped"], "--skip sped: not a step"),
                                        (["--timeout-per-step", "0"], "--timeout-per-step 0")])
def test_bad_options_are_one_line_errors(monkeypatch, args, text):
    result = CliRunner().invoke(app, ["gpu-check", *args])
    assert result.exit_code == 2 and result.output.startswith(f"error: {text}"), result.output
    assert len(result.output.strip().splitlines()) == 1


def fake_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "no_cuda_reason", lambda: None)
    monkeypatch.setattr(gc, "_header", lambda: "bench gpu-check: Fake GPU (80 GiB, 1 GPU(s))")
    monkeypatch.chdir(tmp_path)


def test_the_cli_prints_one_table_and_exits_1_when_a_step_fails(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, tmp_path)
    monkeypatch.setattr(gc, "memory_step", lambda cfg: gc.StepResult("memory", "ok", 1.0, "sdm 1.01"))
    monkeypatch.setattr(gc, "fused_mamba_step", lambda cfg: gc.StepResult("fused-mamba", "fail", 1.0, "bf16 FAIL"))
    result = CliRunner().invoke(app, ["gpu-check", "--out", "check", "--skip", "pytest,speed"])
    assert result.exit_code == 1, result.output
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "| step" in table[0]  # header, rule, one row per step
    assert "Fake GPU" in result.output and "1 ok, 1 failed, 2 skipped" in result.output
    assert "written: check/gpu-check.md, check/gpu-check.json" in result.output
    monkeypatch.setattr(gc, "fused_mamba_step", lambda cfg: gc.StepResult("fused-mamba", "ok", 1.0, "fine"))
    assert CliRunner().invoke(app, ["gpu-check", "--out", "check", "--skip", "pytest,speed"]).exit_code == 0


# ---------------------------------------------------------------------------------------------- the whole check

def test_a_failing_or_broken_step_does_not_stop_the_others(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, tmp_path)
    ran = []

    def step(name, status):
        def run(cfg):
            ran.append(name)
            if status == "raise":
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
            return gc.StepResult(name, status, 0.0, f"{name} detail", {"x": 1})
        return run

    monkeypatch.setattr(gc, "pytest_step", step("pytest", "raise"))
    monkeypatch.setattr(gc, "speed_step", step("speed", "fail"))
    monkeypatch.setattr(gc, "memory_step", step("memory", "ok"))
    seen = []
    check = gc.run_gpu_check(gc.GpuCheckConfig(out=tmp_path / "out", skip=["fused-mamba"]), progress=seen.append)
    assert ran == ["pytest", "speed", "memory"]
    assert [(r.step, r.status) for r in check.results] == [("pytest", "fail"), ("speed", "fail"), ("memory", "ok"),
                                                           ("fused-mamba", "skipped")]
    assert check.results[0].detail == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert not check.ok and len(seen) == 6
    saved = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["fail", "fail", "ok", "skipped"] and saved["ok"] is False
    assert saved["steps"][2]["data"] == {"x": 1}
    assert (tmp_path / "out" / "gpu-check.md").read_text() == check.text


def test_timeouts_default_per_step_and_add_up_to_eight_minutes():
    assert set(gc.TIMEOUTS) == set(gc.STEPS) and sum(gc.TIMEOUTS.values()) <= 8 * 60
    assert gc.GpuCheckConfig().timeout("pytest") == gc.TIMEOUTS["pytest"]
    assert gc.GpuCheckConfig(timeout_per_step=30).timeout("memory") == 30


# ---------------------------------------------------------------------------------------------- the table

def test_the_table_has_one_row_per_step_and_escapes_pipes():
    results = [gc.StepResult("pytest", "ok", 12.34, "20 passed, 1 skipped"),
               gc.StepResult("speed", "fail", 3.0, "dit's attention ran math | on CUDA\nsecond line"),
               gc.StepResult("memory", "skipped", 0.0, "--skip")]
    text = gc.render_table(results)
    lines = text.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["step", "status", "seconds", "detail"]
    assert len(lines) == 2 + 3 and all(line.count("|") == 5 for line in lines[:3])
    assert "| 12.3 " in lines[2] and "20 passed, 1 skipped" in lines[2]
    assert "math \\| on CUDA second line" in lines[3]
    assert gc.summary_line(results, 61.2) == "1 ok, 1 failed, 1 skipped in 61 s"
    assert gc.report_text("hdr", results, 61.2).startswith("hdr: 1 ok, 1 failed, 1 skipped in 61 s\n\n| step")


# ---------------------------------------------------------------------------------------------- 1. pytest

@pytest.mark.parametrize("line, counts", [
    ("3 passed, 1 failed, 2 skipped, 10 deselected, 1 warning in 12.34s",
     {"passed": 3, "failed": 1, "skipped": 2, "deselected": 10, "warnings": 1}),
    ("========= 1 error in 0.50s =========", {"errors": 1}),
    ("2 passed, 3 errors in 1.00s", {"passed": 2, "errors": 3}),
    ("21 passed, 2 skipped, 450 deselected in 183.20s (0:03:03)", {"passed": 21, "skipped": 2, "deselected": 450}),
    ("no tests ran in 0.01s", {}),
])
def test_pytest_summary_is_parsed(line, counts):
    output = f"..s.F\n[100%]\n=== short test summary info ===\nFAILED tests/test_gpu.py::test_x - boom\n{line}\n"
    assert gc.parse_pytest_summary(output) == counts


def test_a_pytest_output_without_summary_gives_none_and_its_progress_so_far():
    output = "..s.F.                                   [ 40%]\n.E..x\n"
    assert gc.parse_pytest_summary(output) is None
    assert gc.parse_pytest_progress(output) == {"passed": 7, "skipped": 1, "failed": 1, "errors": 1, "xfailed": 1}


@pytest.mark.parametrize("completed, status, detail", [
    (done("....s [100%]\n4 passed, 1 skipped, 400 deselected in 90.1s\n"), "ok", "4 passed, 1 skipped"),
    (done((".F [100%]\nFAILED tests/test_gpu.py::test_plan_predicts[sdm-4-4-False] - AssertionError: (3.1, 2.0)\n"
           "1 failed, 1 passed in 9.0s\n"), code=1), "fail",
     "1 passed, 1 failed; failed: test_plan_predicts[sdm-4-4-False]"),
    (done("..s\n", code=None), "fail",
     "timed out after 240 s (--timeout-per-step gives it longer); so far: 2 passed, 1 skipped"),
    (done("\n400 deselected in 2.0s\n", code=5), "fail", "no test is marked gpu here (pytest exit code 5)"),
    (done("sss [100%]\n3 skipped in 2.0s\n"), "fail", "3 skipped: no gpu test passed"),
    (done("", "ERROR: usage: ...\n", code=4), "fail", "pytest exited with code 4 without a summary: ERROR: usage: ..."),
])
def test_pytest_verdict(completed, status, detail):
    got = gc.pytest_verdict(completed, 240)
    assert got[:2] == (status, detail)


def test_the_pytest_step_runs_the_gpu_tests_in_the_repository(monkeypatch, tmp_path):
    calls = []

    def run(cmd, timeout, cwd=None, env=None):
        calls.append((cmd, timeout, cwd, env))
        return done("4 passed, 400 deselected in 9.0s\n")

    monkeypatch.setattr(gc, "run_command", run)
    monkeypatch.chdir(tmp_path)
    result = gc.pytest_step(gc.GpuCheckConfig(out=tmp_path / "out", timeout_per_step=60))
    (cmd, timeout, cwd, env), = calls
    assert cmd == [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    assert timeout == 60 and cwd == gc.ROOT and env["SIS_BENCH_OFFLINE"] == "1"
    assert (result.status, result.detail) == ("ok", "4 passed")
    assert result.data["command"] == "python -m pytest -m gpu -q -p no:cacheprovider"
    assert result.data["counts"] == {"passed": 4, "deselected": 400}
    assert (tmp_path / "out" / "logs" / "pytest.log").read_text().startswith("$ python -m pytest -m gpu")


# ---------------------------------------------------------------------------------------------- 2. speed

def row(model, scan="none", attention="none", status="ok", ms=10.0, device="cuda", error=None):
    return {"model": model, "status": status, "error": error, "device": device, "latency_nfe_median_s": ms / 1000,
            "scan_backend": scan, "attention_kernel": attention}


GOOD = [row("sisma", scan="cuda,cuda-fused", ms=12.5), row("dit", attention="flash", ms=4.0),
        row("sdm", attention="cudnn,flash", ms=20.0)]


def test_speed_rows_with_the_fused_kernels_are_ok():
    status, detail, per_model = gc.speed_verdict(GOOD)
    assert status == "ok", detail
    assert detail == ("sisma 12.50 ms/NFE (scan cuda,cuda-fused); dit 4.00 ms/NFE (attention flash); "
                      "sdm 20.00 ms/NFE (attention cudnn,flash)")
    assert [m["ms_per_nfe"] for m in per_model] == pytest.approx([12.5, 4.0, 20.0])
    assert gc.speed_verdict([row("sisma", scan="cuda")] + GOOD[1:])[0] == "ok"  # unfused mamba-ssm scan


@pytest.mark.parametrize("bad, problem", [
    (row("sisma", scan="torch"), "sisma's scan ran torch on CUDA, not mamba-ssm's kernel"),
    (row("sisma", scan="cuda,cpu"), "sisma's scan ran cuda,cpu on CUDA"),
    (row("sisma", scan=float("nan")), "sisma's scan ran nan on CUDA"),
    (row("dit", attention="math"), "dit's attention ran math on CUDA, not flash, cudnn or mem-efficient"),
    (row("dit", attention="none"), "dit ran no scaled_dot_product_attention kernel"),
    (row("sdm", attention="flash,math"), "sdm's attention ran math on CUDA"),
    (row("sdm", status="oom", error="CUDA out of memory. Tried to allocate\n..."), "sdm: oom (CUDA out of memory."),
    (row("dit", attention="flash", device="cpu"), "dit ran on cpu, not cuda"),
])
def test_a_slow_kernel_or_a_failed_row_on_cuda_fails_with_the_reason(bad, problem):
    rows = [bad if r["model"] == bad["model"] else r for r in GOOD]
    status, detail, _ = gc.speed_verdict(rows)
    assert status == "fail" and problem in detail, detail


def test_a_missing_model_fails():
    status, detail, _ = gc.speed_verdict(GOOD[:2])
    assert status == "fail" and detail.endswith("FAIL: sdm: no row")


def test_the_speed_step_runs_bench_speed_with_its_flags_and_reads_only_its_rows(monkeypatch, tmp_path):
    out = tmp_path / "out"
    csv = out / "speed.csv"
    out.mkdir()
    pd.DataFrame([row("sisma", scan="torch")]).to_csv(csv, index=False)  # an earlier check's row
    calls = []

    def run(cmd, timeout, cwd=None, env=None):
        calls.append(cmd)
        with open(csv, "a") as f:
            pd.DataFrame(GOOD).to_csv(f, index=False, header=False)
        return done("rows appended\n")

    monkeypatch.setattr(gc, "run_command", run)
    result = gc.speed_step(gc.GpuCheckConfig(out=out))
    cmd, = calls
    i = cmd.index("speed")
    assert cmd[i + 1:] == ["--preset", "paper", "--models", "sisma,dit,sdm", "--batch-sizes", "1", "--warmup", "2",
                           "--repeats", "5", "--processes", "1", "--full-image-max-seconds", "0", "--precision",
                           "bf16", "--out", str(csv)]
    assert result.status == "ok", result.detail
    assert [m["model"] for m in result.data["models"]] == ["sisma", "dit", "sdm"]


def test_a_speed_command_that_fails_is_a_fail_with_its_last_line(monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "run_command", lambda *a, **k: done("", "Usage: ...\nError: No such option: --processes",
                                                                code=2))
    result = gc.speed_step(gc.GpuCheckConfig(out=tmp_path))
    assert result.status == "fail"
    assert result.detail == "bench speed exited with code 2: Error: No such option: --processes"


# ---------------------------------------------------------------------------------------------- 3. memory

@pytest.mark.parametrize("measured, predicted, verdict", [
    (100, 100, "ok"), (100, 86, "ok"), (100, 115, "ok"), (100, 84, "fail"), (100, 116, "fail"), (0, 100, "fail"),
    (100, 0, "fail"), (20 * 2 ** 30, 17 * 2 ** 30, "ok"), (20 * 2 ** 30, 24 * 2 ** 30, "fail"),
])
def test_memory_verdict(measured, predicted, verdict):
    assert gc.memory_verdict(measured, predicted) == verdict
    assert gc.memory_verdict(measured, predicted, tolerance=0.5) == ("ok" if measured and predicted else "fail")


class FakeAllocator:
    """torch.cuda's memory statistics for CPU tensors: a fixed peak, 80 GiB free."""

    def __init__(self, monkeypatch, peak: int):
        for name, fn in {"empty_cache": lambda: None, "reset_peak_memory_stats": lambda: None,
                         "memory_allocated": lambda: 1000, "max_memory_allocated": lambda: 1000 + peak,
                         "synchronize": lambda: None, "mem_get_info": lambda: (80 * 2 ** 30, 80 * 2 ** 30)}.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_measured_training_peak_runs_the_trainers_steps(monkeypatch):
    FakeAllocator(monkeypatch, peak=12345)
    from bench.plan import Setting

    assert gc.measured_training_peak("dit", "tiny", 2, Setting(1, 2, True), "fp32", steps=1, device="cpu") == 12345


def test_memory_check_compares_with_the_plan_and_goes_on_after_a_failure(monkeypatch):
    from bench import plan

    FakeAllocator(monkeypatch, peak=0)
    predicted = {"dit": 100 * 2 ** 20, "sdm": 200 * 2 ** 20, "sisma": 300 * 2 ** 20}
    measured = {"dit": 104 * 2 ** 20, "sdm": 300 * 2 ** 20}

    def fake_training_memory(model, preset, batch, setting, precision, grid_batch=0):
        assert (preset, batch, setting, precision, grid_batch) == ("paper", 4, plan.Setting(4, 1, False), "bf16", 0)
        return type("Memory", (), {"peak": predicted[model]})()

    def fake_measured(model, preset, batch, setting, precision, steps, device):
        if model not in measured:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return measured[model]

    monkeypatch.setattr(plan, "training_memory", fake_training_memory)
    monkeypatch.setattr(gc, "measured_training_peak", fake_measured)
    monkeypatch.setattr("models.ssm._fused_op", lambda: object())  # mamba-ssm's fused kernel "loads"
    result = gc.memory_check(models=("dit", "sdm", "sisma"))
    entries = {e["model"]: e for e in result["data"]["models"]}
    assert result["status"] == "fail"
    assert entries["dit"]["status"] == "ok" and entries["dit"]["ratio"] == pytest.approx(1.04)
    assert entries["sdm"]["status"] == "fail" and entries["sdm"]["ratio"] == pytest.approx(1.5)
    assert entries["sisma"]["status"] == "fail" and entries["sisma"]["error"].startswith("OutOfMemoryError: CUDA out")
    assert result["detail"].startswith("measured / predicted peak, 3 paper training steps at batch 4, bf16 (ok within "
                                       "15%): dit 104.0 MiB / 100.0 MiB = 1.04; sdm 300.0 MiB / 200.0 MiB = 1.50 FAIL")


def test_memory_check_skips_what_cannot_run_here(monkeypatch):
    from bench import plan

    FakeAllocator(monkeypatch, peak=0)
    monkeypatch.setattr(plan, "training_memory", lambda *a, **k: type("M", (), {"peak": 70 * 2 ** 30})())
    monkeypatch.setattr("models.ssm._fused_op", lambda: None)
    result = gc.memory_check(models=("sisma", "sdm"))
    assert result["status"] == "skipped"
    assert "sisma skipped: mamba-ssm's fused mamba_inner_fn does not load" in result["detail"]
    assert "sdm skipped: predicted 70.0 GiB does not fit 80% of the free 80.0 GiB" in result["detail"]


# ---------------------------------------------------------------------------------------------- 4. fused Self-Mamba

def test_the_fused_comparison_passes_the_reference_against_itself():
    from models import ssm

    result = gc.fused_mamba_comparison(torch.float32, kernel=ssm.mamba_inner_reference, device="cpu")
    assert result["ok"] and result["dtype"] == "fp32" and result["worst"] == 0
    assert set(result["grads"]) == set(gc.FUSED_GRADS)


@pytest.mark.parametrize("broken", ["output", "gradient"])
def test_the_fused_comparison_catches_a_wrong_kernel(broken):
    from models import ssm

    def kernel(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, *args, **kwargs):
        if broken == "gradient":  # the same output, but x_proj's gradient doubled
            x_proj = x_proj + (x_proj - x_proj.detach())
        out = ssm.mamba_inner_reference(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, *args, **kwargs)
        return out * 1.1 if broken == "output" else out

    result = gc.fused_mamba_comparison(torch.float32, kernel=kernel, device="cpu")
    assert not result["ok"]
    if broken == "output":
        assert result["output"]["worst"] > 1
    else:
        assert result["output"]["worst"] == 0 and result["grads"]["x_proj"]["worst"] > 1


def test_fused_mamba_check_reports_each_dtype(monkeypatch):
    from models import ssm

    result = gc.fused_mamba_check(kernel=ssm.mamba_inner_reference, device="cpu")
    assert result["status"] == "ok" and [c["dtype"] for c in result["data"]["comparisons"]] == ["fp32", "bf16"]
    assert "fp32 worst error 0 of the tolerance" in result["detail"] and "bf16 worst error" in result["detail"]


@pytest.mark.skipif(CUDA, reason="the fused kernel may load where there is CUDA")
def test_the_child_step_runs_in_its_own_process_and_reports_as_json(tmp_path):
    result = gc.child_step(gc.GpuCheckConfig(out=tmp_path), "fused-mamba")
    assert result.status == "fail" and "mamba_inner_fn does not load" in result.detail, result
    assert result.data["command"] == "python -m bench.gpucheck fused-mamba" and result.data["returncode"] == 0


@pytest.mark.parametrize("completed, detail", [
    (done("some output\n", "Traceback ...\nRuntimeError: CUDA error: misaligned address\n", code=1),
     "exited with code 1 without a result: RuntimeError: CUDA error: misaligned address"),
    (done("", code=None), "timed out after 40 s (--timeout-per-step gives it longer)"),
    (done(gc.RESULT_MARKER + '{"status": "maybe", "detail": ""}\n'), "exited with code 0 without a result: "),
])
def test_a_child_step_that_crashes_or_hangs_is_a_fail(monkeypatch, tmp_path, completed, detail):
    monkeypatch.setattr(gc, "run_command", lambda *a, **k: completed)
    result = gc.child_step(gc.GpuCheckConfig(out=tmp_path), "fused-mamba")
    assert result.status == "fail" and result.detail.startswith(detail), result.detail


def test_a_child_result_is_its_last_marked_line():
    out = f"noise\n{gc.RESULT_MARKER}{json.dumps({'status': 'ok', 'detail': 'd', 'data': {'a': 1}})}\n"
    assert gc.parse_child_result(out) == {"status": "ok", "detail": "d", "data": {"a": 1}}
    assert gc.parse_child_result("no result\n") is None
    assert gc.parse_child_result(gc.RESULT_MARKER + "{not json\n") is None


# ---------------------------------------------------------------------------------------------- subprocesses

def test_run_command_kills_the_command_and_its_children_on_timeout():
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    start = time.perf_counter()
    completed = gc.run_command([sys.executable, "-c", code], timeout=3)
    assert completed.timed_out and time.perf_counter() - start < 20
    pid = int(completed.stdout.split()[0])
    for _ in range(50):  # the orphan is reaped by init shortly after it is killed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split()[2] == "Z", "the grandchild survived the timeout"


def test_run_command_returns_code_and_output():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    completed = gc.run_command([sys.executable, "-c", code], timeout=60)
    assert (completed.returncode, completed.stdout, completed.stderr) == (3, "out\n", "err\n")
    assert completed.last_line() == "err" and not completed.timed_out


def test_no_cuda_reason_names_the_cause(monkeypatch):
    no_cuda(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gc.no_cuda_reason() == "torch.cuda.is_available() is False (no NVIDIA driver or no visible GPU)"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA build" in gc.no_cuda_reason()


# ---------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_check_fused_step_on_this_gpu(tmp_path):
    """The fused-mamba step end to end (its own process), the quickest of the four."""
    result = gc.fused_mamba_step(gc.GpuCheckConfig(out=tmp_path))
    assert result.status == "ok", result.detail
