"""The one sampler: a run's EMA model integrated from noise to images, ``bench sample RUN``.

Python API (also used by the quality and speed commands):

    run = load_run("runs/sisma-cpu", device="cuda")          # EMA weights, eval mode, config, autoencoder
    labels = run_masks(run, n=8)                              # (8, S, S) test-split label maps
    images, nfe = generate(run, onehot(labels), indices=range(8), seed=0, steps=200)  # (8, 3, S, S) in [-1, 1]

Sample ``i`` with seed ``s`` starts from noise drawn by its own generator, seeded from (s, i), so it is
the same image whatever the batch size or the other samples of the call. Integration and NFE follow
``bench.flow``.

Precision: a run samples at its training precision unless told otherwise (``precision``). Its EMA model is cast to
that dtype once when loaded (``bench.runtime.cast_for_inference``: weights in bf16 at the ``paper`` preset, the scan's
A, D and step-size bias kept in fp32) and each network call gets its input cast to it, under the training's autocast,
which then recasts no weight. The trajectory itself (the noise, the Euler or Heun state and the time grid) stays fp32.
The trainer's own sample grids keep its fp32 EMA model and sample it under autocast.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from bench import flow
from bench.autoencoder import load_space
from bench.checkpoint import load, load_weights
from bench.data import FaceDataset, colorize, onehot, read_label_folder, resize_label, run_data_folder, write_label_png
from bench.errors import BenchError
from bench.io import display_path, read_json, to_uint8, write_json, write_png
from bench.provenance import provenance
from bench.runtime import PRECISIONS, autocast, cast_for_inference, check_precision, model_precision
from bench.synth import ensure_default_set
from bench.variants import build_model

RUN_IDENTITY_KEYS = ("model", "preset")  # what a run config must name before its checkpoint is read
RUN_CONFIG_KEYS = ("model", "preset", "space", "model_overrides")  # what sampling a run reads
GRID_CELL_PX = 128  # grid cells are enlarged (nearest neighbour) to at least this size, for viewing
GRID_PAD_PX = 2
MAX_GRID_ROWS = 16  # the overview grid of `bench sample` shows at most this many samples
GRID_SAMPLES_PER_MASK = 2  # samples per mask in the trainer's grids


@dataclass
class Run:
    """A trained run ready to sample: EMA model (eval, no grad), its space, its config (a dict)."""

    model: nn.Module
    space: nn.Module
    config: dict
    step: int
    run_dir: Path
    device: torch.device

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def precision(self) -> str:
        """The precision the model was cast to for sampling (fp32 when it was not)."""
        return model_precision(self.model)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             precision: str | None = None) -> Run:
    """The EMA weights of ``checkpoint`` (default RUN/checkpoints/last.pt), read on the CPU first, on ``device``, cast
    once to ``precision`` (default: the run's training precision; see the module docstring)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{run_dir} is not a training run (no config.json); train one with "
                         f"`bench train MODEL --out {run_dir}`")
    config = read_json(config_path, "run config")
    check_run_config(config, config_path, RUN_IDENTITY_KEYS)
    ckpt = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.pt"
    state = load(ckpt, mmap=True)
    check_run_config(config, config_path, RUN_CONFIG_KEYS)
    if config.get("data") is not None:
        config["data"] = display_path(run_data_folder(config, run_dir))  # found from any working folder, checked
    model = build_model(config["model"], config["preset"], config.get("model_config") or config["model_overrides"])
    load_weights(model, state.get("ema"), state, config, ckpt)
    device = torch.device(device)
    precision = precision or config.get("precision", "fp32")
    check_precision(precision)
    model = cast_for_inference(model.to(device).eval().requires_grad_(False), precision)
    space = load_space(config["space"], config.get("vae"), device)
    return Run(model, space, config, int(state["step"]), run_dir, device)


def check_run_config(config, path: Path, keys: Sequence[str]) -> None:
    """A one-line error for a run config that lacks one of ``keys`` (edited, or not written by sis-bench)."""
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if missing:
        raise BenchError(f"{display_path(path)} is not a sis-bench run config (no {missing[0]!r}); restore it or "
                         f"train the run again")


