"""``bench report``: the side-by-side comparison as a Markdown report with PNG plots, built from results/ alone.

What it reads (everything under ``--results``, default ``results/``):

- ``speed.csv`` (``bench speed``): the timed rows of the report's preset -> speed table, latency and scaling
  plots; the ``--flops-only`` rows of any preset (e.g. ``paper``) -> the FLOPs scaling panel and parameter counts.
- ``quality.csv`` (``bench quality``) -> quality table and quality-vs-latency plot; its ``run`` column names the
  run folders whose ``config.json`` and ``loss.csv`` give the training table and loss curves.
- every ``samples.json`` below it (``bench sample``, ``bench run``'s sample stage) -> the sample grid, from the
  newest sets that share masks, seed and sampler (one per model).
- ``run_<preset>*/state.json`` (``bench run``) -> the budget of each stage and the time it took.

Which rows: those of one preset (default: the preset of the newest row). For speed, one table per device (its name
with threads or GPU), precision, ``torch.compile`` setting and step count, the newest first; rows timed on a busy
machine (``busy``) are left out and counted. Ratios between models pair their times round by round where both rows
come from one sweep (``speed_rounds.csv``). Where several rows share a model and setting, the newest (the last in
the file, since rows are only ever appended) is used. The report says what it
kept and how many rows it left out. Every number it prints is a value of those rows (or of the paper, labelled).

One module per section (speed, quality, paper, training, samples, setup), each ``section(ctx) -> lines``;
``build_report`` reads and selects the rows, then joins the sections in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from bench.io import tidy, write_text
from bench.report import paper, quality, samples, setup, speed, training
from bench.report.common import SMOKE_TEST_NOTE, Context, Figures
from bench.report.glance import at_a_glance
from bench.report.select import find_state, model_order, read_results, sample_sets, select

DEFAULT_RESULTS = Path("results")
DEFAULT_REPORTS = Path("reports")
SECTIONS = (speed.section, quality.section, paper.section, training.section, samples.section, setup.section)


def build_report(results: Path = DEFAULT_RESULTS, reports: Path = DEFAULT_REPORTS, name: Optional[str] = None,
                 preset: Optional[str] = None) -> Path:
    """Write ``reports/<name>.md`` and its plots in ``reports/<name>/``; returns the Markdown file's path."""
    results, reports = Path(results), Path(reports)
    speed_rows, quality_rows, mask_rows, round_rows = read_results(results)
    sel = select(speed_rows, quality_rows, preset, mask_rows, results, round_rows)
    name = name or sel.preset
    ctx = Context(sel=sel, order=model_order([*(m for g in sel.devices for m in g["model"]), *sel.quality["model"]]),
                  results=results,
                  figures=Figures(name), state=find_state(results, sel.preset),
                  samples=sample_sets(results, sel.preset))
    ctx.speeds = [s for s in (speed.speed_summary(group, sel, ctx.order) for group in sel.devices) if s]
    ctx.speed = ctx.speeds[0] if ctx.speeds else None
    ctx.final = quality.final_scores(ctx)
    quality.training_summary(ctx)
    md = header(ctx) + at_a_glance(ctx)
    for section in SECTIONS:
        md += section(ctx)
    text = "\n".join(md).rstrip() + "\n"
    reports.mkdir(parents=True, exist_ok=True)
    ctx.figures.save(reports / name)
    return write_text(reports / f"{name}.md", text)


def header(ctx: Context) -> list[str]:
    """Title, where the numbers come from, which rows were used, and the preset's notes."""
    sel = ctx.sel
    md = [f"# sis-bench report: `{sel.preset}` preset", ""]
    md.append(f"Made by `bench report` from the rows in `{tidy(ctx.results)}/`: every number below is read from "
              "those rows (and the run folders they name), except the paper's, which are labelled as such. Rows used:")
    md += [""] + [f"- {note}" for note in sel.notes] + [""]
    if sel.preset == "tiny":
        md += [f"> {SMOKE_TEST_NOTE}", ""]
    if ctx.state and ctx.state.get("budget", {}).get("note"):
        md += [f"> Preset `{sel.preset}` of `bench run`: {ctx.state['budget']['note']}", ""]
    return md
