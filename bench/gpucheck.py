"""`bench gpu-check`: a CUDA machine checked end to end before its first GPU run, in one table.

Four steps, each one row (status ok, fail or skipped; seconds; what was measured):

- ``pytest``: ``pytest -m gpu`` in the repository (tests/test_gpu.py), its summary line parsed;
- ``speed``: ``bench speed`` at the ``paper`` preset, batch 1, bf16, into ``OUT/speed.csv``: ms per NFE of each
  backbone and the kernels that ran. SISMA's scan must be mamba-ssm's (``cuda-fused`` or ``cuda``) and any attention
  a fused SDPA kernel (flash, cudnn, mem-efficient); the PyTorch or CPU scan, or math attention, on CUDA is a fail;
- ``memory``: ``torch.cuda.max_memory_allocated`` of a few ``paper`` training steps per backbone, at batch
  ``MEMORY_BATCH`` in one micro-batch without checkpointing, against ``bench plan``'s prediction of the same step
  (``bench.plan.training_memory``, the sample grid left out; SISMA only where mamba-ssm's fused ``mamba_inner_fn``
  loads, which the prediction assumes). The measured steps are the trainer's: its ``forward_backward`` under the
  recipe's autocast, fused AdamW (``make_optimizer``), gradient clipping and the EMA update (``update_ema``), with the
  fp32 model, EMA copy, AdamW moments and gradients the plan adds from the parameters. Ok when the prediction is
  within ``PLAN_TOLERANCE`` (15%) of the measurement, the bound
  tests/test_gpu.py asserts: ``bench plan`` keeps a 10% margin for what is not a tensor (CUDA context, allocator
  fragmentation, workspaces), so an error well beyond that would make its choices unsafe (under) or wasteful (over);
- ``fused-mamba``: mamba-ssm's fused ``mamba_inner_fn`` against ``models.ssm.mamba_inner_reference`` (fp32 on the
  CPU) with a Self-Mamba layer's weights, output and every gradient, in fp32 and bf16, at tests/test_gpu.py's
  tolerances (the same function runs there).

Every step runs in its own process under a timeout (``pytest`` and ``bench speed`` as commands, ``memory`` and
``fused-mamba`` as ``python -m bench.gpucheck STEP``, whose last line of output is its result as JSON): a step that
hangs, crashes or leaves its CUDA context broken costs its own row only, and each measures from a fresh allocator.
The timeouts (``TIMEOUTS``) add up to 8 minutes. The folder ``out`` gets the table (``gpu-check.md``), the raw results
(``gpu-check.json``, rewritten after each step), each step's output (``logs/STEP.log``) and the speed rows. Downloads
are off in the steps (``SIS_BENCH_OFFLINE=1``): a latent model without the SD-VAE in the cache decodes with its
architecture and random weights, which costs the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import (
    plan,  # a module: tests replace its training_memory
    presets,
    recompute,
)
from bench.errors import BenchError
from bench.io import display_path, strict_json, tidy, write_json, write_text
from bench.plan import Setting, _space, size_text
from bench.runtime import PRECISIONS
from bench.train import forward_backward, make_optimizer, update_ema
from bench.variants import build_model
from models import ssm
from models.mamba import SelfMamba, scan_orders

STEPS = ("pytest", "speed", "memory", "fused-mamba")
TIMEOUTS = {"pytest": 240.0, "speed": 100.0, "memory": 100.0, "fused-mamba": 40.0}  # seconds; 8 minutes in all
MODELS = ("sisma", "dit", "sdm")
STATUSES = ("ok", "fail", "skipped")
ROOT = Path(__file__).resolve().parent.parent  # the repository (pytest runs here)
RESULT_MARKER = "GPU-CHECK-RESULT "  # a child step's last line: this, then its result as JSON
SPEED_ARGS = ["--preset", "paper", "--models", ",".join(MODELS), "--batch-sizes", "1", "--warmup", "2", "--repeats",
              "5", "--processes", "1", "--full-image-max-seconds", "0", "--precision", "bf16"]
GPU_SCANS = {"cuda", "cuda-fused"}  # models.ssm.used_backends() names of mamba-ssm's kernels
MAMBA_MODELS = ("sisma", "dim")  # backbones whose scans must run mamba-ssm's kernels on CUDA
FUSED_ATTENTION = {"flash", "cudnn", "mem-efficient"}  # bench.timing.SDPA_KERNELS names of the fused CUDA kernels
MEMORY_BATCH = 4  # small enough for SDM (about 37 GiB predicted) on an 80 GiB GPU; tests/test_gpu.py's batch
MEMORY_STEPS = 3
PLAN_TOLERANCE = 0.15  # |predicted - measured| <= 15% of measured
FREE_SHARE = 0.8  # a model whose predicted peak exceeds this share of the free memory is skipped
# mamba-ssm's tolerances (tests/ops/test_selective_scan.py): (rtol, atol) of the scan's outputs per input dtype
SCAN_TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}
FUSED_OUTPUT_FACTOR, FUSED_GRAD_FACTOR = 5, 10  # the fused layer's output and gradients, on top of SCAN_TOL
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FUSED_GRADS = ("xz", "conv1d.weight", "conv1d.bias", "x_proj", "dt_proj", "out_proj")
TAIL_CHARS = 4000  # of a step's output kept in the JSON


@dataclass
class StepResult:
    """One row of the table, with the raw numbers behind it."""

    step: str
    status: str  # ok, fail or skipped
    seconds: float
    detail: str
    data: dict = field(default_factory=dict)


@dataclass
class GpuCheckConfig:
    out: Path = Path("results/gpu-check")
    timeout_per_step: float | None = None  # None: each step's own (TIMEOUTS)
    skip: list[str] = field(default_factory=list)

    def timeout(self, step: str) -> float:
        return float(self.timeout_per_step) if self.timeout_per_step else TIMEOUTS[step]


@dataclass
class GpuCheck:
    """What ``run_gpu_check`` found."""

    header: str
    results: list[StepResult]
    seconds: float
    markdown: Path
    json: Path

    @property
    def ok(self) -> bool:
        return not any(r.status == "fail" for r in self.results)

    @property
    def text(self) -> str:
        """The header with the counts, then the table (what gpu-check.md holds)."""
        return report_text(self.header, self.results, self.seconds)


# ---------------------------------------------------------------------------------------------- the check

def no_cuda_reason() -> str | None:
    """Why there is no CUDA device here, or None when there is one."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA build; install the CUDA build for this machine"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "torch.cuda.is_available() is False (no NVIDIA driver or no visible GPU)"
    return None


