"""Uncertainty of quality figures: a two-way bootstrap over training seeds and test masks.

Every run of a comparison is scored on the same test masks with the same noise, and each backbone is trained with
the same seeds, so seeds and masks are crossed random factors. One bootstrap replicate draws S seeds and M masks
with replacement, independently of each other, and recomputes the figure:

- mask mIoU: for each drawn seed, the mIoU of the drawn masks (per-class intersections and unions summed over them,
  IoU averaged over the classes present), then the mean over the drawn seeds;
- a per-mask figure (pixel or LPIPS diversity): the mean over the drawn (seed, mask) pairs;
- a per-run figure without per-mask parts (FID, KID): the mean over the drawn seeds (an interval over seeds only).

The estimate is the figure on all the data; the 95% interval is the 2.5 and 97.5 percentiles of the replicates.
A paired difference between two models uses the same draws for both (seed k of one with seed k of the other, the
same masks), so what they share cancels; a difference whose interval contains 0 is not called a difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # the report's intervals are the same every time it is made


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% bootstrap interval; ``seeds`` and ``masks`` say what it was drawn over."""

    value: float
    low: float
    high: float
    seeds: int
    masks: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def miou_of(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU over the last axis (classes) of summed counts: mean IoU over the classes with a union (NaN if none)."""
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    n = present.sum(-1)
    return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), np.nan)


class Draws:
    """The resampling plan shared by every figure of one comparison: seed and mask multiplicities per replicate."""

    def __init__(self, n_seeds: int, n_masks: int, replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED):
        rng = np.random.default_rng(seed)
        self.n_seeds, self.n_masks = n_seeds, n_masks
        self.seeds = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=replicates).astype(float)  # (B, S)
        self.masks = rng.multinomial(n_masks, [1 / n_masks] * n_masks, size=replicates).astype(float)  # (B, M)

    # --- replicates of each kind of figure: (B,) arrays
    def miou(self, inter: np.ndarray, union: np.ndarray) -> np.ndarray:
        """inter, union (S, M, K) -> per-replicate mIoU."""
        per_seed = miou_of(np.einsum("bm,smk->bsk", self.masks, inter),
                           np.einsum("bm,smk->bsk", self.masks, union))  # (B, S)
        return (self.seeds * per_seed).sum(1) / self.n_seeds

    def per_mask(self, values: np.ndarray) -> np.ndarray:
        """values (S, M) -> per-replicate mean over the drawn (seed, mask) pairs."""
        per_seed = self.masks @ values.T / self.n_masks  # (B, S)
        return (self.seeds * per_seed).sum(1) / self.n_seeds

    def per_seed(self, values: np.ndarray) -> np.ndarray:
        """values (S,) -> per-replicate mean over the drawn seeds."""
        return self.seeds @ values / self.n_seeds


def interval(value: float, replicates: np.ndarray, seeds: int, masks: int) -> Estimate:
    """The estimate with the percentile interval of its replicates."""
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(replicates, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high), seeds, masks)


def miou_estimate(draws: Draws, inter: np.ndarray, union: np.ndarray) -> Estimate:
    """Mean over seeds of each seed's mIoU over all masks, with its interval."""
    value = float(np.mean(miou_of(inter.sum(1), union.sum(1))))
    return interval(value, draws.miou(inter, union), draws.n_seeds, draws.n_masks)


def mean_estimate(draws: Draws, values: np.ndarray) -> Estimate:
    """Mean of per-mask values (S, M), with its interval."""
    return interval(float(np.mean(values)), draws.per_mask(values), draws.n_seeds, draws.n_masks)


def seed_estimate(draws: Draws, values: np.ndarray) -> Estimate:
    """Mean of per-run values (S,), with an interval over seeds only."""
    return interval(float(np.mean(values)), draws.per_seed(values), draws.n_seeds, 0)


def paired_miou_difference(draws: Draws, a: tuple[np.ndarray, np.ndarray],
                           b: tuple[np.ndarray, np.ndarray]) -> Estimate:
    """mIoU(a) - mIoU(b) with the same draws for both: a, b are (inter, union) arrays (S, M, K)."""
    value = float(np.mean(miou_of(a[0].sum(1), a[1].sum(1))) - np.mean(miou_of(b[0].sum(1), b[1].sum(1))))
    return interval(value, draws.miou(*a) - draws.miou(*b), draws.n_seeds, draws.n_masks)


def paired_mean_difference(draws: Draws, a: np.ndarray, b: np.ndarray) -> Estimate:
    """mean(a) - mean(b) of per-mask values (S, M), with the same draws for both."""
    return interval(float(np.mean(a) - np.mean(b)), draws.per_mask(a) - draws.per_mask(b), draws.n_seeds,
                    draws.n_masks)


def ratio_estimate(a: np.ndarray, b: np.ndarray, replicates: int = REPLICATES,
                   seed: int = BOOTSTRAP_SEED) -> Estimate:
    """median(a) / median(b) of two sets of timings, with a bootstrap interval over the repeats of each."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    ra = np.median(rng.choice(a, (replicates, len(a))), axis=1)
    rb = np.median(rng.choice(b, (replicates, len(b))), axis=1)
    return interval(float(np.median(a) / np.median(b)), ra / rb, 0, 0)


def paired_ratio(per_process: list[np.ndarray], replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """A ratio a / b from its per-round values a_r / b_r grouped by timing process (``seeds`` holds the processes,
    ``masks`` the rounds).

    The process is the unit of replication: rounds within one process share its memory layout, thread placement and
    moment, so they vary less than processes do. The figure is the mean over processes of each process's median
    per-round ratio. Its interval is where a second run of as many processes reads, with 95% probability: Student's t
    over the per-process values (n - 1 degrees of freedom) times sqrt(2) standard errors, since both runs' figures
    err (a prediction interval). A confidence interval of the mean alone (sqrt(1) standard error) left a second
    run's figure outside it about one time in five: measured, 0.784 against [0.723, 0.780]. A bootstrap over 3
    processes, then rounds, was narrower still. With one process: a bootstrap over its rounds, which says nothing
    of a second run.
    """
    from scipy.stats import t as student_t

    groups = [np.asarray(p, float) for p in per_process if len(p)]
    rounds = sum(len(g) for g in groups)
    medians = np.array([np.median(g) for g in groups])
    value = float(medians.mean())
    if len(groups) == 1:
        rng = np.random.default_rng(seed)
        draws = np.median(rng.choice(groups[0], (replicates, len(groups[0]))), axis=1)
        return interval(value, draws, 1, rounds)
    half = student_t.ppf(0.5 + CONFIDENCE / 2, len(groups) - 1) * medians.std(ddof=1) * np.sqrt(2 / len(groups))
    return Estimate(value, value - half, value + half, len(groups), rounds)
