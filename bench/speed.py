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
  sampler; with ``--compile`` the compiled model is warmed in that mode and at those shapes before each timed region,
  and a recompilation inside a timed region is an error (``torch.compiler.set_stance("fail_on_recompile")``).
- ``latency_nfe_*_s``: one network evaluation of the whole batch, after ``warmup`` untimed calls, over
  ``repeats`` timed calls: median, interquartile range, standard deviation and minimum; ``latency_nfe_all_s``
  every timed call (so ratios between models get intervals); ``latency_nfe_guided_median_s`` one guided
  evaluation (classifier-free guidance: the conditional and the null-mask halves in one call on a doubled batch).
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
- ``loadavg_1m``: the machine's load average when the row was measured (other work slows CPU timings).
- The provenance columns of ``bench.provenance`` (device, versions, precision, batch, steps, NFE, seed,
  commit) and ``threads`` (torch's intra-op threads; CPU latency is wall clock with time.perf_counter,
  CUDA latency uses CUDA events after synchronisation).

``--flops-only`` rows (``mode`` flops-only, ``device`` meta) hold only the parameter and FLOP columns and
the provenance; timed rows have ``mode`` timed. On a shared, busy CPU, ``--threads 1`` gives far steadier
timings than several intra-op threads competing with other processes.

Resolution scaling changes only the image-size fields of a backbone's config (``image_size``, and
``input_size`` for latent and patch models, keeping the preset's image-to-input factor); widths, depth and
SDM's attention resolutions (feature-map sizes in pixels, as in ADM) stay the preset's.

Latent models decode with the SD-VAE (``--vae``, from a local folder or the Hugging Face cache, fetched
there on first use unless downloads are off: ``bench.weights``). When no weights are reachable, a randomly initialised AutoencoderKL with the SD-VAE architecture decodes instead:
weights do not change its cost, and the ``decoder`` column says so.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.flops import FlopCount, count_flops, equivalent_tokens, example_inputs, fit_power_law
from bench.io import ResultsFile
from bench.provenance import provenance
from bench.rows import SpeedRow
from bench.runtime import PRECISIONS, autocast, cast_for_inference, resolve_device, tf32
from bench.timing import (free_memory, is_out_of_memory, load_average, no_recompiles, peak_memory, probe_kernels,
                          sdpa_enabled, time_calls)
from bench.variants import build_model

GUIDED_SCALE = 1.5  # the guidance scale of the guided per-NFE timing (any s != 1 costs the same doubled call)
FLOPS_ONLY_SCALES = (1, 2, 4)  # default resolutions of --flops-only: the preset's image size times these
ERROR_CHARS = 200  # an error message is cut to this length in its CSV cell
# SD-VAE (sd-vae-ft-mse) architecture, for decoding cost when its weights are not on this machine.
SD_VAE_ARCH = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                   block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", scaling_factor=0.18215, sample_size=256)
RANDOM_VAE_LABEL = "sd-vae-arch, random weights"
PIXEL_DECODER_LABEL = "none (pixel space)"

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
    repeats: int = 10
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
    import models
    from bench.variants import parse_models

    variants = parse_models(cfg.models)
    cfg.models = [v.name for v in variants]
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise BenchError(f"unknown precision {cfg.precision!r}; use one of {', '.join(PRECISIONS)}")
    for v in variants:
        if cfg.preset not in models.list_presets(v.model):
            raise BenchError(f"model {v.model!r} has no preset {cfg.preset!r}; "
                             f"available: {', '.join(models.list_presets(v.model))}")
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.image_repeats < 1:
        raise BenchError("--steps, --repeats and --image-repeats must be at least 1 and --warmup at least 0")
    if cfg.compile and cfg.warmup < 1:
        raise BenchError("--compile needs --warmup 1 or more: the first call compiles and must not be timed")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise BenchError("--batch-sizes must be positive integers, e.g. 1,4")
    ResultsFile(cfg.out, SpeedRow).check()  # a file that is not ours is refused before anything is timed
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
    rows = timed_sweep(settings, cfg, device)
    echo(timed_table(rows))
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


def recipe_precision(name: str, preset: str) -> str:
    """The training precision of the variant ``name``'s backbone at ``preset`` (fp32 for a preset without recipes)."""
    from bench import presets
    from bench.variants import parse_variant

    try:
        return presets.recipe(preset, parse_variant(name).model).precision
    except BenchError:  # a plugin's own preset: no recipe table
        return "fp32"


