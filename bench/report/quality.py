"""The report's quality section: every figure with its 95% interval, paired differences, the ablations, and quality
against training.

Intervals come from a two-way bootstrap over training seeds and test masks (bench.stats); FID and KID, which have
no per-mask parts, get an interval over seeds only. A difference is paired (same seeds, masks and noise) and called
a difference only when its interval excludes 0.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pandas as pd

from bench import plots
from bench.errors import BenchError
from bench.report import settle
from bench.report.common import Context, Footnotes, fmt, markdown
from bench.report.estimates import (
    Scores,
    estimate_all,
    fmt_estimate,
    paired,
    parser_of,
    restrict,
    scores,
    steps_of,
    verdict,
)
from bench.report.select import parser_view, resolve_path
from bench.variants import build_model

FID_RELIABLE_IMAGES = 2048  # Inception's feature size: fewer images per side make FID's covariance rank-deficient
REFERENCE = "sisma"  # the backbone every other is compared with
TRAIN_FLOPS_PER_NFE = 3  # a training step's forward and backward cost about 3 forward passes


def final_scores(ctx: Context) -> dict[str, Scores]:
    """Per model, its runs at the end of training with every figure's interval."""
    out = {}
    for model in ctx.order:
        s = scores(ctx.sel, model)
        if s is not None:
            out[model] = estimate_all(s)
    return out


def main_parser(final: dict[str, Scores]) -> Optional[str]:
    """The face parser the report's comparisons are made with: the one that scored the reference's final runs (or,
    without them, the first model's)."""
    if not final:
        return None
    return parser_of(final[REFERENCE] if REFERENCE in final else next(iter(final.values())))


def reference_scores(ctx: Context, final: dict[str, Scores], reference: str, parser: str) -> Optional[Scores]:
    """``reference``'s runs at the end of training as ``parser`` scored them: its final runs when that parser scored
    them, else its newest runs that parser scored (older run folders); None when it scored none."""
    if reference not in final:
        return None
    if parser_of(final[reference]) == parser:
        return final[reference]
    if (reference, parser) not in ctx.matched:
        s = scores(parser_view(ctx.sel, parser), reference)
        ctx.matched[reference, parser] = estimate_all(s) if s is not None else None
    return ctx.matched[reference, parser]


def versus(ctx: Context, final: dict[str, Scores], model: str, reference: str) -> dict:
    """``model`` minus ``reference``, paired, with the reference's runs scored by ``model``'s parser."""
    ref = reference_scores(ctx, final, reference, parser_of(final[model]))
    return paired(final[model], ref) if ref is not None else {}


def parser_labels(final: dict[str, Scores]) -> dict[str, str]:
    """A short name per face parser ("A", "B", ... in order of first use), when the models' runs had several."""
    found = list(dict.fromkeys(parser_of(s) for s in final.values()))
    return {p: chr(ord("A") + i) for i, p in enumerate(found)} if len(found) > 1 else {}


def quality_table(ctx: Context, final: dict[str, Scores], notes: Footnotes) -> pd.DataFrame:
    lines, labels = [], parser_labels(final)
    for model, s in final.items():
        r = s.rows.iloc[-1]

        def figure(metric: str, status: Optional[str] = None, fallback: str = "no value in the row", *,
                   s: Scores = s, r: pd.Series = r) -> str:
            e = s.figures.get(metric)
            if e is not None:
                return fmt_estimate(e)
            reason = r[status] if status and pd.notna(r.get(status)) else fallback
            return notes.missing(str(reason))

        fid = figure("fid", "fid_status")
        images = r.get("fid_images")
        if "fid" in s.figures and pd.notna(images) and images < FID_RELIABLE_IMAGES:
            fid += f" (unreliable: n = {int(images)} < {FID_RELIABLE_IMAGES})"
        sampling = f"{r['method']} {fmt(r['steps'])} steps (NFE {fmt(r['nfe'])})"
        if pd.notna(r["guidance"]) and float(r["guidance"]) != 1.0:
            sampling += f", guidance {fmt(float(r['guidance']))}"
        lines.append({
            "model": model, "train steps": fmt(s.step), "seeds": ",".join(map(str, s.seeds)),
            "masks x samples": f"{fmt(r['n_masks'])} x {fmt(r['samples_per_mask'])}", "sampling": sampling,
            "mask mIoU": figure("miou"), "parser ceiling (real)": figure("miou_ceiling"),
            "pixel diversity": figure("pixel_diversity"),
            "LPIPS diversity": figure("lpips_diversity", "lpips_status"),
            "FID": fid, "KID": figure("kid", "kid_status"),
            **({"parser": labels[parser_of(s)]} if labels else {}),
        })
    return pd.DataFrame(lines)


