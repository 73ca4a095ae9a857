"""Which rows a report is made of: one preset, one speed setting, the newest row per model and setting."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

import models
from bench.errors import BenchError
from bench.io import ResultsFile, contained, display_path, read_json
from bench.report.common import Selection
from bench.rows import MaskScoreRow, QualityRow, RoundRow, SpeedRow

SPEED_FILE = "speed.csv"
ROUNDS_FILE = "speed_rounds.csv"
QUALITY_FILE = "quality.csv"
MASKS_FILE = "quality_masks.csv"
STATE_FILE = "state.json"
SAMPLES_FILE = "samples.json"


def read_results(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(speed, quality, per-mask, per-round) rows of a results folder; empty frames for absent files, one line for
    foreign ones."""
    return (ResultsFile(results / SPEED_FILE, SpeedRow).read(), ResultsFile(results / QUALITY_FILE, QualityRow).read(),
            ResultsFile(results / MASKS_FILE, MaskScoreRow).read(), ResultsFile(results / ROUNDS_FILE, RoundRow).read())


DEVICE_KEY = ["device_name", "precision", "compile", "steps"]  # rows of one speed table


def device_groups(timed: pd.DataFrame) -> list[pd.DataFrame]:
    """Timed rows split by device (name with threads or GPU), precision, torch.compile and steps, the newest
    group first; within each, the newest row per model, resolution and batch size."""
    if timed.empty:
        return []
    keys = timed[DEVICE_KEY].astype(str).agg(" | ".join, axis=1)
    newest_first = list(dict.fromkeys(reversed(list(keys))))
    return [latest(timed[keys == k], ["model", "resolution", "batch_size"]) for k in newest_first]


def latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The last row (newest: rows are appended) of each group of ``keys``."""
    return df.drop_duplicates(subset=keys, keep="last") if not df.empty else df


def model_order(names) -> list[str]:
    """Backbones in registry order, each followed by its variants (in order of appearance); unknown names last."""
    names = list(dict.fromkeys(str(n) for n in names))
    registered = models.list_models()

    def key(name: str):
        base = name.partition(":")[0]
        return (registered.index(base) if base in registered else len(registered), name != base, names.index(name))

    return sorted(names, key=key)


def native_resolution(model: str, preset: str, resolutions) -> int:
    """The image size of ``model`` at ``preset`` (counted on the meta device), or the smallest one timed."""
    try:
        with torch.device("meta"):
            return int(models.create_model(model, preset).image_size)
    except (LookupError, ValueError, TypeError, ImportError):
        return int(min(resolutions))


def select(speed: pd.DataFrame, quality: pd.DataFrame, preset: Optional[str],
           masks: Optional[pd.DataFrame] = None, results: Path = Path("results"),
           rounds: Optional[pd.DataFrame] = None) -> Selection:
    """Pick the preset, then the rows of it the report shows (see the module docstring); ``results`` names the
    folder the rows were read from, in errors."""
    if preset is None:
        stamps = pd.concat([speed.loc[speed["mode"] == "timed", ["timestamp", "preset"]],
                            quality[["timestamp", "preset"]]]).dropna()
        if stamps.empty:
            stamps = speed[["timestamp", "preset"]].dropna()
        if stamps.empty:
            raise BenchError(f"no result rows to report in {results}: run `bench run`, or `bench speed` and "
                             f"`bench quality`, first (they write {results / 'speed.csv'} and "
                             f"{results / 'quality.csv'}), or give --results the folder they wrote")
        preset = str(stamps.sort_values("timestamp", kind="stable").iloc[-1]["preset"])
    notes = []
    timed = speed[(speed["mode"] == "timed") & (speed["preset"] == preset)]
    flagged = timed["busy"].map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)
    busy_rows = int(flagged.sum())
    groups = device_groups(timed[~flagged])
    for group in groups:
        first = group.iloc[-1]
        notes.append(f"speed: {len(group)} timed rows of preset `{preset}` on {first['device_name']}, "
                     f"{first['precision']}, torch.compile {'on' if str(first['compile']) == 'True' else 'off'}, "
                     f"{int(first['steps'])} steps (the newest row per model, resolution and batch size)")
    left = [f"{n} {what}" for n, what in ((len(timed) - busy_rows - sum(len(g) for g in groups),
                                           "older timed rows of this preset not used"),
                                          (busy_rows, "rows timed on a busy machine (column `busy`) left out of "
                                                      "every table and ratio")) if n]
    if left:
        notes.append(f"speed: {'; '.join(left)}")
    timed = groups[0] if groups else timed.iloc[:0]
    flops = latest(speed[speed["mode"] == "flops-only"], ["model", "preset", "resolution"])
    q = quality[quality["preset"] == preset]
    q = q.assign(train_seed=q["train_seed"].fillna(0))
    every_run = latest(q, ["model", "train_seed", "train_step", "run"])
    q, replaced = newest_runs(q)
    q_all = latest(q, ["model", "train_seed", "train_step"])
    final = q_all["train_step"] == q_all["train_steps"].fillna(
        q_all.groupby(["model", "train_seed"])["train_step"].transform("max"))
    kept_q = latest(q_all[final], ["model"])
    if not q.empty:
        notes.append(f"quality: the newest row per model, training seed and checkpoint of preset `{preset}` "
                     f"({len(q_all)} rows, {len(q_all[final])} of them at the end of training; "
                     f"{len(q) - len(q_all)} older rows not used)")
    if replaced:
        notes.append(f"quality: {replaced} rows of earlier run folders not used (a model and seed trained again in "
                     f"another folder: only the newest run of each counts)")
    if timed.empty and kept_q.empty:
        raise BenchError(f"no timed speed rows and no quality rows for preset {preset!r} in the results; "
                         f"run `bench run --preset {preset}` (or `bench speed`/`bench quality`) first")
    masks = masks if masks is not None else pd.DataFrame(columns=["eval_key"])
    masks = masks[masks["eval_key"].isin(every_run["eval_key"].dropna())] if not q_all.empty else masks.iloc[:0]
    rounds = rounds if rounds is not None else pd.DataFrame(columns=["sweep"])
    sweeps = set(pd.concat(groups)["sweep"].dropna()) if groups else set()
    return Selection(preset, timed, flops, kept_q, notes, q_all, masks, devices=groups,
                     rounds=rounds[rounds["sweep"].isin(sweeps)], busy_rows=busy_rows, quality_runs=every_run)



def parser_view(sel: Selection, parser: str) -> Selection:
    """``sel`` as the rows scored by one face parser (``parser``: its digest, "" for rows that record none) see it:
    the newest run of each model and seed among those rows, so that a comparison can pair runs of one parser."""
    rows = sel.quality_runs
    if rows.empty or "parser_sha256" not in rows:
        return sel
    rows, _ = newest_runs(rows[parser_digests(rows) == parser])
    final = rows["train_step"] == rows["train_steps"].fillna(
        rows.groupby(["model", "train_seed"])["train_step"].transform("max"))
    return dataclasses.replace(sel, quality_all=rows, quality=latest(rows[final], ["model"]))


def parser_digests(rows: pd.DataFrame) -> pd.Series:
    """Each row's face parser digest as text, "" where the row records none (rows older than the column)."""
    if "parser_sha256" not in rows:
        return pd.Series("", index=rows.index, dtype=object)
    return rows["parser_sha256"].map(lambda d: "" if pd.isna(d) else str(d))


