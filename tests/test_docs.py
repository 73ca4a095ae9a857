"""The README and the pages under docs/: links that resolve, files that exist, a layout that lists the repository,
schemas that name every column, study notes without typed figures, timing figures read from their rows."""
from __future__ import annotations

import csv
import dataclasses
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY_NOTES = ROOT / "results" / "study-cpu" / "README.md"
PAGES = [ROOT / "README.md", STUDY_NOTES, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a repository path in a code span: a folder of the repository, then a name without placeholders
FOLDERS = r"bench|models|tests|docs|reports|\.ci|results/study-cpu|results/timing-check"
REPO_PATH = re.compile(rf"`((?:{FOLDERS})/[A-Za-z0-9_./-]*)`")


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = defaultdict(int)
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def test_pages_exist():
    assert (ROOT / "docs").is_dir()
    for name in ("design", "guarantees", "layout", "schemas", "timing", "gpu"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_files_exist(page):
    missing = [p for p in REPO_PATH.findall(page.read_text()) if not (ROOT / p).exists()]
    assert missing == []


def test_readme_is_short_and_keeps_the_ci_test_block():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    after = text.split("<!-- ci:test -->\n", 1)[1]
    assert after.startswith("```bash\n")
    block = after.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install" in block and "pytest" in block
    for section in ("## Quick start", "## Commands"):
        assert section in text


def tracked_top_level() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return {line.split("/", 1)[0] for line in out.splitlines() if line} | {"docs"}


def test_layout_page_names_every_top_level_entry():
    layout = (ROOT / "docs" / "layout.md").read_text()
    section = layout.split("## The repository", 1)[1].split("\n## ", 1)[0]
    listed = {line.split()[0].split("/")[0] for line in section.splitlines() if line and not line[0].isspace()}
    assert sorted(tracked_top_level() - listed) == []


def test_layout_page_names_only_files_that_exist():
    layout = (ROOT / "docs" / "layout.md").read_text()
    section = layout.split("## Modules", 1)[1].split("\n## ", 1)[0]
    names = [line.split()[0] for line in section.splitlines() if line and not line.startswith(("`", " "))]
    assert len(names) > 50
    assert [n for n in names if not (ROOT / n).exists()] == []


def test_schemas_page_names_every_column():
    from bench import rows
    from bench.train import LossLog

    named = set(re.findall(r"`([a-z_0-9]+)`", (ROOT / "docs" / "schemas.md").read_text()))
    schemas = {cls.__name__: [f.name for f in dataclasses.fields(cls)]
               for cls in (rows.SpeedRow, rows.RoundRow, rows.QualityRow, rows.MaskScoreRow, rows.SweepRow)}
    schemas["loss.csv"] = list(LossLog.COLUMNS)
    missing = {name: [c for c in cols if c not in named] for name, cols in schemas.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_study_notes_type_no_figures():
    """The study's figures live in the generated report; its notes name commits and commands, not values."""
    text = prose(STUDY_NOTES.read_text())
    assert re.findall(r"\d+\.\d+|\d+\s*%", text) == []


def paired_ratios(folder: Path, model: str, over: str = "sisma") -> str:
    """``model``'s time per NFE at batch 1 over ``over``'s, paired by round, as docs/timing.md writes it."""
    from bench import stats

    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    with (folder / "speed_rounds.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r["kind"] == "nfe" and r["batch_size"] == "1" and r["model"] in (model, over):
                times[(int(r["process"]), int(r["round"]))][r["model"]] = float(r["seconds"])
    by_process: dict[int, list[float]] = defaultdict(list)
    for (process, _), t in sorted(times.items()):
        by_process[process].append(t[model] / t[over])
    e = stats.paired_ratio([np.array(v) for _, v in sorted(by_process.items())])
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def test_timing_page_figures_are_read_from_their_rows():
    text = " ".join((ROOT / "docs" / "timing.md").read_text().split())
    first, second = ROOT / "results" / "timing-check" / "first", ROOT / "results" / "timing-check" / "second"
    expected = (f"DiT-SIS / SISMA {paired_ratios(first, 'dit')} and {paired_ratios(second, 'dit')}, "
                f"SDM / SISMA {paired_ratios(first, 'sdm')} and {paired_ratios(second, 'sdm')}")
    assert expected in text


@pytest.mark.parametrize("rows_file", ["sisma-dit-benchmark.csv", "sisma-dit-low-rank.csv", "sisma-dit-wrappers.csv"])
def test_sisma_dit_benchmark_table_is_the_medians_of_its_runs(rows_file):
    """docs/timing.md's before/after tables of the SISMA / DiT-SIS benchmark: each cell the median of a batch's runs in
    results/timing-check/<rows_file>, before (the first commit of the file) and after."""
    rows = list(csv.DictReader((ROOT / "results" / "timing-check" / rows_file).open(newline="")))
    before = rows[0]["commit"]
    text = " ".join((ROOT / "docs" / "timing.md").read_text().split())

    def cell(column: str, when: str, percent: bool = False) -> str:
        batches = []
        for batch in sorted({r["batch"] for r in rows}):
            values = [float(r[column]) for r in rows
                      if r["batch"] == batch and (r["commit"] == before) == (when == "before")]
            assert len(values) == 5
            batches.append(f"{np.median(values) * 100:.1f}%" if percent else f"{np.median(values):.3f}")
        return "; ".join(batches)

    for label, column, percent in (("one NFE at batch 1", "nfe_ratio", False),
                                   ("a training step at batch 8 (with AdamW)", "train_ratio", False),
                                   ("layout operators in SISMA's NFE profile", "layout_share_sisma", True)):
        row = f"| {label} | {cell(column, 'before', percent)} | {cell(column, 'after', percent)} |"
        assert row in text, row


def test_paired_benchmark_figures_are_the_medians_of_their_runs():
    """docs/timing.md's ten runs with the paired ratios: each figure the median of results/timing-check/
    sisma-dit-paired.csv's column, the range its lowest and highest run."""
    rows = list(csv.DictReader((ROOT / "results" / "timing-check" / "sisma-dit-paired.csv").open(newline="")))
    assert len(rows) == 10
    text = " ".join((ROOT / "docs" / "timing.md").read_text().split())

    def figure(column: str, percent: bool = False) -> str:
        values = [float(r[column]) for r in rows]
        fmt = (lambda v: f"{v * 100:.1f}%") if percent else (lambda v: f"{v:.3f}")
        return f"{fmt(np.median(values))} [{fmt(min(values))}, {fmt(max(values))}]"

    expected = (f"per training step the ratio of the best rounds {figure('train_ratio')} and the paired ratios' median "
                f"{figure('train_ratio_paired_median')}; per NFE {figure('nfe_ratio')} and "
                f"{figure('nfe_ratio_paired_median')}; the layout share {figure('layout_share_sisma', percent=True)}")
    assert expected in text, expected

TRAINER_STEP_ROWS = (("one NFE at batch 1, ratio of the best rounds", "nfe_ratio", False),
                     ("one NFE at batch 1, median of the paired ratios", "nfe_ratio_paired_median", False),
                     ("a training step at batch 8 (the trainer's), ratio of the best rounds", "train_ratio", False),
                     ("a training step at batch 8, median of the paired ratios", "train_ratio_paired_median", False),
                     ("layout operators in SISMA's NFE profile", "layout_share_sisma", True))


def test_trainer_step_benchmark_table_is_the_medians_of_its_runs():
    """docs/timing.md's table of ten alternating runs before and after (the benchmark's training step the trainer's):
    each cell the median of results/timing-check/sisma-dit-trainer-step.csv's column over a tree's runs, the range its
    lowest and highest run; the header names both commits."""
    rows = list(csv.DictReader((ROOT / "results" / "timing-check" / "sisma-dit-trainer-step.csv").open(newline="")))
    text = " ".join((ROOT / "docs" / "timing.md").read_text().split())
    trees = {tree: [r for r in rows if r["tree"] == tree] for tree in ("before", "after")}
    assert all(len(runs) == 10 and len({r["commit"] for r in runs}) == 1 for runs in trees.values())

    def cell(tree: str, column: str, percent: bool) -> str:
        values = [float(r[column]) for r in trees[tree]]
        fmt = (lambda v: f"{v * 100:.1f}%") if percent else (lambda v: f"{v:.3f}")
        return f"{fmt(np.median(values))} [{fmt(min(values))}, {fmt(max(values))}]"

    header = (f"| SISMA / DiT-SIS, median [lowest, highest] of ten runs | before ({trees['before'][0]['commit']}) | "
              f"after ({trees['after'][0]['commit']}) |")
    assert header in text, header
    for label, column, percent in TRAINER_STEP_ROWS:
        row = f"| {label} | {cell('before', column, percent)} | {cell('after', column, percent)} |"
        assert row in text, row