def differences_table(ctx: Context, final: dict[str, Scores], reference: str) -> pd.DataFrame:
    """Each model minus the reference: paired differences with their intervals, against the reference's runs scored
    by the model's parser."""
    lines = []
    for model in final:
        if model == reference:
            continue
        d = versus(ctx, final, model, reference)
        if not d:
            continue
        lines.append({"model": model, f"mIoU - {reference}": verdict(d["miou"]),
                      f"pixel diversity - {reference}": verdict(d["pixel_diversity"]),
                      f"LPIPS diversity - {reference}": verdict(d.get("lpips_diversity"))})
    return pd.DataFrame(lines)


def model_config(model: str, preset: str, ctx: Optional[Context] = None) -> Optional[object]:
    """A variant's config as its run recorded it (config.json's model_config), else as built here on the meta
    device; None if neither is possible."""
    rows = ctx.sel.quality[ctx.sel.quality["model"] == model] if ctx is not None else pd.DataFrame()
    if not rows.empty and pd.notna(rows.iloc[-1].get("run")):
        try:
            recorded = json.loads((resolve_path(rows.iloc[-1]["run"], ctx.results) / "config.json").read_text())
            if recorded.get("model_config"):
                return SimpleNamespace(**recorded["model_config"])
        except (OSError, ValueError, BenchError):
            pass
    try:
        return build_model(model, preset, None, "meta").config
    except (BenchError, LookupError, ValueError):
        return None


def ablation_table(ctx: Context, final: dict[str, Scores], base: str, fields: tuple[str, ...]
                   ) -> tuple[pd.DataFrame, dict[str, Scores], list[str]]:
    """The variants of one backbone: their config fields, parameters, mIoU and difference from the default; the
    scores the table shows (the default's replaced by its runs of the variants' parser where its newest runs had
    another), and a note when they were."""
    variants = [m for m in final if m == base or m.startswith(base + ":")]
    if len(variants) < 2:
        return pd.DataFrame(), final, []
    reference = base if base in variants else variants[0]
    final, note = dict(final), []
    others = {parser_of(final[m]) for m in variants if m != reference}
    if len(others) == 1 and (parser := others.pop()) != parser_of(final[reference]):
        matched = reference_scores(ctx, final, reference, parser)
        if matched is not None:
            final[reference] = matched
            note = [f"`{reference}`'s row in this table is its runs scored by the same face parser as the other "
                    f"settings (step {matched.step}, seeds {','.join(map(str, matched.seeds))}: older run folders "
                    f"than the Quality table's, which were scored by another parser), so that every difference "
                    f"here is between runs of one parser.", ""]
    lines = []
    for model in variants:
        cfg = model_config(model, ctx.sel.preset, ctx)
        line = {"model": model}
        for f in fields:
            line[f] = str(getattr(cfg, f, "-"))
        if {"scan", "conv"} <= set(fields) and cfg is not None:
            line["causal"] = "yes" if (cfg.scan, cfg.conv) == ("raster", "causal1d") else "no"
            line["a token sees"] = token_reach(cfg)
        timed = ctx.sel.timed[(ctx.sel.timed["model"] == model)] if not ctx.sel.timed.empty else ctx.sel.timed
        if not timed.empty:
            one = timed.loc[timed["batch_size"].idxmin()]
            line["params (M)"] = fmt(one["params"] / 1e6)
            line["ms / NFE"] = fmt(one["latency_nfe_median_s"] * 1e3, 3)
        line["mask mIoU"] = fmt_estimate(final[model].figures.get("miou"))
        line[f"mIoU - {reference}"] = "(reference)" if model == reference else \
            verdict(versus(ctx, final, model, reference).get("miou"))
        lines.append(line)
    return pd.DataFrame(lines), final, note