def check_config(cfg: GpuCheckConfig) -> None:
    unknown = [s for s in cfg.skip if s not in STEPS]
    if unknown:
        raise BenchError(f"--skip {','.join(unknown)}: not a step; the steps are {', '.join(STEPS)}")
    if cfg.timeout_per_step is not None and not cfg.timeout_per_step > 0:
        raise BenchError(f"--timeout-per-step {cfg.timeout_per_step}: give a positive number of seconds")


def run_gpu_check(cfg: GpuCheckConfig, progress=None) -> GpuCheck:
    """Every step not skipped, in order, each bounded by its timeout; a failing step does not stop the others.

    A one-line error (BenchError) without CUDA, before anything runs or is written. ``progress(text)`` hears of each
    step as it starts and ends."""
    check_config(cfg)
    why = no_cuda_reason()
    if why:
        raise BenchError(f"no CUDA device: {why}; `bench doctor` says what is missing")
    say = progress or (lambda text: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    header = _header()
    runners = {"pytest": pytest_step, "speed": speed_step, "memory": memory_step, "fused-mamba": fused_mamba_step}
    results: list[StepResult] = []
    start = time.perf_counter()
    md, js = out / "gpu-check.md", out / "gpu-check.json"
    for i, step in enumerate(STEPS, 1):
        if step in cfg.skip:
            results.append(StepResult(step, "skipped", 0.0, "--skip"))
            continue
        say(f"[{i}/{len(STEPS)}] {step} (at most {cfg.timeout(step):.0f} s) ...")
        t0 = time.perf_counter()
        try:
            result = runners[step](cfg)
        except Exception as e:  # noqa: BLE001 - a broken step is its own row's fail, never the end of the check
            result = StepResult(step, "fail", 0.0, f"{type(e).__name__}: {_first_line(e)}")
        result.seconds = round(time.perf_counter() - t0, 1)
        results.append(result)
        say(f"[{i}/{len(STEPS)}] {step}: {result.status} in {result.seconds:.0f} s")
        write_results(md, js, header, results, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    write_results(md, js, header, results, seconds)
    return GpuCheck(header, results, seconds, md, js)


def _header() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"bench gpu-check: {p.name} ({p.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} GPU(s)), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _first_line(e: BaseException | str) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------------------------------------- output

def render_table(results: list[StepResult]) -> str:
    """The rows as one Markdown table: step, status, seconds, detail."""
    import pandas as pd

    rows = [{"step": r.step, "status": r.status, "seconds": f"{r.seconds:.1f}",
             "detail": str(r.detail).replace("|", "\\|").replace("\n", " ")} for r in results]
    df = pd.DataFrame(rows, columns=["step", "status", "seconds", "detail"])
    return df.to_markdown(index=False, disable_numparse=True) + "\n"


def summary_line(results: list[StepResult], seconds: float) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return f"{counts['ok']} ok, {counts['fail']} failed, {counts['skipped']} skipped in {seconds:.0f} s"


def report_text(header: str, results: list[StepResult], seconds: float) -> str:
    return f"{header}: {summary_line(results, seconds)}\n\n{render_table(results)}"


def write_results(md: Path, js: Path, header: str, results: list[StepResult], seconds: float) -> None:
    write_text(md, tidy(report_text(header, results, seconds)))
    write_json(js, {"header": tidy(header), "seconds": round(seconds, 1), "ok": not any(r.status == "fail"
                                                                                         for r in results),
                    "steps": [asdict(r) for r in results]})


# ---------------------------------------------------------------------------------------------- subprocesses

@dataclass
class Completed:
    """A finished (or killed) command: ``returncode`` None when it ran out of time."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_line(self) -> str:
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return ""


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the command's process group (its own session): the command and whatever it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_command(cmd: list[str], timeout: float, cwd: str | Path | None = None, env: dict | None = None) -> Completed:
    """Run ``cmd`` with its output captured; after ``timeout`` seconds it and its children are killed. An
    interruption (Ctrl-C) kills them too before it goes on."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild in a session of its own holds the pipes
            stdout, stderr = "", ""
        code = None
    except BaseException:
        _kill(proc)
        raise
    return Completed(code, stdout or "", stderr or "", time.perf_counter() - start)


def _env() -> dict:
    return dict(os.environ, SIS_BENCH_OFFLINE="1", PYTHONUNBUFFERED="1")


def _shown(cmd: list[str]) -> str:
    """A command as the results show it: ``python`` for this interpreter, paths without this machine's layout."""
    return " ".join(["python" if c == sys.executable else tidy(c) for c in cmd])


def _log(cfg: GpuCheckConfig, step: str, cmd: list[str], done: Completed) -> Path:
    path = Path(cfg.out) / "logs" / f"{step}.log"
    status = f"timed out after {done.seconds:.0f} s" if done.timed_out else f"exit code {done.returncode}"
    write_text(path, tidy(f"$ {_shown(cmd)}\n# {status}\n\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"))
    return path


def _record(cfg: GpuCheckConfig, step: str, cmd: list[str], done: Completed) -> dict:
    return {"command": _shown(cmd), "returncode": done.returncode, "timed_out": done.timed_out,
            "timeout_s": cfg.timeout(step), "log": display_path(_log(cfg, step, cmd, done)),
            "output_tail": tidy((done.stdout + done.stderr)[-TAIL_CHARS:])}


def _timed_out(cfg: GpuCheckConfig, step: str) -> str:
    return f"timed out after {cfg.timeout(step):.0f} s (--timeout-per-step gives it longer)"


# ---------------------------------------------------------------------------------------------- 1. pytest -m gpu

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")
PYTEST_PROGRESS = re.compile(r"^([.sFExX]+)\s*(\[\s*\d+%\])?$")
PROGRESS_NAMES = {".": "passed", "s": "skipped", "F": "failed", "E": "errors", "x": "xfailed", "X": "xpassed"}


def parse_pytest_summary(output: str) -> dict[str, int] | None:
    """The counts of pytest's final line ('3 passed, 1 failed, 2 skipped, 10 deselected in 12.3s'), or None when
    there is none (pytest did not finish). 'error'/'errors' count as ``errors``, 'warning(s)' as ``warnings``."""
    for line in reversed(output.splitlines()):
        text = line.strip().strip("=").strip()
        if re.search(r"\bin \d+(\.\d+)?s\b", text) and (PYTEST_COUNT.search(text) or "no tests ran" in text):
            counts: dict[str, int] = {}
            for n, word in PYTEST_COUNT.findall(text):
                key = "errors" if word.startswith("error") else "warnings" if word.startswith("warning") else word
                counts[key] = counts.get(key, 0) + int(n)
            return counts
    return None


def parse_pytest_progress(output: str) -> dict[str, int]:
    """Outcomes so far from ``-q``'s progress characters (for a run that was killed before its summary)."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        match = PYTEST_PROGRESS.match(line.strip())
        if match:
            for ch in match.group(1):
                counts[PROGRESS_NAMES[ch]] = counts.get(PROGRESS_NAMES[ch], 0) + 1
    return counts


def count_text(counts: dict[str, int]) -> str:
    order = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) or "no tests ran"


def failed_tests(output: str) -> list[str]:
    """Test ids of pytest's 'FAILED id - ...' and 'ERROR id - ...' short-summary lines."""
    return [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)]


def pytest_verdict(done: Completed, timeout: float) -> tuple[str, str, dict]:
    """(status, detail, counts) of a ``pytest -m gpu`` run."""
    output = done.stdout + "\n" + done.stderr
    if done.timed_out:
        so_far = parse_pytest_progress(done.stdout)
        return "fail", (f"timed out after {timeout:.0f} s (--timeout-per-step gives it longer); so far: "
                        f"{count_text(so_far)}"), so_far
    counts = parse_pytest_summary(output)
    if counts is None:
        return "fail", f"pytest exited with code {done.returncode} without a summary: {done.last_line()}", {}
    detail = count_text(counts)
    failed = failed_tests(output)
    if failed:
        shown = ", ".join(t.rpartition("::")[2] for t in failed[:4]) + (" ..." if len(failed) > 4 else "")
        detail += f"; failed: {shown}"
    ok = done.returncode == 0 and not counts.get("failed") and not counts.get("errors") and counts.get("passed")
    if not ok and done.returncode == 5:
        detail = "no test is marked gpu here (pytest exit code 5)"
    elif not ok and done.returncode == 0:
        detail += ": no gpu test passed"
    elif not ok and not failed:
        detail += f" (pytest exit code {done.returncode})"
    return ("ok" if ok else "fail"), detail, counts


def pytest_step(cfg: GpuCheckConfig) -> StepResult:
    if not (ROOT / "tests" / "test_gpu.py").is_file():
        return StepResult("pytest", "fail", 0.0, "tests/test_gpu.py is not here: run from a clone of the repository "
                          "(pip install -e .)")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    done = run_command(cmd, cfg.timeout("pytest"), cwd=ROOT, env=_env())
    status, detail, counts = pytest_verdict(done, cfg.timeout("pytest"))
    return StepResult("pytest", status, done.seconds, detail, {**_record(cfg, "pytest", cmd, done), "counts": counts})


# ---------------------------------------------------------------------------------------------- 2. bench speed

def kernel_problems(row: dict) -> list[str]:
    """What is wrong with one timed speed row on CUDA: not ok, not on CUDA, or a slow kernel where a fused one
    should have run (see the module docstring)."""
    model = str(row.get("model"))
    base = model.split(":")[0]
    if row.get("status") != "ok":
        return [f"{model}: {row.get('status')} ({_first_line(row.get('error') or '')})"]
    problems = []
    if row.get("device") not in (None, "cuda") and not _missing(row.get("device")):
        problems.append(f"{model} ran on {row.get('device')}, not cuda")
    scans = _names(row.get("scan_backend"))
    if base in MAMBA_MODELS and (not scans or scans - GPU_SCANS):
        problems.append(f"{model}'s scan ran {row.get('scan_backend')} on CUDA, not mamba-ssm's kernel (cuda-fused "
                        f"or cuda): `bench doctor` says what is missing")
    attention = _names(row.get("attention_kernel"))
    if base == "dit" and not attention:
        problems.append(f"{model} ran no scaled_dot_product_attention kernel (attention_kernel "
                        f"{row.get('attention_kernel')})")
    slow = sorted(attention - FUSED_ATTENTION)
    if slow:
        problems.append(f"{model}'s attention ran {','.join(slow)} on CUDA, not flash, cudnn or mem-efficient")
    return problems


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _names(value) -> set[str]:
    """'cuda,cuda-fused' -> {'cuda', 'cuda-fused'}; 'none', '' or a missing value -> set()."""
    if _missing(value):
        return set()
    return {v.strip() for v in str(value).split(",") if v.strip() and v.strip() != "none"}


def speed_verdict(rows: list[dict], models=MODELS) -> tuple[str, str, list[dict]]:
    """(status, detail, per-model results) of the speed rows of ``models``."""
    per_model, problems, parts = [], [], []
    for model in models:
        row = next((r for r in rows if str(r.get("model")) == model), None)
        if row is None:
            problems.append(f"{model}: no row")
            continue
        found = kernel_problems(row)
        problems += found
        seconds = row.get("latency_nfe_median_s")
        ms = None if _missing(seconds) else float(seconds) * 1000
        entry = {"model": model, "status": row.get("status"), "ms_per_nfe": ms,
                 "scan_backend": None if _missing(row.get("scan_backend")) else row.get("scan_backend"),
                 "attention_kernel": None if _missing(row.get("attention_kernel")) else row.get("attention_kernel"),
                 "ok": not found}
        per_model.append(entry)
        kernels = [f"scan {entry['scan_backend']}" if _names(entry["scan_backend"]) else "",
                   f"attention {entry['attention_kernel']}" if _names(entry["attention_kernel"]) else ""]
        kernels = ", ".join(k for k in kernels if k) or "no scan, no attention"
        parts.append(f"{model} {ms:.2f} ms/NFE ({kernels})" if ms is not None else f"{model} ({kernels})")
    detail = "; ".join(parts) if parts else "no rows"
    if problems:
        detail += ". FAIL: " + "; ".join(problems)
    return ("fail" if problems else "ok"), detail, per_model


def read_speed_rows(path: Path, skip: int = 0) -> list[dict]:
    """The rows of the speed CSV after the first ``skip`` (those already there before this check)."""
    import pandas as pd

    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return df.iloc[skip:].to_dict("records")


def _row_count(path: Path) -> int:
    import pandas as pd

    try:
        return len(pd.read_csv(path)) if path.is_file() else 0
    except (OSError, ValueError):
        return 0


def speed_step(cfg: GpuCheckConfig) -> StepResult:
    csv = Path(cfg.out) / "speed.csv"
    before = _row_count(csv)
    cmd = [sys.executable, "-c", "from bench.cli import app; app(prog_name='bench')", "speed", *SPEED_ARGS,
           "--out", str(csv)]
    done = run_command(cmd, cfg.timeout("speed"), env=_env())
    record = _record(cfg, "speed", cmd, done)
    try:
        rows = read_speed_rows(csv, before)
    except (OSError, ValueError) as e:
        return StepResult("speed", "fail", done.seconds, f"{csv.name} does not read: {_first_line(e)}", record)
    if done.timed_out or done.returncode != 0:
        why = _timed_out(cfg, "speed") if done.timed_out else \
            f"bench speed exited with code {done.returncode}: {done.last_line()}"
        if rows:
            why += f"; rows written: {speed_verdict(rows)[1]}"
        return StepResult("speed", "fail", done.seconds, why, {**record, "rows": len(rows)})
    status, detail, per_model = speed_verdict(rows)
    return StepResult("speed", status, done.seconds, detail, {**record, "models": per_model})


# ---------------------------------------------------------------------------------------------- child steps

def child_step(cfg: GpuCheckConfig, step: str, args: list[str] = ()) -> StepResult:
    """``python -m bench.gpucheck STEP`` under the step's timeout; its result from its last line of output."""
    cmd = [sys.executable, "-m", "bench.gpucheck", step, *args]
    done = run_command(cmd, cfg.timeout(step), env=_env())
    record = _record(cfg, step, cmd, done)
    if done.timed_out:
        return StepResult(step, "fail", done.seconds, _timed_out(cfg, step), record)
    result = parse_child_result(done.stdout)
    if result is None:
        return StepResult(step, "fail", done.seconds, f"exited with code {done.returncode} without a result: "
                          f"{done.last_line()}", record)
    return StepResult(step, result["status"], done.seconds, result["detail"], {**record, **result.get("data", {})})


def parse_child_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                result = json.loads(line[len(RESULT_MARKER):])
            except ValueError:
                return None
            return result if result.get("status") in STATUSES else None
    return None


def memory_step(cfg: GpuCheckConfig) -> StepResult:
    return child_step(cfg, "memory")


def fused_mamba_step(cfg: GpuCheckConfig) -> StepResult:
    return child_step(cfg, "fused-mamba")


# ---------------------------------------------------------------------------------------------- 3. memory

def memory_verdict(measured: int, predicted: int, tolerance: float = PLAN_TOLERANCE) -> str:
    """'ok' when ``predicted`` is within ``tolerance`` of ``measured`` (as pytest.approx(measured, rel=tolerance)),
    else 'fail'."""
    if not measured > 0 or not predicted > 0:
        return "fail"
    return "ok" if abs(predicted - measured) <= tolerance * measured else "fail"


def measured_training_peak(model: str, preset: str, batch: int, setting, precision: str, steps: int = 2,
                           device: str = "cuda") -> int:
    """``max_memory_allocated`` (above what was allocated before) of ``steps`` real training steps of ``setting``
    (a ``bench.plan.Setting``), as bench.train runs them: the model, EMA, AdamW (fused on CUDA, as the trainer
    makes it), gradient clipping, the EMA update, micro-batches and checkpointing; random images and one-class
    masks at the model's size."""
    import copy


    dev = torch.device(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    net = build_model(model, preset, {}, device).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if setting.checkpointing:
        recompute.enable(net)
    space = _space(net, device)
    opt = make_optimizer(net.parameters(), 1e-4, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    autocast = torch.autocast(dev.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    c, h, w = net.input_shape
    for _ in range(steps):
        images = torch.randn(batch, 3, net.image_size, net.image_size, device=device).clamp(-1, 1)
        masks = torch.zeros(batch, net.num_classes, net.image_size, net.image_size, device=device)
        masks[:, 1] = 1
        t, x0, drop = torch.rand(batch), torch.randn(batch, c, h, w), torch.zeros(batch, dtype=torch.bool)

        def x1_of(part, images=images, space=space):  # bound: space is deleted after the loop
            return space.encode(images[part])

        forward_backward(net, x1_of, masks, t, x0, drop, setting.micro_batch if setting.accumulation > 1 else 0,
                         autocast, scaler, dev)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, net, 0.9999)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del net, ema, opt, space
    torch.cuda.empty_cache()
    return peak


def memory_check(models=MODELS, preset: str = "paper", batch: int = MEMORY_BATCH, steps: int = MEMORY_STEPS,
                 tolerance: float = PLAN_TOLERANCE, device: str = "cuda") -> dict:
    """Measured against predicted training peak per model (see the module docstring): {status, detail, data}."""
    setting = Setting(batch, 1, False)
    entries, parts = [], []
    for model in models:
        precision = presets.recipe(preset, model).precision
        entry = {"model": model, "preset": preset, "batch": batch, "precision": precision, "steps": steps}
        entries.append(entry)
        try:
            if model.split(":")[0] in MAMBA_MODELS and ssm._fused_op() is None:
                entry.update(status="skipped", reason="mamba-ssm's fused mamba_inner_fn does not load (the plan "
                             "assumes it)")
                parts.append(f"{model} skipped: {entry['reason']}")
                continue
            predicted = plan.training_memory(model, preset, batch, setting, precision, grid_batch=0).peak
            free, _ = torch.cuda.mem_get_info()
            entry["predicted"] = predicted
            if predicted > FREE_SHARE * free:
                entry.update(status="skipped", reason=f"predicted {size_text(predicted)} does not fit "
                             f"{FREE_SHARE:.0%} of the free {size_text(free)}")
                parts.append(f"{model} skipped: {entry['reason']}")
                continue
            measured = measured_training_peak(model, preset, batch, setting, precision, steps, device)
            ratio = measured / predicted
            entry.update(measured=measured, ratio=round(ratio, 4), status=memory_verdict(measured, predicted,
                                                                                         tolerance))
            parts.append(f"{model} {size_text(measured)} / {size_text(predicted)} = {ratio:.2f}"
                         + ("" if entry["status"] == "ok" else " FAIL"))
        except Exception as e:  # noqa: BLE001 - out of memory, a kernel error: this model's fail, the next one runs
            entry.update(status="fail", error=f"{type(e).__name__}: {_first_line(e)}"[:300])
            parts.append(f"{model} FAIL: {entry['error']}")
            torch.cuda.empty_cache()
    statuses = {e["status"] for e in entries}
    status = "fail" if "fail" in statuses else "ok" if "ok" in statuses else "skipped"
    lead = (f"measured / predicted peak, {steps} {preset} training steps at batch {batch}, "
            f"{'/'.join(sorted({e['precision'] for e in entries}))} (ok within {tolerance:.0%}): ")
    return {"status": status, "detail": lead + "; ".join(parts), "data": {"models": entries}}


# ---------------------------------------------------------------------------------------------- 4. fused Self-Mamba

def self_mamba_layer(width: int = 64, grid: int = 16, scan: str = "zigzag"):
    """A Self-Mamba layer (causal conv, one scan order: the fused kernel's case) with random weights, seeded."""
    torch.manual_seed(0)
    layer = SelfMamba(width, orders=scan_orders(scan, grid, 1), conv="causal1d", grid=grid)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
        layer.ssm.conv.conv1d.bias.normal_(0, 0.1)
    return layer


def fused_mamba_comparison(itype: torch.dtype, kernel=None, device: str = "cuda", length: int = 256) -> dict:
    """``kernel`` (mamba-ssm's ``mamba_inner_fn`` by default) on ``device`` against
    ``models.ssm.mamba_inner_reference`` in fp32 on the CPU, with Self-Mamba's weights as SISMA calls it: xz in
    ``itype``, the weights fp32 (bf16 autocast casts the projections inside). The output must be within 5x mamba-ssm's
    scan tolerances elementwise (|a - b| <= atol + rtol |b|), each gradient's largest error within 10 x (atol + rtol
    x its largest reference value). Returns {dtype, ok, worst (largest error / tolerance), output, grads}."""
    kernel = kernel or ssm._fused_op()
    if kernel is None:
        raise RuntimeError("mamba-ssm's mamba_inner_fn does not load")
    rtol, atol = SCAN_TOL[itype]
    layer = self_mamba_layer()
    s = layer.ssm
    xz = torch.randn(2, 2 * s.D.shape[0], length).to(itype)
    weights = [s.conv.conv1d.weight, s.conv.conv1d.bias, s.x_proj.weight, s.dt_proj.weight, layer.out_proj.weight]
    rest = {"D": s.D.float(), "delta_bias": s.dt_proj.bias.float(), "delta_softplus": True}
    dev = [t.detach().to(device).requires_grad_() for t in [xz, *weights]]
    cpu = [t.detach().float().clone().requires_grad_() for t in [xz, *weights]]
    A = -torch.exp(s.A_log.detach().float())
    with torch.autocast(torch.device(device).type, dtype=itype, enabled=itype != torch.float32):
        out = kernel(*dev, None, A.to(device), None, None, **{k: v.detach().to(device) if torch.is_tensor(v) else v
                                                             for k, v in rest.items()})
    ref = ssm.mamba_inner_reference(*cpu, None, A, None, None, **{k: v.detach() if torch.is_tensor(v) else v
                                                                  for k, v in rest.items()})
    got = out.detach().float().cpu()
    if got.shape != ref.shape:
        raise RuntimeError(f"the kernel's output has shape {tuple(got.shape)}, the reference's {tuple(ref.shape)}")
    r, a = FUSED_OUTPUT_FACTOR * rtol, FUSED_OUTPUT_FACTOR * atol
    diff = (got - ref.detach()).abs()
    finite = bool(torch.isfinite(got).all() and torch.isfinite(ref).all())
    ref_scale = ref.detach().abs().max().item() or 1.0
    output = {"max_abs": diff.max().item(), "max_rel": diff.max().item() / ref_scale,
              "worst": (diff / (a + r * ref.detach().abs())).max().item() if finite else math.inf}
    g = torch.randn_like(ref)
    out.backward(g.to(device).to(out.dtype))
    ref.backward(g)
    grads = {}
    for name, x, y in zip(FUSED_GRADS, dev, cpu):
        if x.grad is None or y.grad is None:
            grads[name] = {"max_abs": None, "max_rel": None, "bound": None, "worst": math.inf}
            continue
        scale = y.grad.abs().max().item() or 1.0
        err = (x.grad.float().cpu() - y.grad).abs().max().item()
        bound = FUSED_GRAD_FACTOR * (atol + rtol * scale)
        grads[name] = {"max_abs": err, "max_rel": err / scale, "bound": bound,
                       "worst": err / bound if math.isfinite(err) else math.inf}
    worst = max([output["worst"]] + [v["worst"] for v in grads.values()])
    name = next(k for k, v in DTYPES.items() if v == itype)
    return {"dtype": name, "ok": bool(worst <= 1.0), "worst": worst, "output": output, "grads": grads}


def fused_mamba_check(dtypes=("fp32", "bf16"), kernel=None, device: str = "cuda") -> dict:
    """``fused_mamba_comparison`` per dtype: {status, detail, data}."""
    kernel = kernel or ssm._fused_op()
    if kernel is None:
        return {"status": "fail", "detail": "mamba-ssm's fused mamba_inner_fn does not load: it needs mamba-ssm's "
                "CUDA scan and causal-conv1d's CUDA conv (docs/gpu.md; `bench doctor` says what is missing)",
                "data": {}}
    results, parts = [], []
    for name in dtypes:
        try:
            res = fused_mamba_comparison(DTYPES[name], kernel, device)
        except Exception as e:  # noqa: BLE001 - a kernel error is this dtype's fail
            res = {"dtype": name, "ok": False, "worst": math.inf, "error": f"{type(e).__name__}: {_first_line(e)}"}
            parts.append(f"{name} FAIL: {res['error']}")
            results.append(res)
            continue
        results.append(res)
        grad, values = max(res["grads"].items(), key=lambda kv: kv[1]["worst"])
        parts.append(f"{name} worst error {_g(res['worst'])} of the tolerance (output max abs "
                     f"{_g(res['output']['max_abs'])}, rel {_g(res['output']['max_rel'])}; gradients worst in {grad}: "
                     f"max abs {_g(values['max_abs'])}, rel {_g(values['max_rel'])})" + ("" if res["ok"] else " FAIL"))
    status = "ok" if all(r["ok"] for r in results) else "fail"
    lead = "mamba_inner_fn vs mamba_inner_reference (fp32, CPU), output and 6 gradients: "
    return {"status": status, "detail": lead + "; ".join(parts), "data": {"comparisons": results}}


def _g(value) -> str:
    return "missing" if value is None else f"{value:.2g}"


# ---------------------------------------------------------------------------------------------- child entry point

def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gpucheck memory|fused-mamba``: one in-process step, its result as the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpucheck", description=main.__doc__)
    parser.add_argument("step", choices=["memory", "fused-mamba"])
    args = parser.parse_args(argv)
    if args.step == "memory":
        result = memory_check()
    else:
        result = fused_mamba_check()

    print(RESULT_MARKER + json.dumps(strict_json(result), allow_nan=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
