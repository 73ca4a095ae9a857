"""`bench speed`: parameters, FLOPs, latency, memory and throughput of every backbone, measured alike.

What one timed row holds (one model at one resolution and batch size):
- ``status``: ok, or oom when the setting ran out of memory (``error`` holds the message; the sweep goes on).
- ``params``; FLOPs of one network evaluation (NFE) per sample, counted on the meta device:
  ``flops_counter`` (FlopCounterMode: matmuls, convolutions, attention) + ``flops_scan`` (the selective
  scans, which counters cannot see) = ``flops_per_nfe``; a multiply-add counts as two FLOPs.
  ``flops_decode`` (SD-VAE decoder, latent models) and ``flops_per_image`` = steps x NFE + decode.
  ``tokens``: the model's own sequence length (none for the UNet); ``tokens_equiv``: 16 x 16-px patches of
  the image, the count every model is compared on; ``flops_exponent``: k of FLOPs ~ tokens_equiv**k fitted
  over the resolutions of the sweep (see bench/flops.py).
- Precision: each model runs at its recipe's precision at the preset (``bench.presets``: bf16 at ``paper``, fp32 at
  ``cpu`` and ``tiny``) unless ``--precision`` names one for all; the model is cast to it once
  (``bench.runtime.cast_for_inference``) and its inputs with it, as ``bench sample`` runs it, so that no call spends
  time casting weights. ``--tf32`` holds for the sweep only (``bench.runtime.tf32``, the flags restored after).
- Grad mode: every call (probe, memory, per-NFE, guided, whole images) runs under ``torch.no_grad()``, the mode of the
  sampler; with ``--compile`` the compiled model is warmed in that mode and at those shapes before the rounds,
  and a recompilation inside a round is an error (``torch.compiler.set_stance("fail_on_recompile")``).
- The protocol (``bench.rounds``, ``bench.quiet``): first a gate waits up to ``--quiet-wait`` seconds for a quiet
  machine (no other process using the CPUs the timing needs, a calibration matmul at full speed) and refuses with one
  line naming the competing load, unless ``--allow-busy``. Then ``--processes`` timing processes run one after
  another (fresh interpreters when more than one, as pyperf runs its workers: memory layout, thread placement and
  the machine's drift between processes end up inside the intervals). Each builds and warms up every model, then
  times ``--repeats`` rounds: one call of every model at every batch size and resolution, as a network evaluation,
  a guided one and a decode, in an order shuffled per round from the seed. A round during which the machine was
  busy is thrown away and timed again after the machine is quiet (with ``--allow-busy`` kept, and the rows flagged
  in ``busy``). Every timed call goes to ``speed_rounds.csv`` beside the rows (``sweep``, process, round, position,
  kind, seconds), so a report can compare two models round by round.
- ``latency_nfe_*_s``: one network evaluation of the whole batch over every round of every process: median,
  interquartile range, standard deviation and minimum; ``latency_nfe_all_s`` every timed call,
  ``latency_nfe_process_medians_s`` the median of each process; ``latency_nfe_guided_median_s`` one guided
  evaluation (classifier-free guidance: the conditional and the null-mask halves in one call on a doubled batch).
- ``calibration_gflops``: the best calibration matmul of the sweep (its threads and precision), ``achieved_gflops``
  the model's FLOPs per NFE times the batch over its median, and ``achieved_share`` the ratio of the two: "slow" read
  as many FLOPs, or FLOPs done slowly. ``profile_nfe_ms`` and ``share_*``: where one evaluation's time goes at the
  smallest batch, by operator class (``bench.breakdown``: torch profiler, self time), from the first process.
- ``image_latency_s``: one whole batch of images at ``--steps``: the sampler of ``bench sample``
  (``bench.sample.sample_batch``: Euler, steps NFE, then decode and copy to the host), median over
  ``image_repeats`` runs after one untimed whole image. It is measured only when all of them (the untimed one
  included) fit ``--full-image-max-seconds`` by the projection ``latency_nfe_median_s * steps + decode_latency_s``,
  so that a measured image is always a median of ``image_repeats`` runs;
  the projection itself always goes to ``image_latency_projected_s``, never to the measured column.
  ``image_vs_projected`` = measured / projected: far from 1, the whole image costs more (or less) than its parts.
  ``decode_latency_s`` is the decoder alone (the identity clamp for pixel-space models).
- ``images_per_s`` = batch / image_latency_s (measured), ``images_per_s_projected`` from the projection.
- Peak memory of one network evaluation: on CUDA ``peak_cuda_delta_mib`` = ``torch.cuda.max_memory_allocated`` less
  ``torch.cuda.memory_allocated`` just before the call (what the call itself needs: activations and workspaces), and
  ``peak_cuda_allocated_mib`` the maximum itself (weights and inputs included); on CPU ``peak_rss_delta_mib`` =
  the highest resident set size above the level just before the call, sampled from /proc/self/statm every
  millisecond by a background thread after returning freed heap to the system (Linux only; a lower bound of
  the activation memory, since a peak shorter than a millisecond can fall between samples).
- Kernels that actually ran, from one probe call of the eager model: ``scan_backend`` from
  ``models.ssm.used_backends()``; ``attention_kernel`` from the aten operators dispatched by
  ``scaled_dot_product_attention`` (flash, flash-cpu, mem-efficient, cudnn, or math when SDPA ran but none
  of the fused kernels did; "none" without SDPA); ``sdpa_enabled`` the backends enabled on CUDA.
- ``loadavg_1m``: the machine's load average when the row was written (it counts the timing's own threads, so it
  decides nothing; ``other_cpus_max`` is the most CPUs other processes used in a kept round).
- The provenance columns of ``bench.provenance`` (device, versions, precision, batch, steps, NFE, seed,
  commit) and ``threads`` (torch's intra-op threads; CPU latency is wall clock with time.perf_counter,
  CUDA latency uses CUDA events after synchronisation).

``--flops-only`` rows (``mode`` flops-only, ``device`` meta) hold only the parameter and FLOP columns and
the provenance; timed rows have ``mode`` timed.

Resolution scaling changes only the image-size fields of a backbone's config (``image_size``, and
``input_size`` for latent and patch models, keeping the preset's image-to-input factor); widths, depth and
SDM's attention resolutions (feature-map sizes in pixels, as in ADM) stay the preset's.

Latent models decode with the SD-VAE, or its architecture with random weights where none are reachable
(``bench.timed_models``).
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import models
from bench import presets
from bench.autoencoder import LatentSpace
from bench.errors import BenchError
from bench.flops import FlopCount, count_flops, equivalent_tokens, example_inputs, fit_power_law
from bench.flow import NFE_PER_STEP
from bench.io import ResultsFile
from bench.provenance import provenance
from bench.quiet import Quietness, wait_for_quiet
from bench.rounds import GUIDED_SCALE, Job, image_rounds_per_process, time_process  # noqa: F401 (GUIDED_SCALE: API)
from bench.rows import RoundRow, SpeedRow
from bench.runtime import PRECISIONS, resolve_device
from bench.stats import paired_ratio
from bench.timed_models import (  # noqa: F401
    PIXEL_DECODER_LABEL,
    RANDOM_VAE_LABEL,
    SD_VAE_ARCH,
    eval_model,
    load_decoder,
    sd_vae_architecture,
)
from bench.timing import load_average, sdpa_enabled
from bench.variants import parse_models, parse_variant

FLOPS_ONLY_SCALES = (1, 2, 4)  # default resolutions of --flops-only: the preset's image size times these

COLUMNS = [f for f in SpeedRow.__dataclass_fields__]


MIN_IMAGE_REPEATS = 5  # the fewest timed whole images whose median a report shows as measured


@dataclass
class SpeedConfig:
    """Everything one `bench speed` sweep needs."""

    models: list[str]
    preset: str = "cpu"
    steps: int = 200
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    resolutions: list[int] | None = None  # None: the preset's (times FLOPS_ONLY_SCALES with flops_only)
    precision: str | None = None  # None: each model's recipe precision at the preset (bench.presets)
    warmup: int = 3
    repeats: int | None = None  # interleaved rounds per timing process; None: the preset's (bench.presets)
    processes: int | None = None  # None: the preset's (bench.presets: 6 at cpu, 5 at paper, 1 at tiny)
    allow_busy: bool = False  # time on a busy machine and flag the rows, instead of refusing
    quiet_wait: float = 60.0  # seconds to wait for a quiet machine before refusing
    breakdown: bool = True  # profile where one NFE's time goes (bench.breakdown), after the first process's rounds
    image_repeats: int = MIN_IMAGE_REPEATS
    device: str = "auto"
    compile: bool = False
    tf32: bool = False
    flops_only: bool = False
    full_image_max_seconds: float = 30.0
    seed: int = 0
    vae: str | None = None
    threads: int | None = None
    out: Path = Path("results/speed.csv")


@dataclass
class Setting:
    """One model at one resolution, described on the meta device before anything runs."""

    name: str
    resolution: int
    overrides: dict
    space: str
    input_shape: tuple
    tokens: int | None
    params: int
    flops: FlopCount
    flops_decode: int | None
    flops_exponent: float | None = None
    precision: str = "fp32"  # what the model runs at

    def describe(self, steps: int) -> dict:
        per_image = self.flops.total * steps + (self.flops_decode or 0)
        return {
            "model": self.name, "resolution": self.resolution, "space": self.space,
            "input_shape": "x".join(map(str, self.input_shape)), "tokens": self.tokens,
            "tokens_equiv": equivalent_tokens(self.resolution), "params": self.params,
            "flops_counter": self.flops.counter, "flops_scan": self.flops.scan, "flops_per_nfe": self.flops.total,
            "flops_decode": self.flops_decode, "flops_per_image": per_image, "flops_exponent": self.flops_exponent,
        }


# ---------------------------------------------------------------------------------------------- the sweep

def run_speed(cfg: SpeedConfig, echo=print):
    """Run the sweep of ``cfg``: rows appended to ``cfg.out`` and returned; summary tables through ``echo``."""
    variants = parse_models(cfg.models)
    cfg.models = [v.name for v in variants]
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise BenchError(f"unknown precision {cfg.precision!r}; use one of {', '.join(PRECISIONS)}")
    for v in variants:
        if cfg.preset not in models.list_presets(v.model):
            raise BenchError(f"model {v.model!r} has no preset {cfg.preset!r}; "
                             f"available: {', '.join(models.list_presets(v.model))}")
    cfg.repeats, cfg.processes = (v if v is not None else default for v, default in
                                  zip((cfg.repeats, cfg.processes), preset_protocol(cfg.preset)))
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.image_repeats < 1:
        raise BenchError("--steps, --repeats and --image-repeats must be at least 1 and --warmup at least 0")
    if cfg.processes < 1 or cfg.quiet_wait < 0:
        raise BenchError(f"--processes must be at least 1 and --quiet-wait at least 0, got {cfg.processes} and "
                         f"{cfg.quiet_wait:g}")
    if cfg.compile and cfg.warmup < 1:
        raise BenchError("--compile needs --warmup 1 or more: the first call compiles and must not be timed")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise BenchError("--batch-sizes must be positive integers, e.g. 1,4")
    ResultsFile(cfg.out, SpeedRow).check()  # a file that is not ours is refused before anything is timed
    ResultsFile(rounds_path(cfg.out), RoundRow).check()
    device = torch.device("meta") if cfg.flops_only else resolve_device(cfg.device)
    if cfg.threads is not None and cfg.threads < 1:
        raise BenchError(f"--threads must be at least 1, got {cfg.threads}")
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _sweep(cfg, device, echo)
    finally:
        torch.set_num_threads(threads)  # a sweep run inside a larger program leaves its thread count alone


def _sweep(cfg: SpeedConfig, device: torch.device, echo):
    import pandas as pd

    settings = plan(cfg)
    if cfg.flops_only:
        rows = [flops_row(s, cfg) for s in settings]
        ResultsFile(cfg.out, SpeedRow).append(rows)
        echo(flops_table(rows))
        echo("")
        echo(exponent_table(settings))
        return pd.DataFrame(rows, columns=COLUMNS)
    rows = timed_sweep(settings, cfg, device, echo)
    echo(timed_table(rows))
    echo("")
    echo(ratio_summary(rows, cfg))
    echo("")
    echo(exponent_table(settings, rows))
    return pd.DataFrame(rows, columns=COLUMNS)


def plan(cfg: SpeedConfig) -> list[Setting]:
    """Every (model, resolution) checked and counted on the meta device, in sweep order."""
    from tqdm import tqdm

    settings = []
    # leave=False and only on a terminal: a one-line error raised here is not preceded by a stale bar
    for name in tqdm(cfg.models, desc="counting FLOPs on meta", unit="model", leave=False, disable=None):
        base = eval_model(name, cfg.preset, {}, "meta")
        resolutions = cfg.resolutions or [base.image_size * k for k in
                                          (FLOPS_ONLY_SCALES if cfg.flops_only else (1,))]
        per_model = [describe_setting(name, cfg.preset, r, base) for r in resolutions]
        for s in per_model:
            s.precision = cfg.precision or recipe_precision(name, cfg.preset)
        fit = fit_power_law([equivalent_tokens(s.resolution) for s in per_model],
                            [s.flops.total for s in per_model])
        for s in per_model:
            s.flops_exponent = None if fit is None else round(fit[0], 4)
        settings += per_model
    return settings


DEFAULT_PROTOCOL = (10, 1)  # rounds per process and processes of a preset without a budget (a plugin's own)


def preset_protocol(preset: str) -> tuple[int, int]:
    """(rounds per process, processes) of a preset's sweep (bench.presets)."""
    try:
        b = presets.budget(preset)
    except BenchError:
        return DEFAULT_PROTOCOL
    return b.speed_repeats, b.speed_processes


