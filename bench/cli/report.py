"""``bench report``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import command

DEFAULT_RESULTS = Path("results")
DEFAULT_REPORTS = Path("reports")


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
    from bench.report import build_report

    out = build_report(results, reports, name, preset)
    pngs = sorted(p.name for p in (out.parent / out.stem).glob("*.png"))
    typer.echo(f"wrote {out} with {len(pngs)} plots in {out.parent / out.stem}/ ({', '.join(pngs)})")
