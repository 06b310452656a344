"""The upstream ICP and the distance matrices (Umeyama and the Procrustes mean: test_geometry)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from faceaudit.petct.alignment import (
    icp_distance_matrix,
    icp_point_to_point,
    pairwise_distances,
)


def _points(seed=0, n=478):
    return np.random.default_rng(seed).normal(size=(n, 3))


def test_icp_converges_on_a_small_rigid_motion():
    target = _points(6, n=300) * 0.1
    rot = Rotation.from_euler("xyz", [3, -2, 4], degrees=True).as_matrix()
    source = (target - 0.002) @ rot.T
    transformation, fitness, rmse = icp_point_to_point(source, target)
    moved = source @ transformation[:3, :3].T + transformation[:3, 3]
    assert fitness == 1.0
    np.testing.assert_allclose(moved, target, atol=1e-6)
    assert rmse < 1e-6


def test_icp_zero_iterations_is_identity_and_fitness_counts_the_threshold():
    from scipy.spatial import cKDTree

    source, target = _points(7), _points(8)
    t, fitness, rmse = icp_point_to_point(source, target, max_iteration=0, max_correspondence_distance=0.5)
    np.testing.assert_array_equal(t, np.eye(4))
    nn, _ = cKDTree(target).query(source)
    inliers = nn < 0.5
    assert fitness == pytest.approx(inliers.mean())
    assert rmse == pytest.approx(np.sqrt(np.mean(nn[inliers] ** 2)))


def test_pairwise_distances_equal_brute_force_with_missing_rows():
    rng = np.random.default_rng(9)
    p = 0.5 + 0.1 * rng.normal(size=(5, 478, 3))
    g = 0.5 + 0.1 * rng.normal(size=(4, 478, 3))
    p[2] = np.nan
    g[1] = np.nan
    d = pairwise_distances(p, g)
    for i in range(5):
        for j in range(4):
            expected = np.linalg.norm(p[i] - g[j])
            if np.isnan(expected):
                assert np.isnan(d[i, j])
            else:
                assert d[i, j] == pytest.approx(expected, rel=1e-9)


def test_icp_distance_matrix_identical_pairs_are_zero():
    rng = np.random.default_rng(10)
    faces = 0.5 + 0.05 * rng.normal(size=(3, 100, 3))
    d = icp_distance_matrix(faces, faces)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-9)
    assert (d[~np.eye(3, dtype=bool)] > 0).all()


def test_pairwise_distances_equal_scipy_cdist():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(11)
    p = 0.5 + 0.1 * rng.normal(size=(7, 478, 3))
    g = 0.5 + 0.1 * rng.normal(size=(9, 478, 3))
    g[3] = p[2]  # an identical pair: exactly 0, not a cancellation residue
    d = pairwise_distances(p, g)
    np.testing.assert_allclose(d, cdist(p.reshape(7, -1), g.reshape(9, -1)), rtol=1e-12, atol=1e-13)
    assert d[2, 3] == 0.0