def check_guidance(guidance: float) -> None:
    """One-line error for a guidance scale that is not a finite number of 0 or more (1 turns guidance off)."""
    if not math.isfinite(guidance) or guidance < 0:
        raise BenchError(f"--guidance {guidance}: use a finite scale of 0 or more (1: no guidance)")


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sample ``index`` of seed ``seed`` (distinct streams for distinct pairs)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def noise_for(indices: Iterable[int], seed: int, shape: Sequence[int]) -> Tensor:
    """(N, *shape) standard normal noise on the CPU, row k drawn from the generator of (seed, indices[k])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, int(i))))
            for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


@torch.no_grad()
def sample_batch(model: nn.Module, space: nn.Module, masks: Tensor, noise: Tensor, steps: int,
                 method: str = "euler", guidance: float = 1.0, precision: str | None = None) -> tuple[Tensor, int]:
    """One batch: integrate from ``noise`` given one-hot ``masks``, decode; (images (B, 3, S, S) CPU, NFE).

    The model runs at the precision it was cast to (``precision`` None), its inputs cast to its dtype; a model that
    was not cast (fp32 weights, as the trainer's EMA) runs under ``precision``'s autocast. The trajectory is fp32.
    """
    device = next(model.parameters()).device
    cast = model_precision(model)
    precision = precision or cast
    if cast != "fp32" and precision != cast:
        raise ValueError(f"the model was cast to {cast} for sampling; it cannot sample at {precision}")
    net = model if cast == "fp32" else _with_inputs_cast(model, PRECISIONS[cast])
    masks = masks.to(device, PRECISIONS[cast])
    with autocast(device, precision):
        x, nfe = flow.integrate(flow.guided_velocity(net, masks, guidance), noise.to(device, torch.float32),
                                steps, method)
    return space.decode(x.float()).cpu(), nfe


def _with_inputs_cast(model: nn.Module, dtype: torch.dtype):
    """model(x, t, mask) with x cast to the model's dtype (t stays fp32: the models embed it in fp32)."""
    return lambda x, t, mask: model(x.to(dtype), t, mask)


def generate(run: Run, masks: Tensor, indices: Iterable[int], seed: int = 0, steps: int = 200,
             method: str = "euler", guidance: float = 1.0, batch_size: int = 16, precision: str | None = None,
             progress: bool = False) -> tuple[Tensor, int]:
    """Images (N, 3, S, S) in [-1, 1] on the CPU for one-hot ``masks`` (N, K, S, S) and sample ``indices``
    (the noise of row k comes from (seed, indices[k])), and the NFE of one trajectory.

    ``precision`` None: the run's (``load_run``); another one casts the run's fp32 model to it, once and for good."""
    from tqdm import tqdm

    indices = list(indices)
    if len(indices) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(indices)} indices")
    if method not in flow.METHODS:
        raise BenchError(f"--method {method}: use one of {', '.join(flow.METHODS)}")
    check_guidance(guidance)
    if steps < 1 or batch_size < 1:
        raise BenchError(f"steps and batch size must be at least 1, got {steps} and {batch_size}")
    if precision is not None and precision != run.precision:
        check_precision(precision)
        if run.precision != "fp32":
            raise BenchError(f"the run was loaded for {run.precision} sampling; load it again for {precision}")
        cast_for_inference(run.model, precision)
    out, nfe = [], steps * flow.NFE_PER_STEP[method]
    for start in tqdm(range(0, len(indices), batch_size), desc="sampling", unit="batch", disable=not progress):
        chunk = indices[start:start + batch_size]
        noise = noise_for(chunk, seed, run.model.input_shape)
        images, nfe = sample_batch(run.model, run.space, masks[start:start + batch_size], noise, steps, method,
                                   guidance)
        out.append(images)
    return (torch.cat(out) if out else torch.empty(0, 3, run.image_size, run.image_size)), nfe


# ----------------------------------------------------------------------------------------------
# Masks and pictures
# ----------------------------------------------------------------------------------------------

def test_labels(config: dict, size: int, n: int) -> tuple[list[str], Tensor]:
    """The first ``n`` label maps of the run's test split (cycled if it holds fewer): names and (n, S, S)."""
    if config.get("synthetic"):
        ensure_default_set(config["data"], config["synth_n"], size, progress=False)
    test = FaceDataset(config["data"], "test", size=size)
    picks = [k % len(test) for k in range(n)]
    labels = [torch.from_numpy(resize_label(test.label_map(k), size).astype(np.int64)) for k in picks]
    return [f"test-{test.indices[k]}" for k in picks], torch.stack(labels)


