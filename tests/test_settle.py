"""The report's settling rule, time to quality and figure styles, on made-up runs."""
import numpy as np
import pandas as pd
import pytest

from bench import plots
from bench.report.estimates import Scores
from bench.report.settle import SAME, crossing, reach, reach_table, settle, settling_lines

MASKS, CLASSES, UNION = 40, 3, 200


def runs(model: str, step: int, ious: list[float], spread: float = 0.02, seed: int = 0) -> Scores:
    """Runs of ``model`` at ``step``, one per training seed, whose mIoU is about ``ious[seed]`` on every mask."""
    rng = np.random.default_rng(seed + step)
    union = np.full((len(ious), MASKS, CLASSES), UNION, dtype=np.int64)
    iou = np.clip(np.asarray(ious)[:, None, None] + rng.normal(0, spread, union.shape), 0, 1)
    inter = np.round(iou * UNION).astype(np.int64)
    rows = pd.DataFrame({"train_seed": range(len(ious)), "miou": ious, "run": [None] * len(ious)})
    return Scores(model, step, rows, list(range(len(ious))), sources=[f"test-{i}" for i in range(MASKS)],
                  inter=inter, union=union, ceiling_inter=inter, ceiling_union=union,
                  pixel=np.zeros((len(ious), MASKS)), lpips=np.zeros((len(ious), MASKS)))


def test_a_ranking_that_holds_at_the_last_two_checkpoints_is_settled():
    checkpoints = {"sisma": {300: runs("sisma", 300, [0.50] * 3), 600: runs("sisma", 600, [0.60] * 3)},
                   "dit": {300: runs("dit", 300, [0.30] * 3), 600: runs("dit", 600, [0.35] * 3)},
                   "sdm": {300: runs("sdm", 300, [0.40] * 3), 600: runs("sdm", 600, [0.40] * 3)}}
    result = settle(checkpoints)
    assert result.steps == (300, 600) and len(result.pairs) == 3
    assert result.settled
    signs = {(p.a, p.b): p.signs for p in result.pairs}
    assert signs[("sisma", "dit")] == ("+", "+")
    assert signs[("dit", "sdm")] == ("-", "-")
    assert settling_lines(result, plots.display_name)[0].startswith("**Settled** at step 600")


def test_a_pair_that_swaps_or_stops_differing_is_not_settled():
    checkpoints = {"sisma": {300: runs("sisma", 300, [0.50] * 3), 600: runs("sisma", 600, [0.50] * 3)},
                   "dit": {300: runs("dit", 300, [0.30] * 3), 600: runs("dit", 600, [0.60] * 3)},
                   "sdm": {300: runs("sdm", 300, [0.40] * 3), 600: runs("sdm", 600, [0.50] * 3)}}
    result = settle(checkpoints)
    assert not result.settled
    verdicts = {(p.a, p.b): (p.signs, p.settled) for p in result.pairs}
    assert verdicts[("sisma", "dit")] == (("+", "-"), False)  # swapped
    assert verdicts[("sisma", "sdm")] == (("+", SAME), False)  # stopped differing
    line = settling_lines(result, plots.display_name)[0]
    assert line.startswith("**Not settled** at step 600") and "SISMA - DiT-SIS: higher at 300, lower at 600" in line


def test_models_trained_for_fewer_steps_or_scored_once_stay_out_of_the_rule():
    checkpoints = {"sisma": {300: runs("sisma", 300, [0.5] * 3), 600: runs("sisma", 600, [0.6] * 3),
                             1200: runs("sisma", 1200, [0.7] * 3)},
                   "dit": {600: runs("dit", 600, [0.3] * 3), 1200: runs("dit", 1200, [0.4] * 3)},
                   "sisma:scan=raster": {300: runs("sisma:scan=raster", 300, [0.5] * 3),
                                         600: runs("sisma:scan=raster", 600, [0.6] * 3)},
                   "sdm": {1200: runs("sdm", 1200, [0.5] * 3)}}
    result = settle(checkpoints)
    assert result.models == ["sisma", "dit"] and result.steps == (600, 1200)
    assert set(result.left_out) == {"sisma:scan=raster", "sdm"}
    assert "trained to step 600 only" in result.left_out["sisma:scan=raster"]
    assert "scored at step 1200 only" in result.left_out["sdm"]


def test_crossing_interpolates_between_checkpoints_and_bounds_an_early_one():
    curve = pd.DataFrame({"step": [300, 600, 1200], "miou": [0.2, 0.4, 0.5]})
    assert crossing(curve, 0.3) == (pytest.approx(450.0), False)
    assert crossing(curve, 0.45) == (pytest.approx(900.0), False)
    assert crossing(curve, 0.1) == (300.0, True)  # already above at the first checkpoint: an upper bound
    assert crossing(curve, 0.6) == (None, False)


def test_reach_gives_steps_seconds_and_flops_with_an_interval_over_seeds():
    per_seed = [[0.20, 0.22, 0.18], [0.40, 0.42, 0.38]]  # each seed crosses 0.3 at a different step
    checkpoints = [runs("sisma", 300, per_seed[0], spread=0.0), runs("sisma", 600, per_seed[1], spread=0.0)]
    logs = {k: pd.DataFrame({"step": [300, 600], "wall_s": [200.0, 400.0], "cpu_s": [150.0, 300.0]})
            for k in range(3)}
    r = reach(checkpoints, 0.3, logs, flops_per_step=2e10)
    assert r.reached and not r.bounded
    assert r.steps == [pytest.approx(450.0, abs=2), pytest.approx(420.0, abs=2), pytest.approx(480.0, abs=2)]
    assert r.seconds == [pytest.approx(s / 2, abs=1) for s in r.steps]  # cpu_s, not wall_s
    steps = r.summary(r.steps)
    assert steps.value == pytest.approx(450.0, abs=2) and steps.low < 450 < steps.high
    table = reach_table({"sisma": [r, reach(checkpoints, 0.5, logs, 2e10)]}, plots.display_name, "t (s)")
    assert table.iloc[1]["steps"] == "not reached (0 of 3 seeds)"
    assert table.iloc[0]["training TFLOP"].startswith("9")  # 450 steps x 2e10 = 9.0 TFLOP


@pytest.mark.parametrize("order", [
    ["sisma", "sisma:scan=raster", "sisma:conv=causal1d", "sisma:scan=bidirectional",
     "sisma:scan=bidirectional:conv=causal1d", "sisma:scan=raster:conv=causal1d", "dit", "dit:cond=add", "sdm",
     "dim", "dim:pad=0", "dim:skip=0", "dim:scan=zigzag", "other", "other:x=1"],
])
def test_no_two_series_of_a_figure_look_alike_and_families_keep_their_hue(order):
    styles = {m: plots.style(m, order) for m in order}
    assert len({s.colour for s in styles.values()}) == len(order)
    assert len({(s.colour, s.line) for s in styles.values()}) == len(order)
    for m in order:
        base = plots.family(m)
        if base in plots.MODEL_COLOURS and m != base:  # a variant: a shade of its family's colour
            assert styles[m].colour != plots.MODEL_COLOURS[base]
            assert styles[m].line != styles[base].line or styles[m].marker != styles[base].marker
    assert styles["sisma"].colour == plots.MODEL_COLOURS["sisma"]


def test_sample_grid_titles_put_one_variant_setting_per_line():
    title = plots.column_title("sisma:scan=bidirectional:conv=causal1d")
    assert title.splitlines() == ["SISMA", "scan=bidirectional", "conv=causal1d"]
    assert plots.column_title("sdm") == "SDM"