WHOLE_IMAGE = "the whole image"
GRID_CONVS_PER_BLOCK = 2  # Self- and Cross-Mamba each run a 3 x 3 conv: one token row further down each


def token_reach(cfg) -> str:
    """What one output token of SISMA depends on, from its scan order, conv and depth."""
    if cfg.scan != "raster":  # scans from several corners or directions: every token sees every other
        return WHOLE_IMAGE
    if cfg.conv == "causal1d":
        return "the tokens before it (raster order)"
    rows, reach = cfg.input_size // cfg.patch_size, GRID_CONVS_PER_BLOCK * cfg.depth
    if reach >= rows - 1:
        return WHOLE_IMAGE
    return f"the tokens before it and at most {reach} token rows below (of {rows})"


def mixing_verdict(final: dict[str, Scores], ablation: pd.DataFrame) -> str:
    """Which setting scored best: whether the default (the first row) leads the settings that see the whole image,
    and any non-causal setting of shorter reach that beats it (paired differences: a difference only when the
    interval excludes 0)."""
    base = ablation["model"].iloc[0]
    means = {m: final[m].figures["miou"].value for m in ablation["model"]  # one parser's settings only
             if "miou" in final[m].figures and parser_of(final[m]) == parser_of(final[base])}
    if base not in means or len(means) < 2 or "a token sees" not in ablation:
        return "Too few scored settings to say which mixes best."
    reach = dict(zip(ablation["model"], ablation["a token sees"]))
    causal = dict(zip(ablation["model"], ablation["causal"]))
    whole = [m for m in means if reach[m] == WHOLE_IMAGE]
    lines = []
    if base in whole:
        best = max(whole, key=means.get)
        if best == base:
            lines.append(f"The default (`{base}`) has the highest mean mask mIoU of the settings that see the whole "
                         f"image.")
        else:
            d = paired(final[best], final[base]).get("miou")
            lines.append(f"Of the settings that see the whole image, `{best}` has the highest mean mask mIoU: "
                         f"{verdict(d)} against the default `{base}`.")
    for m in means:
        if m != base and m not in whole and causal[m] == "no" and means[m] > means[base]:
            d = paired(final[m], final[base]).get("miou")
            if d is not None and d.excludes_zero:
                lines.append(f"`{m}`, which sees less of the image, scores higher than the default `{base}` "
                             f"({verdict(d)}).")
            else:
                lines.append(f"`{m}`, which sees less of the image, is not detectably different from the default "
                             f"`{base}` ({verdict(d)}).")
    return " ".join(lines)


def checkpoints(ctx: Context) -> dict[str, dict[int, Scores]]:
    """Per model: its runs at every scored training step (step -> Scores), each on the masks it was scored on."""
    out = {}
    for model in ctx.order:
        runs = {step: s for step in steps_of(ctx.sel, model) if (s := scores(ctx.sel, model, step)) is not None}
        if runs:
            out[model] = runs
    return out


def on_curve_masks(runs: list[Scores]) -> list[Scores]:
    """A model's runs at each checkpoint cut to the masks every checkpoint has (snapshots may have fewer)."""
    common = common_masks(runs)
    return [restrict(s, common) if common and len(common) < len(s.sources) else s for s in runs]


