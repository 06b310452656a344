import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceaudit.core.files import InputError
from faceaudit.mask import selection

ORL = Path(__file__).resolve().parents[1] / "src" / "faceaudit" / "data" / "orl_faces"
OPTIONS = selection.SelectionOptions()


def _orl(name):
    return np.asarray(Image.open(ORL / name))


def test_discovers_youtube_faces_and_plain_layouts(tmp_path):
    for rel in ["Alice/1/1.001.jpg", "Alice/1/1.002.jpg", "Alice/2/2.010.jpg", "Alice/2/frame3.png",
                "Bob/a.png", "Bob/a.pgm", "Bob/b.bmp", "Bob/notes.txt", "Bob/.hidden.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "loose.jpg").write_bytes(b"x")
    found = selection.discover_images(tmp_path)
    assert [(i.identity, i.video, i.name) for i in found] == [
        ("Alice", "1", "1.001"), ("Alice", "1", "1.002"), ("Alice", "2", "2.010"),
        ("Alice", "2", "2.frame3"), ("Bob", "", "a"), ("Bob", "", "a_png"), ("Bob", "", "b")]
    with pytest.raises(InputError, match="found nothing"):
        selection.discover_images(tmp_path / "missing")
    (tmp_path / "empty" / "Carol").mkdir(parents=True)
    with pytest.raises(InputError, match="no images under"):
        selection.discover_images(tmp_path / "empty")


def _rows(spec):
    return [{"identity": ident, "video": video, "name": name, "status": status}
            for ident, video, name, status in spec]


YTF = _rows([("A", "1", "1.1", "accepted"), ("A", "1", "1.2", "accepted"), ("A", "1", "1.3", "accepted"),
             ("A", "2", "2.1", "accepted"), ("A", "3", "3.1", "rejected"), ("A", "3", "3.2", "rejected"),
             ("B", "1", "1.1", "accepted"), ("B", "2", "2.1", "accepted")])


def test_same_video_pairs_two_frames_of_one_video():
    roles, unpaired = selection.choose_pairs(YTF, protocol="same-video", seed=0)
    a = {k: v for k, v in roles.items() if k.startswith("A/")}
    assert sorted(a.values()) == ["database", "query"]
    assert all(k.split("/")[1].startswith("1.") for k in a)  # video 1 is the only one with 2 frames
    assert unpaired == {"B": "no video with 2 accepted frames"}


def test_across_video_pairs_two_videos_and_is_seeded_per_identity():
    roles, unpaired = selection.choose_pairs(YTF, protocol="across-video", seed=0)
    for ident in "AB":
        picks = {k.split("/")[1].split(".")[0] for k in roles if k.startswith(f"{ident}/")}
        assert len(picks) == 2 and "3" not in picks
    assert unpaired == {}
    again, _ = selection.choose_pairs(YTF, protocol="across-video", seed=0)
    assert again == roles
    # another identity added: A's choice does not move
    more, _ = selection.choose_pairs(YTF + _rows([("C", "1", "1.1", "accepted")]),
                                     protocol="across-video", seed=0)
    assert {k: v for k, v in more.items() if k.startswith("A/")} == \
        {k: v for k, v in roles.items() if k.startswith("A/")}
    seeds = {tuple(sorted(selection.choose_pairs(YTF, protocol="across-video", seed=s)[0].items()))
             for s in range(12)}
    assert len(seeds) > 1
    with pytest.raises(InputError, match="unknown protocol"):
        selection.choose_pairs(YTF, protocol="random", seed=0)


def test_plain_photos_pair_under_both_protocols():
    rows = _rows([("P", "", "a", "accepted"), ("P", "", "b", "accepted"), ("P", "", "c", "rejected")])
    for protocol in selection.PROTOCOLS:
        roles, unpaired = selection.choose_pairs(rows, protocol=protocol, seed=1)
        assert sorted(roles) == ["P/a", "P/b"] and not unpaired


def test_crop_is_2_5x_the_square_box_and_black_padded():
    image = np.full((100, 100, 3), 200, np.uint8)
    prep = selection.crop_face(image, (0, 0, 40, 20), size=50)  # square side 40 -> crop 100
    assert prep.shape == (50, 50, 3)
    assert np.all(prep[:10, :10] == 0)  # above/left of the image: padding
    assert np.all(prep[35:, 35:] == 200)  # inside the image
    assert selection.upscale_factor(112, 92, 224) == 3 and selection.upscale_factor(300, 400, 224) == 1


@pytest.fixture(scope="module")
def tools():
    return selection._tools(OPTIONS)


def test_orl_face_is_accepted_with_its_numbers(tools):
    dec = selection.evaluate_image(_orl("s1/1.pgm"), *tools, OPTIONS)
    assert dec.status == "accepted", dec.reason
    assert dec.n_faces == 1 and dec.det_score > 0.9 and dec.upscale == 3
    assert abs(dec.yaw) < 10 and abs(dec.pitch) < 10
    assert dec.prep.shape == (224, 224, 3)
    x0, y0, x1, y1 = dec.box  # in the original 92x112 pixels
    assert 0 <= x0 < x1 <= 95 and 0 <= y0 < y1 <= 115


def test_pose_limits_reject_with_reason(tools):
    strict = selection.SelectionOptions(max_yaw=0.01)
    dec = selection.evaluate_image(_orl("s1/1.pgm"), *tools, strict)
    assert dec.status == "rejected" and dec.reason.startswith("yaw ")
    rolled = selection.SelectionOptions(max_roll=0.01)
    dec = selection.evaluate_image(_orl("s1/1.pgm"), *tools, rolled)
    assert dec.reason.startswith("roll ") and selection.reason_code(dec.reason) == "roll"


def test_no_face_two_faces_and_corrupt_file_give_clear_rows(tmp_path):
    grey = tmp_path / "flat.png"
    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(grey)
    pair = tmp_path / "pair.png"
    Image.fromarray(np.concatenate([_orl("s1/1.pgm"), _orl("s2/1.pgm")], axis=1)).save(pair)
    broken = tmp_path / "broken.jpg"
    shutil.copy(ORL / "s1" / "1.pgm", broken)
    data = broken.read_bytes()
    broken.write_bytes(b"\xff\xd8\xff\xe0" + data[:50])  # a truncated JPEG
    rows = {p.stem: selection.select_one(selection.InputImage("x", "", p.stem, str(p)), OPTIONS)
            for p in (grey, pair, broken)}
    assert rows["flat"]["status"] == "rejected" and rows["flat"]["reason"].startswith("no face")
    assert rows["pair"]["reason"].startswith("more than one face") and rows["pair"]["n_faces"] == 2
    assert rows["broken"]["reason"].startswith("unreadable: cannot read image")
    assert str(broken) in rows["broken"]["reason"]


def test_prep_is_rebuilt_identically_from_its_row(tools):
    image = selection.InputImage("s1", "", "1", str(ORL / "s1" / "1.pgm"))
    row = selection.select_one(image, OPTIONS)
    dec = selection.evaluate_image(_orl("s1/1.pgm"), *tools, OPTIONS)
    assert np.array_equal(selection.prep_from_row(row, OPTIONS), dec.prep)


def test_mediapipe_detector_option_selects_with_its_own_threshold():
    options = selection.SelectionOptions(detector="mediapipe", min_confidence=0.5)
    row = selection.select_one(selection.InputImage("s1", "", "1", str(ORL / "s1" / "1.pgm")), options)
    assert row["status"] == "accepted", row["reason"]
    assert 0.5 < row["det_score"] <= 1.0 and row["n_faces"] == 1


class _FixedDetector:
    """Reports the given detections in the given (not score) order."""

    def __init__(self, *scores):
        from faceaudit.faces.facedetect import Detection

        self.faces = [Detection((10.0 + 50 * i, 10.0, 50.0 + 50 * i, 60.0), s, np.zeros((5, 2)))
                      for i, s in enumerate(scores)]

    def detect(self, image):
        return list(self.faces)


class _NoMesh:
    def detect(self, image):
        return None


def test_rules_use_the_best_face_whatever_the_detector_order():
    image = np.zeros((300, 300, 3), np.uint8)
    dec = selection.evaluate_image(image, _FixedDetector(0.05, 0.95), _NoMesh(), OPTIONS)
    assert dec.n_faces == 1 and dec.det_score == 0.95 and dec.other_score == 0.0
    assert dec.reason.startswith("no landmarks")  # got past the detector rules
    dec = selection.evaluate_image(image, _FixedDetector(0.2, 0.97), _NoMesh(), OPTIONS)
    assert dec.det_score == 0.97 and dec.other_score == 0.2
    assert dec.reason.startswith("more than one face")
    # upstream: the best face must score *above* 0.9, another face is one at >= 0.1
    dec = selection.evaluate_image(image, _FixedDetector(0.9), _NoMesh(), OPTIONS)
    assert dec.reason.startswith("low confidence")
    dec = selection.evaluate_image(image, _FixedDetector(0.95, 0.1), _NoMesh(), OPTIONS)
    assert dec.reason.startswith("more than one face")


# --------------------------------------------------------------------------- photos as people have them

def _exif_rotated(path, upright: np.ndarray, orientation: int = 6) -> None:
    """Store ``upright`` as a phone does: pixels turned, plus the EXIF tag that turns them back
    (6: the viewer rotates the stored pixels 90 degrees clockwise)."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)


def test_every_reader_applies_the_exif_orientation(tmp_path):
    from faceaudit.core.images import read_grey, read_rgb

    upright = _orl("s1/1.pgm")
    _exif_rotated(tmp_path / "phone.jpg", upright)
    assert Image.open(tmp_path / "phone.jpg").size == (112, 92)  # stored on its side
    grey, rgb = read_grey(tmp_path / "phone.jpg"), read_rgb(tmp_path / "phone.jpg")
    assert grey.shape == (112, 92) and rgb.shape == (112, 92, 3)
    assert np.corrcoef(grey.ravel(), upright.ravel() / 255.0)[0, 1] > 0.98


def test_an_exif_rotated_face_is_selected_and_cropped_upright(tmp_path, tools):
    _exif_rotated(tmp_path / "phone.jpg", _orl("s1/1.pgm"))
    upright = selection.evaluate_image(_orl("s1/1.pgm"), *tools, OPTIONS)
    row = selection.select_one(selection.InputImage("s1", "", "phone", str(tmp_path / "phone.jpg")),
                               OPTIONS)
    assert row["status"] == "accepted", row["reason"]
    assert abs(row["roll"] - upright.roll) < 3 and abs(row["yaw"] - upright.yaw) < 3
    prep = selection.prep_from_row(row, OPTIONS)  # what the mask is built on
    assert np.corrcoef(prep[..., 0].ravel(), upright.prep[..., 0].ravel())[0, 1] > 0.95


def _large_photo(seed: int, size=(3000, 4000), face_width=900) -> np.ndarray:
    """A (H, W, 3) colour photo: blotches, shapes and noise, one ORL face pasted in, tinted."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    bg = cv2.resize(rng.uniform(0, 255, size=(h // 64, w // 64, 3)).astype(np.float32), (w, h),
                    interpolation=cv2.INTER_CUBIC)
    bg += cv2.resize(rng.uniform(-60, 60, size=(h // 8, w // 8, 3)).astype(np.float32), (w, h))
    bg += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    for _ in range(25):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.rectangle(bg, (x0, y0), (x0 + int(rng.integers(50, 900)), y0 + int(rng.integers(50, 900))),
                      colour, -1)
        cv2.circle(bg, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(20, 400)),
                   colour, -1)
    fh = face_width * 112 // 92
    face = cv2.resize(_orl("s1/1.pgm").astype(np.float32), (face_width, fh),
                      interpolation=cv2.INTER_CUBIC)
    x0, y0 = (w - face_width) // 2, (h - fh) // 3
    bg[y0:y0 + fh, x0:x0 + face_width] = face[:, :, None] * [1.0, 0.85, 0.72]
    return np.clip(bg, 0, 255).astype(np.uint8)


def test_a_large_photo_with_one_face_is_accepted(tools):
    photo = _large_photo(0)
    dec = selection.evaluate_image(photo, *tools, OPTIONS)
    assert dec.status == "accepted", dec.reason
    assert dec.n_faces == 1 and dec.upscale == 1 and (dec.image_w, dec.image_h) == (3000, 4000)
    x0, y0, x1, y1 = dec.box  # full-resolution pixels, inside the pasted face (1050..1950, 964..2071)
    assert 1000 < x0 < x1 < 2000 and 900 < y0 < y1 < 2120 and x1 - x0 > 400


def test_a_tiny_face_upscaled_is_rejected_as_too_small(tools):
    import cv2

    face = _orl("s1/1.pgm")[10:102, :]  # 92 x 92 around the face
    tiny = cv2.resize(face, (20, 20), interpolation=cv2.INTER_AREA)
    dec = selection.evaluate_image(tiny, *tools, OPTIONS)
    assert dec.upscale == 12 and dec.status == "rejected"
    assert dec.reason.startswith("face too small") and selection.reason_code(dec.reason) == "face too small"
    loose = selection.SelectionOptions(min_face_size=0)
    assert not selection.evaluate_image(tiny, *tools, loose).reason.startswith("face too small")


def test_detection_runs_on_a_bounded_copy_and_maps_boxes_back():
    from faceaudit.faces.facedetect import Detection, detect_downscaled

    class Recorder:
        def detect(self, image):
            self.shape = image.shape
            h, w = image.shape[:2]
            return [Detection((w / 4, h / 4, w / 2, h / 2), 0.99, np.array([[w / 3, h / 3]] * 5))]

    rec = Recorder()
    (det,) = detect_downscaled(rec, np.zeros((4000, 3000, 3), np.uint8), max_side=640)
    assert rec.shape == (640, 480, 3)
    assert np.allclose(det.box, (750, 1000, 1500, 2000)) and np.allclose(det.keypoints[0], (1000, 4000 / 3))
    detect_downscaled(rec, np.zeros((336, 276, 3), np.uint8))  # small photos as they are (ORL x3)
    assert rec.shape == (336, 276, 3)


def test_selection_options_refuse_nonsense():
    from faceaudit.core.runner import OptionsError

    for bad in ({"max_yaw": -1}, {"max_pitch": 0}, {"detect_size": 10}, {"min_face_size": -5},
                {"detector": "dlib"}, {"max_other_confidence": 0}):
        with pytest.raises(OptionsError, match=f"--{next(iter(bad))}"):
            selection.SelectionOptions(**bad)