def recipe_precision(name: str, preset: str) -> str:
    """The training precision of the variant ``name``'s backbone at ``preset`` (fp32 for a preset without recipes)."""
    try:
        return presets.recipe(preset, parse_variant(name).model).precision
    except BenchError:  # a plugin's own preset: no recipe table
        return "fp32"


def resolution_overrides(name: str, base: torch.nn.Module, resolution: int) -> dict:
    """Config overrides that set the image resolution, keeping the preset's image-to-input factor."""
    fields = set(getattr(base.config, "__dataclass_fields__", {}))
    if "image_size" not in fields:
        raise BenchError(f"model {name!r} has no image_size in its config, so its resolution cannot be changed")
    overrides = {"image_size": resolution}
    if "input_size" in fields:
        factor = base.image_size // base.config.input_size  # 8 for SD-VAE latents, 1 for pixels
        step = factor * getattr(base.config, "patch_size", 1)
        if resolution % step:
            raise BenchError(f"model {name!r} cannot take {resolution} px images: the resolution must be a "
                             f"multiple of {step} (input factor {factor} x patch size); "
                             f"try {step * max(1, round(resolution / step))}")
        overrides["input_size"] = resolution // factor
    elif "channel_mult" in fields:
        step = 2 ** (len(base.config.channel_mult) - 1)  # the UNet's total downsampling
        if resolution % step:
            raise BenchError(f"model {name!r} cannot take {resolution} px images: the resolution must be a "
                             f"multiple of {step} (its UNet downsamples {step}x); "
                             f"try {step * max(1, round(resolution / step))}")
    return overrides