def training_curves(ctx: Context, by_step: Optional[dict[str, dict[int, Scores]]] = None) -> dict[str, pd.DataFrame]:
    """Per model: mIoU with its interval at every scored step, and the training FLOPs spent up to it."""
    curves = {}
    for model, runs in (by_step if by_step is not None else checkpoints(ctx)).items():
        points = []
        for s in on_curve_masks(list(runs.values())):
            e = estimate_all(s).figures.get("miou")
            if e is not None:
                points.append({"step": s.step, "miou": e.value, "low": e.low, "high": e.high, "seeds": len(s.seeds),
                               "masks": len(s.sources) if s.per_mask else np.nan})
        if points:
            df = pd.DataFrame(points)
            flops = train_flops_per_step(ctx, model)
            df["train_flops"] = df["step"] * flops if flops else np.nan
            curves[model] = df
    return curves


def common_masks(runs: list[Scores]) -> Optional[list[str]]:
    """The masks every one of ``runs`` was scored on, in the order of the first; None without per-mask scores."""
    if not runs or not all(s.per_mask for s in runs):
        return None
    others = [set(s.sources) for s in runs[1:]]
    return [m for m in runs[0].sources if all(m in o for o in others)]


def train_flops_per_step(ctx: Context, model: str) -> Optional[float]:
    """FLOPs of one training step: TRAIN_FLOPS_PER_NFE x FLOPs of one NFE per image (speed rows) x the run's batch."""
    timed = ctx.sel.timed[ctx.sel.timed["model"] == model] if not ctx.sel.timed.empty else ctx.sel.timed
    if timed.empty:
        return None
    per_nfe = float(timed.loc[timed["resolution"].idxmin(), "flops_per_nfe"])
    rows = ctx.sel.quality[ctx.sel.quality["model"] == model]
    if rows.empty:
        return None
    config = resolve_path(rows.iloc[-1]["run"], ctx.results) / "config.json"
    try:
        batch = json.loads(Path(config).read_text())["batch_size"]
    except (OSError, ValueError, KeyError):
        return None
    return TRAIN_FLOPS_PER_NFE * per_nfe * batch


