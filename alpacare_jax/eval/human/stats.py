"""Agreement and preference statistics, in plain numpy (the tests check them against statsmodels and sklearn).

Labels are small integers (0 = first model better, 1 = tie, 2 = second model better). Kappas are undefined
when chance agreement is 1 (every rating in one category); they are returned as NaN then, as sklearn does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percent_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of items two raters labelled the same."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean(a == b))


def cohen_kappa(a: Sequence[int], b: Sequence[int], n_labels: int = 3) -> float:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e)."""
    a, b = np.asarray(a), np.asarray(b)
    p_o = np.mean(a == b)
    p_e = float(np.sum(np.bincount(a, minlength=n_labels) * np.bincount(b, minlength=n_labels))) / len(a) ** 2
    return float("nan") if p_e == 1 else float((p_o - p_e) / (1 - p_e))


def category_counts(ratings: Sequence[Sequence[int]], n_labels: int = 3) -> np.ndarray:
    """[items, labels] counts from each item's list of labels (one per rater)."""
    return np.array([np.bincount(np.asarray(r, dtype=int), minlength=n_labels) for r in ratings])


def mean_pair_agreement(counts: np.ndarray) -> float:
    """Share of agreeing rater pairs per item, averaged over items (Fleiss' P-bar)."""
    n = counts.sum(axis=1)
    return float(np.mean((np.sum(counts * (counts - 1), axis=1)) / (n * (n - 1))))


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from [items, labels] counts, every item rated by the same number of raters."""
    n = counts.sum(axis=1)
    if len(set(n.tolist())) != 1 or n[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (at least 2) of ratings per item")
    p_bar = mean_pair_agreement(counts)
    p_j = counts.sum(axis=0) / counts.sum()
    p_e = float(np.sum(p_j**2))
    return float("nan") if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def preference(scores: Sequence[Sequence[float]]) -> float:
    """Mean score over all votes; ``scores`` holds each item's votes (1 win, 0.5 tie, 0 loss)."""
    return float(np.mean(np.concatenate([np.asarray(s, dtype=float) for s in scores])))


def bootstrap_ci(scores: Sequence[Sequence[float]], *, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `preference`, resampling items (an item's votes stay together).

    Votes of several raters on one item are not independent, so the item, not the vote, is the unit drawn.
    """
    sums = np.array([np.sum(s) for s in scores], dtype=float)
    counts = np.array([len(s) for s in scores], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)
