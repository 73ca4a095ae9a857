"""The one flow-matching trainer for every backbone: ``bench train MODEL``.

A run is a folder: ``config.json`` (the TrainConfig, plain data), ``loss.csv`` (step, loss, lr, grad norm,
steps/s, wall time), ``checkpoints/last.pt`` (plus ``step_*.pt`` snapshots every ``keep_every`` steps) and
``samples/step_*.png`` grids (mask | samples from fixed noise, EMA weights). The conventions (time, path,
target, guidance) are those of ``bench.flow``.

Exact resume: everything random is a function of the seed and the step. The data order is a seeded
permutation per epoch, indexed by step; the noise, times and mask drops of the GLOBAL batch come from one
generator whose state is checkpointed; each DDP rank takes its slice of both. So N steps in one go,
N/2 + resume, or the same global batch over several processes follow the same trajectory.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import typer

from bench import flow
from bench.autoencoder import SD_VAE, LatentCache, load_space
from bench.checkpoint import load, rng_state, save_atomic, set_rng_state
from bench.cli import command
from bench.errors import BenchError, portable

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SYNTH_SEED = 0  # the default synthetic set is the same for every run, whatever the training seed
SYNTH_UPSCALE = 2  # synthetic faces are drawn at 2x the model's image size: their masks come at half of it
DEFAULT_DATA_ROOT = Path("data")
DEFAULT_RUN_ROOT = Path("runs")

# Defaults per size preset (data, not code paths); every entry can be overridden on the command line.
# paper: the paper's recipe (batch 8, lr 4e-3, no weight decay, EMA 0.9999, 150k iterations); it trained
# without mask dropout, so guidance is off there. cpu: about a second per step at batch 16 on two cores,
# so 1500 steps take ~25 minutes per backbone. cpu/tiny: lr 1e-3 with a short warm-up, because 4e-3 over
# so few steps at these widths makes the loss jump; the EMA decays faster (0.999 is a ~1k-step window,
# 0.9999 would still average the random init at the end); 10% mask dropout so that guidance can be tried.
PRESET_DEFAULTS = {
    "paper": dict(steps=150_000, batch_size=8, lr=4e-3, warmup=0, ema_decay=0.9999, precision="bf16",
                  p_uncond=0.0, ckpt_every=5000, keep_every=50_000, sample_every=5000, log_every=100,
                  grid_steps=50, workers=4, synth_n=30_000),
    "cpu": dict(steps=1500, batch_size=16, lr=1e-3, warmup=100, ema_decay=0.999, precision="fp32",
                p_uncond=0.1, ckpt_every=250, keep_every=0, sample_every=250, log_every=10,
                grid_steps=50, workers=1, synth_n=2000),
    "tiny": dict(steps=20, batch_size=4, lr=1e-3, warmup=0, ema_decay=0.99, precision="fp32",
                 p_uncond=0.1, ckpt_every=10, keep_every=0, sample_every=10, log_every=1,
                 grid_steps=8, workers=0, synth_n=64),
}


@dataclass
class TrainConfig:
    """Everything that defines a run; written to RUN/config.json and into every checkpoint."""

    model: str
    preset: str
    data: Optional[str] = None  # data folder (CelebAMask-HQ or SEAN layout)
    synthetic: bool = False  # data is the default synthetic set, generated on first use
    synth_n: int = 2000  # faces in the default synthetic set
    space: str = "pixel"  # "pixel" or "latent"
    vae: Optional[str] = None  # AutoencoderKL folder or cached hub id (latent space)
    model_overrides: dict = field(default_factory=dict)  # config fields changed to fit the space
    steps: int = 1500
    batch_size: int = 16  # global batch, split evenly over the processes
    lr: float = 1e-3
    warmup: int = 0  # linear learning-rate warm-up steps
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "fp32"
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    p_uncond: float = 0.1  # probability of training a sample on the null mask (classifier-free guidance)
    time_dist: str = "logit-normal"
    ckpt_every: int = 250
    keep_every: int = 0  # keep a snapshot step_N.pt every this many steps (0: only last.pt)
    sample_every: int = 250
    log_every: int = 10
    grid_masks: int = 4  # test masks in the sample grid, two samples each
    grid_steps: int = 50  # Euler steps for the sample grids
    workers: int = 0
    cache_latents: bool = False


# Options that only change how a run is watched or stored, not its trajectory: free to change on resume.
RESUME_FREE = {"steps", "ckpt_every", "keep_every", "sample_every", "log_every", "grid_masks", "grid_steps",
               "workers", "cache_latents"}
GRID_SAMPLES_PER_MASK = 2


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def default_data_dir(image_size: int, n: int) -> Path:
    return DEFAULT_DATA_ROOT / f"synthetic-{SYNTH_UPSCALE * image_size}px-n{n}"


def space_overrides(model: str, preset: str, space: str, vae: str | None) -> dict:
    """Model config fields to change so that the preset runs in ``space`` (pixels, or the VAE's latents)."""
    from models import create_model

    with torch.device("meta"):
        m = create_model(model, preset)
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


def make_config(model: str, run_dir: Path, resume: bool = False, **given) -> TrainConfig:
    """The run's config: for a new run, preset defaults then the given options; on resume, the saved config
    with the given options, which must not change the trajectory (one-line error otherwise)."""
    given = {k: v for k, v in given.items() if v is not None}
    config_path = Path(run_dir) / "config.json"
    if resume:
        if not config_path.is_file():
            raise BenchError(f"--resume: {run_dir} holds no run (no config.json); drop --resume to start one")
        saved = json.loads(config_path.read_text())
        given["model"] = model
        if "data" in given:
            given["data"] = portable(given["data"])
        for key, value in given.items():
            if key not in RESUME_FREE and key in saved and saved[key] != value:
                raise BenchError(f"--resume: {key} = {value!r} differs from the run's {saved[key]!r} "
                                 f"({config_path}); drop the option or train into a new --out")
        return TrainConfig(**{**saved, **given})

    if config_path.exists() or (Path(run_dir) / "checkpoints").exists():
        raise BenchError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
    from models import create_model, list_presets

    preset = given.pop("preset", "cpu")
    if preset not in PRESET_DEFAULTS or preset not in list_presets(model):
        raise BenchError(f"unknown preset {preset!r} for {model}; available: "
                         f"{', '.join(p for p in list_presets(model) if p in PRESET_DEFAULTS)}")
    with torch.device("meta"):
        native_space = create_model(model, preset).space
    if given.get("space", "pixel") not in ("pixel", "latent"):
        raise BenchError(f"--space {given['space']}: use pixel or latent")
    cfg = TrainConfig(model=model, preset=preset, **{**PRESET_DEFAULTS[preset], **given})
    cfg.space = given.get("space", native_space)
    if cfg.space == "latent" and not cfg.vae:
        cfg.vae = SD_VAE
    if cfg.space == "pixel":
        cfg.vae = None
    cfg.model_overrides = space_overrides(model, preset, cfg.space, cfg.vae)
    if cfg.data is None:
        with torch.device("meta"):
            image_size = create_model(model, preset, **cfg.model_overrides).image_size
        cfg.data, cfg.synthetic = portable(default_data_dir(image_size, cfg.synth_n)), True
    else:
        cfg.data = portable(cfg.data)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """One-line errors for option values that cannot work."""
    if cfg.precision not in PRECISIONS:
        raise BenchError(f"--precision {cfg.precision}: use one of {', '.join(PRECISIONS)}")
    if cfg.time_dist not in flow.TIME_DISTS:
        raise BenchError(f"--time-dist {cfg.time_dist}: use one of {', '.join(flow.TIME_DISTS)}")
    if not 0 <= cfg.p_uncond < 1:
        raise BenchError(f"--p-uncond {cfg.p_uncond}: a probability in [0, 1) is needed")
    if not 0 <= cfg.ema_decay < 1:
        raise BenchError(f"--ema-decay {cfg.ema_decay}: a decay in [0, 1) is needed")
    for name in ("steps", "batch_size", "ckpt_every", "sample_every", "log_every", "grid_steps"):
        if getattr(cfg, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise BenchError(f"--lr must be positive, got {cfg.lr}")


def build_model(cfg: TrainConfig | dict) -> nn.Module:
    """The run's backbone, freshly initialised (seed the RNG first for a reproducible init)."""
    from models import create_model

    c = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return create_model(c["model"], c["preset"], **c["model_overrides"])


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

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (the paper uses a constant rate)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone) and its device."""

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device is visible; use --device cpu")
        if device == "cuda":  # each process of a job takes the GPU of its local rank
            device = f"cuda:{local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_mean(self, values: list[float]) -> list[float]:
        """Mean over the processes of a few numbers (one all-reduce)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

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
    the time spent writing checkpoints and sample grids.
    """

    COLUMNS = ["step", "loss", "lr", "grad_norm", "steps_per_s", "wall_s"]

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        rows = []
        if keep_until and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
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
    ddp = Distributed(device)
    try:
        return _train(cfg, Path(run_dir), resume, ddp, progress)
    finally:
        ddp.close()


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, ddp: Distributed, progress: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from bench.data import FaceDataset
    from bench.sample import GridSpec
    from bench.synth import ensure_synthetic

    check_config(cfg)
    if cfg.batch_size % ddp.world:
        raise BenchError(f"--batch-size {cfg.batch_size} is not divisible by the {ddp.world} processes; "
                         f"the global batch is split evenly")
    device, last = ddp.device, run_dir / "checkpoints" / "last.pt"

    # --- state: model, EMA, optimiser, scaler, noise generator; restored from the checkpoint on resume
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)  # time, noise and mask drops of the global batch
    step, wall, saved_step = 0, 0.0, None
    if resume:
        if not last.is_file():
            raise BenchError(f"--resume: {run_dir} has no checkpoint (it stopped before its first one); "
                             f"delete the folder and start again")
        state = load(last)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        gen.set_state(state["generator"])
        step = saved_step = state["step"]
        wall = state["wall_s"]
        del state

    # --- data, in the model's space
    if cfg.synthetic:
        if ddp.main:
            ensure_synthetic(cfg.data, cfg.synth_n, SYNTH_UPSCALE * model.image_size, SYNTH_SEED, progress=progress)
        ddp.barrier()
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
        state = {"step": step, "wall_s": wall, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                 "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_state(), "generator": gen.get_state(),
                 "sampler": {"seed": cfg.seed, "position": step * cfg.batch_size, "n": len(train_set)}}
        save_atomic(state, last)
        if cfg.keep_every and step % cfg.keep_every == 0:
            snapshot = last.with_name(f"step_{step:07d}.pt")
            snapshot.unlink(missing_ok=True)
            try:
                os.link(last, snapshot)  # a hard link: no copy, and it survives the next save of last.pt
            except OSError:
                shutil.copyfile(last, snapshot)

    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(dataclasses.asdict(cfg), run_dir / "config.json")
        log = LossLog(run_dir / "loss.csv", keep_until=step)
        grid = GridSpec.from_data(cfg, ema, space)
    if step >= cfg.steps:
        if ddp.main:
            log.close()
        return {"step": step, "loss": None, "wall_s": wall}

    bar = tqdm(total=cfg.steps, initial=step, disable=not (ddp.main and progress), desc=f"train {cfg.model}",
               unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_time, loss_mean = 0.0, 0, 0.0, float("nan")
    with StopSignals() as stop:
        tic = time.perf_counter()
        for batch in loader:
            images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
            x1 = cache.encode(images, batch["index"].tolist()) if cache else space.encode(images)
            t, x0, drop = draw_noise(gen, cfg, model.input_shape, ddp.rank, ddp.world)
            with autocast:
                loss = flow.flow_loss(net, x1, flow.drop_masks(masks, drop.to(device)), t.to(device), x0.to(device))
            loss_mean, stop_all = ddp.all_mean([loss.item(), float(stop.signum)])
            if not math.isfinite(loss_mean):
                where = f"{last} (step {saved_step})" if saved_step is not None else "none (no checkpoint was written yet)"
                raise BenchError(f"loss is {loss_mean} at step {step + 1}: training stopped and that step was not "
                                 f"saved; last good checkpoint: {where}. Try a lower --lr, --grad-clip, or --precision fp32")

            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, cfg.ema_decay)
            step += 1

            toc = time.perf_counter()
            wall += toc - tic
            window_loss, window_steps, window_time = window_loss + loss_mean, window_steps + 1, window_time + toc - tic
            if ddp.main and (step % cfg.log_every == 0 or step == cfg.steps):
                log.write(step=step, loss=f"{window_loss / window_steps:.6g}", lr=f"{lr_at(step - 1, cfg):.6g}",
                          grad_norm=f"{float(grad_norm):.6g}", steps_per_s=f"{window_steps / window_time:.4g}",
                          wall_s=f"{wall:.2f}")
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", steps_s=f"{window_steps / window_time:.2f}",
                                refresh=False)
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            bar.update()
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_all:
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
            tic = time.perf_counter()
    bar.close()
    if ddp.main:
        log.close()
    return {"step": step, "loss": loss_mean, "wall_s": wall}


def save_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# bench train
# ----------------------------------------------------------------------------------------------

@command("train")
def train_cmd(
    model: str = typer.Argument(..., help="Backbone to train: sisma, dit, sdm (see `bench models`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Size preset: paper, cpu (default) or tiny; also sets "
                                         "the training defaults (steps, batch, lr, EMA...)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder (CelebAMask-HQ or {train,test}/{images,labels} "
                                        "layout). Default: a synthetic set in ./data, generated on first use."),
    synth_n: Optional[int] = typer.Option(None, "--synth-n", help="Faces in the default synthetic set "
                                          "(paper 30000, cpu 2000, tiny 64)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Train up to this step (on resume: extend to it)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch, split over DDP processes."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (no weight decay)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear learning-rate warm-up steps."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA decay of the weights used for sampling."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of init, data order, noise and mask drops."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 (autocast) or fp16 (autocast + "
                                            "grad scaler)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm (0: no clipping; default 1)."),
    p_uncond: Optional[float] = typer.Option(None, "--p-uncond", help="Probability of dropping a sample's mask "
                                             "(null mask) for classifier-free guidance."),
    time_dist: Optional[str] = typer.Option(None, "--time-dist", help="Training time distribution: logit-normal "
                                            "(default) or uniform."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Write checkpoints/last.pt every N steps."),
    keep_every: Optional[int] = typer.Option(None, "--keep-every", help="Keep a snapshot step_N.pt every N steps "
                                             "(0: none)."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Write a sample grid every N steps."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Append a loss.csv row every N steps."),
    grid_steps: Optional[int] = typer.Option(None, "--grid-steps", help="Euler steps of the sample grids (cpu/paper 50, tiny 8)."),
    space: Optional[str] = typer.Option(None, "--space", help="pixel or latent; default: the model's own (paper: "
                                        "latent for sisma and dit, pixel for sdm; cpu and tiny: pixel)."),
    vae: Optional[str] = typer.Option(None, "--vae", help=f"AutoencoderKL for latent space: a local diffusers "
                                      f"folder or a hub id already in the HF cache (default {SD_VAE})."),
    cache_latents: Optional[bool] = typer.Option(None, "--cache-latents/--no-cache-latents",
                                                 help="Keep each image's latent in RUN/latents after its first encoding."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/MODEL-PRESET)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt; "
                                "options that would change its trajectory must match."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
):
    """Train a backbone with flow matching; checkpoints, loss.csv and sample grids go to the run folder.

    Multi-process: `torchrun --nproc-per-node N $(which bench) train ...` (gloo on CPU, NCCL on GPU).
    """
    run_dir = out or DEFAULT_RUN_ROOT / f"{model}-{preset or 'cpu'}"
    options = dict(preset=preset, data=str(data) if data else None, synth_n=synth_n, steps=steps,
                   batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, seed=seed, precision=precision,
                   grad_clip=grad_clip, p_uncond=p_uncond, time_dist=time_dist, ckpt_every=ckpt_every,
                   keep_every=keep_every, sample_every=sample_every, log_every=log_every, grid_steps=grid_steps,
                   space=space, vae=vae, cache_latents=cache_latents, workers=workers)
    cfg = make_config(model, run_dir, resume, **options)
    try:
        result = train(cfg, run_dir, resume=resume, device=device)
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(128 + e.signum)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f", last loss {result['loss']:.4f}" if result["loss"] is not None else " (nothing to do)"
        typer.echo(f"{run_dir}: step {result['step']}{loss}, {result['wall_s']:.1f} s of training")
