"""Quality figures with their 95% intervals, from the quality rows and their per-mask scores (bench.stats).

For each model, the runs of every training seed scored at one training step are gathered; their per-mask
counts (results/quality_masks.csv) give mIoU and the diversities with a two-way bootstrap over seeds and masks,
FID and KID an interval over seeds only. Comparisons between models use the seeds both have and the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from bench import stats
from bench.report.common import Selection, SpeedSummary
from bench.report.select import parser_digests


@dataclass
class Scores:
    """The runs of one model at one training step: one row per seed, and their per-mask arrays when present."""

    model: str
    step: int
    rows: pd.DataFrame  # one quality row per seed, sorted by seed
    seeds: list[int]
    sources: Optional[list[str]] = None  # mask names, in order
    inter: Optional[np.ndarray] = None  # (S, M, K)
    union: Optional[np.ndarray] = None
    ceiling_inter: Optional[np.ndarray] = None
    ceiling_union: Optional[np.ndarray] = None
    pixel: Optional[np.ndarray] = None  # (S, M)
    lpips: Optional[np.ndarray] = None  # (S, M), NaN where LPIPS is missing
    figures: dict = field(default_factory=dict)  # metric -> stats.Estimate

    @property
    def per_mask(self) -> bool:
        return self.inter is not None


def _counts(text: str) -> np.ndarray:
    return np.array([int(v) for v in str(text).split()], dtype=np.int64)


def seed_of(row) -> int:
    return int(row["train_seed"]) if pd.notna(row.get("train_seed")) else 0


def scores(sel: Selection, model: str, step: Optional[int] = None) -> Optional[Scores]:
    """The model's runs at ``step`` (default: each run's last step), one row per training seed."""
    rows = sel.quality_all[sel.quality_all["model"] == model]
    if rows.empty:
        return None
    rows = rows.assign(_seed=[seed_of(r) for _, r in rows.iterrows()])
    if step is None:
        final = rows["train_step"] == rows["train_steps"].fillna(rows.groupby("_seed")["train_step"].transform("max"))
        rows = rows[final]
    else:
        rows = rows[rows["train_step"] == step]
    rows = rows.drop_duplicates("_seed", keep="last").sort_values("_seed")
    if rows.empty:
        return None
    out = Scores(model, int(rows["train_step"].max()), rows, [int(s) for s in rows["_seed"]])
    masks = sel.masks[sel.masks["eval_key"].isin(rows["eval_key"].dropna())] if not sel.masks.empty else sel.masks
    per_run = [masks[masks["eval_key"] == key].sort_values("mask") for key in rows["eval_key"]]
    sizes = {len(m) for m in per_run}
    if per_run and 0 not in sizes and len(sizes) == 1:
        sources = [list(m["mask_source"]) for m in per_run]
        if all(s == sources[0] for s in sources):
            out.sources = sources[0]
            out.inter = np.stack([np.stack([_counts(v) for v in m["inter"]]) for m in per_run])
            out.union = np.stack([np.stack([_counts(v) for v in m["union"]]) for m in per_run])
            out.ceiling_inter = np.stack([np.stack([_counts(v) for v in m["ceiling_inter"]]) for m in per_run])
            out.ceiling_union = np.stack([np.stack([_counts(v) for v in m["ceiling_union"]]) for m in per_run])
            out.pixel = np.stack([m["pixel_diversity"].astype(float).to_numpy() for m in per_run])
            out.lpips = np.stack([m["lpips_diversity"].astype(float).to_numpy() for m in per_run])
    return out


def restrict(s: Scores, sources: list[str]) -> Scores:
    """The same runs with their per-mask arrays cut to ``sources`` (masks they all have), figures cleared."""
    keep = [s.sources.index(src) for src in sources]
    cut = {name: getattr(s, name)[:, keep] for name in ("inter", "union", "ceiling_inter", "ceiling_union", "pixel",
                                                          "lpips")}
    return Scores(s.model, s.step, s.rows, s.seeds, sources=list(sources), **cut)


def estimate_all(s: Scores) -> Scores:
    """Fill ``s.figures``: each metric with its interval (or the plain mean over seeds when there is none)."""
    draws = stats.Draws(len(s.seeds), s.inter.shape[1]) if s.per_mask else None
    if draws is not None:
        s.figures["miou"] = stats.miou_estimate(draws, s.inter, s.union)
        s.figures["miou_ceiling"] = stats.miou_estimate(draws, s.ceiling_inter, s.ceiling_union)
        s.figures["pixel_diversity"] = stats.mean_estimate(draws, s.pixel)
        if np.isfinite(s.lpips).all():
            s.figures["lpips_diversity"] = stats.mean_estimate(draws, s.lpips)
    for metric in ("fid", "kid"):
        values = s.rows[metric].astype(float).to_numpy()
        if np.isfinite(values).all():
            draws_seeds = stats.Draws(len(values), 1)
            s.figures[metric] = stats.seed_estimate(draws_seeds, values)
    if draws is None:  # rows without per-mask scores: the mean over seeds, no interval
        for metric in ("miou", "miou_ceiling", "pixel_diversity", "lpips_diversity"):
            values = s.rows[metric].astype(float).to_numpy()
            if np.isfinite(values).all():
                v = float(values.mean())
                s.figures[metric] = stats.Estimate(v, np.nan, np.nan, len(values), 0)
    return s


def parser_of(s: Scores) -> str:
    """The digest of the face parser that scored ``s``'s runs ("" when its rows record none; several joined by
    "+", which no other set of runs shares)."""
    return "+".join(sorted(set(parser_digests(s.rows))))


def paired(a: Scores, b: Scores) -> dict[str, stats.Estimate]:
    """a - b for mIoU and the per-mask diversities, on the seeds both have and the same draws; nothing when the two
    were scored by different face parsers (their difference would include the parsers')."""
    if not (a.per_mask and b.per_mask) or a.sources != b.sources or parser_of(a) != parser_of(b):
        return {}
    common = [k for k in a.seeds if k in b.seeds]
    if not common:
        return {}
    ia, ib = [a.seeds.index(k) for k in common], [b.seeds.index(k) for k in common]
    draws = stats.Draws(len(common), a.inter.shape[1])
    out = {"miou": stats.paired_miou_difference(draws, (a.inter[ia], a.union[ia]), (b.inter[ib], b.union[ib])),
           "pixel_diversity": stats.paired_mean_difference(draws, a.pixel[ia], b.pixel[ib])}
    if np.isfinite(a.lpips[ia]).all() and np.isfinite(b.lpips[ib]).all():
        out["lpips_diversity"] = stats.paired_mean_difference(draws, a.lpips[ia], b.lpips[ib])
    return out


def steps_of(sel: Selection, model: str) -> list[int]:
    """Training steps at which the model was scored (every seed's rows)."""
    rows = sel.quality_all[sel.quality_all["model"] == model]
    return sorted({int(v) for v in rows["train_step"].dropna()})


def fmt_estimate(e: Optional[stats.Estimate], digits: int = 3) -> str:
    """'0.512 [0.498, 0.526]', or the value alone without an interval, '-' without a value."""
    if e is None or not np.isfinite(e.value):
        return "-"
    if not np.isfinite(e.low):
        return f"{e.value:.{digits}f}"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def verdict(e: Optional[stats.Estimate], digits: int = 3) -> str:
    """A paired difference with its interval, and 'no detectable difference' when the interval contains 0."""
    if e is None:
        return "-"
    text = f"{e.value:+.{digits}f} [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"
    return text if e.excludes_zero else text + ", no detectable difference"


@dataclass
class Ratio:
    """Per-NFE time of one model over another's, with how it was drawn."""

    estimate: stats.Estimate
    paired: bool  # per-round ratios of one sweep (else a ratio of medians over the repeats of each)
    processes: int
    rounds: int  # calls of each model behind it
    per_process: list = field(default_factory=list)  # the median per-round ratio of each process

    def text(self) -> str:
        e = self.estimate
        return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"

    def how(self) -> str:
        if not self.paired:
            return (f"ratio of the medians over {self.rounds} timed repeats each, bootstrap over the repeats; not "
                    "paired: the two rows come from different sweeps")
        if self.processes == 1:
            return (f"median of the per-round ratios of one process x {self.rounds} rounds, bootstrap over the "
                    "rounds: it says nothing of a second run")
        return (f"mean over {self.processes} processes of each one's median per-round ratio "
                f"({self.rounds // self.processes} rounds each); the interval is where a second run reads: t over the "
                "processes, sqrt(2) standard errors")


def nfe_ratio(summary: Optional[SpeedSummary], a: str, b: str) -> Optional[Ratio]:
    """Per-NFE time of ``a`` over ``b`` at their latency rows (batch 1, native resolution): paired round by round when
    both come from one sweep with per-round times, else the ratio of medians (None when either has no times)."""
    if summary is None:
        return None
    lat = summary.latency.set_index("model")
    if a not in lat.index or b not in lat.index:
        return None
    la, lb = lat.loc[a], lat.loc[b]
    pairs = _round_pairs(summary.rounds, la, lb, a, b)
    if pairs is not None:
        groups = [g["ratio"].to_numpy() for _, g in pairs.groupby("process")]
        return Ratio(stats.paired_ratio(groups), True, len(groups), len(pairs),
                     [float(np.median(g)) for g in groups])
    if not la["nfe_all"] or not lb["nfe_all"]:
        return None
    times = [[float(v) for v in row["nfe_all"].split()] for row in (la, lb)]
    return Ratio(stats.ratio_estimate(*times), False, 1, min(map(len, times)))


def _round_pairs(rounds: pd.DataFrame, la, lb, a: str, b: str) -> Optional[pd.DataFrame]:
    """The NFE times of ``a`` and ``b`` joined on (process, round) with their ratio; None unless one sweep."""
    if rounds is None or rounds.empty or pd.isna(la["sweep"]) or la["sweep"] != lb["sweep"]:
        return None

    def times(model, row):
        r = rounds[(rounds["sweep"] == row["sweep"]) & (rounds["model"] == model) & (rounds["kind"] == "nfe")
                   & (rounds["resolution"].astype(int) == row["resolution"])
                   & (rounds["batch_size"].astype(int) == row["batch"])]
        return r[["process", "round", "seconds"]].astype(float)

    pairs = times(a, la).merge(times(b, lb), on=["process", "round"], suffixes=("_a", "_b"))
    if pairs.empty:
        return None
    return pairs.assign(ratio=pairs["seconds_a"] / pairs["seconds_b"])
