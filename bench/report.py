"""``bench report``: the side-by-side comparison as a Markdown report with PNG plots, built from results/ alone.

What it reads (everything under ``--results``, default ``results/``):

- ``speed.csv`` (``bench speed``): the timed rows of the report's preset -> speed table, latency and scaling
  plots; the ``--flops-only`` rows of any preset (e.g. ``paper``) -> the FLOPs scaling panel and parameter counts.
- ``quality.csv`` (``bench quality``) -> quality table and quality-vs-latency plot; its ``run`` column names the
  run folders whose ``config.json`` and ``loss.csv`` give the training table and loss curves.
- every ``samples.json`` below it (``bench sample``, ``bench run``'s sample stage) -> the sample grid, from the
  newest sets that share masks, seed and sampler (one per model).
- ``run_<preset>*/state.json`` (``bench run``) -> the budget of each stage and the time it took.

Which rows: those of one preset (default: the preset of the newest row). For speed, one device, precision,
``torch.compile`` setting and step count: those of the newest timed row. Where several rows share a model and
setting, the newest (the last in the file, since rows are only ever appended) is used. The report says what it
kept and how many rows it left out. Every number it prints is a value of those rows (or of the paper, labelled).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import typer

from bench import plots
from bench.cli import command
from bench.errors import BenchError

DEFAULT_RESULTS = Path("results")
DEFAULT_REPORTS = Path("reports")
SPEED_FILE = "speed.csv"
QUALITY_FILE = "quality.csv"
STATE_FILE = "state.json"
SAMPLES_FILE = "samples.json"
FINAL_LOSS_POINTS = 10  # the final loss is the mean of this many last logged points
GRID_MAX_ROWS = 8
MISSING = "missing"
SMOKE_TEST_NOTE = ("**`tiny` is a smoke test**: a few training steps, a handful of masks and few sampling steps, to "
                   "check that the whole pipeline runs. Its numbers say nothing about the backbones.")

QUALITY_COLUMNS = ["run", "model", "preset", "train_step", "image_size", "data", "split", "n_masks",
                   "samples_per_mask", "method", "guidance", "fid", "kid", "kid_std", "fid_status", "kid_status",
                   "pixel_diversity", "lpips_size", "lpips_diversity", "lpips_status", "miou", "miou_ceiling",
                   "parser", "eval_dir", "timestamp", "device", "device_name", "threads", "torch", "cuda",
                   "precision", "batch_size", "steps", "nfe", "seed", "commit", "host_os"]
PROVENANCE = ["device_name", "threads", "torch", "cuda", "precision", "commit", "host_os"]


# ---------------------------------------------------------------------------------------------- the paper

@dataclass(frozen=True)
class PaperFigure:
    """A figure the SISMA paper reports for one model (None: the paper's text gives none)."""

    model: str
    params_m: float
    seconds_per_image: float
    lpips_diversity: Optional[float]


PAPER_HARDWARE = "NVIDIA RTX 4090"
PAPER_STEPS = 200
PAPER_SETTING = "256 px CelebAMask-HQ; SISMA in SD-VAE latents, SDM in pixels"
PAPER_FIGURES = (PaperFigure("sisma", 799, 8.51, 0.61), PaperFigure("sdm", 653, 22.79, None))
PAPER_FID_NOTE = "not in the paper text available to this project (its Table 2 FID values are not in the excerpt)"


# ---------------------------------------------------------------------------------------------- formatting

def fmt(value, digits: int = 4) -> str:
    """A number as the report prints it: ``digits`` significant digits; '-' for an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def tidy(text) -> str:
    """Paths as a reader should see them: relative to the working folder, the home folder as ~."""
    text = str(text)
    cwd = str(Path.cwd().resolve())
    text = text.replace(cwd + os.sep, "").replace(cwd, ".")
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("/", "") else text


def markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


class Footnotes:
    """Numbered reasons for missing values, printed under their table."""

    def __init__(self):
        self.reasons: list[str] = []

    def missing(self, reason: str) -> str:
        reason = tidy(reason).removeprefix("missing: ").strip() or "no value and no reason recorded"
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"{MISSING} [{self.reasons.index(reason) + 1}]"

    def render(self) -> str:
        return "\n".join(f"[{i}] {r}  " for i, r in enumerate(self.reasons, 1))


# ---------------------------------------------------------------------------------------------- reading results

def read_rows(path: Path, columns: list[str]) -> pd.DataFrame:
    """A results CSV with at least ``columns`` (absent ones empty); an empty frame when the file does not exist."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=columns)
    try:
        df = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise BenchError(f"{path} is not a readable results CSV ({type(e).__name__}); move it away and "
                         f"re-run the command that writes it") from None
    return df.reindex(columns=list(dict.fromkeys([*columns, *df.columns])))


def latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The last row (newest: rows are appended) of each group of ``keys``."""
    return df.drop_duplicates(subset=keys, keep="last") if not df.empty else df


def model_order(names) -> list[str]:
    """Registered backbones in registry order first, then any other names in order of appearance."""
    names = list(dict.fromkeys(str(n) for n in names))
    try:
        import models

        known = [m for m in models.list_models() if m in names]
    except ImportError:
        known = []
    return known + [m for m in names if m not in known]


def native_resolution(model: str, preset: str, resolutions) -> int:
    """The image size of ``model`` at ``preset`` (counted on the meta device), or the smallest one timed."""
    import torch

    try:
        import models

        with torch.device("meta"):
            return int(models.create_model(model, preset).image_size)
    except (KeyError, ValueError, TypeError, ImportError):
        return int(min(resolutions))


@dataclass
class Selection:
    """The rows a report is made of, and what was left out."""

    preset: str
    timed: pd.DataFrame     # timed speed rows, one device/precision/compile/steps, latest per setting
    flops: pd.DataFrame     # flops-only rows, latest per model, preset and resolution
    quality: pd.DataFrame   # latest quality row per model
    notes: list[str]


def select(speed: pd.DataFrame, quality: pd.DataFrame, preset: Optional[str]) -> Selection:
    """Pick the preset, then the rows of it the report shows (see the module docstring)."""
    if preset is None:
        stamps = pd.concat([speed.loc[speed["mode"] == "timed", ["timestamp", "preset"]],
                            quality[["timestamp", "preset"]]]).dropna()
        if stamps.empty:
            stamps = speed[["timestamp", "preset"]].dropna()
        if stamps.empty:
            raise BenchError("no result rows to report: run `bench run`, or `bench speed` and `bench quality`, first "
                             "(they write results/speed.csv and results/quality.csv)")
        preset = str(stamps.sort_values("timestamp", kind="stable").iloc[-1]["preset"])
    notes = []
    timed = speed[(speed["mode"] == "timed") & (speed["preset"] == preset)]
    if not timed.empty:
        newest = timed.iloc[-1]
        same = ((timed["device_name"] == newest["device_name"]) & (timed["precision"] == newest["precision"])
                & (timed["compile"].astype(str) == str(newest["compile"])) & (timed["steps"] == newest["steps"]))
        kept = latest(timed[same], ["model", "resolution", "batch_size"])
        notes.append(f"speed: {len(kept)} timed rows of preset `{preset}` on {newest['device_name']}, "
                     f"{newest['precision']}, torch.compile {'on' if str(newest['compile']) == 'True' else 'off'}, "
                     f"{int(newest['steps'])} steps (the newest row per model, resolution and batch size; "
                     f"{len(timed) - len(kept)} older or other-setting rows of this preset not used)")
        timed = kept
    flops = latest(speed[speed["mode"] == "flops-only"], ["model", "preset", "resolution"])
    q = quality[quality["preset"] == preset]
    kept_q = latest(q, ["model"])
    if not q.empty:
        notes.append(f"quality: the newest row per model of preset `{preset}` ({len(kept_q)} rows; "
                     f"{len(q) - len(kept_q)} older rows not used)")
    if timed.empty and kept_q.empty:
        raise BenchError(f"no timed speed rows and no quality rows for preset {preset!r} in the results; "
                         f"run `bench run --preset {preset}` (or `bench speed`/`bench quality`) first")
    return Selection(preset, timed, flops, kept_q, notes)


# ---------------------------------------------------------------------------------------------- speed

@dataclass
class SpeedSummary:
    """Per model at its native resolution: what the speed table shows, also used by the plots."""

    table: pd.DataFrame       # the Markdown table
    latency: pd.DataFrame     # model, latency_s, projected, iqr_s, params
    steps: int
    device: str


def speed_summary(sel: Selection, order: list[str]) -> Optional[SpeedSummary]:
    timed = sel.timed
    if timed.empty:
        return None
    steps = int(timed["steps"].iloc[-1])
    lines, latency = [], []
    for model in order:
        rows = timed[timed["model"] == model]
        if rows.empty:
            continue
        native = native_resolution(model, sel.preset, rows["resolution"])
        here = rows[rows["resolution"] == native]
        if here.empty:
            native = int(rows["resolution"].min())
            here = rows[rows["resolution"] == native]
        one = here.loc[here["batch_size"].idxmin()]
        big = here.loc[here["batch_size"].idxmax()]
        line = {"model": model, "px": fmt(int(native)), "params (M)": fmt(one["params"] / 1e6),
                "GFLOPs / NFE": fmt(one["flops_per_nfe"] / 1e9)}
        if one["status"] != "ok":
            line[f"s / image ({steps} steps)"] = f"{one['status']} at batch {int(one['batch_size'])}"
            lines.append(line)
            continue
        measured = pd.notna(one["image_latency_s"])
        seconds = one["image_latency_s"] if measured else one["image_latency_projected_s"]
        line[f"s / image ({steps} steps)"] = fmt(seconds)
        line["how"] = (f"measured (median of {int(one['image_repeats'])})" if measured
                       else "projected (NFE x steps + decode)")
        line["ms / NFE"] = fmt(one["latency_nfe_median_s"] * 1e3)
        line["IQR (ms)"] = fmt(one["latency_nfe_iqr_s"] * 1e3)
        if pd.notna(one["peak_cuda_allocated_mib"]):
            line["peak memory (MiB)"] = f"{fmt(one['peak_cuda_allocated_mib'])} (CUDA allocated)"
        elif pd.notna(one["peak_rss_delta_mib"]):
            line["peak memory (MiB)"] = f"{fmt(one['peak_rss_delta_mib'])} (RSS increase)"
        else:
            line["peak memory (MiB)"] = "-"
        if big["status"] != "ok":
            line["images / s"] = f"{big['status']} at batch {int(big['batch_size'])}"
        elif pd.notna(big["images_per_s"]):
            line["images / s"] = f"{fmt(big['images_per_s'])} (batch {int(big['batch_size'])})"
        else:
            line["images / s"] = f"{fmt(big['images_per_s_projected'])} (batch {int(big['batch_size'])}, projected)"
        line["scan"] = str(one["scan_backend"])
        line["attention"] = str(one["attention_kernel"])
        lines.append(line)
        iqr = one["latency_nfe_iqr_s"] * steps if not measured else float("nan")
        latency.append({"model": model, "latency_s": float(seconds), "projected": not measured, "iqr_s": iqr,
                        "params": one["params"]})
    table = pd.DataFrame(lines).fillna("-")
    return SpeedSummary(table, pd.DataFrame(latency, columns=["model", "latency_s", "projected", "iqr_s", "params"]),
                        steps, str(timed["device_name"].iloc[-1]))


def scaling_panels(sel: Selection, order: list[str]) -> tuple[list[dict], pd.DataFrame]:
    """Panels for the scaling figure (GFLOPs and ms per NFE against resolution) and the table of their fitted
    exponents k (cost ~ tokens^k; a unit change does not change k)."""
    from bench.flops import equivalent_tokens, fit_power_law

    def panel(short, title, ylabel, rows, column, unit):
        data = rows[["model", "resolution"]].assign(value=rows[column].astype(float) / unit)
        fits = {model: fit_power_law([equivalent_tokens(r) for r in d["resolution"]], d["value"])
                for model, d in data.groupby("model")}
        return {"short": short, "title": title, "ylabel": ylabel, "data": data, "fits": fits}

    panels = []
    ok = sel.timed[sel.timed["status"] == "ok"] if not sel.timed.empty else sel.timed
    if not ok.empty:
        counted = latest(pd.concat([ok, sel.flops[sel.flops["preset"] == sel.preset]]), ["model", "resolution"])
        panels.append(panel(f"FLOPs, {sel.preset}", f"FLOPs per NFE, `{sel.preset}` preset",
                            "GFLOPs per network evaluation (1 image)", counted, "flops_per_nfe", 1e9))
        b1 = ok[ok["batch_size"] == ok.groupby("model")["batch_size"].transform("min")]
        panels.append(panel(f"latency, {sel.preset}", f"latency per NFE (batch 1), `{sel.preset}` preset",
                            "ms per network evaluation", b1, "latency_nfe_median_s", 1e-3))
    paper = sel.flops[sel.flops["preset"] == "paper"]
    if not paper.empty and sel.preset != "paper" or not paper.empty and not panels:
        panels.append(panel("FLOPs, paper", "FLOPs per NFE, `paper` preset (counted, not run)",
                            "GFLOPs per network evaluation (1 image)", paper, "flops_per_nfe", 1e9))
    lines = []
    for model in order:
        line = {"model": model}
        for p in panels:
            d = p["data"][p["data"]["model"] == model]
            if d.empty:
                continue
            fit = p["fits"].get(model)
            span = f"{int(d['resolution'].min())}-{int(d['resolution'].max())} px"
            line[f"k: {p['short']}"] = f"{fit[0]:.2f} ({span})" if fit else f"- (one size: {span})"
        if len(line) > 1:
            lines.append(line)
    return panels, pd.DataFrame(lines).fillna("-")


# ---------------------------------------------------------------------------------------------- quality

def quality_table(sel: Selection, order: list[str], notes: Footnotes) -> pd.DataFrame:
    lines = []
    for model in order:
        rows = sel.quality[sel.quality["model"] == model]
        if rows.empty:
            continue
        r = rows.iloc[-1]

        def metric(column, status_column=None, digits=4, fallback="no value in the row"):
            value = r[column]
            if pd.notna(value):
                return fmt(float(value), digits)
            reason = r[status_column] if status_column and pd.notna(r.get(status_column)) else fallback
            return notes.missing(str(reason))

        sampling = f"{r['method']} {fmt(r['steps'])} steps (NFE {fmt(r['nfe'])})"
        if pd.notna(r["guidance"]) and float(r["guidance"]) != 1.0:
            sampling += f", guidance {fmt(float(r['guidance']))}"
        lines.append({
            "model": model, "train steps": fmt(r["train_step"]), "px": fmt(r["image_size"]),
            "masks x samples": f"{fmt(r['n_masks'])} x {fmt(r['samples_per_mask'])}", "sampling": sampling,
            "FID": metric("fid", "fid_status"), "KID": metric("kid", "kid_status"),
            "LPIPS diversity": metric("lpips_diversity", "lpips_status"),
            "mask mIoU": metric("miou"), "parser ceiling (real)": metric("miou_ceiling"),
            "pixel diversity": metric("pixel_diversity", fallback="pixel diversity needs 2 or more samples per mask"),
        })
    return pd.DataFrame(lines)


# ---------------------------------------------------------------------------------------------- paper vs ours

def paper_table(sel: Selection, speed: Optional[SpeedSummary], order: list[str]) -> pd.DataFrame:
    """The paper's figures, this harness's parameter counts at the paper preset, and this run's figures."""
    lines = []
    for p in PAPER_FIGURES:
        lines.append({"source": "paper", "hardware": PAPER_HARDWARE, "setting": PAPER_SETTING,
                      "model": p.model, "params (M)": fmt(p.params_m),
                      f"s / image ({PAPER_STEPS} steps)": fmt(p.seconds_per_image),
                      "LPIPS diversity": fmt(p.lpips_diversity) if p.lpips_diversity is not None else "not reported",
                      "FID": "not in excerpt"})
    counted = sel.flops[sel.flops["preset"] == "paper"]
    for model in order:
        rows = counted[counted["model"] == model]
        if rows.empty:
            continue
        r = rows.loc[rows["resolution"].idxmin()]
        lines.append({"source": "this harness, counted", "hardware": "none (meta device)",
                      "setting": f"`paper` preset, {int(r['resolution'])} px", "model": model,
                      "params (M)": fmt(r["params"] / 1e6), f"s / image ({PAPER_STEPS} steps)": "-",
                      "LPIPS diversity": "-", "FID": "-"})
    for model in order:
        lat = speed.latency[speed.latency["model"] == model] if speed is not None else pd.DataFrame()
        q = sel.quality[sel.quality["model"] == model]
        if lat.empty and q.empty:
            continue
        line = {"source": "this report", "hardware": speed.device if speed is not None else "-",
                "setting": f"`{sel.preset}` preset", "model": model, "params (M)": "-",
                f"s / image ({PAPER_STEPS} steps)": "-", "LPIPS diversity": "-", "FID": "-"}
        if not lat.empty:
            l0 = lat.iloc[0]
            line["params (M)"] = fmt(l0["params"] / 1e6)
            if speed.steps == PAPER_STEPS:
                how = " (projected)" if l0["projected"] else ""
                line[f"s / image ({PAPER_STEPS} steps)"] = fmt(l0["latency_s"]) + how
        if not q.empty:
            r = q.iloc[-1]
            line["LPIPS diversity"] = fmt(r["lpips_diversity"]) if pd.notna(r["lpips_diversity"]) else MISSING
            line["FID"] = fmt(r["fid"]) if pd.notna(r["fid"]) else MISSING
        lines.append(line)
    return pd.DataFrame(lines)


def speed_ratio_sentence(speed: Optional[SpeedSummary]) -> str:
    paper = {p.model: p.seconds_per_image for p in PAPER_FIGURES}
    text = (f"The paper's SDM / SISMA time ratio is {paper['sdm'] / paper['sisma']:.2f} "
            f"({paper['sdm']} s / {paper['sisma']} s per image, {PAPER_STEPS} steps, {PAPER_HARDWARE}, paper scale).")
    if speed is not None:
        lat = speed.latency.set_index("model")["latency_s"]
        projected = speed.latency.set_index("model")["projected"]
        if {"sdm", "sisma"} <= set(lat.index):
            how = ", projected" if projected["sdm"] or projected["sisma"] else ""
            text += (f" Here it is {lat['sdm'] / lat['sisma']:.2f} ({fmt(lat['sdm'])} s / {fmt(lat['sisma'])} s, "
                     f"{speed.steps} steps, {speed.device}{how}).")
    return text


def at_a_glance(sel: Selection, speed: Optional[SpeedSummary], order: list[str]) -> list[str]:
    """A few lines with the headline numbers of the tables below."""
    lines = []
    if speed is not None and not speed.latency.empty:
        parts = [f"{plots.display_name(r.model)} {fmt(r.latency_s)} s{' (projected)' if r.projected else ''}"
                 for r in speed.latency.itertuples()]
        lines.append(f"- Seconds per image at {speed.steps} steps, batch 1, {speed.device}: {', '.join(parts)}.")
        lines.append(f"- {speed_ratio_sentence(speed)}")
    q = sel.quality.set_index("model") if not sel.quality.empty else None
    if q is not None:
        parts = [f"{plots.display_name(m)} {fmt(q.loc[m, 'miou'])}" for m in order if m in q.index]
        ceiling = ", ".join(dict.fromkeys(fmt(v) for v in q["miou_ceiling"]))
        lines.append(f"- Mask mIoU of generated images: {', '.join(parts)} (the parser on real test images: "
                     f"{ceiling}).")
    return ["## At a glance", "", *lines, ""] if lines else []


# ---------------------------------------------------------------------------------------------- environment

def environment_table(sel: Selection) -> pd.DataFrame:
    sources = [("speed (timed)", sel.timed), ("speed (FLOPs only)", sel.flops), ("quality", sel.quality)]
    lines = []
    for label, df in sources:
        if df.empty:
            continue
        line = {"rows": f"{label}: {len(df)}"}
        for col in PROVENANCE:
            values = [str(v) for v in dict.fromkeys(df[col].dropna().tolist())]
            line[col.replace("_", " ")] = ", ".join(values) or "-"
        lines.append(line)
    return pd.DataFrame(lines)


# ---------------------------------------------------------------------------------------------- training runs

def resolve_path(text: str, results: Path) -> Path:
    """A path written in a row: as is, or relative to the results folder's parent."""
    p = Path(str(text))
    if p.exists() or p.is_absolute():
        return p
    return results.parent / p


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
        cfg = json.loads((runs[model] / "config.json").read_text())
        log_path = runs[model] / "loss.csv"
        log = pd.read_csv(log_path) if log_path.is_file() and log_path.stat().st_size else pd.DataFrame()
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


# ---------------------------------------------------------------------------------------------- samples

def sample_sets(results: Path, preset: str) -> list[dict]:
    """The newest group of sample folders (same masks, seed and sampler), one record per model."""
    records = []
    for path in sorted(results.rglob(SAMPLES_FILE)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("preset") != preset or not rec.get("files"):
            continue
        rec["folder"] = path.parent
        rec["key"] = json.dumps([[f["mask_source"] for f in rec["files"]], rec.get("seed"), rec.get("steps"),
                                 rec.get("method"), rec.get("guidance"), rec.get("data")])
        rec["stamp"] = rec.get("provenance", {}).get("timestamp", "")
        records.append(rec)
    if not records:
        return []
    groups: dict[str, dict[str, dict]] = {}
    for rec in sorted(records, key=lambda r: r["stamp"]):
        groups.setdefault(rec["key"], {})[rec["model"]] = rec  # the newest set per model wins
    best = max(groups.values(), key=lambda g: (len(g), max(r["stamp"] for r in g.values())))
    return list(best.values())


def grid_pictures(sets: list[dict], order: list[str]):
    """(mask pictures, {model: sample pictures}, row labels) of the sample grid."""
    from PIL import Image

    from bench.data import colorize, read_label_png

    sets = sorted(sets, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    n = min(GRID_MAX_ROWS, min(len(r["files"]) for r in sets))
    first = sets[0]
    masks = [colorize(read_label_png(first["folder"] / f["mask"])) for f in first["files"][:n]]
    columns = {}
    for rec in sets:
        pics = []
        for f in rec["files"][:n]:
            with Image.open(rec["folder"] / f["image"]) as im:
                pics.append(np.asarray(im.convert("RGB")))
        columns[rec["model"]] = pics
    labels = [f["mask_source"] for f in first["files"][:n]]
    return masks, columns, labels


# ---------------------------------------------------------------------------------------------- pipeline state

def find_state(results: Path, preset: str) -> Optional[dict]:
    """The newest ``bench run`` state file of this preset under the results folder."""
    found = []
    for path in results.glob(f"run_{preset}*/{STATE_FILE}"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("preset") == preset:
            found.append((path.stat().st_mtime, state))
    return max(found, key=lambda x: x[0])[1] if found else None


def status(stage: str, record: dict) -> str:
    """A stage's status as the report tells it; the report stage is running while it writes this report."""
    if stage == "report" and record.get("status") == "running":
        return "writing this report"
    return str(record.get("status", "-"))


def budget_tables(state: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    budget = state.get("budget", {})
    explained = state.get("budget_help", {})
    def shown(v) -> str:
        if v is None:
            return "trainer's preset default"
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    b = pd.DataFrame([{"setting": k, "value": shown(v), "what it is": explained.get(k, "")}
                      for k, v in budget.items() if k != "note"])
    stages = pd.DataFrame([{"stage": name, "status": status(name, s), "seconds": fmt(s.get("seconds")),
                            "finished": s.get("finished", "-")} for name, s in state.get("stages", {}).items()])
    return b, stages


# ---------------------------------------------------------------------------------------------- the report

def build_report(results: Path = DEFAULT_RESULTS, reports: Path = DEFAULT_REPORTS, name: Optional[str] = None,
                 preset: Optional[str] = None) -> Path:
    """Write ``reports/<name>.md`` and its plots in ``reports/<name>/``; returns the Markdown file's path."""
    from bench.speed import COLUMNS as SPEED_COLUMNS

    results, reports = Path(results), Path(reports)
    speed = read_rows(results / SPEED_FILE, SPEED_COLUMNS)
    quality = read_rows(results / QUALITY_FILE, QUALITY_COLUMNS)
    sel = select(speed, quality, preset)
    name = name or sel.preset
    plot_dir = reports / name
    order = model_order([*sel.timed["model"], *sel.quality["model"]])
    figures: list[tuple[str, str, object]] = []  # (file name, caption, figure)

    def figure(file: str, caption: str, fig) -> str:
        if fig is None:
            return ""
        figures.append((file, caption, fig))
        return f"![{Path(file).stem}]({name}/{file})\n\n*Figure: {caption}*\n"

    state = find_state(results, sel.preset)
    samples = sample_sets(results, sel.preset)
    md = [f"# sis-bench report: `{sel.preset}` preset", ""]
    md.append(f"Made by `bench report` from the rows in `{tidy(results)}/`: every number below is read from "
              "those rows (and the run folders they name), except the paper's, which are labelled as such. Rows used:")
    md += [""] + [f"- {note}" for note in sel.notes] + [""]
    if sel.preset == "tiny":
        md += [f"> {SMOKE_TEST_NOTE}", ""]
    if state and state.get("budget", {}).get("note"):
        md += [f"> Preset `{sel.preset}` of `bench run`: {state['budget']['note']}", ""]

    summary = speed_summary(sel, order)
    panels, exponents = scaling_panels(sel, order)
    md += at_a_glance(sel, summary, order)

    # --- speed
    md += ["## Speed", ""]
    if summary is None:
        md += ["No timed speed rows for this preset (run `bench speed --preset "
               f"{sel.preset}`).", ""]
    else:
        md += [markdown(summary.table), ""]
        md.append(f"One image at batch 1 and {summary.steps} Euler steps (1 NFE per step) plus decoding, "
                  f"median over repeats after warm-up; 'projected' is the per-NFE median times the steps plus the "
                  "decoder's time, given where a whole image was not timed. ms / NFE and its IQR: one network "
                  "evaluation at batch 1. Peak memory: CUDA bytes allocated during one evaluation, or on CPU the rise "
                  "of the resident set during one (a lower bound). images / s: at the largest batch timed. "
                  "scan / attention: the kernels that ran.")
        md.append("")
        md.append(figure(
            "latency.png",
            f"seconds per image at {summary.steps} steps, batch 1. Left: this report's rows ({sel.preset} preset, "
            f"{summary.device}); hatched bars are projected, solid ones measured, error bars the per-NFE IQR times "
            f"the steps. Right: the paper's Table 2 ({PAPER_HARDWARE}, paper scale). Different scales and hardware: "
            "compare ratios, not seconds.",
            plots.latency_figure(summary.latency,
                                 pd.DataFrame([{"model": p.model, "latency_s": p.seconds_per_image}
                                               for p in PAPER_FIGURES]),
                                 summary.steps, f"this report: `{sel.preset}` preset, {summary.device}",
                                 f"paper: {PAPER_HARDWARE}, paper scale")))
    if panels:
        md += ["### Cost against resolution", ""]
        if not exponents.empty:
            md += [markdown(exponents), "",
                   "k is the fitted exponent of cost against the number of pixels (equivalently of 16 x 16-px "
                   "tokens): 1 is linear, 2 quadratic. Least squares on log-log axes.", ""]
        titles = "; ".join(p["title"].replace("`", "") for p in panels)
        where = f" Latency measured on {summary.device}." if summary is not None else ""
        md.append(figure("scaling.png", f"cost against image resolution on log-log axes, with fitted power laws "
                                        f"(dashed) and exponents k in the legends. Panels: {titles}.{where}",
                         plots.scaling_figure(panels, order)))

    # --- quality
    md += ["## Quality", ""]
    notes = Footnotes()
    qtable = quality_table(sel, order, notes)
    if qtable.empty:
        md += [f"No quality rows for this preset (run `bench quality`).", ""]
    else:
        md += [markdown(qtable), ""]
        if notes.reasons:
            md += ["Missing values, and why:", "", notes.render(), ""]
        md.append("FID and KID: torch-fidelity's Inception, the real test images of the masks against one sample per "
                  "mask, at the run's resolution. LPIPS diversity (AlexNet) and pixel diversity (mean absolute "
                  "difference of images in [0, 1], no weights; not a substitute for LPIPS): the mean over the pairs of "
                  "a mask's samples, averaged over masks. Mask mIoU: the face parser on the generated images against "
                  "their input masks; the parser ceiling is the same parser on the real test images.")
        md.append("")
        if summary is not None:
            points = summary.latency.merge(sel.quality[["model", "miou", "fid", "lpips_diversity", "pixel_diversity"]],
                                           on="model", how="inner")
            metric_cols = [("miou", "mask mIoU (higher: follows the mask better)"),
                           ("fid", "FID (lower is better)"), ("lpips_diversity", "LPIPS diversity"),
                           ("pixel_diversity", "pixel diversity (no weights)")]
            shown = [lab for col, lab in metric_cols if col in points and points[col].notna().any()]
            md.append(figure(
                "quality_latency.png",
                f"quality against seconds per image ({summary.steps} steps, batch 1, {summary.device}; hollow markers "
                f"are projected latencies). Panels: {'; '.join(shown) or 'none'}; metrics without values are left out.",
                plots.quality_latency_figure(points, metric_cols, order, f"seconds per image ({summary.steps} steps)")))

    # --- paper
    md += ["## The paper's figures beside this report's", ""]
    md += [markdown(paper_table(sel, summary, order)), ""]
    md += [speed_ratio_sentence(summary),
           f"FID: {PAPER_FID_NOTE}. The paper reports LPIPS diversity only for SISMA.", ""]

    # --- training
    runs = training_runs(sel, samples, results)
    md += ["## Training", ""]
    if runs:
        ttable, curves = training_table(runs, order)
        md += [markdown(ttable), ""]
        md.append(figure("loss.png", "training loss (flow-matching MSE) against step of each run, as logged in its "
                                     "loss.csv (thin: logged values, each a mean over its logging window; thick: "
                                     "moving average).", plots.loss_figure(curves, order)))
    else:
        md += ["No run folders found (the quality rows name them).", ""]

    # --- samples
    md += ["## Samples", ""]
    if samples:
        masks, columns, labels = grid_pictures(samples, order)
        s0 = samples[0]
        md.append(figure(
            "samples.png",
            f"mask | {' | '.join(plots.display_name(m) for m in columns)}: one sample per model for the same "
            f"{len(masks)} test masks and the same seeds (noise of sample i from seed {s0.get('seed')}, i), "
            f"{s0.get('method')} {s0.get('steps')} steps, EMA weights; rows labelled by test face.",
            plots.sample_grid_figure(masks, columns, labels)))
    else:
        md += ["No sample folders (`samples.json`) of this preset under the results folder.", ""]

    # --- setup
    md += ["## Setup", ""]
    env = environment_table(sel)
    if not env.empty:
        md += ["Environment, from the provenance columns of the rows used:", "", markdown(env), ""]
    if state:
        budget, stages = budget_tables(state)
        md += [f"Budget of `bench run --preset {sel.preset}` (one table in `bench/pipeline.py`):", "",
               markdown(budget), "", "Stages and the time each took (wall clock):", "", markdown(stages), ""]

    text = "\n".join(md).rstrip() + "\n"
    reports.mkdir(parents=True, exist_ok=True)
    for file, _, fig in figures:
        plots.save_png(fig, plot_dir / file)
    out = reports / f"{name}.md"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


@command("report")
def report_cmd(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Folder holding speed.csv, quality.csv, run "
                                 "folders and samples (what `bench run`, `bench speed` and `bench quality` write)."),
    reports: Path = typer.Option(DEFAULT_REPORTS, "--reports", help="Folder the report goes to: NAME.md and its "
                                 "plots in NAME/."),
    name: Optional[str] = typer.Option(None, "--name", help="Report name (default: the preset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset to report on (default: the one of the "
                                         "newest row)."),
):
    """Write a Markdown report with plots (speed, quality, the paper's figures, training, samples) from results/."""
    out = build_report(results, reports, name, preset)
    pngs = sorted(p.name for p in (out.parent / out.stem).glob("*.png"))
    typer.echo(f"wrote {out} with {len(pngs)} plots in {out.parent / out.stem}/ ({', '.join(pngs)})")