def section(ctx: Context) -> list[str]:
    md = ["## Quality", ""]
    notes = Footnotes()
    final = ctx.final or final_scores(ctx)
    qtable = quality_table(ctx, final, notes)
    if qtable.empty:
        return md + ["No quality rows for this preset (run `bench quality`).", ""]
    md += [markdown(qtable), ""]
    if notes.reasons:
        md += ["Missing values, and why:", "", notes.render(), ""]
    md.append("Each figure is the mean over the training seeds listed, with its 95% interval in brackets: a two-way "
              "bootstrap over seeds and test masks (mIoU and the diversities, from the per-mask scores in "
              "`quality_masks.csv`), over seeds only for FID and KID. Mask mIoU: the face parser on the generated "
              "images against their input masks; the parser ceiling is the same parser on the real test images. "
              "LPIPS diversity (AlexNet) and pixel diversity (mean absolute difference of images in [0, 1], no "
              "weights; not a substitute for LPIPS): the mean over the pairs of a mask's samples. FID and KID: "
              f"torch-fidelity's Inception, real test images against one sample per mask; with fewer than "
              f"{FID_RELIABLE_IMAGES} images per side they are marked unreliable.")
    md.append("")
    md += parser_note(final)
    reference = REFERENCE if REFERENCE in final else next(iter(final))
    diffs = differences_table(ctx, final, reference)
    if not diffs.empty:
        md += [f"### Differences from {plots.display_name(reference)}", "", markdown(diffs), "",
               "Paired differences (the same seeds, masks and noise for both), with their 95% bootstrap intervals; "
               "an interval that contains 0 is written \"no detectable difference\".", ""]
    ablation, shown, note = ablation_table(ctx, final, "sisma", ("scan", "conv"))
    if not ablation.empty:
        md += ["### SISMA's token mixing: scan order x conv", "", markdown(ablation), "", *note,
               "raster + causal1d is strictly causal (a token never sees the tokens after it in raster order, so "
               "the top of the image never sees the bottom); raster + grid2d reaches at most two token rows further "
               "down per block (the 3 x 3 convs of Self- and Cross-Mamba); zigzag (one snake path per block, its "
               "corner and direction cycling) and bidirectional scans let every token see the whole image. "
               f"{mixing_verdict(shown, ablation)}", ""]
    dit, _, note = ablation_table(ctx, final, "dit", ("cond",))
    if not dit.empty:
        md += ["### DiT-SIS: cross-attention against the aligned mask", "", markdown(dit), "", *note,
               "cond=cross: image tokens attend to the mask tokens and must learn where each belongs (position "
               "embeddings only); cond=add: the mask token of each position is added at that position in every "
               "block (what cross-attention restricted to its own position computes), aligned as Cross-Mamba and "
               "SPADE are.", ""]
    curves = training_curves(ctx, ctx.checkpoints)
    if any(len(c) > 1 for c in curves.values()):
        labels = parser_labels(final)
        steps = sorted({int(p.step) for c in curves.values() for p in c.itertuples()})  # columns in step order
        table = pd.DataFrame([{"model": m, **{f"step {k}": "-" for k in steps},
                               **{f"step {int(p.step)}": fmt_estimate_row(p) for p in c.itertuples()},
                               **({"parser": labels.get(parser_of(final[m]), "-")} if labels and m in final else {})}
                              for m, c in curves.items()]).fillna("-")
        md += ["### Quality against training", "", markdown(table), ""]
        md += curve_masks_note(curves, final)
        md.append(ctx.figures.add(
            "quality_training.png",
            "mask mIoU (mean over seeds, 95% interval shaded) against training steps (left) and training FLOPs "
            f"(right: {TRAIN_FLOPS_PER_NFE} x FLOPs per NFE x batch x steps). Dotted: the mIoU targets of the "
            "time-to-quality table; crosses: where each model reaches them (mean over seeds). A ranking that still "
            "changes between the last two checkpoints is not settled.",
            plots.training_quality_figure(curves, ctx.order, settle.TARGETS, reached_points(ctx))))
        md += rising_note(curves, ctx)
    md += settling_section(ctx)
    if ctx.speed is not None:
        points = ctx.speed.latency.merge(ctx.sel.quality[["model", "miou", "fid", "lpips_diversity",
                                                          "pixel_diversity"]], on="model", how="inner")
        for metric in ("miou", "pixel_diversity", "lpips_diversity", "fid"):  # the means over seeds
            points[metric] = [final[m].figures[metric].value if m in final and metric in final[m].figures
                              else np.nan for m in points["model"]]
        metric_cols = [("miou", "mask mIoU (higher: follows the mask better)"),
                       ("fid", "FID (lower is better)"), ("lpips_diversity", "LPIPS diversity"),
                       ("pixel_diversity", "pixel diversity (no weights)")]
        shown = [lab for col, lab in metric_cols if col in points and points[col].notna().any()]
        md.append(ctx.figures.add(
            "quality_latency.png",
            f"quality (mean over seeds) against seconds per image ({ctx.speed.steps} steps, batch 1, "
            f"{ctx.speed.device}; hollow markers are projected latencies). Panels: {'; '.join(shown) or 'none'}; "
            "metrics without values are left out.",
            plots.quality_latency_figure(points, metric_cols, ctx.order,
                                         f"seconds per image ({ctx.speed.steps} steps)")))
    return md


