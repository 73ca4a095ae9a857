"""The one flow-matching trainer for every backbone: ``bench train MODEL``.

A run is a folder: ``config.json`` (the TrainConfig, plain data), ``loss.csv`` (step, loss, lr, grad norm,
steps/s, wall time, CPU threads), ``checkpoints/last.pt`` (plus ``step_*.pt`` snapshots every ``keep_every`` steps
and at the steps of ``keep_at``) and ``samples/step_*.png`` grids (mask | samples from fixed noise, EMA weights).
The conventions (time, path, target, guidance) are those of ``bench.flow``.

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
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

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
from bench.data import check_complete, data_fingerprint, run_data_folder
from bench.errors import BenchError
from bench.io import check_folder_free, display_path, read_json, write_json, write_text
from bench.presets import doc
from bench.runtime import PRECISIONS, resolve_device
from bench.synth import default_set_dir
from bench.variants import build_model


@dataclass
class TrainConfig:
    """Everything that defines a run; written to RUN/config.json and into every checkpoint.

    Defaults of the optimisation and bookkeeping fields come from ``bench.presets`` (per preset and backbone);
    each field's help text is stored with it (``bench.presets.help_text``).
    """

    model: str = doc("Registered backbone (sisma, dit, sdm, or a plugin).")
    preset: str = doc("Size preset: paper, cpu or tiny; also picks the recipe and bookkeeping defaults.")
    variant: str = doc("The variant's name (the backbone plus config overrides, e.g. sisma:scan=raster).",
                       default="")
    data: Optional[str] = doc("Data folder (CelebAMask-HQ or {train,test}/{images,labels} layout).", default=None)
    synthetic: bool = doc("The data is the default synthetic set, generated on first use.", default=False)
    synth_n: int = doc("Faces in the default synthetic set.", default=2000)
    space: str = doc("pixel or latent (the SD-VAE's latents).", default="pixel")
    vae: Optional[str] = doc("AutoencoderKL folder or hub id (latent space; fetched into the HF cache on first use).",
                             default=None)
    model_overrides: dict = doc("Config fields of the backbone changed by the variant and the space.",
                                default_factory=dict)
    model_config: dict = doc("Every field of the backbone's config as built, so that a later change of a preset or a "
                             "default cannot change what this run builds.", default_factory=dict)
    steps: int = doc(presets.help_text(presets.Recipe, "steps"), default=600)
    batch_size: int = doc(presets.help_text(presets.Recipe, "batch_size"), default=8)
    lr: float = doc(presets.help_text(presets.Recipe, "lr"), default=1e-3)
    warmup: int = doc(presets.help_text(presets.Recipe, "warmup"), default=0)
    ema_decay: float = doc(presets.help_text(presets.Recipe, "ema_decay"), default=0.999)
    seed: int = doc("Seed of init, data order, noise and mask drops.", default=0)
    precision: str = doc(presets.help_text(presets.Recipe, "precision"), default="fp32")
    grad_clip: float = doc(presets.help_text(presets.Recipe, "grad_clip"), default=1.0)
    p_uncond: float = doc(presets.help_text(presets.Recipe, "p_uncond"), default=0.1)
    time_dist: str = doc("Training time distribution: logit-normal or uniform.", default="logit-normal")
    ckpt_every: int = doc(presets.help_text(presets.Budget, "ckpt_every"), default=250)
    keep_every: int = doc(presets.help_text(presets.Budget, "keep_every"), default=0)
    keep_at: list = doc("Also keep a snapshot step_N.pt at each of these steps (quality against training).",
                        default_factory=list)
    sample_every: int = doc(presets.help_text(presets.Budget, "sample_every"), default=250)
    log_every: int = doc(presets.help_text(presets.Budget, "log_every"), default=10)
    grid_masks: int = doc(presets.help_text(presets.Budget, "grid_masks"), default=4)
    grid_steps: int = doc(presets.help_text(presets.Budget, "grid_steps"), default=50)
    workers: int = doc(presets.help_text(presets.Budget, "workers"), default=0)
    cache_latents: bool = doc("Keep each image's latent in RUN/latents after its first encoding (default: on in latent "
                              "space, off in pixel space).", default=False)
    micro_batch: int = doc("Samples per forward and backward pass: each process's share of the batch is split into "
                           "micro-batches whose gradients add up before the one optimiser step (0: the whole share "
                           "at once).", default=0)
    checkpointing: bool = doc("Recompute each block's activations in backward instead of keeping them (less memory, "
                              "about a third more compute; bench/recompute.py).", default=False)
    data_from_run: Optional[str] = doc("The data folder relative to the run folder, so that the run finds it from any "
                                       "working folder (set at training).", default=None)
    data_fingerprint: str = doc("What identifies the data set (bench.data.data_fingerprint), checked where the run's "
                                "data is used.", default="")
    memory_plan: dict = doc("What `bench plan` chose for `--gpu-memory` (bench/plan.py); empty without it.",
                            default_factory=dict)


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
    from bench.variants import Variant, parse_variant

    variant = model if isinstance(model, Variant) else parse_variant(str(model))
    given = {k: v for k, v in given.items() if v is not None}
    config_path = Path(run_dir) / "config.json"
    if Path(run_dir).is_dir() and int(os.environ.get("RANK", "0")) == 0:  # the job's other processes: rank 0 holds it
        check_folder_free(run_dir, *RUN_LOCK)
    if resume:
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

    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise BenchError(f"--out {run_dir} is a file; give a folder for the run")
    if any((Path(run_dir) / "checkpoints").glob("*.pt")):
        raise BenchError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
    # A folder with a config but no checkpoint is a run that stopped before its first one: it starts again there.
    import models

    preset = given.pop("preset", "cpu")
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
    import random

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
    the same spans (all its threads; DataLoader workers are other processes), which other work on the machine does not
    inflate as it does ``wall_s`` (nan for a run resumed from a checkpoint older than the column); ``threads`` is
    torch's CPU thread count then (a resumed run may have another).
    """

    COLUMNS = ["step", "loss", "lr", "grad_norm", "steps_per_s", "wall_s", "cpu_s", "threads"]

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
    from bench.io import folder_lock

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
    from bench.synth import ensure_default_set, wait_for_default_set

    if not cfg.synthetic:
        return
    size = cfg.model_config.get("image_size") or build_model(cfg.model, cfg.preset, cfg.model_overrides,
                                                             "meta").image_size
    if int(os.environ.get("RANK", "0")) == 0:
        ensure_default_set(cfg.data, cfg.synth_n, size, progress=progress)
    else:
        wait_for_default_set(cfg.data, cfg.synth_n, size)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, ddp: Distributed, progress: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from bench.data import FaceDataset
    from bench.sample import GridSpec

    check_config(cfg)
    if cfg.batch_size % ddp.world:
        raise BenchError(f"--batch-size {cfg.batch_size} is not divisible by the {ddp.world} processes; "
                         f"the global batch is split evenly")
    if cfg.micro_batch and (cfg.batch_size // ddp.world) % cfg.micro_batch:
        raise BenchError(f"--micro-batch {cfg.micro_batch} does not divide each process's share of the batch "
                         f"({cfg.batch_size} / {ddp.world} processes)")
    device, last = ddp.device, run_dir / "checkpoints" / "last.pt"
    if ddp.main and last.parent.is_dir():
        clean_stale_temporaries(last.parent)

    # --- state: model, EMA, optimiser, scaler, noise generator; restored from the checkpoint on resume
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.preset, cfg.model_config or cfg.model_overrides).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.checkpointing:
        recompute.enable(model)
    opt = make_optimizer(model.parameters(), cfg.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)  # time, noise and mask drops of the global batch
    step, wall, cpu, saved_step = 0, 0.0, 0.0, None
    if resume:
        if not last.is_file():
            raise BenchError(f"--resume: {run_dir} has no checkpoint (it stopped before its first one); "
                             f"delete the folder and start again")
        state = load(last)
        load_weights(model, state.get("model"), state, dataclasses.asdict(cfg), last)
        load_weights(ema, state.get("ema"), state, dataclasses.asdict(cfg), last)
        for group in state["optimizer"]["param_groups"]:  # fused/foreach are this device's choice, not the saved one's
            group.update(optimizer_flags(device))
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        gen.set_state(state["generator"])
        step = saved_step = state["step"]
        wall = state["wall_s"]
        cpu = state.get("cpu_s", math.nan)  # checkpoints before the column have no CPU time
        del state

    # --- data, in the model's space (a synthetic set was made before the process group: prepare_data)
    train_set = FaceDataset(cfg.data, "train", size=model.image_size)
    space = load_space(cfg.space, cfg.vae, device)
    cache = LatentCache(run_dir / "latents", space, "train") if cfg.cache_latents and cfg.space == "latent" else None
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, step, cfg.steps, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp.world > 1 else model
    autocast = torch.autocast(device.type, dtype=PRECISIONS[cfg.precision], enabled=cfg.precision != "fp32")

    def save_checkpoint() -> None:
        state = {"step": step, "wall_s": wall, "cpu_s": cpu, "config": dataclasses.asdict(cfg),
                 "model": model.state_dict(),
                 "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_state(), "generator": gen.get_state(),
                 "sampler": {"seed": cfg.seed, "position": step * cfg.batch_size, "n": len(train_set)}}
        save_atomic(state, last)
        if (cfg.keep_every and step % cfg.keep_every == 0) or step in cfg.keep_at:
            snapshot(last, last.with_name(f"step_{step:07d}.pt"))

    if step >= cfg.steps:  # nothing to do: the run's files (config.json, loss.csv) stay as they are
        return {"step": step, "loss": None, "wall_s": wall}
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record_data(cfg, run_dir)
        log = LossLog(run_dir / "loss.csv", keep_until=step)  # first: a damaged log stops before anything is written
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
        grid = GridSpec.from_data(cfg, ema, space)

    bar = tqdm(total=cfg.steps, initial=step, disable=not (ddp.main and progress), desc=f"train {cfg.model}",
               unit="step", dynamic_ncols=True)
    pin = device.type == "cuda"  # host tensors copied without waiting for the device
    params = list(model.parameters())
    # on the device, read at logging and checkpoint steps only: this window's loss sum (fp64), the last step's loss,
    # the first step since the last check with a non-finite loss (0: none) and that loss
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    last_loss = torch.zeros((), dtype=torch.float64, device=device)
    bad_step = torch.zeros((), dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps, window_time, loss_mean, checked = 0, 0.0, float("nan"), step
    with StopSignals() as stop:
        tic, tic_cpu = time.perf_counter(), time.process_time()
        for batch in loader:
            images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
            t, x0, drop = (v.pin_memory() if pin else v for v in draw_noise(gen, cfg, model.input_shape, ddp.rank,
                                                                              ddp.world))
            loss = forward_backward(
                net, lambda part: cache.encode(images[part], batch["index"][part].tolist()) if cache
                else space.encode(images[part]), masks, t, x0, drop, cfg.micro_batch, autocast, scaler, device)
            last_loss = loss.double()
            window_loss += last_loss
            first_bad = (bad_step == 0) & ~torch.isfinite(last_loss)
            bad_step = torch.where(first_bad, step + 1, bad_step)
            bad_loss = torch.where(first_bad, last_loss, bad_loss)

            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))
            step += 1
            window_steps += 1

            log_now = step % cfg.log_every == 0 or step == cfg.steps
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or (ddp.world == 1 and stop.signum)
            stop_all = False
            if log_now or save_now:  # the one host sync of a step (see the module docstring)
                weights_bad = ~(all_finite(params) & all_finite(ema.parameters()))
                totals = ddp.all_sum(torch.stack([window_loss, last_loss, (bad_step > 0).double(),
                                                  torch.tensor(float(stop.signum > 0), dtype=torch.float64,
                                                               device=device), weights_bad.double()]))
                window_sum, loss_sum, n_bad, n_stop, n_weights_bad = totals
                loss_mean = loss_sum / ddp.world
                stop_all = n_stop > 0
                if n_bad or n_weights_bad:
                    if ddp.main:
                        log.close()
                    bar.close()
                    raise BenchError(nonfinite_message(int(bad_step.item()), float(bad_loss.item()), bool(n_bad),
                                                       checked + 1, step, last, saved_step))
                bad_step.zero_()
                checked = step
            toc = time.perf_counter()
            wall += toc - tic
            cpu += time.process_time() - tic_cpu
            window_time += toc - tic
            if log_now:
                if ddp.main:
                    mean = window_sum / ddp.world / window_steps
                    log.write(step=step, loss=f"{mean:.6g}", lr=f"{lr_at(step - 1, cfg):.6g}",
                              grad_norm=f"{float(grad_norm):.6g}", steps_per_s=f"{window_steps / window_time:.4g}",
                              wall_s=f"{wall:.2f}", cpu_s=f"{cpu:.2f}", threads=torch.get_num_threads())
                    bar.set_postfix(loss=f"{mean:.4f}", steps_s=f"{window_steps / window_time:.2f}", refresh=False)
                window_loss.zero_()
                window_steps, window_time = 0, 0.0
            bar.update()
            if save_now or stop_all:
                if ddp.main:
                    save_checkpoint()
                saved_step = step
            if stop_all:
                bar.close()
                if ddp.main:
                    log.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, last)
            if ddp.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                grid.write(run_dir / "samples" / f"step_{step:07d}.png")
            tic, tic_cpu = time.perf_counter(), time.process_time()
    bar.close()
    if ddp.main:
        log.close()
    return {"step": step, "loss": loss_mean, "wall_s": wall}
