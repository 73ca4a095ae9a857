"""The results files' row schemas: one dataclass per file, columns in declaration order.

Every row carries the provenance columns (``Provenance``, filled by ``bench.provenance.provenance``), so that a
reader can tell what was measured on what. ``bench.io.ResultsFile(path, SpeedRow)`` appends rows of a schema
and refuses files that are not of it.

Files written by older versions hold a subset of today's columns. When they are read, ``REQUIRED`` names the
columns no row can do without (a file lacking one, or a row with one empty, is refused naming the line), and
``MIGRATIONS`` fills the later columns a reader depends on where a row leaves them empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional


@dataclass
class Provenance:
    """What every result row records about how and where it was measured."""

    timestamp: Optional[str] = None
    device: Optional[str] = None
    device_name: Optional[str] = None
    threads: Optional[int] = None
    torch: Optional[str] = None
    cuda: Optional[str] = None
    precision: Optional[str] = None
    batch_size: Optional[int] = None
    steps: Optional[int] = None
    nfe: Optional[int] = None
    seed: Optional[int] = None
    commit: Optional[str] = None
    host_os: Optional[str] = None


PROVENANCE_COLUMNS = [f for f in Provenance.__dataclass_fields__]


@dataclass
class SpeedRow(Provenance):
    """One row of results/speed.csv: a model at one resolution and batch size (``bench speed``)."""

    mode: Optional[str] = None  # timed or flops-only
    status: Optional[str] = None  # ok or oom
    error: Optional[str] = None
    model: Optional[str] = None  # the variant's name
    preset: Optional[str] = None
    resolution: Optional[int] = None
    space: Optional[str] = None
    input_shape: Optional[str] = None
    tokens: Optional[int] = None
    tokens_equiv: Optional[float] = None
    params: Optional[int] = None
    flops_counter: Optional[int] = None
    flops_scan: Optional[int] = None
    flops_per_nfe: Optional[int] = None
    flops_decode: Optional[int] = None
    flops_per_image: Optional[int] = None
    flops_exponent: Optional[float] = None
    compile: Optional[bool] = None
    tf32: Optional[str] = None
    scan_backend: Optional[str] = None
    attention_kernel: Optional[str] = None
    sdpa_enabled: Optional[str] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    latency_nfe_median_s: Optional[float] = None
    latency_nfe_iqr_s: Optional[float] = None
    latency_nfe_std_s: Optional[float] = None
    latency_nfe_min_s: Optional[float] = None
    latency_nfe_all_s: Optional[str] = None  # every timed repeat, space-separated (for intervals of ratios)
    latency_nfe_guided_median_s: Optional[float] = None  # one guided NFE: cond and null mask in one doubled batch
    image_latency_s: Optional[float] = None
    image_repeats: Optional[int] = None
    image_latency_projected_s: Optional[float] = None
    image_vs_projected: Optional[float] = None  # measured image / (steps x per-NFE median + decode)
    decode_latency_s: Optional[float] = None
    decoder: Optional[str] = None
    images_per_s: Optional[float] = None
    images_per_s_projected: Optional[float] = None
    peak_cuda_allocated_mib: Optional[float] = None
    peak_cuda_delta_mib: Optional[float] = None  # max_memory_allocated less memory_allocated just before the call
    peak_rss_delta_mib: Optional[float] = None
    loadavg_1m: Optional[float] = None
    # the protocol (bench.speed): interleaved rounds in fresh processes, on a quiet machine
    sweep: Optional[str] = None  # the sweep's id: its per-round times in speed_rounds.csv, paired across models
    processes: Optional[int] = None  # timing processes, one after another; ``repeats`` rounds each
    latency_nfe_process_medians_s: Optional[str] = None  # the per-NFE median of each process, space-separated
    busy: Optional[str] = None  # why the machine was not quiet ('' when it was): rows a report leaves out
    other_cpus_max: Optional[float] = None  # the most CPUs other processes used in a kept round
    rounds_discarded: Optional[int] = None  # busy rounds thrown away and timed again
    calibration_gflops: Optional[float] = None  # the sweep's best calibration matmul at its threads and precision
    achieved_gflops: Optional[float] = None  # flops_per_nfe x batch / per-NFE median
    achieved_share: Optional[float] = None  # achieved_gflops / calibration_gflops
    # where one NFE's time goes (batch 1, torch profiler, self time by operator class: bench.breakdown)
    profile_nfe_ms: Optional[float] = None
    share_matmul: Optional[float] = None
    share_attention: Optional[float] = None
    share_scan: Optional[float] = None
    share_conv: Optional[float] = None
    share_norm_elementwise: Optional[float] = None
    share_layout: Optional[float] = None
    share_other: Optional[float] = None


@dataclass
class RoundRow:
    """One row of results/speed_rounds.csv: one timed call of one round of a ``bench speed`` sweep."""

    sweep: Optional[str] = None
    process: Optional[int] = None
    round: Optional[int] = None
    position: Optional[int] = None  # its place in the round's shuffled order
    model: Optional[str] = None
    resolution: Optional[int] = None
    batch_size: Optional[int] = None
    kind: Optional[str] = None  # nfe, guided, decode or image
    seconds: Optional[float] = None
    busy: Optional[str] = None
    other_cpus: Optional[float] = None
    calibration_gflops: Optional[float] = None


@dataclass
class QualityRow(Provenance):
    """One row of results/quality.csv: one checkpoint of one run, scored (``bench quality``)."""

    run: Optional[str] = None
    checkpoint: Optional[str] = None  # the checkpoint file measured (a step_N.pt snapshot stays as it was)
    model: Optional[str] = None  # the variant's name
    preset: Optional[str] = None
    train_seed: Optional[int] = None
    train_step: Optional[int] = None
    train_steps: Optional[int] = None  # the run's full length (train_step < train_steps: an earlier snapshot)
    image_size: Optional[int] = None
    data: Optional[str] = None
    split: Optional[str] = None
    n_masks: Optional[int] = None
    samples_per_mask: Optional[int] = None
    method: Optional[str] = None
    guidance: Optional[float] = None
    fid: Optional[float] = None
    kid: Optional[float] = None
    kid_std: Optional[float] = None
    fid_status: Optional[str] = None
    kid_status: Optional[str] = None
    fid_images: Optional[int] = None  # images per side; fewer than 2048 make FID and KID unreliable
    pixel_diversity: Optional[float] = None
    lpips_size: Optional[int] = None
    lpips_diversity: Optional[float] = None
    lpips_status: Optional[str] = None
    miou: Optional[float] = None
    miou_ceiling: Optional[float] = None
    parser: Optional[str] = None
    parser_sha256: Optional[str] = None  # the parser file's digest (16 hex): rows of one comparison need one parser
    eval_dir: Optional[str] = None
    eval_key: Optional[str] = None  # joins the row to its per-mask scores (MaskScoreRow)


@dataclass
class MaskScoreRow:
    """One row of results/quality_masks.csv: one test mask of one quality row, for confidence intervals.

    ``inter`` and ``union`` hold 19 space-separated pixel counts per class (summed over the mask's samples); the
    mIoU of any set of masks is the mean over present classes of sum(inter) / sum(union). ``ceiling_*``: the same for
    the real image of the mask.
    """

    eval_key: Optional[str] = None
    model: Optional[str] = None
    preset: Optional[str] = None
    train_seed: Optional[int] = None
    train_step: Optional[int] = None
    mask: Optional[int] = None
    mask_source: Optional[str] = None
    samples: Optional[int] = None
    pixel_diversity: Optional[float] = None
    lpips_diversity: Optional[float] = None
    inter: Optional[str] = None
    union: Optional[str] = None
    ceiling_inter: Optional[str] = None
    ceiling_union: Optional[str] = None


@dataclass
class SweepRow(Provenance):
    """One row of results/lr_sweep.csv: one training run of the learning-rate sweep (``bench tune lr``)."""

    model: Optional[str] = None
    preset: Optional[str] = None
    lr: Optional[float] = None
    train_steps: Optional[int] = None
    heldout_loss: Optional[float] = None  # flow-matching loss of the EMA weights on the test split, fixed noise
    train_loss: Optional[float] = None
    recipe_lr: Optional[float] = None  # the preset recipe's rate when the sweep ran
    seconds: Optional[float] = None
    run: Optional[str] = None


# ---------------------------------------------------------------------------------------------- older files

REQUIRED: dict[type, tuple[str, ...]] = {
    SpeedRow: ("mode", "model", "preset", "resolution", "batch_size", "steps", "precision"),
    RoundRow: ("sweep", "process", "round", "model", "resolution", "batch_size", "kind", "seconds"),
    QualityRow: ("model", "preset", "train_step"),
    MaskScoreRow: ("eval_key", "model", "mask", "inter", "union"),
    SweepRow: ("model", "preset", "lr", "train_steps"),
}


def _given(value: Any) -> bool:
    """Whether a cell read from a file holds a value (not empty, not NaN)."""
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def derived_device_name(row: Mapping[str, Any]) -> str:
    """``device_name`` of a row written before it was recorded: the device type, with the threads on a CPU (the
    CPU or GPU model is unknown, so rows of different machines of one type share a table)."""
    device, threads = row.get("device"), row.get("threads")
    if not _given(device):
        return "device not recorded"
    if device == "cpu" and _given(threads):
        return f"CPU, model not recorded ({int(threads)} thread{'s' if int(threads) != 1 else ''})"
    return f"{device}, model not recorded"


def derived_status(row: Mapping[str, Any]) -> str:
    """``status`` of a row written before it was recorded: ok where the row holds its figures."""
    return "ok" if row.get("mode") == "flops-only" or _given(row.get("latency_nfe_median_s")) else "not recorded"


def eager(row: Mapping[str, Any]) -> bool:
    """``compile`` of a row written before the option existed: those versions ran the model eagerly."""
    return False


MIGRATIONS: dict[type, dict[str, Callable[[Mapping[str, Any]], Any]]] = {
    SpeedRow: {"device_name": derived_device_name, "status": derived_status, "compile": eager},
}
