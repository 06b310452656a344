"""Intervals for the audit's numbers: binomial intervals for proportions, bootstrap for the rest.

A proportion (rank-k accuracy: k hits out of n queries) gets a Wilson score interval
(:func:`wilson_interval`, computed by ``scipy.stats.binomtest``). A percentile bootstrap
of a proportion collapses to [1, 1] at 100 % and [0, 0] at 0 % with a few queries, which
reads as certainty; Wilson's interval does not (5/5 -> [0.566, 1]).

The percentile bootstrap (:func:`bootstrap_ci`, :func:`paired_bootstrap_difference`)
is kept for statistics without a closed form: a mean rank, or the difference between
two scenarios measured on the same queries (resampled in pairs, so the spread of the
queries' difficulty cancels).
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


def paired_bootstrap_difference(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000,
                                level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired observations and its percentile bootstrap interval.

    Parameters
    ----------
    a, b : (n,) arrays measured on the same n units (e.g. hit = 1 / miss = 0 of the
        same queries in two scenarios); the pairs are resampled together.

    Returns
    -------
    (difference, lo, hi) ; NaNs when n = 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two (n,) arrays of paired values, found {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    diff = a - b
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    return float(diff.mean()), lo, hi


__all__ = ["LEVEL", "bootstrap_ci", "paired_bootstrap_difference", "wilson_interval"]
