"""The report's training section: each run's recipe, final loss and time, and the loss curves."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import plots
from bench.errors import BenchError
from bench.io import ResultsFile, display_path, read_json
from bench.report.common import FINAL_LOSS_POINTS, Context, Selection, fmt, markdown, tidy
from bench.report.select import resolve_path
from bench.rows import SweepRow


def training_runs(sel: Selection, samples: list[dict], results: Path) -> dict[str, Path]:
    """Run folders per model: from the quality rows, else from the samples' records."""
    runs = {}
    for r in sel.quality.itertuples():
        if isinstance(r.run, str):
            runs[r.model] = resolve_path(r.run, results)
    for rec in samples:
        if rec["model"] not in runs and rec.get("run"):
            runs[rec["model"]] = resolve_path(rec["run"], results)
    return {m: p for m, p in runs.items() if (p / "config.json").is_file()}


def training_table(runs: dict[str, Path], order: list[str]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    lines, curves = [], {}
    for model in [m for m in order if m in runs]:
        cfg = read_json(runs[model] / "config.json", "run config")
        log_path = runs[model] / "loss.csv"
        try:
            log = pd.read_csv(log_path) if log_path.is_file() and log_path.stat().st_size else pd.DataFrame()
            if not log.empty and not {"step", "loss", "wall_s"} <= set(log.columns):
                raise ValueError("other columns")
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
            raise BenchError(f"{display_path(log_path)} is not a sis-bench loss log ({type(e).__name__}); move it "
                             f"away or retrain the run") from None
        data = f"synthetic, {cfg.get('synth_n')} faces" if cfg.get("synthetic") else Path(str(cfg.get("data"))).name
        line = {"model": model, "run": tidy(runs[model]), "data": data, "space": str(cfg.get("space")),
                "batch": fmt(cfg.get("batch_size")), "lr": fmt(cfg.get("lr")), "EMA decay": fmt(cfg.get("ema_decay")),
                "mask drop p": fmt(cfg.get("p_uncond")), "precision": str(cfg.get("precision"))}
        if not log.empty:
            last = log.iloc[-1]
            line.update({"steps": fmt(int(last["step"])),
                         f"final loss (mean of last {min(FINAL_LOSS_POINTS, len(log))} logged)":
                             fmt(log["loss"].tail(FINAL_LOSS_POINTS).mean()),
                         "train time (s)": fmt(float(last["wall_s"])),
                         "steps / s": fmt(int(last["step"]) / float(last["wall_s"])) if last["wall_s"] > 0 else "-"})
            curves[model] = log[["step", "loss"]]
        lines.append(line)
    return pd.DataFrame(lines).fillna("-"), curves


def recipe_table(ctx: Context) -> pd.DataFrame:
    """Each model's recipe with its source, as `bench run` recorded it in its state file."""
    recipes = (ctx.state or {}).get("recipes", {})
    lines = []
    for model in [m for m in ctx.order if m in recipes] + [m for m in recipes if m not in ctx.order]:
        r = recipes[model]
        lines.append({"model": model, "steps": fmt(r.get("steps")), "batch": fmt(r.get("batch_size")),
                      "lr": fmt(r.get("lr")), "warm-up": fmt(r.get("warmup")), "EMA decay": fmt(r.get("ema_decay")),
                      "precision": str(r.get("precision")), "mask drop p": fmt(r.get("p_uncond")),
                      "grad clip": fmt(r.get("grad_clip")), "guidance": fmt(r.get("guidance")),
                      "source": str(r.get("source", ""))})
    return pd.DataFrame(lines)


def sweep_table(ctx: Context) -> pd.DataFrame:
    """The learning-rate sweep of this preset (results/lr_sweep.csv): held-out loss per model and rate."""
    path = ctx.results / "lr_sweep.csv"
    if not path.is_file():
        return pd.DataFrame()
    rows = ResultsFile(path, SweepRow).read()
    # "steps" is the length asked for; a diverged run stopped earlier (its train_steps)
    rows = rows[rows["preset"] == ctx.sel.preset].drop_duplicates(["model", "lr", "steps"], keep="last")
    if rows.empty:
        return pd.DataFrame()
    lines = []
    for (model, steps), g in rows.groupby(["model", "steps"], sort=False):
        best = g.loc[g["heldout_loss"].idxmin(), "lr"] if g["heldout_loss"].notna().any() else None
        line = {"model": model, "steps": fmt(int(steps))}
        for r in g.sort_values("lr").itertuples():
            line[f"lr {r.lr:g}"] = (f"diverged (step {int(r.train_steps)})" if pd.isna(r.heldout_loss)
                                    else f"{r.heldout_loss:.5f}" + (" (best)" if r.lr == best else ""))
        lines.append(line)
    return pd.DataFrame(lines).fillna("-")


def section(ctx: Context) -> list[str]:
    runs = training_runs(ctx.sel, ctx.samples, ctx.results)
    md = ["## Training", ""]
    recipes = recipe_table(ctx)
    if not recipes.empty:
        md += ["### Recipes", "", markdown(recipes), "",
               "Each backbone's recipe at this preset and where it comes from (`bench/presets.py`). The EMA decay "
               "is warmed up: update n uses min(decay, (1 + n) / (10 + n)), so the sampled weights keep no visible "
               "share of the random initialisation even in short runs.", ""]
    sweep = sweep_table(ctx)
    if not sweep.empty:
        md += ["### Learning-rate sweep", "", markdown(sweep), "",
               "Held-out flow-matching loss of each sweep run's EMA weights (`bench tune lr`: the test images at "
               "fixed times and noise, so runs differ only by their weights); the recipes above use the best rate.",
               ""]
    if runs:
        ttable, curves = training_table(runs, ctx.order)
        md += ["### Runs", "", markdown(ttable), ""]
        md.append(ctx.figures.add("loss.png", "training loss (flow-matching MSE) against step of each run, as logged "
                                  "in its loss.csv (thin: logged values, each a mean over its logging window; thick: "
                                  "moving average).", plots.loss_figure(curves, ctx.order)))
    else:
        md += ["No run folders found (the quality rows name them).", ""]
    return md