def run_masks(run: Run, n: int, folder: str | Path | None = None) -> tuple[list[str], Tensor]:
    """Label maps (n, S, S) for n samples: sample i gets mask i modulo the number available, from the run's
    test split or from a folder of label PNGs (class indices 0-18)."""
    if folder is None:
        return test_labels(run.config, run.image_size, n)

    names, labels = read_label_folder(folder, size=run.image_size)
    picks = [i % len(labels) for i in range(n)]
    return [names[k] for k in picks], labels[picks]


def grid_picture(labels: Tensor, images: Tensor, per_mask: int) -> np.ndarray:
    """One row per mask: the mask in colour, then its ``per_mask`` samples; cells enlarged for viewing."""
    S = labels.shape[-1]
    zoom = max(1, GRID_CELL_PX // S)
    pix = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)
    rows = []
    for m, label in enumerate(labels):
        cells = [colorize(label.numpy())] + [pix[m * per_mask + j] for j in range(per_mask)]
        cells = [np.pad(c.repeat(zoom, 0).repeat(zoom, 1), ((GRID_PAD_PX,) * 2, (GRID_PAD_PX,) * 2, (0, 0)),
                        constant_values=255) for c in cells]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0).astype(np.uint8)


@dataclass
class GridSpec:
    """The training-time sample grid: fixed test masks and fixed noise, sampled with the EMA model."""

    model: nn.Module
    space: nn.Module
    labels: Tensor  # (M, S, S)
    noise: Tensor  # (M * per_mask, C, H, W)
    steps: int
    precision: str
    per_mask: int

    @classmethod
    def from_data(cls, cfg, ema: nn.Module, space: nn.Module) -> "GridSpec":
        _, labels = test_labels(dataclasses.asdict(cfg), ema.image_size, cfg.grid_masks)
        noise = noise_for(range(cfg.grid_masks * GRID_SAMPLES_PER_MASK), cfg.seed, ema.input_shape)
        return cls(ema, space, labels, noise, cfg.grid_steps, cfg.precision, GRID_SAMPLES_PER_MASK)

    def write(self, path: Path) -> None:
        masks = onehot(self.labels).repeat_interleave(self.per_mask, dim=0)
        images, _ = sample_batch(self.model, self.space, masks, self.noise, self.steps, precision=self.precision)
        write_png(path, grid_picture(self.labels, images, self.per_mask))


# ----------------------------------------------------------------------------------------------
# Samples written to a folder (bench sample, and bench run's sample stage)
# ----------------------------------------------------------------------------------------------

def write_samples(run: Run, out: Path, n: int, steps: int = 200, method: str = "euler", guidance: float = 1.0,
                  seed: int = 0, batch_size: int = 16, precision: str | None = None, masks: str | Path | None = None,
                  grid: bool = True, progress: bool = False) -> dict:
    """``n`` images of a run in ``out``: PNGs, the masks used (masks/*.png), grid.png and samples.json (returned).
    ``precision`` None: the one the run was loaded at."""
    if precision is not None:
        check_precision(precision)
    if n < 1:
        raise BenchError(f"--n must be at least 1, got {n}")
    names, labels = run_masks(run, n, masks)
    images, nfe = generate(run, onehot(labels), range(n), seed, steps, method, guidance, batch_size, precision,
                           progress=progress)
    out = Path(out)
    pix, files = to_uint8(images).permute(0, 2, 3, 1).numpy(), []
    for i in range(n):
        write_png(out / f"{i:05d}.png", pix[i])
        write_label_png(labels[i].numpy(), out / "masks" / f"{i:05d}.png")
        files.append({"index": i, "image": f"{i:05d}.png", "mask": f"masks/{i:05d}.png", "mask_source": names[i]})
    if grid:
        shown = min(n, MAX_GRID_ROWS)
        write_png(out / "grid.png", grid_picture(labels[:shown], images[:shown], 1))
    record = {"run": str(run.run_dir), "model": run.config.get("variant") or run.config["model"],
              "preset": run.config["preset"], "data": run.config["data"], "space": run.config["space"],
              "train_step": run.step, "method": method, "steps": steps, "nfe": nfe, "guidance": guidance,
              "seed": seed, "n": n, "masks": str(masks) if masks else "test split", "files": files,
              "provenance": provenance(run.device, run.precision, batch_size, steps, nfe, seed)}
    write_json(out / "samples.json", record)
    return record
