
import numpy as np
import pytest

from conftest import ORL
from faceaudit.core.figures import montage
from faceaudit.core.images import read_grey, to_uint8
from faceaudit.faces.facedetect import make_detector
from faceaudit.faces.facemesh import N_LANDMARKS, FaceMesh, eye_contour_indices


def _astronaut():
    from skimage import data

    return data.astronaut()


@pytest.mark.parametrize("name", ["retinaface", "mediapipe"])
def test_detector_finds_one_face_with_keypoints_in_order(name):
    detector = make_detector(name)
    faces = detector.detect(_astronaut())
    confident = [f for f in faces if f.score > 0.9]
    assert len(confident) == 1
    face = confident[0]
    kp = face.keypoints
    assert kp.shape == (5, 2)
    assert kp[0, 0] < kp[1, 0]  # the eye on the image left comes first
    assert kp[2, 1] > kp[:2, 1].max()  # nose below the eyes
    x0, y0, x1, y1 = face.box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in kp)


def test_detector_finds_nothing_in_a_flat_image():
    assert make_detector("retinaface").detect(np.full((128, 128), 127, np.uint8)) == []


def test_unknown_detector_is_named():
    with pytest.raises(ValueError, match="unknown face detector 'haar'"):
        make_detector("haar")


def test_face_mesh_on_real_photos():
    with FaceMesh() as mesh:
        lm = mesh.detect(_astronaut())
        assert lm.shape == (N_LANDMARKS, 3)
        assert 0 < lm[:, 0].min() and lm[:, 0].max() < 1
        orl = to_uint8(read_grey(ORL / "s1" / "1.pgm"))
        up = np.kron(orl, np.ones((3, 3), np.uint8))  # ORL photos are 92x112
        assert mesh.detect(up) is not None
        assert mesh.detect(np.zeros((64, 64), np.uint8)) is None
    left, right = eye_contour_indices()
    assert len(left) == 16 and len(right) == 16


def test_montage_shape():
    sheet = montage([np.zeros((10, 20), np.uint8)] * 5, labels=list("abcde"), ncols=3, tile=32)
    assert sheet.shape == (2 * (32 + 14), 3 * 32, 3)


def test_orl_helpers_are_the_one_place_for_the_bundled_faces():
    """One orl_root for the model check and the cohort's face shapes; the loader reads the
    photos upscaled 3x through one face mesh, in the order given."""
    from faceaudit import models
    from faceaudit.demo import face_shapes
    from faceaudit.faces import orl

    assert models.orl_root is orl.orl_root and orl.orl_root() == ORL
    assert not hasattr(face_shapes, "_orl_root")
    people = orl.orl_people()
    assert [p.name for p in people[:3]] == ["s1", "s2", "s3"] and len(people) == 40
    assert [p.stem for p in orl.orl_photos(people[0])][:3] == ["1", "2", "3"]
    assert orl.orl_photo(2, 10) == ORL / "s2" / "10.pgm"
    paths = [orl.orl_photo(1, 1), orl.orl_photo(1, 2)]
    found = list(orl.mesh_landmarks(paths))
    assert [f[0] for f in found] == paths
    assert all(lm.shape == (N_LANDMARKS, 3) and (w, h) == (276, 336) for _, lm, w, h in found)


def test_one_alignment_and_one_session_helper_for_every_onnx_model():
    from faceaudit.faces import alignment, embedding, onnx_session, tfjs_recognizers

    assert embedding.norm_crop is alignment.norm_crop is tfjs_recognizers.norm_crop
    for module in (embedding, tfjs_recognizers):
        assert not hasattr(module, "_ort_cpu_session_options") and not hasattr(module, "_session")
    opts = onnx_session.cpu_session_options()
    assert opts.intra_op_num_threads == 1 and opts.log_severity_level == 3