def newest_runs(q: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows of the newest run folder of each model and training seed (the folder of its last row), and how many
    rows of older folders were left out: a run trained again elsewhere replaces the older one's checkpoints."""
    if q.empty or "run" not in q:
        return q, 0
    newest = q.groupby(["model", "train_seed"])["run"].transform("last")
    keep = (q["run"] == newest) | q["run"].isna()
    return q[keep], int((~keep).sum())


def resolve_path(text: str, results: Path) -> Path:
    """A run folder named in a results row. Rows name paths relative to the folder the command ran in: the working
    folder when the report is made from there, else the results folder's parent. The folder must lie inside the
    working folder or the results folder's parent (one-line error otherwise)."""
    what = f"a row of {display_path(results)}"
    cwd, parent = Path.cwd().resolve(), Path(results).resolve().parent
    for base in dict.fromkeys([cwd, parent]):
        try:
            found = contained(str(text), base, what)
        except BenchError:
            continue
        if found.exists():
            return found
    return contained(str(text), parent, what)


def sample_sets(results: Path, preset: str) -> list[dict]:
    """The newest group of sample folders (same masks, seed and sampler), one record per model."""
    records = []
    for path in sorted(results.rglob(SAMPLES_FILE)):
        rec = read_json(path, "sample record")
        if not isinstance(rec, dict) or rec.get("preset") != preset or not rec.get("files"):
            continue
        rec["folder"] = path.parent
        try:
            for f in rec["files"]:  # every picture named must lie in the record's own folder
                f["image"] = contained(f["image"], path.parent, display_path(path))
                f["mask"] = contained(f["mask"], path.parent, display_path(path))
                f.setdefault("mask_source", "")
        except (KeyError, TypeError):
            raise BenchError(f"{display_path(path)} is not a sis-bench sample record (its files lack image or mask); "
                             f"move it away or redo `bench sample`") from None
        if not isinstance(rec.get("model"), str) or not isinstance(rec.get("provenance", {}), dict):
            raise BenchError(f"{display_path(path)} is not a sis-bench sample record (no model named); move it away "
                             f"or redo `bench sample`")
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


def find_state(results: Path, preset: str) -> Optional[dict]:
    """The newest ``bench run`` state file of this preset under the results folder."""
    found = []
    for path in results.glob(f"run_{preset}*/{STATE_FILE}"):
        state = read_json(path, "bench run state file")
        if isinstance(state, dict) and state.get("preset") == preset:
            found.append((path.stat().st_mtime, state))
    return max(found, key=lambda x: x[0])[1] if found else None


