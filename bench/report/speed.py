"""The report's speed section: per-model latency, memory and throughput, and cost against resolution."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from bench import plots
from bench.report.common import Context, Selection, SpeedSummary, fmt, markdown
from bench.report.paper import PAPER_FIGURES, PAPER_HARDWARE
from bench.report.select import latest, native_resolution
from bench.speed import MIN_IMAGE_REPEATS

IMAGE_FLAG = 0.15  # a measured image this far from steps x per-NFE + decode is flagged


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
                        "nfe_all": str(one["latency_nfe_all_s"]) if pd.notna(one.get("latency_nfe_all_s")) else ""})
    table = pd.DataFrame(lines).fillna("-")
    return SpeedSummary(table, pd.DataFrame(latency, columns=["model", "latency_s", "projected", "iqr_s", "params",
                                                              "nfe_s", "nfe_all"]),
                        steps, str(timed["device_name"].iloc[-1]))


def sdm_shape_note(ctx: Context) -> list[str]:
    """SDM's attention sits at fixed feature-map sizes, so its architecture changes with the image size."""
    sdm = [m for m in ctx.order if m == "sdm" or m.startswith("sdm:")]
    rows = ctx.sel.timed[ctx.sel.timed["model"].isin(sdm)] if sdm and not ctx.sel.timed.empty else None
    if rows is None or rows.empty:
        return []
    from bench.report.quality import model_config

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




def section(ctx: Context) -> list[str]:
    md = ["## Speed", ""]
    panels, exponents = scaling_panels(ctx.sel, ctx.order)
    if ctx.speed is None:
        md += ["No timed speed rows for this preset (run `bench speed --preset "
               f"{ctx.sel.preset}`).", ""]
    else:
        md += [markdown(ctx.speed.table), ""]
        md.append(f"One image at batch 1 and {ctx.speed.steps} Euler steps (1 NFE per step) plus decoding, "
                  f"median over at least {MIN_IMAGE_REPEATS} timed images after warm-up; 'projected' is the per-NFE "
                  "median times the steps plus the decoder's time, given where fewer whole images were timed; a "
                  f"flag marks a measured image more than {IMAGE_FLAG:.0%} away from its projection. ms / NFE and "
                  "its IQR: one network evaluation at batch 1; ms / guided NFE: one classifier-free-guided "
                  "evaluation (conditional and null mask in one call on a doubled batch). Peak memory: CUDA bytes allocated during one evaluation, or on CPU the rise "
                  "of the resident set during one (a lower bound). images / s: at the largest batch timed. "
                  "scan / attention: the kernels that ran.")
        md.append("")
        md.append(ctx.figures.add(
            "latency.png",
            f"seconds per image at {ctx.speed.steps} steps, batch 1. Left: this report's rows ({ctx.sel.preset} preset, "
            f"{ctx.speed.device}); hatched bars are projected, solid ones measured, error bars the per-NFE IQR times "
            f"the steps. Right: the paper's Table 2 ({PAPER_HARDWARE}, paper scale). Different scales and hardware: "
            "compare ratios, not seconds.",
            plots.latency_figure(ctx.speed.latency,
                                 pd.DataFrame([{"model": p.model, "latency_s": p.seconds_per_image}
                                               for p in PAPER_FIGURES]),
                                 ctx.speed.steps, f"this report: `{ctx.sel.preset}` preset, {ctx.speed.device}",
                                 f"paper: {PAPER_HARDWARE}, paper scale")))
    if panels:
        md += ["### Cost against resolution", ""]
        if not exponents.empty:
            md += [markdown(exponents), "",
                   "k is the fitted exponent of cost against the number of pixels (equivalently of 16 x 16-px "
                   "tokens): 1 is linear, 2 quadratic. Least squares on log-log axes.", ""]
        titles = "; ".join(p["title"].replace("`", "") for p in panels)
        where = f" Latency measured on {ctx.speed.device}." if ctx.speed is not None else ""
        md += sdm_shape_note(ctx)
        md.append(ctx.figures.add("scaling.png", f"cost against image resolution on log-log axes, with fitted power laws "
                                        f"(dashed) and exponents k in the legends. Panels: {titles}.{where}",
                         plots.scaling_figure(panels, ctx.order)))
    return md