def eval_model(name: str, preset: str, overrides: dict, device: torch.device | str) -> torch.nn.Module:
    """The variant ``name`` with ``overrides`` on ``device``, in eval mode without gradients."""
    return build_model(name, preset, overrides, device).eval().requires_grad_(False)


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
                             f"multiple of {step} (input factor {factor} x patch size); try {step * max(1, round(resolution / step))}")
        overrides["input_size"] = resolution // factor
    elif "channel_mult" in fields:
        step = 2 ** (len(base.config.channel_mult) - 1)  # the UNet's total downsampling
        if resolution % step:
            raise BenchError(f"model {name!r} cannot take {resolution} px images: the resolution must be a "
                             f"multiple of {step} (its UNet downsamples {step}x); try {step * max(1, round(resolution / step))}")
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
    from bench.autoencoder import LatentSpace

    with torch.device("meta"):
        space = LatentSpace(sd_vae_architecture(), RANDOM_VAE_LABEL)
    return count_flops(space.decode, torch.empty(1, *latent_shape, device="meta")).total


def sd_vae_architecture() -> torch.nn.Module:
    """A randomly initialised AutoencoderKL with the SD-VAE architecture, on the current default device."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_ARCH)


def load_decoder(space: str, vae: str | None, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(module with .decode, label) for a model space: identity for pixels, the SD-VAE (or its architecture)."""
    from bench.autoencoder import SD_VAE, LatentSpace, PixelSpace, load_vae
    from bench.weights import WeightsMissing

    if space != "latent":
        return PixelSpace().to(device), PIXEL_DECODER_LABEL
    try:
        with warnings.catch_warnings():  # the hub client's deprecation notices are not the user's concern
            warnings.simplefilter("ignore")
            return LatentSpace(load_vae(vae or SD_VAE), vae or SD_VAE).to(device), vae or SD_VAE
    except WeightsMissing:  # not cached and not fetched (offline, no network); a wrong file is still an error
        if vae:  # weights the user asked for by name must exist
            raise
    return LatentSpace(sd_vae_architecture(), RANDOM_VAE_LABEL).to(device), RANDOM_VAE_LABEL


# ---------------------------------------------------------------------------------------------- timing

