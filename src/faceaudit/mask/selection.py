"""Frontal-face selection for the digital-mask stage (upstream rules, numbers as options).

Input layouts (found per identity folder, both may be mixed):

* YouTube Faces ``frame_images_DB``: ``<Identity>/<video>/<video>.<frame>.jpg``;
* plain photos: ``<Identity>/<image>`` in any format Pillow reads (jpg, png, pgm, bmp, ...).

Per image (:func:`evaluate_image`):

0. Photos are read upright (their EXIF orientation applied, :mod:`faceaudit.core.images`).
1. Images whose shorter side is below ``min_side`` (224 px by default; ORL photos
   are 92x112) are upscaled by the smallest integer factor that reaches it (bicubic)
   before anything else, because MediaPipe's face mesh misses faces that small.
   Boxes are reported in the original image's pixels.
2. Face detection (RetinaFace by default, MediaPipe as option) on a copy whose long
   side is at most ``detect_size`` (640 px, as InsightFace runs this detector family;
   on large photos at full resolution RetinaFace fires on chests, backgrounds and eye
   fragments), boxes mapped back; the crop below is taken from the full-resolution
   image. A best face whose box side is below ``min_face_size`` (40 px) in the
   photo's own pixels is rejected as too small: upscaled, it would be masked from
   a few hundred pixels of real data. Accepted only if
   the best face has confidence > ``min_confidence`` (0.9) and no other face has
   confidence >= ``max_other_confidence`` (0.1), as upstream. MediaPipe runs its
   short-range model (faces within ~2 m: photos, video frames); its scores are not
   calibrated like RetinaFace's (on 100 ORL photos, 46% score > 0.9 against 0% for
   the full-range model and 100% for RetinaFace), so lower ``min_confidence`` with it.
3. Crop: the square box of side max(w, h) around the detection centre, with a
   margin of 1.5 x half the side on every side (2.5 x the box, as upstream), padded
   with black where it leaves the image (upstream clipped instead, which changes the
   aspect ratio), resized to 224 x 224: the *prep* image.
4. Head pose from MediaPipe's 478 landmarks on the prep image
   (:mod:`faceaudit.mask.headpose`): |yaw| < ``max_yaw`` and |pitch| < ``max_pitch``
   (20 degrees); |roll| < ``max_roll`` only when given (upstream read MAX_ROLL but
   never tested it).

Pairing (:func:`choose_pairs`), per identity with a generator seeded by (seed,
CRC-32 of the identity name), so adding identities never changes the others:

* ``same-video`` (upstream): one video with >= 2 accepted frames, two distinct frames
  of it; in the plain layout the identity's photos count as one video.
* ``across-video``: two different videos with >= 1 accepted frame, one frame of
  each; in the plain layout, two different photos.

The first image is the *database* image, the second the *query*.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import MASK_PREP_SIZE
from faceaudit.core.files import InputError
from faceaudit.core.images import read_rgb
from faceaudit.core.options import expect_choice, expect_number, expect_whole
from faceaudit.faces.facedetect import DETECT_SIZE, detect_downscaled

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".tif",
                              ".tiff", ".webp", ".gif"})
PROTOCOLS = ("same-video", "across-video")
DETECTORS = ("retinaface", "mediapipe")
ACCEPTED, REJECTED = "accepted", "rejected"
DATABASE, QUERY = "database", "query"


@dataclass(frozen=True)
class InputImage:
    """One photo or video frame of an identity."""

    identity: str
    video: str   # YouTube Faces video folder; "" for a plain photo
    name: str    # unique within the identity; the output file stem
    source: str  # path as found under the input folder

    @property
    def key(self) -> str:
        return f"{self.identity}/{self.name}"


@dataclass(frozen=True)
class SelectionOptions:
    """The selection rules (module docstring); validated on creation, so a value no run
    could use (a negative yaw limit) is an OptionsError naming the command-line flag."""

    detector: str = "retinaface"
    min_confidence: float = 0.9
    max_other_confidence: float = 0.1
    max_yaw: float = 20.0            # degrees
    max_pitch: float = 20.0          # degrees
    max_roll: float | None = None    # degrees; None: roll is not checked
    min_side: int = MASK_PREP_SIZE   # px: smaller images are upscaled by an integer factor
    crop_scale: float = 2.5
    size: int = MASK_PREP_SIZE       # px: side of the prep crop
    detect_size: int = DETECT_SIZE   # px: long side of the copy the detector sees
    min_face_size: float = 40.0      # px: shortest accepted face box side, in the photo

    def __post_init__(self) -> None:
        expect_choice("--detector", self.detector, DETECTORS)
        expect_number("--min_confidence", self.min_confidence, low=0, high=1, high_open=True)
        expect_number("--max_other_confidence", self.max_other_confidence, low=0, high=1, low_open=True)
        expect_number("--max_yaw", self.max_yaw, low=0, high=90, low_open=True)      # degrees
        expect_number("--max_pitch", self.max_pitch, low=0, high=90, low_open=True)
        if self.max_roll is not None:
            expect_number("--max_roll", self.max_roll, low=0, high=180, low_open=True)
        expect_whole("--min_side", self.min_side, 1)
        expect_number("--crop_scale", self.crop_scale, low=1)
        expect_whole("--size", self.size, 32)
        expect_whole("--detect_size", self.detect_size, 64)
        expect_number("--min_face_size", self.min_face_size, low=0)


@dataclass
class Decision:
    """What selection found for one image; ``prep`` only when a face was cropped."""

    status: str
    reason: str = ""
    n_faces: int = 0
    det_score: float = float("nan")
    other_score: float = float("nan")
    yaw: float = float("nan")
    pitch: float = float("nan")
    roll: float = float("nan")
    pose_residual: float = float("nan")
    upscale: int = 1
    image_w: int = 0
    image_h: int = 0
    box: tuple[float, float, float, float] | None = None  # original-image pixels
    prep: np.ndarray | None = None        # (size, size, 3) uint8

    def row(self) -> dict[str, Any]:
        box = self.box or (float("nan"),) * 4
        return {"status": self.status, "reason": self.reason, "n_faces": self.n_faces,
                "det_score": self.det_score, "other_score": self.other_score, "yaw": self.yaw,
                "pitch": self.pitch, "roll": self.roll, "pose_residual": self.pose_residual,
                "upscale": self.upscale, "image_w": self.image_w, "image_h": self.image_h,
                "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3]}


#: Rejection reasons start with one of these codes (then the numbers, in brackets).
REASON_CODES = ("unreadable", "no face", "face too small", "low confidence", "more than one face",
                "no landmarks", "yaw", "pitch", "roll", "error")


def reason_code(reason: str) -> str:
    """The code a rejection reason starts with (``other`` if none)."""
    return next((code for code in REASON_CODES if reason.startswith(code)), "other")


# --------------------------------------------------------------------------- discovery

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def discover_images(input_dir: str | Path) -> list[InputImage]:
    """Every photo or frame under ``input_dir`` (layouts in the module docstring), sorted."""
    root = Path(input_dir).resolve()  # absolute sources: later stages may run elsewhere
    if not root.is_dir():
        raise InputError(f"expected a folder of identity folders at {root}, found "
                         f"{'a file' if root.exists() else 'nothing'}")
    images: list[InputImage] = []
    for ident_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity = ident_dir.name
        used: set[str] = set()
        for entry in sorted(ident_dir.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                for frame in sorted(f for f in entry.iterdir() if _is_image(f)):
                    stem = frame.stem
                    name = stem if stem.startswith(f"{entry.name}.") else f"{entry.name}.{stem}"
                    name = _unique(name, frame, used)
                    images.append(InputImage(identity, entry.name, name, str(frame)))
            elif _is_image(entry):
                images.append(InputImage(identity, "", _unique(entry.stem, entry, used), str(entry)))
    if not images:
        raise InputError(f"no images under {root}; expected <Identity>/<video>/<frame>.jpg "
                         f"or <Identity>/<photo> with extensions {sorted(IMAGE_EXTENSIONS)}")
    return images


def _unique(name: str, path: Path, used: set[str]) -> str:
    if name in used:  # e.g. a.jpg and a.png side by side
        name = f"{name}_{path.suffix.lstrip('.').lower()}"
    used.add(name)
    return name


# --------------------------------------------------------------------------- per image

def upscale_factor(height: int, width: int, min_side: int) -> int:
    """Smallest integer factor bringing the shorter side to >= ``min_side`` (1 if already)."""
    short = min(height, width)
    return 1 if short >= min_side or short <= 0 else math.ceil(min_side / short)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    import cv2

    if factor == 1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (w * factor, h * factor), interpolation=cv2.INTER_CUBIC)


def crop_face(image: np.ndarray, box: tuple[float, float, float, float], *,
              scale: float = 2.5, size: int = MASK_PREP_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 crop of ``scale`` x the square face box, black-padded outside the image.

    box: (x0, y0, x1, y1) pixels of ``image``. The square has side max(w, h) and the same centre.
    """
    import cv2

    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * scale
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = round(cx - side / 2), round(cy - side / 2)
    n = max(round(side), 1)
    h, w = image.shape[:2]
    canvas = np.zeros((n, n, 3), dtype=np.uint8)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + n, w), min(top + n, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if n > size else cv2.INTER_CUBIC
    return cv2.resize(canvas, (size, size), interpolation=interp)


def evaluate_image(image: np.ndarray, detector, face_mesh, options: SelectionOptions) -> Decision:
    """Apply the selection rules to one RGB (or grey) uint8 image; order as in the module docstring.

    detector: object with ``detect(rgb) -> [Detection]`` (faceaudit.faces.facedetect) reporting
    every face >= max_other_confidence, in any order; face_mesh: faceaudit.faces.facemesh.FaceMesh.
    """
    from faceaudit.faces.facemesh import as_rgb_uint8
    from faceaudit.mask.headpose import estimate_pose

    image = as_rgb_uint8(image)
    h, w = image.shape[:2]
    factor = upscale_factor(h, w, options.min_side)
    work = upscale(image, factor)
    dec = Decision(status=REJECTED, upscale=factor, image_w=w, image_h=h)
    found = detect_downscaled(detector, work, max_side=options.detect_size)
    faces = sorted((d for d in found if d.score >= options.max_other_confidence),
                   key=lambda d: -d.score)  # the rules read faces[0] as the best face
    dec.n_faces = len(faces)
    if not faces:
        dec.reason = f"no face (no detection with confidence >= {options.max_other_confidence:g})"
        return dec
    best = faces[0]
    dec.det_score = float(best.score)
    dec.other_score = float(faces[1].score) if len(faces) > 1 else 0.0
    dec.box = tuple(float(v) / factor for v in best.box)
    side = max(dec.box[2] - dec.box[0], dec.box[3] - dec.box[1])
    if side < options.min_face_size:
        dec.reason = (f"face too small ({side:.0f} px box side in the photo < "
                      f"{options.min_face_size:g})")
        return dec
    if best.score <= options.min_confidence:
        dec.reason = f"low confidence ({best.score:.3f} <= {options.min_confidence:g})"
        return dec
    if len(faces) > 1:
        dec.reason = (f"more than one face (another at {dec.other_score:.3f} >= "
                      f"{options.max_other_confidence:g})")
        return dec
    prep = crop_face(work, best.box, scale=options.crop_scale, size=options.size)
    landmarks = face_mesh.detect(prep)
    if landmarks is None:
        dec.reason = "no landmarks (MediaPipe face mesh found no face on the crop)"
        return dec
    pose = estimate_pose(landmarks, options.size, options.size)
    dec.yaw, dec.pitch, dec.roll = pose.yaw, pose.pitch, pose.roll
    dec.pose_residual = pose.rms_residual
    dec.prep = prep
    if abs(pose.yaw) >= options.max_yaw:
        dec.reason = f"yaw {pose.yaw:.1f} (|yaw| >= {options.max_yaw:g})"
    elif abs(pose.pitch) >= options.max_pitch:
        dec.reason = f"pitch {pose.pitch:.1f} (|pitch| >= {options.max_pitch:g})"
    elif options.max_roll is not None and abs(pose.roll) >= options.max_roll:
        dec.reason = f"roll {pose.roll:.1f} (|roll| >= {options.max_roll:g})"
    else:
        dec.status = ACCEPTED
    return dec


def prep_from_row(row: dict[str, Any], options: SelectionOptions) -> np.ndarray:
    """Rebuild the prep crop of an accepted image from its selection row (source, box, upscale)."""
    image = read_rgb(row["source"])
    factor = int(row["upscale"])
    box = tuple(float(row[k]) * factor for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    return crop_face(upscale(image, factor), box, scale=options.crop_scale, size=options.size)


# per-process detector and face mesh (one of each per worker)
_TOOLS: dict[str, Any] = {}


def _tools(options: SelectionOptions):
    from faceaudit.faces.facedetect import make_detector
    from faceaudit.faces.facemesh import FaceMesh

    key = f"detector:{options.detector}:{options.max_other_confidence}"
    if key not in _TOOLS:
        extra = {"model_selection": 0} if options.detector == "mediapipe" else {}
        _TOOLS[key] = make_detector(options.detector, min_score=options.max_other_confidence, **extra)
    if "mesh" not in _TOOLS:
        _TOOLS["mesh"] = FaceMesh()
    return _TOOLS[key], _TOOLS["mesh"]


def select_one(image: InputImage, options: SelectionOptions) -> dict[str, Any]:
    """Selection row for one input image (module-level so ``--jobs`` can run it in workers)."""
    row = {"identity": image.identity, "video": image.video, "name": image.name,
           "source": image.source}
    try:
        rgb = read_rgb(image.source)
    except InputError as exc:
        row.update(Decision(status=REJECTED, reason=f"unreadable: {exc}").row())
        return row
    detector, mesh = _tools(options)
    row.update(evaluate_image(rgb, detector, mesh, options).row())
    return row


# --------------------------------------------------------------------------- pairing

def identity_rng(seed: int, identity: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(identity.encode("utf-8"))])


def choose_pairs(rows: list[dict[str, Any]], *, protocol: str, seed: int
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """Pick a database and a query image per identity among accepted rows.

    rows: selection rows (identity, video, name, status). Returns ({row key
    "<identity>/<name>": "database" | "query"}, {identity: why it has no pair}).
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    identities = sorted({r["identity"] for r in rows})
    for r in rows:
        if r["status"] != ACCEPTED:
            continue
        video = r["video"]
        if protocol == "across-video" and not video:
            video = f"photo:{r['name']}"  # plain layout: each photo is its own "video"
        groups[r["identity"]][video].append(r["name"])
    roles: dict[str, str] = {}
    unpaired: dict[str, str] = {}
    for identity in identities:
        rng = identity_rng(seed, identity)
        videos = {v: sorted(names) for v, names in groups.get(identity, {}).items()}
        if protocol == "same-video":
            eligible = sorted(v for v, names in videos.items() if len(names) >= 2)
            if not eligible:
                unpaired[identity] = "no video with 2 accepted frames"
                continue
            video = eligible[int(rng.integers(len(eligible)))]
            db, q = rng.choice(len(videos[video]), size=2, replace=False)
            picks = (videos[video][db], videos[video][q])
        else:
            eligible = sorted(videos)
            if len(eligible) < 2:
                unpaired[identity] = "fewer than 2 videos/photos with an accepted image"
                continue
            v_db, v_q = rng.choice(len(eligible), size=2, replace=False)
            picks = tuple(videos[eligible[v]][int(rng.integers(len(videos[eligible[v]])))]
                          for v in (v_db, v_q))
        roles[f"{identity}/{picks[0]}"] = DATABASE
        roles[f"{identity}/{picks[1]}"] = QUERY
    return roles, unpaired
