"""The paper's figures, and the report's section that sets them beside this harness's rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from bench.report.common import MISSING, Context, Selection, SpeedSummary, fmt, markdown
from bench.report.estimates import nfe_ratio


@dataclass(frozen=True)
class PaperFigure:
    """A figure the SISMA paper reports for one model (None: not in the text available to this project)."""

    model: str
    params_m: float
    seconds_per_image: float
    lpips_diversity: Optional[float]


# Every figure below is quoted from the SISMA paper's text (Table 2 and sections 4.2-4.3); what the text does not
# give is marked NOT_IN_TEXT, and what this harness assumes is marked as an assumption.
PAPER_HARDWARE = "NVIDIA RTX 4090"
PAPER_STEPS = 200
NOT_IN_TEXT = "not in the available text"
PAPER_SETTING = ("CelebAMask-HQ; SISMA in the latents of \"a pre-trained VAE\" (the SD VAE at 256 px is this "
                 "harness's assumption: the image size is not in the available text), SDM in pixels")
PAPER_FIGURES = (PaperFigure("sisma", 799, 8.51, 0.61), PaperFigure("sdm", 653, 22.79, None))
PAPER_SPEEDUP_TEXT = "3 times faster"  # the paper's own words for SDM / SISMA
PAPER_LPIPS_NOTE = ("LPIPS diversity: the paper gives 0.61 for SISMA and says SISMA \"outperform[s] every other "
                    f"model\"; the other models' values are in its Table 2 but {NOT_IN_TEXT}")
PAPER_FID_NOTE = f"FID: the paper's Table 2 values are {NOT_IN_TEXT}"


def paper_table(sel: Selection, speed: Optional[SpeedSummary], order: list[str]) -> pd.DataFrame:
    """The paper's figures, this harness's parameter counts at the paper preset, and this run's figures."""
    lines = []
    for p in PAPER_FIGURES:
        lines.append({"source": "paper", "hardware": PAPER_HARDWARE, "setting": PAPER_SETTING,
                      "model": p.model, "params (M)": fmt(p.params_m),
                      f"s / image ({PAPER_STEPS} steps)": fmt(p.seconds_per_image),
                      "LPIPS diversity": fmt(p.lpips_diversity) if p.lpips_diversity is not None else NOT_IN_TEXT,
                      "FID": NOT_IN_TEXT})
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
    """The headline ratio from per-NFE medians (with its interval), and the paper's as context only."""
    paper = {p.model: p.seconds_per_image for p in PAPER_FIGURES}
    context = (f"For context only (different scale and hardware, not a target): the paper's SDM / SISMA ratio is "
               f"{paper['sdm'] / paper['sisma']:.2f} ({paper['sdm']} s / {paper['sisma']} s per image, {PAPER_STEPS} "
               f"steps, {PAPER_HARDWARE}, ~0.7-0.8B-parameter models; \"{PAPER_SPEEDUP_TEXT}\" in its text).")
    ratio = nfe_ratio(speed, "sdm", "sisma")
    if ratio is None:
        return context
    return (f"SDM / SISMA time per network evaluation: {ratio.text()} (batch 1; {ratio.how()}; 95% interval; "
            f"{speed.device}). {context}")


def section(ctx: Context) -> list[str]:
    md = ["## The paper's figures beside this report's", ""]
    md += [markdown(paper_table(ctx.sel, ctx.speed, ctx.order)), ""]
    md += [speed_ratio_sentence(ctx.speed), "", f"{PAPER_LPIPS_NOTE}. {PAPER_FID_NOTE}.", ""]
    return md
