"""Whether the ranking of the compared models is settled, and how much training each needs to reach a quality target.

Settling rule: the models trained longest are compared pair by pair at their last two common checkpoints. A pair's
verdict at a checkpoint is the sign of its paired mIoU difference when the 95% interval excludes 0, else "no
detectable difference". A pair is settled when its verdict is the same at both checkpoints; the ranking is settled
when every pair is. (Whether a model is still rising is a separate statement: two models can both rise and keep
their order.)

Time to quality (as MLPerf Training reports time to a target): for each run, the first training step at which its
mask mIoU reaches a target, interpolated linearly between scored checkpoints; the training time (CPU seconds of the
training process from its loss log, else wall-clock) and training FLOPs at that step follow from it. A model's figure
is the mean over its seeds with a t interval over the seeds; a target that some seed has not reached is "not reached".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from bench import stats
from bench.report.estimates import Scores, paired, restrict, verdict

TARGETS = (0.3, 0.4, 0.5)  # mask mIoU targets of the time-to-quality table
CONFIDENCE = 0.95
TERA = 1e12
SAME = "no detectable difference"


# ---------------------------------------------------------------------------------------------- settling rule

def sign_of(e: Optional[stats.Estimate]) -> str:
    """'+', '-' or SAME: the direction of a paired difference, where its interval says one."""
    if e is None:
        return "?"
    if not e.excludes_zero:
        return SAME
    return "+" if e.value > 0 else "-"


def on_common_masks(a: Scores, b: Scores) -> tuple[Scores, Scores]:
    """Both runs cut to the masks both were scored on (snapshots may have fewer than a run's last step)."""
    if not (a.per_mask and b.per_mask) or a.sources == b.sources:
        return a, b
    common = [m for m in a.sources if m in set(b.sources)]
    return restrict(a, common), restrict(b, common)


@dataclass
class PairVerdict:
    """One pair of models at the last two common checkpoints."""

    a: str
    b: str
    steps: tuple[int, int]
    differences: tuple[Optional[stats.Estimate], Optional[stats.Estimate]]  # a - b at each step

    @property
    def signs(self) -> tuple[str, str]:
        return sign_of(self.differences[0]), sign_of(self.differences[1])

    @property
    def settled(self) -> bool:
        first, last = self.signs
        return first == last and first != "?"


@dataclass
class Settling:
    """The settling rule's verdict over the compared models."""

    models: list[str]
    steps: tuple[int, ...]  # the two checkpoints compared (empty when fewer than two are common)
    pairs: list[PairVerdict] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # model -> why it is not compared

    @property
    def settled(self) -> bool:
        return bool(self.pairs) and all(p.settled for p in self.pairs)


def settle(checkpoints: dict[str, dict[int, Scores]]) -> Settling:
    """The rule over ``checkpoints`` (model -> step -> its runs at that step): the models trained longest, their
    last two common steps, every pair's paired mIoU difference at both."""
    last = {m: max(steps) for m, steps in checkpoints.items() if steps}
    if not last:
        return Settling([], ())
    longest = max(last.values())
    left_out = {m: f"trained to step {s} only" for m, s in last.items() if s < longest}
    left_out.update({m: f"scored at step {longest} only" for m, s in last.items()
                     if s == longest and len(checkpoints[m]) < 2})
    models = [m for m in checkpoints if m in last and m not in left_out]
    if not models:
        return Settling([], (), left_out=left_out)
    common = sorted(set.intersection(*(set(checkpoints[m]) for m in models)))
    if len(models) < 2 or len(common) < 2:
        return Settling(models, tuple(common[-2:]), left_out=left_out)
    steps = (common[-2], common[-1])
    pairs = []
    for a, b in itertools.combinations(models, 2):
        diffs = []
        for step in steps:
            sa, sb = on_common_masks(checkpoints[a][step], checkpoints[b][step])
            diffs.append(paired(sa, sb).get("miou"))
        pairs.append(PairVerdict(a, b, steps, (diffs[0], diffs[1])))
    return Settling(models, steps, pairs, left_out)


# ---------------------------------------------------------------------------------------------- time to quality

def seed_curves(runs: list[Scores]) -> dict[int, pd.DataFrame]:
    """Per training seed: its mIoU at each scored step (step, miou), each run on the masks it was scored on."""
    out: dict[int, list[tuple[int, float]]] = {}
    for s in runs:
        if s.per_mask:
            values = stats.miou_of(s.inter.sum(1), s.union.sum(1))  # (S,)
        else:
            values = s.rows["miou"].astype(float).to_numpy()
        for seed, v in zip(s.seeds, values):
            out.setdefault(seed, []).append((s.step, float(v)))
    return {k: pd.DataFrame(sorted(v), columns=["step", "miou"]) for k, v in out.items()}


def crossing(curve: pd.DataFrame, target: float) -> tuple[Optional[float], bool]:
    """(step at which ``curve`` first reaches ``target``, whether that is only an upper bound): interpolated between
    the two checkpoints around the crossing; the first checkpoint itself (an upper bound) when it already lies above;
    None when no checkpoint reaches it."""
    steps, values = curve["step"].to_numpy(float), curve["miou"].to_numpy(float)
    above = np.nonzero(values >= target)[0]
    if len(above) == 0:
        return None, False
    i = int(above[0])
    if i == 0:
        return float(steps[0]), True
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (target - v0) / (v1 - v0) * (s1 - s0)), False


