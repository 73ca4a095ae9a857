"""What every section of the report shares: the rows it was built from, number formatting, footnotes, figures."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench.io import tidy  # noqa: F401  (re-exported: sections write paths through it)
from bench.plots import save_figure

MISSING = "missing"
FINAL_LOSS_POINTS = 10  # the final loss is the mean of this many last logged points
GRID_MAX_ROWS = 8
SMOKE_TEST_NOTE = ("**`tiny` is a smoke test**: a few training steps, a handful of masks and few sampling steps, to "
                   "check that the whole pipeline runs. Its numbers say nothing about the backbones.")


def fmt(value, digits: int = 4) -> str:
    """A number as the report prints it: ``digits`` significant digits; '-' for an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


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




@dataclass
class Selection:
    """The rows a report is made of, and what was left out."""

    preset: str
    timed: pd.DataFrame     # timed speed rows, one device/precision/compile/steps, latest per setting
    flops: pd.DataFrame     # flops-only rows, latest per model, preset and resolution
    quality: pd.DataFrame   # latest quality row per model at the end of its training
    notes: list[str]
    quality_all: pd.DataFrame = field(default_factory=pd.DataFrame)  # latest per model, seed and training step
    masks: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-mask scores of those rows
    devices: list = field(default_factory=list)  # timed rows per device (bench.report.select.device_groups)
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-round times of the sweeps of those rows
    busy_rows: int = 0  # timed rows flagged busy, left out
    quality_runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # like quality_all, older run folders kept



@dataclass
class SpeedSummary:
    """Per model at its native resolution: what the speed table shows, also used by the plots."""

    table: pd.DataFrame       # the Markdown table
    latency: pd.DataFrame     # model, latency_s, projected, iqr_s, params, nfe_s, nfe_all, sweep, resolution, batch
    steps: int
    device: str
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)  # the timed row behind each latency line
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-round times of those rows' sweeps



class Figures:
    """The figures of one report: each added with its caption, linked from the Markdown, saved at the end."""

    def __init__(self, name: str):
        self.name = name
        self.items: list[tuple[str, str, object]] = []  # (file name, caption, figure)

    def add(self, file: str, caption: str, fig) -> str:
        """The Markdown that shows ``fig`` (nothing when there is no figure)."""
        if fig is None:
            return ""
        self.items.append((file, caption, fig))
        return f"![{Path(file).stem}]({self.name}/{file})\n\n*Figure: {caption}*\n"

    def save(self, folder: Path) -> None:
        for file, _, fig in self.items:
            save_figure(fig, folder / file)


@dataclass
class Context:
    """Everything a section reads: the selected rows, the model order, the state of `bench run`, the figures."""

    sel: Selection
    order: list[str]
    results: Path
    figures: Figures
    state: Optional[dict] = None
    samples: list[dict] = field(default_factory=list)
    speed: Optional[SpeedSummary] = None  # the newest device's (the headline)
    speeds: list = field(default_factory=list)  # every device's SpeedSummary, newest first
    final: dict = field(default_factory=dict)  # model -> bench.report.estimates.Scores at the end of training
    checkpoints: dict = field(default_factory=dict)  # model -> step -> Scores: every scored checkpoint
    settling: Optional[object] = None  # bench.report.settle.Settling over those checkpoints
    reaches: dict = field(default_factory=dict)  # model -> [bench.report.settle.Reach per mIoU target]
    reach_time: str = ""  # what the reaches' seconds are: "training CPU time" or "training time"
    reach_source: str = ""  # where those times come from, in words
    matched: dict = field(default_factory=dict)  # (model, parser digest) -> its final Scores as that parser scored it
