"""Does a stage-1 render show a usable face? A QA verdict per CT and PET render.

A render can be status ``ok`` and still show no face (a crop that missed it, a headrest in
front of it, a PET too noisy to read). The verdict is what the landmark stage would see:
MediaPipe's face mesh on the central ``RENDER_CROP`` (208) pixels of the render, framed as
the landmark stage frames it (petct.landmarks.Framing, upstream: as is), then a plausible
layout of the face found: eye centres above the nose tip above the mouth above the chin
(image rows grow downwards).

Verdicts: ``face`` (found, plausible), ``no_face`` (nothing found), ``implausible`` (found,
but the layout is not a face seen upright from the front), ``unchecked`` (the face mesh
could not run; logged). The face mesh is loaded once per process (landmarks' cache), so a
process pays the model's start-up once (0.8-1.0 s, nearly all of it importing MediaPipe,
which holds the GIL), then ~0.02 s per render. Stage 1 starts a checker process instead
(``start_checker``): MediaPipe is imported there, on another core, while the volumes are
read and meshed, and the renders are checked there by this same function. Without a
checker (or when it cannot run) the check runs in this process, behind one lock: the
MediaPipe graph is not thread-safe and stage 1 checks its CT and PET from two threads.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np

from faceaudit.core.contracts import RENDER_CROP
from faceaudit.core.images import to_uint8
from faceaudit.petct.landmarks import Framing, eye_centres, place_landmarks

log = logging.getLogger(__name__)

FACE, NO_FACE, IMPLAUSIBLE, UNCHECKED = "face", "no_face", "implausible", "unchecked"
#: MediaPipe face-mesh indices: nose tip, inner upper and lower lip, chin (menton)
NOSE_TIP, UPPER_LIP, LOWER_LIP, CHIN = 1, 13, 14, 152


def plausible_layout(landmarks: np.ndarray) -> bool:
    """Eyes above nose tip above mouth above chin, in a (478, 3) landmark set (y down)."""
    eyes_y = float(eye_centres(landmarks)[:, 1].mean())
    mouth_y = float(landmarks[[UPPER_LIP, LOWER_LIP], 1].mean())
    return bool(eyes_y < landmarks[NOSE_TIP, 1] < mouth_y < landmarks[CHIN, 1])


_FACE_MESH_LOCK = threading.Lock()


def _face_mesh():
    from faceaudit.petct.landmarks import _cached_mesh

    return _cached_mesh(0.5)


#: what the checker process runs (``python -c``)
CHECKER_CODE = "from faceaudit.petct.render_qa import serve_checks; serve_checks()"


class FaceChecker:
    """``render_face_qa`` in a child process that has imported MediaPipe on its own.

    Protocol on the child's stdin and stdout: height and width (two little-endian uint32),
    then the uint8 grey pixels; the answer is the verdict on one line. The child ends when
    its stdin closes, so it never outlives this process, however this one ends.
    """

    def __init__(self) -> None:
        import os
        from pathlib import Path

        # the child imports this very faceaudit, however this process found it
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHECKER_CODE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def verdict(self, image: np.ndarray) -> str:
        """The verdict of ``image`` (H, W) uint8; OSError or EOFError when the child is gone."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        request = np.array(image.shape[:2], "<u4").tobytes() + image.tobytes()
        with self._lock:
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise EOFError(f"the face-check process ended (exit code {self._proc.poll()})")
        return line.decode("ascii").strip()

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


_checker: FaceChecker | None = None
_checker_failed = False
_CHECKER_LOCK = threading.Lock()


def start_checker() -> None:
    """Start this process's checker (once; later calls return at once; never again after
    one failed: the checks then run in this process)."""
    global _checker
    with _CHECKER_LOCK:
        if _checker is None and not _checker_failed:
            import atexit

            _checker = FaceChecker()
            atexit.register(_checker.close)


