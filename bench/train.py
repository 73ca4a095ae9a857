"""The one flow-matching trainer for every backbone: ``bench train MODEL``.

A run is a folder: ``config.json`` (the TrainConfig, plain data), ``loss.csv`` (step, loss, lr, grad norm,
steps/s, wall time, CPU threads), ``checkpoints/last.pt`` (plus ``step_*.pt`` snapshots every ``keep_every`` steps
and at the steps of ``keep_at``) and ``samples/step_*.png`` grids (mask | samples from fixed noise, EMA weights).
The conventions (time, path, target, guidance) are those of ``bench.flow``.

A config comes from ``make_config``: the recipe and bookkeeping fields have no defaults of their own (they are the
preset's, ``bench.presets``), and a TrainConfig built with any of them unset is refused.

Exact resume: everything random is a function of the seed and the step. The data order is a seeded
permutation per epoch, indexed by step; the noise, times and mask drops of the GLOBAL batch come from one
generator whose state is checkpointed; each DDP rank takes its slice of both. So N steps in one go,
N/2 + resume, or the same global batch over several processes follow the same trajectory.

The device is not waited for on every step. The loss stays on the device (summed per logging window, in fp64); at
logging and checkpoint steps one all-reduce brings the window's loss, whether any loss since the last check was not
finite, whether a process was asked to stop and, before a checkpoint, whether the weights are all finite: a
non-finite loss or weight stops the run there, and no checkpoint is ever written with either (the last good one
stays). A single process acts on Ctrl-C/SIGTERM at the end of the current step; in DDP the processes agree at the next
logging or checkpoint step. AdamW runs fused on CUDA and multi-tensor (foreach) on the CPU; the EMA update is one
foreach lerp. Data comes first: the default synthetic set is generated (rank 0; the other processes wait for its
manifest) before the process group exists, whose collectives time out after ``PROCESS_GROUP_TIMEOUT``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import io
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models
from bench import flow, presets, recompute
from bench.autoencoder import SD_VAE, LatentCache, load_space
from bench.checkpoint import (
    clean_stale_temporaries,
    load,
    load_weights,
    rng_state,
    save_atomic,
    set_rng_state,
    snapshot,
)
from bench.data import FaceDataset, check_complete, data_fingerprint, run_data_folder
from bench.errors import BenchError, NonFiniteLoss
from bench.io import check_folder_free, display_path, folder_lock, read_json, write_json, write_text
from bench.presets import Budget, Recipe, doc
from bench.provenance import machine_name
from bench.runtime import PRECISIONS, resolve_device
from bench.sample import GridSpec
from bench.synth import default_set_dir, ensure_default_set, wait_for_default_set
from bench.variants import Variant, build_model, parse_variant

DEFAULT_PRESET = "cpu"
# Field metadata: the field is filled by make_config from the preset's table (its value until then: None) ...
FROM_PRESET = "from_preset"
# ... or recorded by the harness (make_config, the trainer, `bench plan`) rather than given as a `bench train` option.
RECORDED = "recorded"


def from_preset(table: type, name: str) -> Any:
    """A field whose value is the preset's (``table``: ``Recipe`` or ``Budget``), with that table's help text."""
    return field(default=None, metadata={"help": presets.help_text(table, name), FROM_PRESET: True})


def recorded(text: str, **kw) -> Any:
    """A field the harness sets, with its help text; not a `bench train` option."""
    return field(metadata={"help": text, RECORDED: True}, **kw)


@dataclass
class TrainConfig:
    """Everything that defines a run; written to RUN/config.json and into every checkpoint.

    Made by ``make_config``, which fills the recipe and bookkeeping fields from ``bench.presets`` (per preset and
    backbone); each field's help text is stored with it (``bench.presets.help_text``), and every field that is not
    recorded by the harness is a `bench train` option.
    """

    model: str = doc("Registered backbone (sisma, dit, sdm, or a plugin).")
    preset: str = doc(f"Size preset: paper, cpu or tiny; also picks the recipe and bookkeeping defaults (default: "
                      f"{DEFAULT_PRESET}).")
    variant: str = recorded("The variant's name (the backbone plus config overrides, e.g. sisma:scan=raster).",
                            default="")
    data: Optional[str] = doc("Data folder (CelebAMask-HQ or {train,test}/{images,labels} layout). Default: a "
                              "synthetic set in ./data, generated on first use.", default=None)
    synthetic: bool = recorded("The data is the default synthetic set, generated on first use.", default=False)
    synth_n: int = from_preset(Budget, "synth_n")
    space: str = doc("pixel or latent (the SD-VAE's latents). Default: the model's own (paper: latent for sisma and "
                     "dit, pixel for sdm; cpu and tiny: pixel).", default="pixel")
    vae: Optional[str] = doc("AutoencoderKL folder or hub id (latent space; fetched into the HF cache on first use).",
                             default=None)
    model_overrides: dict = recorded("Config fields of the backbone changed by the variant and the space.",
                                     default_factory=dict)
    model_config: dict = recorded("Every field of the backbone's config as built, so that a later change of a preset "
                                  "or a default cannot change what this run builds.", default_factory=dict)
    steps: int = from_preset(Recipe, "steps")
    batch_size: int = from_preset(Recipe, "batch_size")
    lr: float = from_preset(Recipe, "lr")
    warmup: int = from_preset(Recipe, "warmup")
    ema_decay: float = from_preset(Recipe, "ema_decay")
    seed: int = doc("Seed of init, data order, noise and mask drops.", default=0)
    precision: str = from_preset(Recipe, "precision")
    grad_clip: float = from_preset(Recipe, "grad_clip")
    p_uncond: float = from_preset(Recipe, "p_uncond")
    time_dist: str = doc("Training time distribution: logit-normal or uniform.", default="logit-normal")
    ckpt_every: int = from_preset(Budget, "ckpt_every")
    keep_every: int = from_preset(Budget, "keep_every")
    keep_at: list[int] = doc("Also keep a snapshot step_N.pt at this step (quality against training); repeat the "
                             "option for several steps.", default_factory=list)
    sample_every: int = from_preset(Budget, "sample_every")
    log_every: int = from_preset(Budget, "log_every")
    grid_masks: int = from_preset(Budget, "grid_masks")
    grid_steps: int = from_preset(Budget, "grid_steps")
    workers: int = from_preset(Budget, "workers")
    cache_latents: bool = doc("Keep each image's latent in RUN/latents after its first encoding (default: on in latent "
                              "space, off in pixel space).", default=False)
    micro_batch: int = doc("Samples per forward and backward pass: each process's share of the batch is split into "
                           "micro-batches whose gradients add up before the one optimiser step (0: the whole share "
                           "at once).", default=0)
    checkpointing: bool = doc("Recompute each block's activations in backward instead of keeping them (less memory, "
                              "about a third more compute; bench/recompute.py).", default=False)
    data_from_run: Optional[str] = recorded("The data folder relative to the run folder, so that the run finds it "
                                            "from any working folder (set at training).", default=None)
    data_fingerprint: str = recorded("What identifies the data set (bench.data.data_fingerprint), checked where the "
                                     "run's data is used.", default="")
    memory_plan: dict = recorded("What `bench plan` chose for `--gpu-memory` (bench/plan.py); empty without it.",
                                 default_factory=dict)

    def __post_init__(self):
        require_preset_fields(self)


def require_preset_fields(cfg: TrainConfig) -> None:
    """One-line error for a config whose recipe or bookkeeping fields are not all set (not made by make_config)."""
    unset = [f.name for f in dataclasses.fields(cfg) if f.metadata.get(FROM_PRESET) and getattr(cfg, f.name) is None]
    if unset:
        raise BenchError(f"TrainConfig of {cfg.model}/{cfg.preset} leaves {', '.join(unset)} unset; make it with "
                         f"bench.train.make_config, which takes them from the preset's recipe and budget")


def option_fields() -> list[str]:
    """The TrainConfig fields that `bench train` takes as options: all but those the harness records."""
    return [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get(RECORDED)]


# Options that only change how a run is watched or stored, not its trajectory: free to change on resume.
# Checkpointing recomputes the same operations (same gradients); micro_batch is not free: accumulating
# micro-batch gradients sums in another order, so the trajectory changes in the last bits.
RUN_LOCK = ("a training run", "wait for it to finish or train into another --out")  # what a second process is told
RESUME_FREE = {"data_from_run", "data_fingerprint", "steps", "ckpt_every", "keep_every", "keep_at", "sample_every",
               "log_every", "grid_masks", "grid_steps", "workers", "cache_latents", "checkpointing", "memory_plan"}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def space_overrides(model: str, preset: str, space: str, vae: str | None, overrides: dict) -> dict:
    """Model config fields to change so that the preset runs in ``space`` (pixels, or the VAE's latents)."""
    m = build_model(model, preset, overrides, "meta")
    adaptable = {"space", "in_channels", "input_size"} <= {f.name for f in dataclasses.fields(m.config)}
    if space != m.space and not adaptable:
        raise BenchError(f"{model} has no {space}-space variant (its config has no space/in_channels/input_size "
                         f"fields); train it with --space {m.space}")
    if space == "pixel":
        want = {"space": "pixel", "in_channels": 3, "input_size": m.image_size}
    else:
        geometry = load_space("latent", vae)
        if m.image_size % geometry.downsample:
            raise BenchError(f"image size {m.image_size} of {model}/{preset} is not divisible by the VAE's "
                             f"downsampling factor {geometry.downsample}")
        want = {"space": "latent", "in_channels": geometry.channels,
                "input_size": m.image_size // geometry.downsample}
    have = {"space": m.space, "in_channels": m.input_shape[0], "input_size": m.input_shape[1]}
    if have == want:
        return {}
    if not adaptable:
        raise BenchError(f"{model}/{preset} takes {space} inputs of {m.input_shape}, but the VAE gives "
                         f"{want['in_channels']} x {want['input_size']} x {want['input_size']}")
    return {k: v for k, v in want.items() if have[k] != v}


def make_config(model, run_dir: Path, resume: bool = False, **given) -> TrainConfig:
    """The run's config. ``model`` is a backbone or variant (``sisma:scan=raster``). A new run takes the preset's
    table (``bench.presets``) for that backbone, then the given options; on resume, the saved config with the
    given options, which must not change the trajectory (one-line error otherwise)."""
    variant = model if isinstance(model, Variant) else parse_variant(str(model))
    given = {k: v for k, v in given.items() if v is not None}
    if Path(run_dir).is_dir() and int(os.environ.get("RANK", "0")) == 0:  # the job's other processes: rank 0 holds it
        check_folder_free(run_dir, *RUN_LOCK)
    return resumed_config(variant, Path(run_dir), given) if resume else new_config(variant, Path(run_dir), given)


def resumed_config(variant: Variant, run_dir: Path, given: dict) -> TrainConfig:
    """The saved config of the run in ``run_dir`` with the ``given`` options that leave its trajectory alone."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BenchError(f"--resume: {run_dir} holds no run (no config.json); drop --resume to start one")
    saved = read_json(config_path, "run config")
    if not isinstance(saved, dict) or set(saved) - {f.name for f in dataclasses.fields(TrainConfig)}:
        raise BenchError(f"{config_path} is not a sis-bench run config; restore it or train into a new --out")
    missing = [k for k in ("model", "preset") if k not in saved]
    if missing:
        raise BenchError(f"{config_path} is not a sis-bench run config (no {missing[0]!r}); restore it or train "
                         f"into a new --out")
    saved.setdefault("variant", saved.get("model", ""))
    given["model"], given["variant"] = variant.model, variant.name
    if "data" in given:
        given["data"] = display_path(given["data"])
        if saved.get("data_fingerprint") and Path(given["data"]).is_dir() \
                and data_fingerprint(given["data"]) == saved["data_fingerprint"]:
            saved["data"] = given["data"]  # the same data set, moved: found where it is now
    elif saved.get("data") is not None:
        saved["data"] = display_path(run_data_folder(saved, run_dir))  # found from any working folder, checked
    for key, value in given.items():
        if key not in RESUME_FREE and key in saved and saved[key] != value:
            raise BenchError(f"--resume: {key} = {value!r} differs from the run's {saved[key]!r} "
                             f"({config_path}); drop the option or train into a new --out")
    return TrainConfig(**{**saved, **given})


def new_config(variant: Variant, run_dir: Path, given: dict) -> TrainConfig:
    """A new run's config: the preset's table for the backbone, then the ``given`` options."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BenchError(f"--out {run_dir} is a file; give a folder for the run")
    if any((run_dir / "checkpoints").glob("*.pt")):
        raise BenchError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
    # A folder with a config but no checkpoint is a run that stopped before its first one: it starts again there.
    preset = given.pop("preset", DEFAULT_PRESET)
    if preset not in presets.presets() or preset not in models.list_presets(variant.model):
        raise BenchError(f"unknown preset {preset!r} for {variant.model}; available: "
                         f"{', '.join(p for p in models.list_presets(variant.model) if p in presets.presets())}")
    native_space = build_model(variant.model, preset, variant.kwargs(), "meta").space
    if given.get("space", "pixel") not in ("pixel", "latent"):
        raise BenchError(f"--space {given['space']}: use pixel or latent")
    defaults = presets.train_defaults(preset, variant.model)
    cfg = TrainConfig(model=variant.model, preset=preset, variant=variant.name, **{**defaults, **given})
    cfg.space = given.get("space", native_space)
    if cfg.space == "latent" and not cfg.vae:
        cfg.vae = SD_VAE
    if cfg.space == "pixel":
        cfg.vae = None
    cfg.model_overrides = {**variant.kwargs(),
                           **space_overrides(variant.model, preset, cfg.space, cfg.vae, variant.kwargs())}
    cfg.model_config = model_config(variant.model, preset, cfg.model_overrides)
    if "cache_latents" not in given:  # each image is encoded once, not once per epoch
        cfg.cache_latents = cfg.space == "latent"
    if cfg.data is None:
        image_size = cfg.model_config["image_size"]
        cfg.data, cfg.synthetic = display_path(default_set_dir(image_size, cfg.synth_n)), True
    else:
        cfg.data = display_path(cfg.data)
        check_complete(cfg.data)
    check_config(cfg)
    return cfg


def record_data(cfg: TrainConfig, run_dir: Path) -> None:
    """Record where the data lies relative to the run folder and what it is (its fingerprint); a resumed run whose
    data folder holds another set than the one it trained on is a one-line error."""
    fingerprint = data_fingerprint(cfg.data)
    if cfg.data_fingerprint and fingerprint != cfg.data_fingerprint:
        raise BenchError(f"{cfg.data} is not the data set {run_dir} trained on (its fingerprint differs from the one "
                         f"in config.json); give the run's data folder with --data, or train into a new --out")
    cfg.data_fingerprint = fingerprint
    cfg.data_from_run = os.path.relpath(Path(cfg.data).expanduser().resolve(), Path(run_dir).resolve())


def model_config(model: str, preset: str, overrides: dict) -> dict:
    """Every field of the backbone's config at ``preset`` with ``overrides`` (plain JSON values)."""
    config = build_model(model, preset, overrides, "meta").config
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def check_config(cfg: TrainConfig) -> None:
    """One-line errors for option values that cannot work, naming the option and its valid range."""
    require_preset_fields(cfg)  # a field may have been unset after the config was made
    if cfg.precision not in PRECISIONS:
        raise BenchError(f"--precision {cfg.precision}: use one of {', '.join(PRECISIONS)}")
    if cfg.time_dist not in flow.TIME_DISTS:
        raise BenchError(f"--time-dist {cfg.time_dist}: use one of {', '.join(flow.TIME_DISTS)}")
    if not 0 <= cfg.p_uncond < 1:
        raise BenchError(f"--p-uncond {cfg.p_uncond}: a probability in [0, 1) is needed")
    if not 0 <= cfg.ema_decay < 1:
        raise BenchError(f"--ema-decay {cfg.ema_decay}: a decay in [0, 1) is needed")
    for name in ("steps", "batch_size", "ckpt_every", "sample_every", "log_every", "grid_steps", "synth_n"):
        if getattr(cfg, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if any(not isinstance(k, int) or k < 1 for k in cfg.keep_at):
        raise BenchError(f"keep_at must list steps of 1 or more, got {cfg.keep_at}")
    for name in ("warmup", "keep_every", "workers", "grid_masks", "micro_batch", "seed"):
        if getattr(cfg, name) < 0:
            raise BenchError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise BenchError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.grad_clip >= 0 or not math.isfinite(cfg.grad_clip):
        raise BenchError(f"--grad-clip must be 0 (off) or a positive number, got {cfg.grad_clip}")
    if cfg.micro_batch and cfg.batch_size % cfg.micro_batch:
        raise BenchError(f"--micro-batch {cfg.micro_batch} does not divide --batch-size {cfg.batch_size}")


# ----------------------------------------------------------------------------------------------
# Deterministic, resumable randomness
# ----------------------------------------------------------------------------------------------

class StepBatchSampler(torch.utils.data.Sampler):
    """Dataset indices of this rank's share of the global batch of each step ``start .. stop - 1``.

    The global index stream is one seeded permutation per epoch, concatenated; step s takes its
    ``batch_size`` entries from position ``s * batch_size`` and rank r the r-th slice of those. The
    order is a function of (seed, step) alone, so a resumed run needs only its step.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self.permutation(p // self.n)[p % self.n]) for p in positions]

    def __iter__(self):
        share = self.batch_size // self.world
        for step in range(self.start, self.stop):
            yield self.global_batch(step)[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def draw_noise(gen: torch.Generator, cfg: TrainConfig, shape: tuple, rank: int, world: int):
    """Times (b,), noise (b, *shape) and mask drops (b,) of this rank's slice of the global batch."""
    G = cfg.batch_size
    t = flow.sample_time(G, cfg.time_dist, gen)
    x0 = torch.randn(G, *shape, generator=gen)
    drop = torch.rand(G, generator=gen) < cfg.p_uncond
    share = slice(rank * (G // world), (rank + 1) * (G // world))
    return t[share], x0[share], drop[share]


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy/random seeded from torch's per-worker seed.

    Ctrl-C and SIGTERM are the parent's business: a terminal, ``timeout`` or a batch scheduler signals the whole
    process group, and a worker that died of it would make the parent fail before it saves its checkpoint. The
    parent shuts its workers down itself (and they exit when it is gone).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------

EMA_WARMUP = 10  # the decay after n updates is at most (1 + n) / (EMA_WARMUP + n)
# Collectives wait this long before failing: rank 0 writes checkpoints (three copies of the weights at the paper
# preset) and sample grids while the others wait in the next all-reduce; NCCL's own default is 10 minutes.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's AdamW (no weight decay): fused on CUDA, multi-tensor (foreach) elsewhere."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **optimizer_flags(device))


def optimizer_flags(device: torch.device) -> dict:
    return {"fused": True, "foreach": False} if torch.device(device).type == "cuda" else {"fused": False,
                                                                                           "foreach": True}


def ema_decay_at(updates: int, decay: float) -> float:
    """The EMA decay of update ``updates`` (0-based): min(decay, (1 + n) / (10 + n)).

    With a fixed decay d, the random initial weights keep a share d^n of the average after n updates: 0.999 over
    1500 steps still leaves 22%. The warm-up averages the early weights evenly instead, so that share falls as
    about 9! / n^9 (below 1e-9 after 100 updates) and short runs sample trained weights.
    """
    return min(decay, (1 + updates) / (EMA_WARMUP + updates))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- ema + (1 - decay) (model - ema) for every parameter in one foreach call; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


def all_finite(tensors) -> torch.Tensor:
    """A device bool: every element of ``tensors`` finite (one foreach norm per call, no host sync)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_norm(tensors)).isfinite().all()


def micro_batches(n: int, micro_batch: int) -> list[slice]:
    """A batch of ``n`` samples as slices of ``micro_batch`` samples each (0: one slice, the whole batch)."""
    size = micro_batch or n
    return [slice(i, i + size) for i in range(0, n, size)]


def forward_backward(net: nn.Module, x1_of, masks, t, x0, drop, micro_batch: int, autocast, scaler,
                     device: torch.device) -> torch.Tensor:
    """The flow-matching loss of this process's batch and its gradients, in micro-batches.

    ``x1_of(part)`` gives the model-space data of the slice ``part`` of the batch. Each micro-batch's mean loss is
    divided by the number of micro-batches before its backward, so the accumulated gradient is the batch mean's;
    DDP all-reduces only after the last one. Returns the batch's mean loss (detached).
    """
    parts = micro_batches(len(masks), micro_batch)
    losses = []
    for i, part in enumerate(parts):
        no_sync = getattr(net, "no_sync", None) if i < len(parts) - 1 else None
        with no_sync() if no_sync else contextlib.nullcontext():
            with autocast:  # non_blocking: t, x0 and drop come in pinned memory on CUDA (no wait for the device)
                loss = flow.flow_loss(net, x1_of(part),
                                      flow.drop_masks(masks[part], drop[part].to(device, non_blocking=True)),
                                      t[part].to(device, non_blocking=True), x0[part].to(device, non_blocking=True))
            scaler.scale(loss / len(parts) if len(parts) > 1 else loss).backward()
        losses.append(loss.detach())
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def nonfinite_message(bad_step: int, bad_loss: float, any_bad: bool, since: int, step: int, last: Path,
                      saved_step: int | None) -> str:
    """The one-line error of a run stopped by a non-finite loss (``bad_step`` 0: on another process) or weights."""
    if bad_step:
        what = f"loss is {bad_loss} at step {bad_step}"
    elif any_bad:
        what = f"a loss of another process was not finite in steps {since}-{step}"
    else:
        what = f"the weights are not finite after step {step}"
    where = f"{last} (step {saved_step})" if saved_step is not None else "none (no checkpoint was written yet)"
    return (f"{what}: training stopped at step {step}, before any checkpoint of it was written; last good checkpoint: "
            f"{where}. Try a lower --lr, --grad-clip, or --precision fp32")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (the paper uses a constant rate)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone) and its device."""

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device)
        if device.type == "cuda" and device.index is None:  # each process of a job takes its local rank's GPU
            device = torch.device("cuda", local_rank)
        self.device = device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> list[float]:
        """Sum over the processes of a few numbers (one fp64 tensor on the device, one all-reduce), on the host."""
        if self.world > 1:
            dist.all_reduce(values)
        return values.tolist()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second one stops at once)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


class TrainingInterrupted(Exception):
    """Raised after a signal once the checkpoint of the last finished step is written."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {path}; "
                         f"continue with --resume")
        self.signum = signum


class LossLog:
    """loss.csv, appended as the run goes; on resume, rows past the checkpoint's step are dropped first.

    Each row averages the loss over the ``log_every`` steps before it; ``steps_per_s`` is over the same
    window, data loading included; ``wall_s`` is the run's training time so far, across resumes, without
    the time spent writing checkpoints and sample grids; ``cpu_s`` is the CPU time of the training process over
    the same spans (all its threads; DataLoader workers are other processes): it leaves out the time spent waiting for
    a CPU, but not the slowdown of sharing a core or its caches with other work, so it too reads high on a busy
    machine (nan for a run resumed from a checkpoint older than the column); ``threads`` is
    torch's CPU thread count then (a resumed run may have another); ``machine`` the CPU or GPU model it ran on (a run
    resumed elsewhere has two, and its times mix them; empty in logs older than the column).
    """

    COLUMNS = ["step", "loss", "lr", "grad_norm", "steps_per_s", "wall_s", "cpu_s", "threads", "machine"]

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        rows = []
        if keep_until and path.exists():
            try:
                with path.open(newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
            except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
                raise BenchError(f"{display_path(path)} is not a readable loss log ({type(e).__name__}); move it "
                                 f"away to resume without the earlier rows") from None
        text = io.StringIO()
        w = csv.DictWriter(text, self.COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text(path, text.getvalue())
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)

    def write(self, **row) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True) -> dict:
    """Train (or continue) the run in ``run_dir`` up to ``cfg.steps``; returns {step, loss, wall_s}.

    Works alone or in every process of a torchrun job (WORLD_SIZE > 1: DDP, the global batch split evenly).
    """
    prepare_data(cfg, progress)  # before the process group: no collective waits on data generation
    main = int(os.environ.get("RANK", "0")) == 0  # the job's first process holds the run folder for all of them
    with folder_lock(run_dir, *RUN_LOCK) if main else contextlib.nullcontext():
        if main and not resume and any((Path(run_dir) / "checkpoints").glob("*.pt")):  # a run started meanwhile
            raise BenchError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        ddp = Distributed(device)
        try:
            return _train(cfg, Path(run_dir), resume, ddp, progress)
        finally:
            ddp.close()


def prepare_data(cfg: TrainConfig, progress: bool = True) -> None:
    """The default synthetic set of a run, generated by rank 0 (or the only process); the other processes of a
    torchrun job wait for its manifest to say it is complete. Nothing to do for a given data folder."""
    if not cfg.synthetic:
        return
    size = cfg.model_config.get("image_size") or build_model(cfg.model, cfg.preset, cfg.model_overrides,
                                                             "meta").image_size
    if int(os.environ.get("RANK", "0")) == 0:
        ensure_default_set(cfg.data, cfg.synth_n, size, progress=progress)
    else:
        wait_for_default_set(cfg.data, cfg.synth_n, size)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, ddp: Distributed, progress: bool) -> dict:
    """This process's training: its state, new or restored, and its data; then the loop, with the run's files in
    the main process."""
    check_config(cfg)
    check_split(cfg, ddp.world)
    last = run_dir / "checkpoints" / "last.pt"
    if ddp.main and last.parent.is_dir():
        clean_stale_temporaries(last.parent)
    state = initial_state(cfg, ddp.device)
    if resume:
        restore(state, cfg, run_dir, last, ddp.device)
    feed = DataFeed(cfg, run_dir, state.model, ddp, state.step)
    net = DistributedDataParallel(state.model, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None) \
        if ddp.world > 1 else state.model
    if state.step >= cfg.steps:  # nothing to do: the run's files (config.json, loss.csv) stay as they are
        return {"step": state.step, "loss": None, "wall_s": state.clock.wall}
    files = RunFiles(cfg, run_dir, state, feed.space, ddp.device) if ddp.main else None
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (ddp.main and progress), desc=f"train {cfg.model}",
               unit="step", dynamic_ncols=True)
    try:
        loss = train_loop(cfg, state, net, feed, files, bar, ddp, last)
    finally:
        bar.close()
        if files:
            files.close()
    return {"step": state.step, "loss": loss, "wall_s": state.clock.wall}


def check_split(cfg: TrainConfig, world: int) -> None:
    """One-line errors for a global batch that the processes, and each process's micro-batches, cannot share evenly."""
    if cfg.batch_size % world:
        raise BenchError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes; "
                         f"the global batch is split evenly")
    if cfg.micro_batch and (cfg.batch_size // world) % cfg.micro_batch:
        raise BenchError(f"--micro-batch {cfg.micro_batch} does not divide each process's share of the batch "
                         f"({cfg.batch_size} / {world} processes)")


def train_loop(cfg: TrainConfig, state: TrainState, net: nn.Module, feed: DataFeed, files: RunFiles | None, bar,
               ddp: Distributed, last: Path) -> float:
    """Train up to ``cfg.steps``: at logging and checkpoint steps the processes agree (``CheckWindow.agree``), then
    the loss is logged, the checkpoint saved and the sample grid drawn; returns the processes' mean loss at the last
    check. A stop request ends the run after the checkpoint of its step (``TrainingInterrupted``)."""
    autocast = torch.autocast(ddp.device.type, dtype=PRECISIONS[cfg.precision], enabled=cfg.precision != "fp32")
    window = CheckWindow(ddp.device, state.step)
    params = list(state.model.parameters())
    with StopSignals() as stop:
        state.clock.start()
        for batch in feed.loader:
            grad_norm = optimise(cfg, state, net, batch, feed, window, ddp, autocast)
            step = state.step
            log_now = step % cfg.log_every == 0 or step == cfg.steps
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or (ddp.world == 1 and stop.signum)
            stop_all = False
            if log_now or save_now:
                weights_bad = ~(all_finite(params) & all_finite(state.ema.parameters()))
                stop_all = window.agree(ddp, stop.signum > 0, weights_bad, step, last, state.saved_step)
            window.seconds += state.clock.stop()
            if log_now:
                if files:
                    files.log_window(cfg, step, window, grad_norm, state.clock, bar)
                window.reset()
            bar.update()
            if save_now or stop_all:
                if ddp.main:
                    save(state, cfg, len(feed.train_set), last)
                state.saved_step = step
            if stop_all:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, last)
            if files and (step % cfg.sample_every == 0 or step == cfg.steps):
                files.grid.write(files.samples / f"step_{step:07d}.png")
            state.clock.start()
    return window.loss_mean


# ----------------------------------------------------------------------------------------------
# The loop's state and steps
# ----------------------------------------------------------------------------------------------

class Clock:
    """The run's training time across resumes, wall and CPU (all this process's threads), without the time spent
    writing checkpoints and sample grids: started before a step, stopped after its check."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall, self.cpu = wall, cpu
        self.tic, self.tic_cpu = 0.0, 0.0

    def start(self) -> None:
        self.tic, self.tic_cpu = time.perf_counter(), time.process_time()

    def stop(self) -> float:
        """Add the time since ``start``; returns its wall seconds."""
        toc = time.perf_counter()
        self.wall += toc - self.tic
        self.cpu += time.process_time() - self.tic_cpu
        return toc - self.tic


@dataclass
class TrainState:
    """What a checkpoint holds beside the config: weights, EMA, optimiser, grad scaler, noise generator (time, noise
    and mask drops of the global batch), step and clock; and the step of the last checkpoint (None: none yet)."""

    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    step: int = 0
    clock: Clock = field(default_factory=Clock)
    saved_step: Optional[int] = None


def initial_state(cfg: TrainConfig, device: torch.device) -> TrainState:
    """A new run's state, all of it seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.preset, cfg.model_config or cfg.model_overrides).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.checkpointing:
        recompute.enable(model)
    opt = make_optimizer(model.parameters(), cfg.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return TrainState(model, ema, opt, scaler, torch.Generator().manual_seed(cfg.seed))


def restore(state: TrainState, cfg: TrainConfig, run_dir: Path, last: Path, device: torch.device) -> None:
    """The state of the run's last checkpoint, every random state included, so that the run goes on exactly."""
    if not last.is_file():
        raise BenchError(f"--resume: {run_dir} has no checkpoint (it stopped before its first one); "
                         f"delete the folder and start again")
    saved = load(last)
    load_weights(state.model, saved.get("model"), saved, dataclasses.asdict(cfg), last)
    load_weights(state.ema, saved.get("ema"), saved, dataclasses.asdict(cfg), last)
    for group in saved["optimizer"]["param_groups"]:  # fused/foreach are this device's choice, not the saved one's
        group.update(optimizer_flags(device))
    state.opt.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    state.gen.set_state(saved["generator"])
    state.step = state.saved_step = saved["step"]
    state.clock = Clock(saved["wall_s"], saved.get("cpu_s", math.nan))  # checkpoints before the column: no CPU time


def save(state: TrainState, cfg: TrainConfig, n_images: int, last: Path) -> None:
    """Write the checkpoint of the state's step to ``last``, and keep a snapshot of it at the steps that keep one."""
    save_atomic({"step": state.step, "wall_s": state.clock.wall, "cpu_s": state.clock.cpu,
                 "config": dataclasses.asdict(cfg), "model": state.model.state_dict(), "ema": state.ema.state_dict(),
                 "optimizer": state.opt.state_dict(), "scaler": state.scaler.state_dict(), "rng": rng_state(),
                 "generator": state.gen.get_state(),
                 "sampler": {"seed": cfg.seed, "position": state.step * cfg.batch_size, "n": n_images}}, last)
    if (cfg.keep_every and state.step % cfg.keep_every == 0) or state.step in cfg.keep_at:
        snapshot(last, last.with_name(f"step_{state.step:07d}.pt"))


class DataFeed:
    """This process's training data from step ``start`` on, and its way into the model's space (the autoencoder,
    through the run's latent cache when it keeps one). A synthetic set was made before the process group
    (``prepare_data``)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, model: nn.Module, ddp: Distributed, start: int):
        self.train_set = FaceDataset(cfg.data, "train", size=model.image_size)
        self.space = load_space(cfg.space, cfg.vae, ddp.device)
        self.cache = LatentCache(run_dir / "latents", self.space, "train") \
            if cfg.cache_latents and cfg.space == "latent" else None
        sampler = StepBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, start, cfg.steps, ddp.rank,
                                   ddp.world)
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                                  pin_memory=ddp.device.type == "cuda", worker_init_fn=seed_worker,
                                                  generator=torch.Generator().manual_seed(cfg.seed))

    def encoder(self, batch: dict, images: torch.Tensor):
        """``x1_of(part)``: the model-space data of the slice ``part`` of the batch (``forward_backward``)."""
        def x1_of(part: slice) -> torch.Tensor:
            if self.cache:
                return self.cache.encode(images[part], batch["index"][part].tolist())
            return self.space.encode(images[part])

        return x1_of


def optimise(cfg: TrainConfig, state: TrainState, net: nn.Module, batch: dict, feed: DataFeed, window: CheckWindow,
             ddp: Distributed, autocast) -> torch.Tensor:
    """One training step: the loss of this process's share of the batch (counted in ``window``) and its gradients,
    then the optimiser and EMA updates; returns the gradient norm before clipping (on the device)."""
    device = ddp.device
    pin = device.type == "cuda"  # host tensors copied without waiting for the device
    images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
    t, x0, drop = (v.pin_memory() if pin else v
                   for v in draw_noise(state.gen, cfg, state.model.input_shape, ddp.rank, ddp.world))
    loss = forward_backward(net, feed.encoder(batch, images), masks, t, x0, drop, cfg.micro_batch, autocast,
                            state.scaler, device)
    window.add(loss, state.step)
    for group in state.opt.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    state.scaler.unscale_(state.opt)
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or math.inf)
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    update_ema(state.ema, state.model, ema_decay_at(state.step, cfg.ema_decay))
    state.step += 1
    return grad_norm


class CheckWindow:
    """What the processes agree on at logging and checkpoint steps (see the module docstring).

    Between checks it stays on the device: the logging window's loss sum (fp64), the last step's loss, and the first
    step since the last check whose loss was not finite (0: none) with that loss. On the host: the window's steps and
    seconds, the step of the last check, and what the last check found (the window's mean loss over the processes,
    the processes' mean loss of that step).
    """

    def __init__(self, device: torch.device, step: int):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.last_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.seconds, self.checked = 0, 0.0, step
        self.window_mean, self.loss_mean = float("nan"), float("nan")

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Count the loss of step ``step`` (0-based), without waiting for the device."""
        self.last_loss = loss.double()
        self.loss_sum += self.last_loss
        first_bad = (self.bad_step == 0) & ~torch.isfinite(self.last_loss)
        self.bad_step = torch.where(first_bad, step + 1, self.bad_step)
        self.bad_loss = torch.where(first_bad, self.last_loss, self.bad_loss)
        self.steps += 1

    def agree(self, ddp: Distributed, stopping: bool, weights_bad: torch.Tensor, step: int, last: Path,
              saved_step: int | None) -> bool:
        """The one host sync of a step: one all-reduce of the window's numbers, this process's stop request and
        whether its weights are finite. A non-finite loss since the last check, or weight, on any process is a
        one-line error; otherwise returns whether any process was asked to stop."""
        flags = torch.stack([self.loss_sum, self.last_loss, (self.bad_step > 0).double(),
                             torch.tensor(float(stopping), dtype=torch.float64, device=self.loss_sum.device),
                             weights_bad.double()])
        window_sum, loss_sum, n_bad, n_stop, n_weights_bad = ddp.all_sum(flags)
        self.window_mean = window_sum / ddp.world / self.steps
        self.loss_mean = loss_sum / ddp.world
        if n_bad or n_weights_bad:
            raise NonFiniteLoss(nonfinite_message(int(self.bad_step.item()), float(self.bad_loss.item()),
                                                  bool(n_bad), self.checked + 1, step, last, saved_step), step)
        self.bad_step.zero_()
        self.checked = step
        return n_stop > 0

    def reset(self) -> None:
        """Start the next logging window."""
        self.loss_sum.zero_()
        self.steps, self.seconds = 0, 0.0


class RunFiles:
    """What the main process keeps in the run folder as it trains: config.json, loss.csv and the sample grids."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, state: TrainState, space: nn.Module, device: torch.device):
        self.machine = machine_name(device)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_data(cfg, run_dir)
        # the log first: a damaged one stops the run before anything is written
        self.log = LossLog(run_dir / "loss.csv", keep_until=state.step)
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
        self.grid = GridSpec.from_data(cfg, state.ema, space)
        self.samples = run_dir / "samples"

    def log_window(self, cfg: TrainConfig, step: int, window: CheckWindow, grad_norm: torch.Tensor, clock: Clock,
                   bar) -> None:
        """The loss.csv row of the logging window that ends at ``step``, and the progress bar's figures."""
        steps_per_s = window.steps / window.seconds
        self.log.write(step=step, loss=f"{window.window_mean:.6g}", lr=f"{lr_at(step - 1, cfg):.6g}",
                       grad_norm=f"{float(grad_norm):.6g}", steps_per_s=f"{steps_per_s:.4g}",
                       wall_s=f"{clock.wall:.2f}", cpu_s=f"{clock.cpu:.2f}", threads=torch.get_num_threads(),
                       machine=self.machine)
        bar.set_postfix(loss=f"{window.window_mean:.4f}", steps_s=f"{steps_per_s:.2f}", refresh=False)

    def close(self) -> None:
        self.log.close()