def parser_note(final: dict[str, Scores]) -> list[str]:
    """When the models' runs were scored by more than one face parser: which parser scored which, and how the report
    keeps them apart."""
    labels = parser_labels(final)
    if not labels:
        return []
    groups = [f"{label}, {f'sha256 {p}' if p else 'digest not recorded (rows older than the column)'}: "
              f"{', '.join(plots.display_name(m) for m, s in final.items() if parser_of(s) == p)}"
              for p, label in labels.items()]
    return [f"**These runs were scored by more than one face parser** (column `parser`: {'; '.join(groups)}). A "
            "parser trained from the same seed and data on another CPU rounds differently, so mIoU values of "
            "different parsers are not compared: every paired difference below is between runs of one parser "
            "(against the reference's runs of that parser where it has them), and the ranking, its settling and the "
            "time to quality use the parser of SISMA's runs. Score every compared run with one parser (`bench quality "
            "--parser FILE`) to compare them all.", ""]


def training_summary(ctx: Context) -> None:
    """Fill ``ctx`` with every scored checkpoint, the settling rule's verdict and the time to quality."""
    ctx.checkpoints = checkpoints(ctx)
    parser = main_parser(ctx.final)  # one parser's models are ranked: the others' mIoU is not comparable
    other = [m for m, runs in ctx.checkpoints.items() if parser is not None and parser_of(runs[max(runs)]) != parser]
    compared = {m: runs for m, runs in ctx.checkpoints.items() if m not in other}
    ctx.settling = settle.settle(compared)
    ctx.settling.left_out.update({m: "scored by another face parser" for m in other})
    curves = {m: on_curve_masks(list(runs.values())) for m, runs in compared.items() if len(runs) > 1}
    if not curves:
        return
    logs = {m: run_logs(ctx, runs) for m, runs in curves.items()}
    column = settle.time_column([log for per_seed in logs.values() for log in per_seed.values()])
    ctx.reach_time = "training CPU time" if column == "cpu_s" else "training time"
    ctx.reaches = settle.time_to_quality(curves, logs, {m: train_flops_per_step(ctx, m) for m in curves})
    ctx.reach_source = time_source(ctx, logs, column)


def settling_section(ctx: Context) -> list[str]:
    """Is the ranking settled (the rule of bench.report.settle), and the cost of each model to reach mIoU targets."""
    result = ctx.settling
    if result is None or not (result.models or result.left_out):
        return []
    md = ["### Is the ranking settled?", "", *settle.settling_lines(result, plots.display_name), ""]
    if result.pairs:
        md += [markdown(settle.settling_table(result, plots.display_name)), "",
               "The rule: the models trained longest, compared pair by pair (paired mIoU differences, 95% "
               "intervals) at their last two scored checkpoints; a pair is settled when its verdict (higher, lower, "
               "or no detectable difference) is the same at both, the ranking when every pair is.", ""]
    if not ctx.reaches:
        return md
    label = f"{ctx.reach_time} (s)"
    md += ["### Time to quality", "", markdown(settle.reach_table(ctx.reaches, plots.display_name, label)), "",
           f"Steps, {ctx.reach_time} and training FLOPs until a run's mask mIoU first reaches each "
           "target, interpolated linearly between its scored checkpoints (on the masks every checkpoint has, as "
           "the curves above); the mean over seeds with a t interval over the seeds. \"<=\": reached at the first "
           "scored checkpoint already, so the figure is an upper bound; \"not reached\": some seed's last "
           f"checkpoint is below the target. {ctx.reach_source} Training FLOPs: "
           f"{TRAIN_FLOPS_PER_NFE} x FLOPs per NFE x batch x steps.", ""]
    return md


def reached_points(ctx: Context) -> pd.DataFrame:
    """Where each model reaches each mIoU target (mean over seeds): model, target, step, train_flops."""
    points = []
    for model, per_target in ctx.reaches.items():
        for r in per_target:
            steps = r.summary(r.steps)
            if steps is not None and not r.bounded:
                points.append({"model": model, "target": r.target, "step": steps.value,
                               "train_flops": steps.value * r.flops_per_step if r.flops_per_step else np.nan})
    return pd.DataFrame(points, columns=["model", "target", "step", "train_flops"])