@dataclass
class Reach:
    """One model's cost to reach one target: per seed, and summarised over the seeds."""

    target: float
    steps: list[Optional[float]]  # per seed; None where not reached
    bounded: bool  # some seed reached it at its first checkpoint already: the figures are upper bounds
    seconds: list[Optional[float]] = field(default_factory=list)
    flops_per_step: Optional[float] = None

    @property
    def reached(self) -> bool:
        return bool(self.steps) and all(s is not None for s in self.steps)

    def summary(self, values: list[Optional[float]]) -> Optional[stats.Estimate]:
        """Mean over seeds with a t interval (None unless every seed reached the target)."""
        if not self.reached or not values or any(v is None or not np.isfinite(v) for v in values):
            return None
        return mean_interval(np.asarray(values, dtype=float))


def mean_interval(values: np.ndarray) -> stats.Estimate:
    """Mean of per-seed values with the t interval of the mean (none from a single seed)."""
    n, mean = len(values), float(values.mean())
    if n < 2:
        return stats.Estimate(mean, np.nan, np.nan, n, 0)
    half = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return stats.Estimate(mean, mean - half, mean + half, n, 0)


def seconds_at(log: pd.DataFrame, step: float) -> Optional[float]:
    """Training time of a run at ``step`` from its loss log: CPU seconds where logged, else wall-clock seconds."""
    for column in ("cpu_s", "wall_s"):
        if column in log and log[column].notna().all() and not log.empty:
            return float(np.interp(step, np.r_[0.0, log["step"].to_numpy(float)],
                                   np.r_[0.0, log[column].to_numpy(float)]))
    return None


def time_column(logs: list[pd.DataFrame]) -> str:
    """Which time the runs' logs give: 'cpu_s' when every one has it, else 'wall_s'."""
    ok = all("cpu_s" in log and log["cpu_s"].notna().all() and not log.empty for log in logs)
    return "cpu_s" if logs and ok else "wall_s"


def reach(runs: list[Scores], target: float, logs: dict[int, pd.DataFrame],
          flops_per_step: Optional[float]) -> Reach:
    """The cost of one model's runs (one Scores per checkpoint) to reach ``target``."""
    curves = seed_curves(runs)
    found = [crossing(curves[k], target) for k in sorted(curves)]
    steps = [s for s, _ in found]
    seconds = [seconds_at(logs[k], s) if s is not None and k in logs else None
               for k, s in zip(sorted(curves), steps)]
    return Reach(target, steps, any(b for _, b in found), seconds, flops_per_step)


def read_log(run: Path) -> pd.DataFrame:
    """A run's loss log (empty when it has none or it is unreadable)."""
    path = run / "loss.csv"
    try:
        return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError):
        return pd.DataFrame()


