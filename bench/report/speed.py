"""The report's speed section: per-model latency, memory and throughput, and cost against resolution."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from bench import plots
from bench.breakdown import OP_CLASSES
from bench.flops import equivalent_tokens, fit_power_law
from bench.report.common import Context, Selection, SpeedSummary, fmt, markdown
from bench.report.estimates import nfe_ratio
from bench.report.paper import PAPER_FIGURES, PAPER_HARDWARE
from bench.report.quality import model_config
from bench.report.select import latest, native_resolution
from bench.speed import MIN_IMAGE_REPEATS

IMAGE_FLAG = 0.15  # a measured image this far from steps x per-NFE + decode is flagged


def speed_summary(timed: pd.DataFrame, sel: Selection, order: list[str]) -> Optional[SpeedSummary]:
    """The speed table of one device's rows (``timed``) and the latency line per model behind it."""
    if timed.empty:
        return None
    steps = int(timed["steps"].iloc[-1])
    lines, latency, used = [], [], []
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
        used.append(one)
        line = {"model": model, "px": fmt(int(native)), "params (M)": fmt(one["params"] / 1e6),
                "GFLOPs / NFE": fmt(one["flops_per_nfe"] / 1e9)}
        if one["status"] != "ok":
            line[f"s / image ({steps} steps)"] = f"{one['status']} at batch {int(one['batch_size'])}"
            lines.append(line)
            continue
        repeats = int(one["image_repeats"]) if pd.notna(one["image_repeats"]) else 0
        measured = pd.notna(one["image_latency_s"]) and repeats >= MIN_IMAGE_REPEATS
        seconds = one["image_latency_s"] if measured else one["image_latency_projected_s"]
        line[f"s / image ({steps} steps)"] = fmt(seconds)
        if measured:
            line["how"] = f"measured (median of {repeats})"
            ratio = float(one["image_latency_s"]) / float(one["image_latency_projected_s"])
            if abs(ratio - 1) > IMAGE_FLAG:
                line["how"] += f"; flag: {ratio:.2f} x steps x per-NFE + decode"
        elif repeats:
            line["how"] = f"projected (NFE x steps + decode; {repeats} whole images < {MIN_IMAGE_REPEATS})"
        else:
            line["how"] = "projected (NFE x steps + decode)"
        line["ms / NFE"] = fmt(one["latency_nfe_median_s"] * 1e3)
        line["IQR (ms)"] = fmt(one["latency_nfe_iqr_s"] * 1e3)
        if pd.notna(one.get("latency_nfe_guided_median_s")):
            line["ms / guided NFE"] = fmt(one["latency_nfe_guided_median_s"] * 1e3)
        if pd.notna(one.get("peak_cuda_delta_mib")):
            line["peak memory (MiB)"] = f"{fmt(one['peak_cuda_delta_mib'])} (CUDA allocated, rise in one NFE)"
        elif pd.notna(one["peak_cuda_allocated_mib"]):
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
                        "params": one["params"], "nfe_s": float(one["latency_nfe_median_s"]),
                        "nfe_all": str(one["latency_nfe_all_s"]) if pd.notna(one.get("latency_nfe_all_s")) else "",
                        "sweep": one.get("sweep"), "resolution": int(one["resolution"]),
                        "batch": int(one["batch_size"])})
    table = pd.DataFrame(lines).fillna("-")
    rows = pd.DataFrame(used)
    sweeps = set(rows["sweep"].dropna()) if "sweep" in rows else set()
    rounds = sel.rounds[sel.rounds["sweep"].isin(sweeps)] if not sel.rounds.empty else sel.rounds
    return SpeedSummary(table, pd.DataFrame(latency, columns=["model", "latency_s", "projected", "iqr_s", "params",
                                                              "nfe_s", "nfe_all", "sweep", "resolution", "batch"]),
                        steps, str(timed["device_name"].iloc[-1]), rows=rows, rounds=rounds)


