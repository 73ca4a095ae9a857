"""``bench tune lr``: the learning-rate sweep behind the small presets' recipes.

Each backbone (or variant) is trained at each learning rate for ``steps`` steps with the rest of its preset recipe,
then its EMA weights are scored by the held-out flow-matching loss: the test split's images (at most
``HELDOUT_IMAGES``), each at the same times ``HELDOUT_TIMES`` with the same noise for every run, so that the loss of
two runs differs only by their weights. One row per run goes to ``results/lr_sweep.csv``; the rate with the lowest
held-out loss is the one the preset's recipe uses (bench/presets.py cites the rows). A rate at which training meets a
non-finite loss is recorded as diverged (an empty held-out loss, the step it stopped at) and the sweep goes on.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bench import flow, presets
from bench.data import FaceDataset
from bench.errors import BenchError, NonFiniteLoss
from bench.io import ResultsFile, display_path
from bench.provenance import provenance
from bench.rows import SweepRow
from bench.runtime import resolve_device
from bench.sample import load_run
from bench.train import make_config, train
from bench.variants import parse_models

HELDOUT_IMAGES = 256
HELDOUT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
HELDOUT_SEED = 1234
SWEEP_FILE = "lr_sweep.csv"


@torch.no_grad()
def heldout_loss(run, batch_size: int = 64) -> float:
    """Mean flow-matching loss of a run's EMA model on the test split at HELDOUT_TIMES with fixed noise."""
    ds = FaceDataset(run.config["data"], "test", size=run.image_size)
    n = min(HELDOUT_IMAGES, len(ds))
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([it["image"] for it in items]).to(run.device)
        masks = torch.stack([it["mask"] for it in items]).to(run.device)
        x1 = run.space.encode(images)
        for t in HELDOUT_TIMES:
            x0 = torch.randn(x1.shape, generator=gen).to(run.device)
            tt = torch.full((len(x1),), t, device=run.device)
            total += flow.flow_loss(run.model, x1, masks, tt, x0).item() * len(x1)
            count += len(x1)
    return total / count


def lr_sweep(preset: str, models: list[str], lrs: list[float], steps: int, seed: int = 0,
             results: Path = Path("results"), device: str = "auto", echo=print) -> list[dict]:
    """Train every (model, lr) for ``steps`` steps and append its held-out loss to RESULTS/lr_sweep.csv."""
    variants = parse_models(models)
    if not lrs or min(lrs) <= 0:
        raise BenchError("--lrs takes positive learning rates, e.g. 3e-4,1e-3,2e-3")
    if steps < 1:
        raise BenchError(f"--steps must be at least 1, got {steps}")
    device = resolve_device(device)
    out = ResultsFile(Path(results) / SWEEP_FILE, SweepRow)
    out.check()
    rows = []
    for v in variants:
        recipe = presets.recipe(preset, v.model)
        for lr in lrs:
            run_dir = Path(results) / f"lr_sweep_{preset}" / v.slug / f"lr{lr:g}-steps{steps}-seed{seed}"
            resume = (run_dir / "checkpoints" / "last.pt").is_file()
            options = dict(preset=preset, steps=steps, lr=lr, seed=seed, keep_at=[])
            cfg = make_config(v, run_dir, resume=resume, **({} if resume else options))
            echo(f"{v.name} lr {lr:g}: {'continuing' if resume else 'training'} {display_path(run_dir)}")
            tic = time.perf_counter()
            try:
                result = train(cfg, run_dir, resume=resume, device=str(device), progress=True)
            except NonFiniteLoss as e:  # a rate too high for this model is a result of the sweep, not its end
                echo(f"   diverged: {e}")
                result = {"step": e.step, "loss": math.nan}
                loss = math.nan
            else:
                run = load_run(run_dir, device, precision="fp32")  # the held-out loss of the fp32 EMA weights
                loss = heldout_loss(run)
                echo(f"   held-out loss {loss:.5f}")
            row = {"model": v.name, "preset": preset, "lr": lr, "train_steps": result["step"],
                   "heldout_loss": loss, "train_loss": result["loss"], "run": display_path(run_dir),
                   "recipe_lr": recipe.lr, "seconds": time.perf_counter() - tic,
                   **provenance(device, cfg.precision, cfg.batch_size, steps, None, seed)}
            out.append([row])
            rows.append(row)
    return rows


def best_rates(rows: list[dict]) -> dict[str, float]:
    """Per model, the learning rate with the lowest held-out loss."""
    best = {}
    for r in rows:
        if math.isnan(r["heldout_loss"]):  # diverged
            continue
        if r["model"] not in best or r["heldout_loss"] < best[r["model"]][1]:
            best[r["model"]] = (r["lr"], r["heldout_loss"])
    return {m: lr for m, (lr, _) in best.items()}


__all__ = ["best_rates", "heldout_loss", "lr_sweep"]
