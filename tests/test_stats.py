"""bench.stats: the two-way bootstrap's figures, paired differences and interval coverage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import metrics, stats


def counts(rng, seeds, masks, classes=5, quality=0.7):
    """Per-mask intersections and unions (S, M, K) of a parser that is right a fraction ``quality`` of the time."""
    union = rng.integers(50, 200, (seeds, masks, classes))
    inter = rng.binomial(union, quality)
    return inter, union


def test_miou_of_counts_equals_the_confusion_matrix_definition():
    rng = np.random.default_rng(0)
    pred, target = torch.from_numpy(rng.integers(0, 6, 500)), torch.from_numpy(rng.integers(0, 6, 500))
    conf = metrics.confusion_matrix(pred, target, 19)
    inter, union = metrics.inter_union(conf)
    assert stats.miou_of(inter.numpy(), union.numpy()) == pytest.approx(metrics.miou(conf))


def test_the_estimate_is_the_figure_on_all_the_data_and_lies_in_its_interval():
    rng = np.random.default_rng(1)
    inter, union = counts(rng, 3, 40)
    draws = stats.Draws(3, 40, replicates=500)
    e = stats.miou_estimate(draws, inter, union)
    assert e.value == pytest.approx(np.mean([stats.miou_of(inter[s].sum(0), union[s].sum(0)) for s in range(3)]))
    assert e.low < e.value < e.high and (e.seeds, e.masks) == (3, 40)
    values = rng.normal(0.3, 0.05, (3, 40))
    m = stats.mean_estimate(draws, values)
    assert m.value == pytest.approx(values.mean()) and m.low < m.value < m.high


def test_a_model_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(2)
    inter, union = counts(rng, 2, 30)
    draws = stats.Draws(2, 30, replicates=300)
    d = stats.paired_miou_difference(draws, (inter, union), (inter, union))
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and not d.excludes_zero


def test_pairing_removes_what_two_models_share():
    """Two models that differ by a constant on every mask: the paired interval is narrow and excludes 0, while
    the intervals of each alone overlap widely."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0.5, 0.2, (3, 60))  # hard and easy masks, seeds that train well or badly
    a, b = shared + 0.02, shared
    draws = stats.Draws(3, 60)
    ea, eb = stats.mean_estimate(draws, a), stats.mean_estimate(draws, b)
    d = stats.paired_mean_difference(draws, a, b)
    assert ea.low < eb.high  # unpaired, the two intervals overlap
    assert d.value == pytest.approx(0.02) and d.excludes_zero and d.half_width < 1e-9


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(4)
    covered, trials = 0, 200
    for _ in range(trials):
        values = rng.normal(0.0, 1.0, (1, 40))  # one seed: the bootstrap over masks alone
        e = stats.mean_estimate(stats.Draws(1, 40, replicates=400, seed=int(rng.integers(1 << 30))), values)
        covered += e.low <= 0.0 <= e.high
    assert 0.88 <= covered / trials <= 0.99


def test_ratio_of_medians_with_an_interval_over_repeats():
    a, b = np.full(10, 2.0) + np.linspace(0, 0.01, 10), np.full(10, 1.0)
    r = stats.ratio_estimate(a, b)
    assert r.value == pytest.approx(np.median(a)) and r.low <= r.value <= r.high and r.high - r.low < 0.02