def sdm_shape_note(ctx: Context) -> list[str]:
    """SDM's attention sits at fixed feature-map sizes, so its architecture changes with the image size."""
    sdm = [m for m in ctx.order if m == "sdm" or m.startswith("sdm:")]
    rows = ctx.sel.timed[ctx.sel.timed["model"].isin(sdm)] if sdm and not ctx.sel.timed.empty else None
    if rows is None or rows.empty:
        return []
    cfg = model_config(sdm[0], ctx.sel.preset)
    if cfg is None or not hasattr(cfg, "attention_resolutions"):
        return []
    parts = []
    for px in sorted({int(r) for r in rows["resolution"]}):
        sizes = [px // 2 ** level for level in range(len(cfg.channel_mult))]
        attn = [f for f in sizes if f in cfg.attention_resolutions]
        parts.append(f"{px} px: attention at {', '.join(f'{f} px' for f in attn) or 'no level'} "
                     f"({len(attn)} of {len(sizes)} levels)")
    return [f"SDM changes shape with the image size: its self-attention runs at feature maps of "
            f"{', '.join(f'{a} px' for a in cfg.attention_resolutions)} only (as in ADM), so at each resolution a "
            f"different share of its levels attend ({'; '.join(parts)}); its fitted exponent mixes that change with "
            "the growth of each layer.", ""]


def scaling_panels(sel: Selection, order: list[str]) -> tuple[list[dict], pd.DataFrame]:
    """Panels for the scaling figure (GFLOPs and ms per NFE against resolution) and the table of their fitted
    exponents k (cost ~ tokens^k; a unit change does not change k)."""
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




REFERENCE = "sisma"  # ratios are each model's time over this one's (the first model when it is absent)
SHARE_LABELS = {"matmul": "matmul", "attention": "attention", "scan": "scan", "conv": "conv",
                "norm_elementwise": "norm / elementwise", "layout": "layout (copies, permutes)", "other": "other"}


def device_title(summary: SpeedSummary) -> str:
    """What one speed table was measured on: device, precision, torch, commit and the protocol of its rows."""
    r = summary.rows.iloc[0]
    protocol = ""
    if pd.notna(r.get("processes")):
        protocol = f", {int(r['processes'])} processes x {int(r['repeats'])} interleaved rounds"
    return (f"{summary.device}: {r['precision']}, torch {r['torch']}, CUDA {r['cuda']}, commit {r['commit']}"
            f"{protocol}")


def ratio_table(summary: SpeedSummary, order: list[str]) -> tuple[pd.DataFrame, str]:
    """Each model's per-NFE time over the reference's (paired by round where possible), and the reference's name."""
    models = [m for m in order if m in set(summary.latency["model"])]
    if len(models) < 2:
        return pd.DataFrame(), ""
    ref = REFERENCE if REFERENCE in models else models[0]
    lines = []
    for model in models:
        if model == ref:
            continue
        ratio = nfe_ratio(summary, model, ref)
        if ratio is None:
            continue
        spread = "-"
        if len(ratio.per_process) > 1:
            spread = (f"{', '.join(f'{v:.2f}' for v in ratio.per_process)} "
                      f"(spread {max(ratio.per_process) - min(ratio.per_process):.2f})")
        lines.append({"model": model, f"time / {ref}'s (95%, a second run)": ratio.text(), "each process": spread,
                      "calls": ratio.rounds, "paired by round": "yes" if ratio.paired else "no (different sweeps)"})
    return pd.DataFrame(lines), ref


def breakdown_table(summary: SpeedSummary, order: list[str]) -> pd.DataFrame:
    """Where one NFE's time goes per model (shares of the profiled self time), and the FLOPs it achieves."""
    lines = []
    for model in order:
        rows = summary.rows[summary.rows["model"] == model] if not summary.rows.empty else summary.rows
        if rows.empty:
            continue
        r = rows.iloc[0]
        line = {"model": model, "ms / NFE (profiled)": fmt(r.get("profile_nfe_ms"))}
        for c in OP_CLASSES:
            share = r.get(f"share_{c}")
            line[SHARE_LABELS[c]] = f"{share:.0%}" if pd.notna(share) else "-"
        line["GFLOP/s achieved"] = fmt(r.get("achieved_gflops"), 3)
        share = r.get("achieved_share")
        line["of the calibration matmul"] = f"{share:.0%}" if pd.notna(share) else "-"
        lines.append(line)
    return pd.DataFrame(lines)


def breakdown_panel(summary: SpeedSummary) -> pd.DataFrame:
    """Milliseconds per NFE by operator class per model, for the stacked-bar figure."""
    rows = summary.rows[summary.rows["profile_nfe_ms"].notna()] if "profile_nfe_ms" in summary.rows else summary.rows
    data = {"model": list(rows["model"])} if not rows.empty else {"model": []}
    for c in OP_CLASSES:
        data[c] = list(rows[f"share_{c}"].astype(float) * rows["profile_nfe_ms"].astype(float)) if not rows.empty \
            else []
    return pd.DataFrame(data)


def device_section(ctx: Context, summary: SpeedSummary) -> list[str]:
    """One device's speed table, ratios and breakdown."""
    md = [f"### {device_title(summary)}", "", markdown(summary.table), ""]
    ratios, ref = ratio_table(summary, ctx.order)
    if not ratios.empty:
        calibration = summary.rows["calibration_gflops"].dropna() if "calibration_gflops" in summary.rows else []
        md += [f"Time per network evaluation over {plots.display_name(ref)}'s, batch 1:", "", markdown(ratios), "",
               "Paired by round: in every round each model was timed once, in a shuffled order, so a ratio is "
               "taken within a round and a drift of the machine reaches both models. Each timing process gives its "
               "median per-round ratio ('each process'); the figure is their mean, and the interval is where a second "
               "run of the same protocol reads with 95% probability (Student's t over the processes, sqrt(2) standard "
               "errors: both runs' figures err), so that the spread between processes, which is what a second run "
               "sees, is inside it.", ""]
        if len(calibration):
            md += [f"Calibration: a square matmul at the timing's threads and precision ran at "
                   f"{fmt(float(calibration.iloc[0]), 3)} GFLOP/s (the sweep's best).", ""]
    shares = breakdown_table(summary, ctx.order)
    if not shares.empty and (shares["ms / NFE (profiled)"] != "-").any():
        md += ["Where the time of one network evaluation goes (batch 1; torch profiler, self time of each operator "
               "by class, from the first timing process) and the FLOPs it achieves (FLOPs per NFE over the median "
               "time, and as a share of the calibration matmul's rate: a low share is FLOPs done slowly, not many "
               "FLOPs):", "", markdown(shares), "",
               "The profiled time leaves out the Python between operators and adds the profiler's own cost, so it "
               "differs from the timed median.", ""]
    return md


def section(ctx: Context) -> list[str]:
    md = ["## Speed", ""]
    panels, exponents = scaling_panels(ctx.sel, ctx.order)
    if not ctx.speeds:
        left = f" ({ctx.sel.busy_rows} rows timed on a busy machine left out)" if ctx.sel.busy_rows else ""
        md += [f"No timed speed rows for this preset{left} (run `bench speed --preset {ctx.sel.preset}` on a "
               "quiet machine).", ""]
    else:
        if ctx.sel.busy_rows:
            md += [f"{ctx.sel.busy_rows} rows timed on a busy machine (column `busy` of speed.csv) are left out of "
                   "every table and ratio.", ""]
        if len(ctx.speeds) > 1:
            md += [f"Rows of {len(ctx.speeds)} devices: one table each, newest first; nothing of one device is mixed "
                   "into another's.", ""]
        for summary in ctx.speeds:
            md += device_section(ctx, summary)
        md.append(f"s / image: one image at batch 1 and {ctx.speed.steps} Euler steps (1 NFE per step) plus "
                  f"decoding, median over at least {MIN_IMAGE_REPEATS} timed images after warm-up; 'projected' is "
                  "the per-NFE median times the steps plus the decoder's time, given where fewer whole images were "
                  f"timed; a flag marks a measured image more than {IMAGE_FLAG:.0%} away from its projection. ms / NFE "
                  "and its IQR: one network evaluation at batch 1 over every round of every process; ms / guided "
                  "NFE: one classifier-free-guided evaluation (conditional and null mask in one call on a doubled "
                  "batch). Peak memory: CUDA bytes allocated during one evaluation, or on CPU the rise of the "
                  "resident set during one (a lower bound). images / s: at the largest batch timed. scan / "
                  "attention: the kernels that ran.")
        md.append("")
        md.append(ctx.figures.add(
            "latency.png",
            f"seconds per image at {ctx.speed.steps} steps, batch 1, one panel per device of this report's rows "
            f"({ctx.sel.preset} preset); hatched bars are projected, solid ones measured, error bars the per-NFE IQR "
            f"times the steps. Last panel: the paper's Table 2 ({PAPER_HARDWARE}, paper scale). Different scales "
            "and hardware: compare ratios, not seconds.",
            plots.latency_figure([(s.device, s.latency) for s in ctx.speeds],
                                 pd.DataFrame([{"model": p.model, "latency_s": p.seconds_per_image}
                                               for p in PAPER_FIGURES]),
                                 ctx.speed.steps, f"paper: {PAPER_HARDWARE}, paper scale")))
        breakdown = [(s.device, breakdown_panel(s)) for s in ctx.speeds]
        md.append(ctx.figures.add(
            "breakdown.png", "milliseconds of one network evaluation (batch 1) by operator class, one panel per "
            "device (torch profiler, self time; the shares of the tables above).",
            plots.breakdown_figure([(label, df) for label, df in breakdown if not df.empty])))
    if panels:
        md += ["### Cost against resolution", ""]
        if not exponents.empty:
            md += [markdown(exponents), "",
                   "k is the fitted exponent of cost against the number of pixels (equivalently of 16 x 16-px "
                   "tokens): 1 is linear, 2 quadratic. Least squares on log-log axes.", ""]
        titles = "; ".join(p["title"].replace("`", "") for p in panels)
        where = f" Latency measured on {ctx.speed.device}." if ctx.speed is not None else ""
        md += sdm_shape_note(ctx)
        md.append(ctx.figures.add("scaling.png", f"cost against image resolution on log-log axes, with fitted power "
                                  f"laws (dashed) and exponents k in the legends. Panels: {titles}.{where}",
                                  plots.scaling_figure(panels, ctx.order)))
    return md
