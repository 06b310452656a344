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


# ---------------------------------------------------------------- open set (issue 13.7)


def test_genuine_and_impostor_pairs_and_nan_is_never_accepted():
    from faceaudit.core.ranking import genuine_impostor_distances

    d = np.array([[0.1, 0.5, np.nan], [0.7, 0.2, 0.9]])
    genuine, impostor = genuine_impostor_distances(d, ["a", "b"], ["a", "b", "a"])
    assert sorted(genuine.tolist()) == [0.1, 0.2, np.inf]   # (a, a), (b, b), (a, a: no face)
    assert sorted(impostor.tolist()) == [0.5, 0.7, 0.9]


def test_tar_at_far_known_answers():
    from faceaudit.core.ranking import tar_at_far

    impostor = 0.01 * np.arange(1, 201)             # 200 pairs: 0.01 .. 2.00
    genuine = np.array([0.005, 0.015, 0.025, 0.5, np.inf])
    # 1 % of 200 = 2 false accepts allowed: accept below the 3rd impostor (0.03)
    tar, threshold = tar_at_far(genuine, impostor, 0.01)
    assert threshold == pytest.approx(0.03) and tar == pytest.approx(3 / 5)
    assert np.mean(impostor < threshold) <= 0.01
    # 0.1 % of 200 pairs is 0.2 of a pair: not measurable
    assert all(np.isnan(tar_at_far(genuine, impostor, 0.001)))
    # ties at the threshold are rejected, never split
    tar, threshold = tar_at_far(np.array([0.5, 0.6]), np.r_[np.full(5, 0.5), np.ones(95)], 0.01)
    assert threshold == 0.5 and tar == 0.0
    # 1000 impostor pairs suffice for 0.1 %
    tar, _ = tar_at_far(np.array([0.0005, 0.0025]), 0.001 * np.arange(1, 1001), 0.001)
    assert tar == 0.5


def test_roc_points_known_answer_and_agreement_with_tar_at_far():
    from faceaudit.core.ranking import roc_points, tar_at_far

    far, tar, thresholds = roc_points(np.array([0.1, 0.3]), np.array([0.2, 0.4]))
    assert far.tolist() == [0, 0, 0.5, 0.5, 1] and tar.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thresholds.tolist() == [0.1, 0.2, 0.3, 0.4, np.inf]   # accept distance < threshold
    rng = np.random.default_rng(2)
    genuine, impostor = rng.normal(0.3, 0.15, 300), rng.normal(0.8, 0.15, 3000)
    far, tar, _ = roc_points(genuine, impostor)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    for target in (0.01, 0.001):
        assert tar_at_far(genuine, impostor, target)[0] == pytest.approx(tar[far <= target].max())


def test_roc_and_tar_at_far_accept_by_one_rule():
    """The threshold tar_at_far reports is a ROC row with the same TAR and a FAR within the
    target: both accept a pair when its distance is strictly below the threshold."""
    from faceaudit.core.ranking import roc_points, tar_at_far

    impostor = 0.01 * np.arange(1, 201)
    genuine = np.array([0.005, 0.015, 0.025, 0.03, 0.5, np.inf])
    tar, threshold = tar_at_far(genuine, impostor, 0.01)
    assert threshold == pytest.approx(0.03) and tar == pytest.approx(3 / 6)   # 0.03 rejected
    far, roc_tar, thresholds = roc_points(genuine, impostor)
    row = int(np.flatnonzero(thresholds == threshold)[0])
    assert roc_tar[row] == tar and far[row] == pytest.approx(2 / 200)
    assert far[-1] == 1.0 and roc_tar[-1] == pytest.approx(5 / 6)   # inf: every face accepted
