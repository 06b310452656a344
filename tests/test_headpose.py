from pathlib import Path

import numpy as np
import pytest

from faceaudit.core.geometry import umeyama
from faceaudit.mask import headpose as hp

ORL = Path(__file__).resolve().parents[1] / "src" / "faceaudit" / "data" / "orl_faces"


def _synthetic_landmarks(yaw, pitch, roll, *, seed=0, size=224):
    """(478, 3) normalised MediaPipe-style landmarks of a rotated face whose shape differs
    from the reference (3% noise), with the stable points placed, the rest random."""
    rng = np.random.default_rng(seed)
    shape = hp.REFERENCE_SHAPE + rng.normal(scale=0.03, size=hp.REFERENCE_SHAPE.shape)
    rot = hp.rotation_from_angles(yaw, pitch, roll)
    view = 60.0 * shape @ rot.T + [112.0, -112.0, 0.0]  # x right, y up, z to viewer (px)
    lm = rng.uniform(0.3, 0.7, size=(478, 3))
    lm[hp.STABLE_POINTS] = np.stack([view[:, 0] / size, -view[:, 1] / size, -view[:, 2] / size], 1)
    return lm


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (15, -10, 5), (-25, 12, -8), (30, 25, 20),
                                            (-5, -30, 0)])
def test_pose_of_rotated_synthetic_face_recovered_within_3_degrees(yaw, pitch, roll):
    pose = hp.estimate_pose(_synthetic_landmarks(yaw, pitch, roll), 224, 224)
    assert abs(pose.yaw - yaw) < 3 and abs(pose.pitch - pitch) < 3 and abs(pose.roll - roll) < 3
    assert pose.scale == pytest.approx(60.0, rel=0.05)


def test_sign_convention_in_image_terms():
    nose, left_eye, right_eye = (list(hp.STABLE_POINTS).index(i) for i in (1, 33, 263))
    front = _synthetic_landmarks(0, 0, 0)[hp.STABLE_POINTS]
    # yaw > 0: the face turns to the image right, so the nose tip moves right (x grows)
    assert _synthetic_landmarks(20, 0, 0)[hp.STABLE_POINTS][nose, 0] > front[nose, 0] + 0.02
    # pitch > 0: chin up, so the nose tip moves up (row shrinks)
    assert _synthetic_landmarks(0, 20, 0)[hp.STABLE_POINTS][nose, 1] < front[nose, 1] - 0.02
    # roll > 0: counter-clockwise, so the image-right eye corner rises above the left one
    tilted = _synthetic_landmarks(0, 0, 20)[hp.STABLE_POINTS]
    assert tilted[right_eye, 1] < tilted[left_eye, 1] - 0.02


def test_angles_round_trip_and_umeyama():
    for angles in [(10.0, -20.0, 30.0), (-40.0, 5.0, -15.0)]:
        assert np.allclose(hp.angles_from_rotation(hp.rotation_from_angles(*angles)), angles)
    rng = np.random.default_rng(1)
    src = rng.normal(size=(30, 3))
    rot = hp.rotation_from_angles(12, 34, -56)
    dst = 2.5 * src @ rot.T + [1, 2, 3]
    r, s, t = umeyama(src, dst)
    assert np.allclose(r, rot) and s == pytest.approx(2.5) and np.allclose(t, [1, 2, 3])


def test_bad_landmarks_are_refused():
    with pytest.raises(ValueError, match=r"expected \(N, 3\) landmarks"):
        hp.landmarks_to_viewer(np.zeros((478, 2)), 224, 224)
    lm = _synthetic_landmarks(0, 0, 0)
    lm[1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hp.estimate_pose(lm, 224, 224)


def _orl_landmarks(names):
    from faceaudit.core.images import read_grey, to_uint8
    from faceaudit.faces.facemesh import FaceMesh

    sets = []
    with FaceMesh() as mesh:
        for name in names:
            up = np.kron(to_uint8(read_grey(ORL / name)), np.ones((3, 3), np.uint8))
            sets.append((mesh.detect(up), up.shape[1], up.shape[0]))
    return sets


def test_reference_table_is_rederived_from_orl_and_frontal_photo_reads_frontal():
    sets = _orl_landmarks([f"s{i}/1.pgm" for i in range(1, 21)])
    ref = hp.derive_reference(sets)
    rot, s, t = umeyama(ref, hp.REFERENCE_SHAPE)
    # same shape (a subset of the photos) and the same frontal frame within a few degrees
    assert np.abs(s * ref @ rot.T + t - hp.REFERENCE_SHAPE).max() < 0.06
    assert np.all(np.abs(hp.angles_from_rotation(rot)) < 5)
    pose = hp.estimate_pose(*sets[0])  # s1/1 looks straight at the camera
    assert abs(pose.yaw) < 5 and abs(pose.pitch) < 5 and abs(pose.roll) < 5
