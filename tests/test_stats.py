"""core.stats: the interval level is pinned by known values, coverage by simulation."""

import numpy as np
import pytest

from faceaudit.core.stats import (
    bootstrap_ci,
    paired_difference_interval,
    wilson_interval,
)


def test_wilson_interval_is_95_percent_with_known_values():
    lo, hi = wilson_interval(5, 5)
    assert round(lo, 3) == 0.566 and hi == 1.0   # a 97.5 % interval gives 0.499
    lo, hi = wilson_interval(40, 40)
    assert hi == 1.0 and lo == pytest.approx(0.9124, abs=1e-4)  # 40/40 is not certainty
    lo, hi = wilson_interval(0, 8)
    assert lo == 0.0 and hi == pytest.approx(0.3244, abs=1e-4)  # 0/8 is not [0, 0]
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError, match="0 <= hits <= n"):
        wilson_interval(6, 5)


def test_bootstrap_ci_of_a_mean():
    values = np.r_[np.ones(50), np.zeros(50), np.nan]     # NaN dropped
    lo, hi = bootstrap_ci(values, n_boot=2000, seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.05)  # ~ 2 x 1.96 x 0.05
    assert all(np.isnan(bootstrap_ci(np.array([np.nan]))))


def test_paired_difference_keeps_a_width_where_a_bootstrap_collapses():
    diff, lo, hi = paired_difference_interval(np.zeros(40), np.ones(40))
    # every pair discordant one way: the bootstrap reads [-1, -1]; Newcombe's upper
    # bound is -1 + sqrt(2) x (1 - Wilson lower bound of 40/40)
    assert diff == -1.0 and lo == -1.0
    assert hi == pytest.approx(-1 + np.sqrt(2) * (1 - wilson_interval(40, 40)[0]), abs=1e-9)
    with pytest.raises(ValueError, match="0/1 outcomes"):
        paired_difference_interval(np.array([0.5]), np.array([1.0]))


def test_paired_difference_covers_the_true_difference_95_percent_of_the_time():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    n, p1, p2, rho, trials = 30, 0.8, 0.6, 0.3, 1500
    covered = 0
    for _ in range(trials):
        z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
        a = (z[:, 0] < norm.ppf(p1)).astype(float)
        b = (z[:, 1] < norm.ppf(p2)).astype(float)
        _, lo, hi = paired_difference_interval(a, b)
        covered += lo <= p1 - p2 <= hi
    assert 0.925 <= covered / trials <= 0.975
