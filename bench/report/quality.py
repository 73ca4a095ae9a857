"""The report's quality section: FID, KID, LPIPS and pixel diversity, mask mIoU, against latency."""
from __future__ import annotations

import pandas as pd

from bench import plots
from bench.report.common import Context, Selection, Footnotes, fmt, markdown


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




def section(ctx: Context) -> list[str]:
    md = ["## Quality", ""]
    notes = Footnotes()
    qtable = quality_table(ctx.sel, ctx.order, notes)
    if qtable.empty:
        md += ["No quality rows for this preset (run `bench quality`).", ""]
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
        if ctx.speed is not None:
            points = ctx.speed.latency.merge(ctx.sel.quality[["model", "miou", "fid", "lpips_diversity", "pixel_diversity"]],
                                           on="model", how="inner")
            metric_cols = [("miou", "mask mIoU (higher: follows the mask better)"),
                           ("fid", "FID (lower is better)"), ("lpips_diversity", "LPIPS diversity"),
                           ("pixel_diversity", "pixel diversity (no weights)")]
            shown = [lab for col, lab in metric_cols if col in points and points[col].notna().any()]
            md.append(ctx.figures.add(
                "quality_latency.png",
                f"quality against seconds per image ({ctx.speed.steps} steps, batch 1, {ctx.speed.device}; hollow markers "
                f"are projected latencies). Panels: {'; '.join(shown) or 'none'}; metrics without values are left out.",
                plots.quality_latency_figure(points, metric_cols, ctx.order, f"seconds per image ({ctx.speed.steps} steps)")))
    return md
