"""Intervals for the audit's numbers: binomial intervals for proportions, bootstrap for the rest.

A proportion (rank-k accuracy: k hits out of n queries) gets a Wilson score interval
(:func:`wilson_interval`, computed by ``scipy.stats.binomtest``). A percentile bootstrap
of a proportion collapses to [1, 1] at 100 % and [0, 0] at 0 % with a few queries, which
reads as certainty; Wilson's interval does not (5/5 -> [0.566, 1]).

The difference of two rank-k accuracies measured on the same queries (two scenarios)
gets Newcombe's paired score interval (:func:`paired_difference_interval`), which is
built from the two Wilson intervals and so does not collapse either. The percentile
bootstrap (:func:`bootstrap_ci`) is kept for statistics without such a form: a mean rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Confidence level of every interval the audit prints.
LEVEL = 0.95


def wilson_interval(hits: int, n: int, *, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the proportion ``hits / n`` (NaN, NaN when n = 0).

    Parameters
    ----------
    hits : number of successes, 0 <= hits <= n.
    n : number of trials.
    level : confidence level, e.g. 0.95.

    Returns
    -------
    (lo, hi) : floats in [0, 1].
    """
    from scipy.stats import binomtest

    hits, n = int(hits), int(n)
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= hits <= n:
        raise ValueError(f"expected 0 <= hits <= n, found hits={hits}, n={n}")
    ci = binomtest(hits, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_ci(values: np.ndarray, *, statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                 n_boot: int = 2000, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement).

    Parameters
    ----------
    values : (n,) float array; NaN entries are dropped first.
    statistic : maps an (n_boot, n) array of resamples to (n_boot,) statistics;
        default: the mean over axis 1.
    n_boot : number of resamples (>= 1).
    level : confidence level.
    seed : seed of the resampling.

    Returns
    -------
    (lo, hi) ; (NaN, NaN) when no value is finite.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    if n_boot < 1:
        raise ValueError(f"expected n_boot >= 1, found {n_boot}")
    statistic = statistic or (lambda x: x.mean(axis=1))
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(int(n_boot), values.size))]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(statistic(samples), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, *,
                               level: float = LEVEL) -> tuple[float, float, float]:
    """Difference of two paired proportions, mean(a) - mean(b), with Newcombe's hybrid
    score interval for paired data (Newcombe 1998, Stat. Med. 17:2635, method 10).

    Built from the Wilson intervals of both proportions and the correlation of the
    pairs, it keeps a width where a bootstrap of the differences collapses (every query
    found in one scenario and missed in the other reads [-1, -1] by bootstrap).

    Parameters
    ----------
    a, b : (n,) arrays of 0/1 (hit/miss) of the same n units in two conditions.

    Returns
    -------
    (difference, lo, hi) ; NaNs when n = 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two (n,) arrays of paired values, found {a.shape} and {b.shape}")
    if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("expected 0/1 outcomes (hit = 1, miss = 0)")
    n = a.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    both, only_a = float(np.sum(a * b)), float(np.sum(a * (1 - b)))
    only_b, neither = float(np.sum((1 - a) * b)), float(np.sum((1 - a) * (1 - b)))
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(int(both + only_a), n, level=level)
    l2, u2 = wilson_interval(int(both + only_b), n, level=level)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / np.sqrt(margins) if margins > 0 else 0.0
    below = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    diff = p1 - p2
    return float(diff), float(max(-1.0, diff - below)), float(min(1.0, diff + above))


__all__ = ["LEVEL", "bootstrap_ci", "paired_difference_interval", "wilson_interval"]
