"""Procrustes / Umeyama, the common reference frame, the upstream ICP, distance matrices."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from faceaudit.petct.alignment import (
    align_to, centroid_size, icp_distance_matrix, icp_point_to_point, pairwise_distances, procrustes_mean,
    umeyama,
)


def _points(seed=0, n=478):
    return np.random.default_rng(seed).normal(size=(n, 3))


def test_umeyama_recovers_known_similarity_exactly():
    x = _points()
    rot = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    y = 2.5 * x @ rot.T + np.array([1.0, -2.0, 3.0])
    tf = umeyama(x, y, scale=True)
    np.testing.assert_allclose(tf.rotation, rot, atol=1e-12)
    assert tf.scale == pytest.approx(2.5, abs=1e-12)
    np.testing.assert_allclose(tf.translation, [1.0, -2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(tf.apply(x), y, atol=1e-12)


def test_umeyama_rigid_and_batched():
    x = _points(1)
    rots = Rotation.random(4, random_state=3).as_matrix()
    ys = np.einsum("bij,mj->bmi", rots, x) + np.arange(12.0).reshape(4, 1, 3)
    tf = umeyama(np.broadcast_to(x, ys.shape), ys, scale=False)
    np.testing.assert_allclose(tf.rotation, rots, atol=1e-12)
    np.testing.assert_allclose(tf.scale, 1.0)
    np.testing.assert_allclose(tf.apply(np.broadcast_to(x, ys.shape)), ys, atol=1e-12)


def test_umeyama_never_reflects():
    x = _points(2)
    mirrored = x * np.array([-1.0, 1.0, 1.0])
    tf = umeyama(x, mirrored)
    assert np.linalg.det(tf.rotation) == pytest.approx(1.0)


def test_align_to_keeps_missing_rows_missing_and_removes_pose():
    ref = _points(3)
    rot = Rotation.from_euler("z", 70, degrees=True).as_matrix()
    shapes = np.stack([0.3 * ref @ rot.T + 5.0, np.full_like(ref, np.nan)])
    out = align_to(shapes, ref, mode="similarity")
    np.testing.assert_allclose(out[0], ref, atol=1e-10)
    assert np.isnan(out[1]).all()
    rigid = align_to(shapes[0], ref, mode="rigid")  # rigid keeps the 0.3 scale
    assert centroid_size(rigid) == pytest.approx(0.3 * centroid_size(ref))


def test_procrustes_mean_of_posed_copies_is_the_shape():
    base = _points(4)
    rots = Rotation.random(6, random_state=5).as_matrix()
    scales = np.linspace(0.5, 1.5, 6)
    shapes = scales[:, None, None] * np.einsum("bij,mj->bmi", rots, base) + 1.0
    mean = procrustes_mean(shapes, mode="similarity")
    assert centroid_size(mean) == pytest.approx(centroid_size(shapes).mean())
    # the mean is the base shape up to a similarity transform
    residual = align_to(mean, base, mode="similarity") - base
    assert np.abs(residual).max() < 1e-9


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
