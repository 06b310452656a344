"""Face QA of stage-1 renders: a verdict per CT and PET render (issue 10 point 6)."""

import numpy as np
import pytest

from faceaudit.core.contracts import RENDER_CROP
from faceaudit.petct.render_qa import (
    FACE,
    IMPLAUSIBLE,
    NO_FACE,
    UNCHECKED,
    plausible_layout,
    render_face_qa,
)


@pytest.fixture(scope="module")
def headsq_render(headsq_ct):
    from faceaudit.petct.render import render_frontal
    from faceaudit.petct.surface import extract_head_surface

    surface = extract_head_surface(headsq_ct.array, headsq_ct.spacing, modality="ct",
                                   origin=headsq_ct.origin)
    return render_frontal(surface.mesh).image


def test_a_real_face_render_is_a_face_and_its_upside_down_copy_or_a_blob_is_not(headsq_render):
    assert render_face_qa(headsq_render) == FACE
    # a face found upside down has the chin above the eyes: not a usable frontal render
    assert render_face_qa(headsq_render[::-1]) in (IMPLAUSIBLE, NO_FACE)
    yy, xx = np.mgrid[:512, :512]
    blob = (((yy - 256) / 100.0) ** 2 + ((xx - 256) / 80.0) ** 2 <= 1.0) * np.uint8(180)
    assert render_face_qa(blob) == NO_FACE
    assert render_face_qa(np.zeros((512, 512), np.uint8)) == NO_FACE


def test_layout_rule_orders_eyes_nose_mouth_chin(headsq_render):
    from faceaudit.core.images import center_crop
    from faceaudit.petct.landmarks import _cached_mesh

    landmarks = _cached_mesh(0.5).detect(center_crop(headsq_render, RENDER_CROP))
    assert plausible_layout(landmarks)
    flipped = landmarks.copy()
    flipped[:, 1] = 1.0 - flipped[:, 1]
    assert not plausible_layout(flipped)


def test_a_face_mesh_that_fails_gives_unchecked_not_an_error():
    class Broken:
        def detect(self, image):
            raise RuntimeError("graph crashed")

    assert render_face_qa(np.zeros((512, 512), np.uint8), mesh=Broken()) == UNCHECKED


def test_the_montage_frames_renders_without_a_face_in_red(tmp_path):
    from faceaudit.core.files import make_private_dir, write_png
    from faceaudit.petct.reconstruction import output_paths, qa_montage

    for modality in ("ct", "pet"):
        make_private_dir(tmp_path / output_paths(tmp_path, "a", modality)["png"].parent.name)
        for sid in ("a", "b"):
            write_png(output_paths(tmp_path, sid, modality)["png"], np.full((512, 512), 128, np.uint8))
    verdicts = {("a", "ct"): FACE, ("a", "pet"): NO_FACE, ("b", "ct"): FACE, ("b", "pet"): FACE}
    sheet = qa_montage(tmp_path, ["a", "b"], verdicts=verdicts).astype(int)
    red = (sheet[..., 0] > 200) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)
    # tiles are 160 px wide with a 14 px label row: PET of "a" is row 1, column 0
    assert red[174:334, :160].sum() > 500
    assert red[:174].sum() == 0 and red[174:334, 160:].sum() == 0
    np.testing.assert_allclose(sheet[174 + 120, 80], 128, atol=2)     # the render still shows
    unmarked = qa_montage(tmp_path, ["a", "b"]).astype(int)
    assert not ((unmarked[..., 0] > 200) & (unmarked[..., 1] < 60)).any()


@pytest.fixture
def fresh_checker(monkeypatch):
    """This process's checker state, reset before and after (stage-1 tests start one too)."""
    from faceaudit.petct import render_qa

    monkeypatch.setattr(render_qa, "_checker", None)
    monkeypatch.setattr(render_qa, "_checker_failed", False)
    yield render_qa
    if render_qa._checker is not None:
        render_qa._checker.close()


def test_the_checker_process_gives_the_verdicts_checked_here(headsq_render, fresh_checker):
    yy, xx = np.mgrid[:512, :512]
    blob = (((yy - 256) / 100.0) ** 2 + ((xx - 256) / 80.0) ** 2 <= 1.0) * np.uint8(180)
    images = [headsq_render, np.ascontiguousarray(headsq_render[::-1]), blob, np.zeros((512, 512), np.uint8)]
    here = [render_face_qa(image) for image in images]
    fresh_checker.start_checker()
    checker = fresh_checker._checker
    assert [checker.verdict(image) for image in images] == here        # asked directly
    assert [render_face_qa(image) for image in images] == here          # and through the default path
    assert here[0] == FACE


def test_a_killed_checker_process_leaves_the_checks_to_this_process(headsq_render, fresh_checker, caplog):
    """kill -9 of the checker: the next check warns, runs here with the same verdict, and no
    new checker is started for later studies."""
    import signal

    fresh_checker.start_checker()
    checker = fresh_checker._checker
    assert checker.verdict(headsq_render) == FACE
    checker._proc.send_signal(signal.SIGKILL)
    checker._proc.wait(timeout=10)
    with caplog.at_level("WARNING"):
        assert render_face_qa(headsq_render) == FACE
    assert "the face-check process failed" in caplog.text
    fresh_checker.start_checker()
    assert fresh_checker._checker is None and fresh_checker._checker_failed


def test_the_checker_process_keeps_mediapipe_chatter_off_stderr(headsq_render):
    """MediaPipe's first inference writes C++ log lines to stderr; the checker drops exactly
    those lines, and the verdict comes back as before."""
    import subprocess
    import sys

    image = np.ascontiguousarray(headsq_render, dtype=np.uint8)
    request = np.array(image.shape, "<u4").tobytes() + image.tobytes()
    from faceaudit.petct.render_qa import CHECKER_CODE

    done = subprocess.run([sys.executable, "-c", CHECKER_CODE], input=request, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().split() == [FACE]
    assert b"XNNPACK" not in done.stderr and b"inference_feedback_manager" not in done.stderr, done.stderr


def test_stderr_filter_drops_only_whole_matching_lines():
    """C-level writes to fd 2 included; a genuine line, one with a chatter line's words inside
    it and a last line without a newline all get through, in order."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from faceaudit.faces.facemesh import filter_stderr\n"
        "stop = filter_stderr()\n"
        "os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\nreal error 1\\n')\n"
        "os.write(2, b'W0000 00:00:1796104985.925035   30297 inference_feedback_manager.cc:114] Feedback '\n"
        "            b'manager requires a model with a single signature inference. Disabling support for '\n"
        "            b'feedback tensors.\\nWARNING: All log messages before absl::InitializeLog() is called '\n"
        "            b'are written to STDERR\\n')\n"
        "os.write(2, b'ERROR: the INFO: Created TensorFlow Lite XNNPACK delegate for CPU. failed\\n')\n"
        "import sys; print('python warning', file=sys.stderr, flush=True)\n"
        "os.write(2, b'no newline at the end')\n"
        "stop()\n"
        "os.write(2, b'|after stop\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode() == ("real error 1\n"
                                    "ERROR: the INFO: Created TensorFlow Lite XNNPACK delegate for CPU. failed\n"
                                    "python warning\nno newline at the end|after stop\n")