def run_logs(ctx: Context, runs: list[Scores]) -> dict[int, pd.DataFrame]:
    """The loss log of each seed's run (the run folder its rows name)."""
    logs = {}
    rows = runs[-1].rows
    for seed, run in zip(runs[-1].seeds, rows["run"]):
        if isinstance(run, str):
            logs[seed] = settle.read_log(resolve_path(run, ctx.results))
    return logs


def time_source(ctx: Context, logs: dict[str, dict[int, pd.DataFrame]], column: str) -> str:
    """Where the training times come from: which column of the runs' loss logs, at how many threads, on what."""
    threads = sorted({int(t) for per_seed in logs.values() for log in per_seed.values()
                      if "threads" in log for t in log["threads"].dropna()})
    logged = sorted({str(m) for per_seed in logs.values() for log in per_seed.values()
                     if "machine" in log for m in log["machine"].dropna() if str(m)})
    if logged:  # the machines the runs trained on, from their own logs
        machine = " and ".join(logged) + (" (the times of these runs mix machines)" if len(logged) > 1 else "")
    else:  # logs older than the column: the machine that scored the runs
        device = str(ctx.sel.quality["device_name"].dropna().iloc[-1]) if not ctx.sel.quality.empty else "this machine"
        machine = re.sub(r"\s*\(\d+ threads?\)$", "", device)
    what = ("CPU time of each training process (`cpu_s` in its loss.csv: all its threads; it leaves out time spent "
            "waiting for a CPU, not the slowdown of sharing one)" if column == "cpu_s" else
            "wall-clock training time of each run (`wall_s` in its loss.csv; some runs have no CPU time logged)")
    at = f", {'/'.join(map(str, threads))} thread(s)" if threads else ""
    return f"Time: {what}, on {machine}{at}."


def fmt_estimate_row(p) -> str:
    if not np.isfinite(p.low):
        return f"{p.miou:.3f}"
    return f"{p.miou:.3f} [{p.low:.3f}, {p.high:.3f}]"


def curve_masks_note(curves: dict[str, pd.DataFrame], final: dict[str, Scores]) -> list[str]:
    """Says so where a curve is drawn on fewer masks than its model's last-step figure (snapshots scored on fewer)."""
    cut = {m: int(c["masks"].iloc[-1]) for m, c in curves.items()
           if m in final and final[m].per_mask and c["masks"].notna().all()
           and c["masks"].iloc[-1] < len(final[m].sources)}
    if not cut:
        return []
    counts = ", ".join(sorted({str(n) for n in cut.values()}))
    return [f"The snapshots before each run's last step were scored on fewer test masks (the preset's "
            f"quality_snapshot_masks), so every point of these curves uses the masks all its checkpoints have "
            f"({counts}); the figures at the last step elsewhere in this report use every mask scored there.", ""]


def rising_note(curves: dict[str, pd.DataFrame], ctx: Context) -> list[str]:
    """Which models are still improving at the end, and whether each reaches half the parser's ceiling."""
    lines = []
    ceiling = ctx.sel.quality["miou_ceiling"].astype(float).mean() if not ctx.sel.quality.empty else np.nan
    for model, c in curves.items():
        if len(c) < 2:
            continue
        last, before = c.iloc[-1], c.iloc[-2]
        rising = last.low > before.high if np.isfinite(last.low) else last.miou > before.miou
        half = last.miou >= ceiling / 2 if np.isfinite(ceiling) else None
        text = f"- {plots.display_name(model)}: mIoU {last.miou:.3f} at step {int(last.step)}"
        text += (", still rising (its interval lies above the previous checkpoint's)" if rising
                 else ", not detectably higher than at the previous checkpoint")
        if half is not None:
            text += f"; {'at least' if half else 'below'} half the parser ceiling ({ceiling / 2:.3f})"
        lines.append(text + ".")
    return lines + [""] if lines else []
