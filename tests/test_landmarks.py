"""Inter-ocular distance, MAD (478 and upstream 468 divisors), framing, placement."""

import subprocess
import sys

import numpy as np
import pytest

from faceaudit.faces.facemesh import eye_contour_indices
from faceaudit.petct.landmarks import (
    WELL_PLACED_MAD,
    Framing,
    eye_centres,
    inter_ocular_distance,
    landmark_mad,
    place_landmarks,
    place_landmarks_batch,
    well_placed,
)


def hand_made_face():
    """478 points; the two eye contours have known corners, the rest are arbitrary.

    Left eye (MediaPipe's FACEMESH_LEFT_EYE): corners (0.60, 0.40) and (0.70, 0.42)
    -> centre (0.65, 0.41). Right eye: corners (0.30, 0.40) and (0.40, 0.40) -> (0.35, 0.40).
    IOD = sqrt(0.30^2 + 0.01^2).
    """
    rng = np.random.default_rng(0)
    lm = np.column_stack([rng.uniform(0.2, 0.8, 478), rng.uniform(0.2, 0.8, 478), rng.normal(0, 0.02, 478)])
    left, right = eye_contour_indices()
    for idx, (x0, y0), (x1, y1) in ((left, (0.60, 0.40), (0.70, 0.42)), (right, (0.30, 0.40), (0.40, 0.40))):
        inner = rng.permutation(len(idx))
        # corners at shuffled positions; other contour points strictly between them in x, any y
        lm[idx, 0] = rng.uniform(x0 + 0.01, x1 - 0.01, len(idx))
        lm[idx, 1] = rng.uniform(0.3, 0.5, len(idx))
        lm[idx[inner[0]], :2] = (x0, y0)
        lm[idx[inner[1]], :2] = (x1, y1)
    return lm


def test_eye_centres_and_iod_on_a_hand_made_face():
    lm = hand_made_face()
    centres = eye_centres(lm)
    np.testing.assert_allclose(centres, [[0.65, 0.41], [0.35, 0.40]], atol=1e-12)
    assert inter_ocular_distance(lm) == pytest.approx(np.hypot(0.30, 0.01))


def test_mad_known_answer_478_and_upstream_468():
    ref = hand_made_face()
    placed = ref.copy()
    placed[:, 0] += 0.01  # every point 0.01 right and 0.02 up: L1 = 0.03 per point
    placed[:, 1] -= 0.02
    placed[:, 2] += 5.0  # z is ignored
    iod = np.hypot(0.30, 0.01)
    assert landmark_mad(ref, placed) == pytest.approx(100 * 0.03 / iod)
    assert landmark_mad(ref, placed, upstream=True) == pytest.approx(100 * 0.03 * 478 / (468 * iod))


def test_mad_batch_with_missing_rows_and_well_placed():
    ref = np.stack([hand_made_face()] * 3)
    placed = ref.copy()
    placed[0, :, 0] += 0.001
    placed[1, :, 0] += 0.1
    placed[2] = np.nan
    mad = landmark_mad(ref, placed)
    assert mad.shape == (3,)
    assert mad[0] < WELL_PLACED_MAD < mad[1]
    assert np.isnan(mad[2])
    np.testing.assert_array_equal(well_placed(mad), [True, False, False])


def test_mad_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        landmark_mad(np.zeros((478, 3)), np.zeros((468, 3)))


class BrightSpotDetector:
    """A stand-in face mesh: 478 copies of the brightest pixel's normalised position."""

    def detect(self, image):
        y, x = np.unravel_index(np.argmax(image), image.shape)
        h, w = image.shape
        return np.tile([(x + 0.5) / w, (y + 0.5) / h, 0.1], (478, 1))


@pytest.mark.parametrize("framing", [Framing(), Framing(pad=20), Framing(upscale=2.0),
                                     Framing(upscale=3.0, pad=0.25)])
def test_framing_maps_landmarks_back_to_the_original_image(framing):
    img = np.zeros((60, 80), np.float32)
    img[15, 50] = 1.0
    lm = place_landmarks(img, BrightSpotDetector(), framing=framing)
    # within one original pixel of the spot's centre (upscaling blurs the peak by < 1 px)
    assert abs(lm[0, 0] * 80 - 50.5) <= 1.0
    assert abs(lm[0, 1] * 60 - 15.5) <= 1.0


def test_framing_z_rescaled_like_x():
    f = Framing(pad=10)
    out = f.to_original(np.array([[0.5, 0.5, 0.1]]), (100, 100))
    assert out[0, 2] == pytest.approx(0.1 * 120 / 100)
    np.testing.assert_allclose(out[0, :2], [0.5, 0.5])


def astronaut_face():
    from skimage import color, data, transform

    g = color.rgb2gray(data.astronaut())[10:310, 80:380]
    return transform.resize(g, (208, 208), anti_aliasing=True).astype(np.float32)


def test_mediapipe_places_478_points_and_framing_agrees():
    face = astronaut_face()
    blank = np.zeros_like(face)
    lm, det = place_landmarks_batch([face, blank, face], framing=Framing())
    assert lm.shape == (3, 478, 3)
    np.testing.assert_array_equal(det, [True, False, True])
    assert np.isnan(lm[1]).all()
    assert 0.1 < inter_ocular_distance(lm[0]) < 0.6
    padded, det_p = place_landmarks_batch([face], framing=Framing(upscale=1.5, pad=0.2))
    assert det_p[0]
    # the same face framed differently: landmarks agree within a few % of the IOD
    assert landmark_mad(lm[0], padded[0]) < 10.0


@pytest.mark.parametrize("options", [{"upscale": 0}, {"upscale": -2.0}, {"pad": -1}, {"upscale": float("nan")}])
def test_framing_rejects_impossible_settings_when_built(options):
    with pytest.raises(ValueError, match="must be"):
        Framing(**options)


def test_mediapipe_import_leaves_drawing_and_tasks_until_used():
    # a fresh interpreter: this test process may already hold matplotlib
    code = (
        "import sys\n"
        "from faceaudit.faces.facemesh import mediapipe_solutions, _LazyModuleFinder\n"
        "before = list(sys.meta_path)\n"
        "solutions = mediapipe_solutions()\n"
        "assert sys.meta_path == before, 'finder left behind'\n"
        "assert not any(isinstance(f, _LazyModuleFinder) for f in sys.meta_path)\n"
        "print('matplotlib' in sys.modules, 'mediapipe.tasks.python.vision' in sys.modules)\n"
        "assert solutions.face_mesh.FaceMesh is not None\n"
        "import mediapipe as mp\n"
        "print(mp.solutions.drawing_utils.DrawingSpec.__name__, mp.tasks.vision.FaceLandmarker.__name__)\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "DrawingSpec", "FaceLandmarker", "True"]
