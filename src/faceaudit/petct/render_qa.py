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
worker pays the model's start-up once (about 0.8 s, most of it importing MediaPipe), then
~0.02 s per render. Stage 1 loads it in the background while the volumes are read
(``load_face_mesh``), and checks its CT and PET renders from two threads: one lock keeps
the MediaPipe graph, which is not thread-safe, to one image at a time.
"""

from __future__ import annotations

import logging
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


def load_face_mesh() -> None:
    """Load the process's face mesh now (once; later calls return at once), so that the
    first render's check does not wait for it."""
    with _FACE_MESH_LOCK:
        _face_mesh()


def render_face_qa(image: np.ndarray, *, crop: int = RENDER_CROP, framing: Framing = Framing(),
                   mesh=None) -> str:
    """The QA verdict of a render (H, W) uint8 grey: see the module docstring.

    mesh: anything with ``detect(image)``; default the process's cached MediaPipe face mesh.
    """
    from faceaudit.core.images import center_crop

    image = np.asarray(image)
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
