"""The report's sample grid: the same test masks and noise through every model."""
from __future__ import annotations

import json

import numpy as np

from bench import plots
from bench.data import colorize, read_label_png
from bench.errors import BenchError
from bench.io import display_path
from bench.report.common import GRID_MAX_ROWS, Context
from bench.report.select import SAMPLES_FILE


def grid_pictures(sets: list[dict], order: list[str]):
    """(mask pictures, {model: sample pictures}, row labels) of the sample grid."""
    from PIL import Image

    sets = sorted(sets, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    n = min(GRID_MAX_ROWS, min(len(r["files"]) for r in sets))
    first = sets[0]
    masks = [colorize(read_label_png(first["folder"] / f["mask"])) for f in first["files"][:n]]
    columns = {}
    for rec in sets:
        pics = []
        for f in rec["files"][:n]:
            path = rec["folder"] / f["image"]
            try:
                with Image.open(path) as im:
                    pics.append(np.asarray(im.convert("RGB")))
            except (OSError, ValueError) as e:
                raise BenchError(f"{display_path(path)} is not a readable image ({type(e).__name__}); redo the "
                                 f"samples (bench sample, or bench run --force)") from None
        columns[rec["model"]] = pics
    labels = [f["mask_source"] for f in first["files"][:n]]
    return masks, columns, labels



def section(ctx: Context) -> list[str]:
    md = ["## Samples", ""]
    if ctx.samples:
        masks, columns, labels = grid_pictures(ctx.samples, ctx.order)
        s0 = ctx.samples[0]
        md.append(ctx.figures.add(
            "samples.png",
            f"mask | {' | '.join(plots.display_name(m) for m in columns)}: one sample per model for the same "
            f"{len(masks)} test masks and the same seeds (noise of sample i from seed {s0.get('seed')}, i), "
            f"{s0.get('method')} {s0.get('steps')} steps, EMA weights; rows labelled by test face. "
            f"{training_steps(ctx.samples, list(columns))}",
            plots.sample_grid_figure(masks, columns, labels)))
        md += left_out_note(ctx, list(columns))
    else:
        md += ["No sample folders (`samples.json`) of this preset under the results folder.", ""]
    return md


def training_steps(sets: list[dict], shown: list[str]) -> str:
    """The training step of the checkpoint each column sampled, in one clause when they share it."""
    step = {r["model"]: r.get("train_step") for r in sets}
    if all(step.get(m) is None for m in shown):  # sample sets of an older harness do not record it
        return ""
    if len({step.get(m) for m in shown}) == 1:
        return f"Every model at training step {step.get(shown[0])}."
    return "Training step of each column: " + ", ".join(f"{plots.display_name(m)} {step.get(m)}" for m in shown) + "."


def left_out_note(ctx: Context, shown: list[str]) -> list[str]:
    """Which models of the report the grid lacks, and why: a sample set made with other masks, seed or sampler (it
    cannot share the grid's rows), or none at all."""
    missing = [m for m in ctx.order if m not in shown]
    if not missing:
        return []
    other = set()
    for path in ctx.results.rglob(SAMPLES_FILE):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("preset") == ctx.sel.preset:
            other.add(rec.get("model"))
    why = [f"{plots.display_name(m)} ("
           f"{'its sample set uses other masks, seed or sampler settings' if m in other else 'no sample set found'})"
           for m in missing]
    return [f"Not in the grid: {'; '.join(why)}. Redo the samples of every model with one setting (`bench run` "
            "with all of them in --models, or `bench sample`) to see them side by side.", ""]
