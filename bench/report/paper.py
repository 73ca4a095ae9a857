"""The paper's figures, and the report's section that sets them beside this harness's rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from bench.report.common import MISSING, Context, Selection, SpeedSummary, fmt, markdown

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


def section(ctx: Context) -> list[str]:
    md = ["## The paper's figures beside this report's", ""]
    md += [markdown(paper_table(ctx.sel, ctx.speed, ctx.order)), ""]
    md += [speed_ratio_sentence(ctx.speed),
           f"FID: {PAPER_FID_NOTE}. The paper reports LPIPS diversity only for SISMA.", ""]
    return md
