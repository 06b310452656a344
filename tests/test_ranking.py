import numpy as np
import pytest

from faceaudit.core.ranking import (
    MISS,
    chance_topk,
    cmc_curve,
    mean_rank,
    topk_accuracy,
    true_match_ranks,
)


def _brute_force_rank(row, probe, gallery):
    order = sorted(range(len(gallery)), key=lambda j: (row[j], gallery[j] == probe))
    for pos, j in enumerate(order, start=1):
        if gallery[j] == probe:
            return pos
    return MISS


def test_ranks_match_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.random((15, 12))
        gallery = [f"s{j}" for j in range(12)]
        probes = [f"s{rng.integers(0, 14)}" for _ in range(15)]  # s12, s13 absent
        ranks = true_match_ranks(d, probes, gallery)
        expected = [_brute_force_rank(d[i], probes[i], gallery) for i in range(15)]
        assert ranks.tolist() == expected
        for k in (1, 3, 5):
            assert topk_accuracy(ranks, [k])[k] == pytest.approx(
                np.mean([(r != MISS) and r <= k for r in expected]))
        assert np.allclose(cmc_curve(ranks, 12),
                           [np.mean([(r != MISS) and r <= k for r in expected]) for k in range(1, 13)])


def test_identical_items_rank_first_and_invalid_probe_is_miss():
    x = np.arange(12.0).reshape(4, 3)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    ids = ["a", "b", "c", "d"]
    ranks = true_match_ranks(d, ids, ids, probe_valid=np.array([True, True, False, True]))
    assert ranks.tolist() == [1, 1, MISS, 1]
    assert topk_accuracy(ranks, [1])[1] == 0.75
    assert mean_rank(ranks) == 1.0


def test_ties_and_nan_never_score():
    assert true_match_ranks(np.zeros((2, 2)), ["a", "b"], ["a", "b"]).tolist() == [2, 2]
    d = np.array([[np.nan, 1.0], [0.5, 0.1]])
    assert true_match_ranks(d, ["a", "b"], ["a", "b"]).tolist() == [MISS, 1]


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"does not match 3 probes x 2 gallery"):
        true_match_ranks(np.zeros((2, 2)), ["a", "b", "c"], ["a", "b"])


def test_chance_levels():
    assert chance_topk(112, 1) == pytest.approx(1 / 112)
    assert chance_topk(4, 10) == 1.0
    assert np.isnan(chance_topk(0, 1))
