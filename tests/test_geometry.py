"""core.geometry against analytic answers: Umeyama recovers a known rotation, scale and
translation; the Procrustes mean of posed copies is the shape; Euler angles of hand-built
rotation matrices."""

import numpy as np
import pytest

from faceaudit.core.geometry import (
    align_to,
    centroid_size,
    euler_angles,
    procrustes_mean,
    rotation_from_euler,
    umeyama,
)


def _points(seed=0, n=478):
    return np.random.default_rng(seed).normal(size=(n, 3))


def rx(deg):
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def ry(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def rz(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


# --------------------------------------------------------------------------- umeyama

def test_umeyama_square_quarter_turn_doubled_and_shifted():
    """A 2-D square turned by 90 degrees, scaled by 2 and moved by (3, 4)."""
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    target = 2.0 * square @ quarter.T + np.array([3.0, 4.0])
    rotation, scale, translation = umeyama(square, target)
    np.testing.assert_allclose(rotation, quarter, atol=1e-15)
    assert scale == pytest.approx(2.0, abs=1e-15) and isinstance(scale, float)
    np.testing.assert_allclose(translation, [3.0, 4.0], atol=1e-15)


def test_umeyama_recovers_a_known_3d_similarity():
    x = _points()
    rot = rz(50) @ ry(-35) @ rx(20)
    y = 2.5 * x @ rot.T + np.array([1.0, -2.0, 3.0])
    tf = umeyama(x, y, scale=True)
    np.testing.assert_allclose(tf.rotation, rot, atol=1e-12)
    assert tf.scale == pytest.approx(2.5, abs=1e-12)
    np.testing.assert_allclose(tf.translation, [1.0, -2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(tf.apply(x), y, atol=1e-12)


def test_umeyama_rigid_keeps_scale_one_and_still_finds_the_rotation():
    x = _points(11)
    rot = ry(30) @ rx(-10)
    y = 3.0 * x @ rot.T + 7.0              # scaled, but a rigid fit may not scale
    rotation, scale, translation = umeyama(x, y, scale=False)
    np.testing.assert_allclose(rotation, rot, atol=1e-12)
    assert scale == 1.0
    # the rigid optimum maps the source centroid onto the target centroid
    np.testing.assert_allclose(rotation @ x.mean(0) + translation, y.mean(0), atol=1e-12)


def test_umeyama_batched_against_one_target():
    from scipy.spatial.transform import Rotation

    x = _points(1)
    rots = Rotation.random(4, random_state=3).as_matrix()
    ys = np.einsum("bij,mj->bmi", rots, x) + np.arange(12.0).reshape(4, 1, 3)
    tf = umeyama(np.broadcast_to(x, ys.shape), ys, scale=False)
    np.testing.assert_allclose(tf.rotation, rots, atol=1e-12)
    np.testing.assert_allclose(tf.scale, 1.0)
    np.testing.assert_allclose(tf.apply(np.broadcast_to(x, ys.shape)), ys, atol=1e-12)
    # a batch of sources against one (m, d) target: each source's inverse rotation
    back = umeyama(ys, x, scale=False)
    np.testing.assert_allclose(back.rotation, np.transpose(rots, (0, 2, 1)), atol=1e-12)


def test_umeyama_never_reflects():
    x = _points(2)
    mirrored = x * np.array([-1.0, 1.0, 1.0])
    rotation, scale, _ = umeyama(x, mirrored)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert scale > 0


def test_umeyama_source_without_spread_has_scale_one():
    rotation, scale, translation = umeyama(np.ones((5, 3)), _points(3, n=5))
    assert scale == 1.0 and np.isfinite(rotation).all() and np.isfinite(translation).all()


def test_umeyama_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected source and target of shape \(\.\.\., m, d\) alike"):
        umeyama(np.zeros((5, 3)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- align_to, procrustes_mean

def test_align_to_keeps_missing_shapes_missing_and_removes_pose():
    ref = _points(3)
    shapes = np.stack([0.3 * ref @ rz(70).T + 5.0, np.full_like(ref, np.nan)])
    out = align_to(shapes, ref, scale=True)
    np.testing.assert_allclose(out[0], ref, atol=1e-10)
    assert np.isnan(out[1]).all()
    rigid = align_to(shapes[0], ref, scale=False)  # a rigid fit keeps the 0.3 scale
    assert centroid_size(rigid) == pytest.approx(0.3 * centroid_size(ref))


def test_centroid_size_of_a_unit_square():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert centroid_size(square) == pytest.approx(np.sqrt(4 * 0.5))   # each corner sqrt(0.5) away
    np.testing.assert_allclose(centroid_size(np.stack([square, 3 * square])), [np.sqrt(2), 3 * np.sqrt(2)])


def test_procrustes_mean_of_posed_copies_is_the_shape():
    from scipy.spatial.transform import Rotation

    base = _points(4)
    rots = Rotation.random(6, random_state=5).as_matrix()
    scales = np.linspace(0.5, 1.5, 6)
    shapes = scales[:, None, None] * np.einsum("bij,mj->bmi", rots, base) + 1.0
    mean = procrustes_mean(shapes, scale=True)
    assert centroid_size(mean) == pytest.approx(np.mean(centroid_size(shapes)))
    np.testing.assert_allclose(mean.mean(0), 0.0, atol=1e-12)
    residual = align_to(mean, base, scale=True) - base   # the base shape up to a similarity
    assert np.abs(residual).max() < 1e-9


def test_rigid_procrustes_mean_of_moved_copies_is_the_shape_itself():
    from scipy.spatial.transform import Rotation

    base = _points(12)
    rots = Rotation.random(5, random_state=6).as_matrix()
    shapes = np.einsum("bij,mj->bmi", rots, base) + np.arange(15.0).reshape(5, 1, 3)
    shapes[2] = np.nan                                    # ignored
    mean = procrustes_mean(shapes, scale=False)
    np.testing.assert_allclose(mean.mean(0), 0.0, atol=1e-12)
    assert centroid_size(mean) == pytest.approx(centroid_size(base))   # rigid: no rescaling
    residual = align_to(mean, base, scale=False) - base
    assert np.abs(residual).max() < 1e-9
    with pytest.raises(ValueError, match="at least one shape without NaN"):
        procrustes_mean(np.full((2, 4, 3), np.nan))


# --------------------------------------------------------------------------- Euler angles

@pytest.mark.parametrize("angles", [(30.0, 0.0, 0.0), (0.0, -20.0, 0.0), (0.0, 0.0, 45.0),
                                    (25.0, -15.0, 10.0), (-170.0, 80.0, 120.0)])
def test_euler_angles_of_hand_built_rotations(angles):
    a, b, c = angles
    rotation = ry(a) @ rx(b) @ rz(c)        # intrinsic Y, X', Z''
    np.testing.assert_allclose(euler_angles(rotation, order="YXZ"), angles, atol=1e-10)
    np.testing.assert_allclose(rotation_from_euler(angles, order="YXZ"), rotation, atol=1e-12)


def test_euler_angles_batched_radians_and_extrinsic_order():
    rotations = np.stack([rz(10) @ ry(20) @ rx(30), rz(-40) @ ry(5) @ rx(60)])
    # extrinsic x, then y, then z about the fixed axes is R = Rz @ Ry @ Rx
    np.testing.assert_allclose(euler_angles(rotations, order="xyz"), [[30, 20, 10], [60, 5, -40]], atol=1e-10)
    np.testing.assert_allclose(euler_angles(rotations[0], order="xyz", degrees=False),
                               np.radians([30, 20, 10]), atol=1e-12)