def describe_setting(name: str, preset: str, resolution: int, base: torch.nn.Module) -> Setting:
    """Build ``name`` at ``resolution`` on meta, check that a forward fits, count parameters and FLOPs."""
    if resolution < 1:
        raise BenchError(f"resolution must be positive, got {resolution}")
    overrides = resolution_overrides(name, base, resolution)
    try:
        model = eval_model(name, preset, overrides, "meta")
        x, t, mask = example_inputs(model, 1, "meta")
        flops = count_flops(lambda: _check_forward(model, x, t, mask))
    except (ValueError, RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchError(f"model {name!r} cannot take {resolution} px images: {reason}") from None
    params = sum(p.numel() for p in model.parameters())
    return Setting(name=name, resolution=resolution, overrides=overrides, space=model.space,
                   input_shape=tuple(model.input_shape), tokens=model.num_tokens, params=params,
                   flops=flops, flops_decode=decoder_flops(model))


def _check_forward(model, x, t, mask):
    out = model(x, t, mask)
    if out.shape != x.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the input shape {tuple(x.shape)}")
    return out


# ---------------------------------------------------------------------------------------------- decoders

def decoder_flops(model: torch.nn.Module) -> int | None:
    """FLOPs of decoding one sample's output of ``model`` (meta device); None in pixel space."""
    if model.space != "latent":
        return None
    return _sd_vae_decode_flops(tuple(model.input_shape))


@functools.lru_cache(maxsize=None)
def _sd_vae_decode_flops(latent_shape: tuple) -> int:
    with torch.device("meta"):
        space = LatentSpace(sd_vae_architecture(), RANDOM_VAE_LABEL)
    return count_flops(space.decode, torch.empty(1, *latent_shape, device="meta")).total


# ---------------------------------------------------------------------------------------------- timing

def timed_sweep(settings: list[Setting], cfg: SpeedConfig, device: torch.device, echo=print) -> list[dict]:
    """The gate, then ``processes`` timing processes one after another; rows and per-round times appended at the
    end (nothing is appended when the sweep stops)."""
    import secrets

    threads = torch.get_num_threads()
    quiet = Quietness(threads)
    dtype = PRECISIONS[settings[0].precision]
    gate = wait_for_quiet(quiet, device, dtype, cfg.quiet_wait, echo=echo)
    if gate and not cfg.allow_busy:
        raise BenchError(f"the machine is busy: {gate}; wait for it to finish, or time anyway with --allow-busy "
                         "(the rows are flagged busy and left out of the report's ratios)")
    if gate:
        echo(f"timing on a busy machine (--allow-busy): {gate}")
    processes = cfg.processes or 1
    job = Job(settings=[{"name": s.name, "resolution": s.resolution, "overrides": s.overrides, "space": s.space,
                         "precision": s.precision} for s in settings],
              preset=cfg.preset, steps=cfg.steps, batch_sizes=list(cfg.batch_sizes), warmup=cfg.warmup,
              rounds=cfg.repeats, image_rounds=image_rounds_per_process(cfg.image_repeats, processes),
              processes=processes, full_image_max_seconds=cfg.full_image_max_seconds, device=str(device),
              threads=threads, seed=cfg.seed, compile=cfg.compile, tf32=cfg.tf32, vae=cfg.vae,
              allow_busy=cfg.allow_busy, quiet_wait=cfg.quiet_wait, best_gflops=quiet.best_gflops)
    results = []
    for k in range(processes):
        job = dataclasses.replace(job, process=k, probe=k == 0, breakdown=cfg.breakdown and k == 0)
        # one process: this one (no start-up cost); several: each a fresh interpreter, as pyperf runs its workers
        result = time_process(job) if processes == 1 else run_worker(job)
        job = dataclasses.replace(job, best_gflops=result["best_gflops"], images=result["images"])
        results.append(result)
    sweep = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    rows, rounds = sweep_rows(settings, cfg, device, results, sweep, gate)
    ResultsFile(cfg.out, SpeedRow).append(rows)
    ResultsFile(rounds_path(cfg.out), RoundRow).append(rounds)
    return rows


def rounds_path(out: Path) -> Path:
    """The per-round times beside a speed CSV: results/speed.csv -> results/speed_rounds.csv."""
    return out.with_name(f"{out.stem}_rounds{out.suffix or '.csv'}")


def run_worker(job) -> dict:
    """``job`` in a fresh Python process (bench.speed_worker); its one-line error becomes ours."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sis-bench-speed-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job.as_dict()))
        done = subprocess.run([sys.executable, "-m", "bench.speed_worker", str(job_file), str(result_file)],
                              stdin=subprocess.DEVNULL)
        result = json.loads(result_file.read_text()) if result_file.exists() else None
    if result is None:
        raise BenchError(f"timing process {job.process + 1} of {job.processes} failed (exit status "
                         f"{done.returncode}; its traceback is above); --processes 1 times in this process")
    if "error" in result:
        raise BenchError(result["error"])
    return result


def sweep_rows(settings: list[Setting], cfg: SpeedConfig, device: torch.device, results: list[dict], sweep: str,
               gate: str) -> tuple[list[dict], list[dict]]:
    """One row per setting and batch size from every process's rounds, and the per-round rows."""
    rounds = [{**r, "sweep": sweep, "model": settings[r["setting"]].name,
               "resolution": settings[r["setting"]].resolution}
              for res in results for r in res["rounds"]]
    busy_rounds = [r for r in rounds if r["busy"]]
    busy_count = len({(r["process"], r["round"], r["kind"] == "image") for r in busy_rounds})
    busy = "; ".join(filter(None, [f"busy at the start: {gate}" if gate else "",
                                   f"busy in {busy_count} rounds: {busy_rounds[0]['busy']}" if busy_rounds else ""]))
    discarded = sum(res["discarded"] for res in results)
    best = max(res["best_gflops"] for res in results)
    nfe = cfg.steps * NFE_PER_STEP["euler"]
    rows = []
    for index, s in enumerate(settings):
        for batch_size in cfg.batch_sizes:
            row = {**s.describe(cfg.steps), **base_columns(cfg, device, batch_size, s.precision),
                   "sweep": sweep, "processes": len(results), "busy": busy, "rounds_discarded": discarded,
                   "calibration_gflops": best}
            item = next(it for it in results[0]["items"] if (it["setting"], it["batch_size"]) == (index, batch_size))
            row.update(item["extra"])
            failed = [it for res in results for it in res["items"] if
                      (it["setting"], it["batch_size"]) == (index, batch_size) and it["status"] != "ok"]
            if failed:
                row.update(status=failed[0]["status"], error=failed[0]["error"])
                rows.append(row)
                continue
            mine = [r for r in rounds if (r["setting"], r["batch_size"]) == (index, batch_size)]
            row.update(latency_columns(mine, s, batch_size, nfe, best))
            rows.append(row)
    rounds = [{k: r[k] for k in RoundRow.__dataclass_fields__} for r in rounds]
    return rows, rounds


def latency_columns(mine: list[dict], s: Setting, batch_size: int, nfe: int, best_gflops: float) -> dict:
    """Latency, throughput and achieved-FLOPs columns of one setting and batch size from its round records."""
    def times(kind, process=None):
        return [r["seconds"] for r in mine if r["kind"] == kind and (process is None or r["process"] == process)]

    nfe_times, decode_times = times("nfe"), times("decode")
    nfe_median, decode_median = statistics.median(nfe_times), statistics.median(decode_times)
    q25, q75 = np.percentile(nfe_times, [25, 75])
    projected = nfe_median * nfe + decode_median
    achieved = s.flops.total * batch_size / nfe_median / 1e9
    others = [r["other_cpus"] for r in mine if r["other_cpus"] is not None]
    out = dict(latency_nfe_median_s=nfe_median, latency_nfe_iqr_s=float(q75 - q25),
               latency_nfe_std_s=statistics.pstdev(nfe_times), latency_nfe_min_s=min(nfe_times),
               latency_nfe_all_s=" ".join(f"{v:.6g}" for v in nfe_times),
               latency_nfe_process_medians_s=" ".join(
                   f"{statistics.median(times('nfe', p)):.6g}" for p in sorted({r['process'] for r in mine})),
               latency_nfe_guided_median_s=statistics.median(times("guided")),
               decode_latency_s=decode_median, image_latency_projected_s=projected,
               images_per_s_projected=batch_size / projected, nfe=nfe, other_cpus_max=max(others, default=None),
               achieved_gflops=achieved, achieved_share=achieved / best_gflops if best_gflops else None)
    image_times = times("image")
    if image_times:
        image_median = statistics.median(image_times)
        out.update(image_latency_s=image_median, image_repeats=len(image_times),
                   images_per_s=batch_size / image_median, image_vs_projected=image_median / projected)
    return out


def base_columns(cfg: SpeedConfig, device: torch.device, batch_size: int, precision: str) -> dict:
    """Columns shared by every timed row of this sweep (provenance included)."""
    return {
        "mode": "timed", "status": "ok", "error": "", "preset": cfg.preset, "compile": cfg.compile,
        "tf32": cfg.tf32 if device.type == "cuda" else "n/a", "warmup": cfg.warmup, "repeats": cfg.repeats,
        "sdpa_enabled": sdpa_enabled(device), "loadavg_1m": load_average(),
        **provenance(device, precision, batch_size, cfg.steps, cfg.steps, cfg.seed),
    }


# ---------------------------------------------------------------------------------------------- rows, tables

def flops_row(s: Setting, cfg: SpeedConfig) -> dict:
    """A --flops-only row: parameters and FLOPs, nothing timed."""
    row = {**s.describe(cfg.steps), "mode": "flops-only", "status": "ok", "error": "", "preset": cfg.preset,
           "decoder": RANDOM_VAE_LABEL if s.flops_decode is not None else PIXEL_DECODER_LABEL,
           **provenance("cpu", s.precision, 1, cfg.steps, cfg.steps, cfg.seed)}
    row.update(device="meta", device_name="meta (shapes only, nothing executed)")
    return row


def flops_table(rows: list[dict]) -> str:
    """Markdown: parameters and FLOPs per network evaluation at each model and resolution."""
    import pandas as pd

    df = pd.DataFrame(rows)
    table = pd.DataFrame({
        "model": df["model"], "px": df["resolution"],
        "tokens": df["tokens"].map(lambda v: "-" if v is None or v != v else int(v)),
        "tokens (16 px)": df["tokens_equiv"].map(lambda v: f"{v:g}"),
        "params (M)": _scaled(df["params"], 1e-6, 2),
        "counter GFLOPs": _scaled(df["flops_counter"], 1e-9, 2),
        "scan GFLOPs": _scaled(df["flops_scan"], 1e-9, 3),
        "TFLOPs / NFE": _scaled(df["flops_per_nfe"], 1e-12, 4),
        "decode TFLOPs": _scaled(df["flops_decode"], 1e-12, 3),
    })
    return table.to_markdown(index=False)


def timed_table(rows: list[dict]) -> str:
    """Markdown: the timed columns that matter most, one line per model, resolution and batch size."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    cuda = df["device"].eq("cuda").any()
    memory = "peak_cuda_delta_mib" if cuda else "peak_rss_delta_mib"
    table = pd.DataFrame({
        "model": df["model"], "px": df["resolution"], "batch": df["batch_size"], "status": df["status"],
        "params (M)": _scaled(df["params"], 1e-6, 2), "GFLOPs / NFE": _scaled(df["flops_per_nfe"], 1e-9, 3),
        "NFE median (ms)": _scaled(df["latency_nfe_median_s"], 1e3, 2),
        "NFE IQR (ms)": _scaled(df["latency_nfe_iqr_s"], 1e3, 2),
        "image (s, measured)": _scaled(df["image_latency_s"], 1, 3),
        "image (s, projected)": _scaled(df["image_latency_projected_s"], 1, 3),
        "decode (s)": _scaled(df["decode_latency_s"], 1, 4),
        "images/s": _scaled(df["images_per_s"], 1, 3),
        "peak CUDA alloc rise (MiB)" if cuda else "peak RSS growth (MiB)": _scaled(df[memory], 1, 1),
        "precision": df["precision"], "scan": df["scan_backend"], "attention": df["attention_kernel"],
    })
    note = ("latencies cover the whole batch; 'image' = --steps Euler NFE + decode, measured only within "
            "--full-image-max-seconds, else projected from the per-NFE median")
    return table.to_markdown(index=False) + f"\n\n{note}"


def ratio_summary(rows: list[dict], cfg: SpeedConfig) -> str:
    """Each model's per-NFE time over the first model's (SISMA's when timed) at the smallest batch and each model's
    first resolution, paired by round, with the per-process ratios; and why rows are flagged busy."""
    rounds = ResultsFile(rounds_path(cfg.out), RoundRow).read()
    ok = [r for r in rows if r["status"] == "ok" and r["batch_size"] == min(cfg.batch_sizes)]
    firsts = list({r["model"]: r for r in reversed(ok)}.values())[::-1]  # each model's first resolution
    if len(firsts) < 2 or rounds.empty:
        return ""
    ref = next((r for r in firsts if r["model"] == "sisma"), firsts[0])

    def times(row):
        mine = rounds[(rounds["sweep"] == row["sweep"]) & (rounds["model"] == row["model"]) & (rounds["kind"] == "nfe")
                      & (rounds["resolution"] == row["resolution"]) & (rounds["batch_size"] == row["batch_size"])]
        return mine.set_index(["process", "round"])["seconds"].astype(float)

    lines = [f"per-NFE time over {ref['model']}'s at batch {ref['batch_size']}, paired by round (mean of the "
             f"processes' median ratios; 95% interval of a second run: t over the processes; each process's ratio "
             "in brackets):"]
    for row in firsts:
        if row is ref:
            continue
        ratio = (times(row) / times(ref)).dropna()
        groups = [g.to_numpy() for _, g in ratio.groupby(level="process")]
        e = paired_ratio(groups)
        each = ", ".join(f"{np.median(g):.2f}" for g in groups)
        lines.append(f"  {row['model']} / {ref['model']}: {e.value:.2f} [{e.low:.2f}, {e.high:.2f}] ({each})")
    if rows[0].get("busy"):
        lines.append(f"flagged busy (left out of the report's ratios): {rows[0]['busy']}")
    return "\n".join(lines)


def _scaled(column, factor: float, digits: int):
    """A numeric column times ``factor``, rounded; '-' where there is no value."""
    values = column.astype(float) * factor
    return values.round(digits).astype(object).where(values.notna(), "-")


def exponent_table(settings: list[Setting], rows: list[dict] | None = None) -> str:
    """Markdown: fitted exponent k of cost ~ tokens**k per model (FLOPs; latency at batch 1 when timed)."""
    import pandas as pd

    lines = []
    for name in dict.fromkeys(s.name for s in settings):
        mine = [s for s in settings if s.name == name]
        entry = {"model": name, "resolutions (px)": ",".join(str(s.resolution) for s in mine),
                 "FLOPs exponent": _fmt_exp(mine[0].flops_exponent)}
        if rows is not None:
            smallest = min(r["batch_size"] for r in rows)
            timed = [r for r in rows if r["model"] == name and r["batch_size"] == smallest and r["status"] == "ok"]
            fit = fit_power_law([r["tokens_equiv"] for r in timed], [r["latency_nfe_median_s"] for r in timed])
            entry["latency exponent"] = _fmt_exp(None if fit is None else fit[0])
        lines.append(entry)
    note = ("cost ~ tokens^k, least squares on log-log axes; tokens = 16 x 16-px patches of the image "
            "(needs two resolutions or more)")
    return pd.DataFrame(lines).to_markdown(index=False) + f"\n\n{note}"


def _fmt_exp(k: float | None) -> str:
    return "-" if k is None else f"{k:.3f}"