def timed_sweep(settings: list[Setting], cfg: SpeedConfig, device: torch.device) -> list[dict]:
    """Time every setting at every batch size; a setting that runs out of memory becomes an 'oom' row."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    # one decoder per space, loaded before anything is timed (a --vae that cannot load fails here)
    decoders = {space: load_decoder(space, cfg.vae, device) for space in dict.fromkeys(s.space for s in settings)}
    with tf32(cfg.tf32) if device.type == "cuda" else contextlib.nullcontext():
        return _timed_sweep(settings, cfg, device, decoders)


def _timed_sweep(settings: list[Setting], cfg: SpeedConfig, device: torch.device, decoders: dict) -> list[dict]:
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(settings) * len(cfg.batch_sizes), desc="bench speed", unit="setting")
    for s in settings:
        model = None
        for batch_size in cfg.batch_sizes:
            bar.set_postfix_str(f"{s.name} {s.resolution}px batch {batch_size}")
            row = {**s.describe(cfg.steps), **base_columns(cfg, device, batch_size, s.precision)}
            try:
                if model is None:
                    torch.manual_seed(cfg.seed)
                    model = cast_for_inference(eval_model(s.name, cfg.preset, s.overrides, device), s.precision)
                row.update(measure_batch(model, decoders[s.space], s, batch_size, cfg, device))
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                message = str(e).strip().splitlines()[0][:ERROR_CHARS] if str(e).strip() else "out of memory"
                row.update(status="oom", error=message)
                model = None  # rebuilt for the next batch size: an OOM can leave it half-moved
                free_memory(device)
            rows.append(row)
            ResultsFile(cfg.out, SpeedRow).append([row])
            bar.update()
        del model
        free_memory(device)
    bar.close()
    return rows


def base_columns(cfg: SpeedConfig, device: torch.device, batch_size: int, precision: str) -> dict:
    """Columns shared by every timed row of this sweep (provenance included)."""
    return {
        "mode": "timed", "status": "ok", "error": "", "preset": cfg.preset, "compile": cfg.compile,
        "tf32": cfg.tf32 if device.type == "cuda" else "n/a", "warmup": cfg.warmup, "repeats": cfg.repeats,
        "sdpa_enabled": sdpa_enabled(device), "loadavg_1m": load_average(),
        **provenance(device, precision, batch_size, cfg.steps, cfg.steps, cfg.seed),
    }


def measure_batch(model: torch.nn.Module, decoder: tuple, s: Setting, batch_size: int, cfg: SpeedConfig,
                  device: torch.device) -> dict:
    """Kernels, memory, per-NFE latency and whole-image latency of ``model`` (cast to ``s.precision``) at
    ``batch_size``, every call under torch.no_grad() as the sampler makes it (see the module docstring)."""
    from bench.flow import NFE_PER_STEP, guided_velocity
    from bench.sample import sample_batch

    space, decoder_label = decoder
    dtype = PRECISIONS[s.precision]
    gen = torch.Generator().manual_seed(cfg.seed)
    x, t, mask = example_inputs(model, batch_size, device, generator=gen)
    xd, maskd = x.to(dtype), mask.to(dtype)  # the sampler's inputs: x and the mask in the model's dtype, t in fp32
    out = {"decoder": decoder_label}
    # no_grad, not inference_mode: under it SDPA's kernel choice is not dispatched visibly, and a compiled model
    # would see inference tensors in one region and normal ones in another (a recompilation)
    with torch.no_grad(), autocast(device, s.precision):
        out.update(probe_kernels(model, xd, t, maskd))
        out.update(peak_memory(lambda: model(xd, t, maskd), device))
    net = torch.compile(model) if cfg.compile else model

    def timed(fn, warmup: int, repeats: int) -> list[float]:
        """Seconds per call of fn: the warm-up calls (compilation included) first, then the timed ones, during
        which a recompilation is an error."""
        for _ in range(warmup):
            fn()
        with no_recompiles(cfg.compile):
            return time_calls(fn, 0, repeats, device)

    with torch.no_grad(), autocast(device, s.precision):
        nfe_times = timed(lambda: net(xd, t, maskd), cfg.warmup, cfg.repeats)
        # classifier-free guidance: both halves in one call on a doubled batch (the scale does not change the cost)
        guided = guided_velocity(lambda xs, ts, ms: net(xs.to(dtype), ts, ms), maskd, GUIDED_SCALE)
        guided_times = timed(lambda: guided(x, t), cfg.warmup, cfg.repeats)
    with torch.no_grad():  # the sampler decodes in fp32, outside autocast
        decode_times = time_calls(lambda: space.decode(x.float()), 1, cfg.repeats, device)
    nfe_median, decode_median = statistics.median(nfe_times), statistics.median(decode_times)
    q25, q75 = np.percentile(nfe_times, [25, 75])
    nfe = cfg.steps * NFE_PER_STEP["euler"]
    projected = nfe_median * nfe + decode_median
    out.update(latency_nfe_median_s=nfe_median, latency_nfe_iqr_s=float(q75 - q25),
               latency_nfe_std_s=statistics.pstdev(nfe_times), latency_nfe_min_s=min(nfe_times),
               latency_nfe_all_s=" ".join(f"{v:.6g}" for v in nfe_times),
               latency_nfe_guided_median_s=statistics.median(guided_times),
               decode_latency_s=decode_median, image_latency_projected_s=projected,
               images_per_s_projected=batch_size / projected, nfe=nfe)

    if projected * (cfg.image_repeats + 1) <= cfg.full_image_max_seconds:  # the untimed image counts too
        runs = cfg.image_repeats
        noise = torch.randn(x.shape, generator=gen)
        counted = []

        def one_image():  # the real sampler of `bench sample`: Euler on t_i = i / steps, decode, to host
            counted.append(sample_batch(net, space, mask, noise, cfg.steps, "euler", 1.0, s.precision)[1])

        with torch.no_grad():
            image_times = timed(one_image, 1, runs)  # one untimed image first: the sampler's own first-call costs
        image_median = statistics.median(image_times)
        out.update(image_latency_s=image_median, image_repeats=runs, images_per_s=batch_size / image_median,
                   image_vs_projected=image_median / projected, nfe=counted[-1])
    return out


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