def serve_checks(stdin=None, stdout=None) -> None:
    """The checker's loop (see FaceChecker): load the face mesh, then answer until stdin ends."""
    import os

    # the stage needs the first verdict only after its volumes are read and meshed: until
    # then its threads have the cores first, and MediaPipe's import fills the gaps
    try:
        os.nice(10)
    except OSError:
        pass
    from faceaudit.faces.facemesh import filter_stderr

    stdin = stdin or sys.stdin.buffer
    stop_filter = None
    if stdout is None:          # this process's own streams: it is the checker process
        # the answers keep the real stdout; anything a library prints goes to stderr instead
        stdout = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        # MediaPipe's first inference writes four lines of C++ logging to stderr, every run
        stop_filter = filter_stderr()
    try:
        with _FACE_MESH_LOCK:
            try:
                _face_mesh()
            except Exception:       # each check then says "unchecked" and logs why
                pass
        while True:
            size = stdin.read(8)
            if len(size) < 8:
                return
            height, width = (int(v) for v in np.frombuffer(size, "<u4"))
            pixels = stdin.read(height * width)
            if len(pixels) < height * width:
                return
            image = np.frombuffer(pixels, np.uint8).reshape(height, width)
            stdout.write(render_face_qa(image, in_process=True).encode("ascii") + b"\n")
            stdout.flush()
    finally:
        if stop_filter is not None:
            stop_filter()


def render_face_qa(image: np.ndarray, *, crop: int = RENDER_CROP, framing: Framing = Framing(),
                   mesh=None, in_process: bool = False) -> str:
    """The QA verdict of a render (H, W) uint8 grey: see the module docstring.

    mesh: anything with ``detect(image)``; default the process's cached MediaPipe face mesh,
    or the checker process when one was started (``start_checker``) and the crop and
    framing are the defaults it uses. A checker that has ended is not asked again: the
    check then runs here.
    """
    from faceaudit.core.images import center_crop

    global _checker, _checker_failed
    image = np.asarray(image)
    checker = _checker
    if checker is not None and mesh is None and not in_process and crop == RENDER_CROP \
            and framing == Framing() and image.dtype == np.uint8 and image.ndim == 2:
        try:
            return checker.verdict(image)
        except (OSError, EOFError, ValueError) as exc:
            log.warning("the face-check process failed (%s: %s); checking here", type(exc).__name__, exc)
            with _CHECKER_LOCK:
                _checker_failed = True
                if _checker is checker:
                    _checker = None
    if min(image.shape[:2]) > crop:
        image = center_crop(image, crop)
    try:
        with _FACE_MESH_LOCK:
            landmarks = place_landmarks(image, mesh if mesh is not None else _face_mesh(),
                                        framing=framing)
    except Exception as exc:  # a QA check never fails the render it checks
        log.warning("face QA could not run: %s: %s", type(exc).__name__, exc)
        return UNCHECKED
    if landmarks is None:
        return NO_FACE
    return FACE if plausible_layout(landmarks) else IMPLAUSIBLE


# --------------------------------------------------------------------------- the QA sheet's cells

def qa_labels(ids: list[str], *, width: int) -> list[str]:
    """Labels of at most ``width`` characters that tell every id of ``ids`` apart.

    An id that fits is shown whole (without the ``PETCT_`` prefix); a longer one as its
    head, "..", its tail, with the split chosen so that no two labels are equal (two
    studies of one patient share the head, so the tail or a longer head must differ).
    Ids that no split tells apart get their position appended.
    """
    names = [i.removeprefix("PETCT_") for i in ids]
    if all(len(n) <= width for n in names):
        return names

    def shorten(name: str, head: int) -> str:
        return name if len(name) <= width else f"{name[:head]}..{name[len(name) - (width - 2 - head):]}"

    room = width - 2
    for head in [8, *range(9, room), *range(7, 0, -1)]:
        if not 0 < head < room:
            continue
        labels = [shorten(n, head) for n in names]
        if len(set(labels)) == len(labels):
            return labels
    labels = [shorten(n, 8) for n in names]
    return [f"{label[: width - 4]}#{k}" for k, label in enumerate(labels)]


#: characters core.figures.montage prints under a cell
LABEL_CHARS = 26


def mark_no_face(image: np.ndarray, verdict: str) -> np.ndarray:
    """The grey render (uint8, or float in [0, 1]) as RGB with a red frame and the verdict
    written in red ("no_face", "implausible"): the QA sheet shows at a glance which renders
    the landmark stage will miss."""
    from PIL import Image, ImageDraw, ImageFont

    image = np.asarray(image)
    if image.dtype != np.uint8:                       # grey float [0, 1], as read_grey gives
        image = to_uint8(image)
    sheet = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(sheet)
    width = max(2, sheet.width // 32)
    draw.rectangle([0, 0, sheet.width - 1, sheet.height - 1], outline=(255, 0, 0), width=width)
    draw.text((2 * width, 2 * width), verdict.replace("_", " ").upper(), fill=(255, 0, 0),
              font=ImageFont.load_default(size=max(10, sheet.height // 10)))
    return np.asarray(sheet)