# ---------------------------------------------------------------------------------------------- report text

def fmt_cost(e: Optional[stats.Estimate], scale: float = 1.0, unit: str = "") -> str:
    """'412 [380, 444]' (scaled), or the value alone without an interval."""
    if e is None:
        return "-"

    def one(v):
        return f"{v * scale:.3g}{unit}"
    if not np.isfinite(e.low):
        return one(e.value)
    return f"{one(e.value)} [{one(e.low)}, {one(e.high)}]"


def settling_table(result: Settling, name) -> pd.DataFrame:
    """One line per pair: its paired mIoU difference at both checkpoints and whether its verdict held."""
    first, last = result.steps
    return pd.DataFrame([{"pair": f"{name(p.a)} - {name(p.b)}", f"step {first}": verdict(p.differences[0]),
                          f"step {last}": verdict(p.differences[1]),
                          "settled": "yes" if p.settled else "no"} for p in result.pairs])


def settling_lines(result: Settling, name) -> list[str]:
    """The rule's verdict in words: settled or not, and why."""
    lines = []
    if len(result.models) < 2:
        lines.append("Settled: cannot say (fewer than two models were trained longest and scored at two "
                     "checkpoints or more).")
    elif not result.pairs:
        lines.append(f"Settled: cannot say (the models trained longest, {', '.join(map(name, result.models))}, "
                     f"share fewer than two scored checkpoints).")
    else:
        lines.append(verdict_line(result, name))
    if result.left_out:
        why = "; ".join(f"{name(m)}: {reason}" for m, reason in result.left_out.items())
        lines.append(f"Not in the rule (their figures are at their own last step): {why}.")
    return lines


def verdict_line(result: Settling, name) -> str:
    """'Settled at step N: ...' or 'Not settled at step N: k of n pairs changed (which and how)'."""
    first, last = result.steps
    if result.settled:
        text = (f"**Settled** at step {last}: every pair of {', '.join(map(name, result.models))} has the same "
                f"verdict at steps {first} and {last} (the same sign, or no detectable difference at both).")
    else:
        moved = [p for p in result.pairs if not p.settled]
        why = "; ".join(f"{name(p.a)} - {name(p.b)}: {describe(p.signs[0])} at {first}, {describe(p.signs[1])} at "
                        f"{last}" for p in moved)
        text = (f"**Not settled** at step {last}: {len(moved)} of {len(result.pairs)} pairs changed verdict between "
                f"steps {first} and {last} ({why}).")
    return text


def describe(sign: str) -> str:
    return {"+": "higher", "-": "lower", SAME: SAME}.get(sign, "not comparable")


def time_to_quality(checkpoints: dict[str, list[Scores]], logs: dict[str, dict[int, pd.DataFrame]],
                    flops: dict[str, Optional[float]], targets=TARGETS) -> dict[str, list[Reach]]:
    """Per model (its runs at each checkpoint, on common masks): the cost to reach each target."""
    return {m: [reach(runs, t, logs.get(m, {}), flops.get(m)) for t in targets] for m, runs in checkpoints.items()}


def reach_table(reaches: dict[str, list[Reach]], name, seconds_label: str) -> pd.DataFrame:
    """One line per model and target: steps, training time and training FLOPs to reach it."""
    lines = []
    for model, per_target in reaches.items():
        for r in per_target:
            line = {"model": name(model), "mIoU target": f"{r.target:g}"}
            if not r.reached:
                n = sum(s is not None for s in r.steps)
                line.update({"steps": f"not reached ({n} of {len(r.steps)} seeds)", seconds_label: "-",
                             "training TFLOP": "-"})
            else:
                bound = "<= " if r.bounded else ""
                steps = r.summary(r.steps)
                line["steps"] = bound + fmt_cost(steps)
                line[seconds_label] = bound + fmt_cost(r.summary(r.seconds))
                line["training TFLOP"] = bound + (fmt_cost(steps, r.flops_per_step / TERA)
                                                  if r.flops_per_step else "-")
            lines.append(line)
    return pd.DataFrame(lines)
