"""Digital-mask backends behind one interface: ``build(prep_rgb, landmarks) -> MaskResult``.

``mediapipe``  the 478-point face mesh found on the prep image (the subject's own shape).
``meanshape``  the same topology with the identity replaced by a population mean
    shape, aligned to the detected landmarks by a similarity transform (rotation,
    scale, translation): only the pose is kept (the expression is the mean's). The
    default mean comes from the 400 ORL photos shipped with the package (40 people,
    see :func:`derive_mean_shape`); when masking those same people each contributes
    1/40 of it. A mean of another population can be given as ``meanshape.npz``
    (array ``mean_shape`` (478, 3)) in ``--model_dir``.
Both MediaPipe-topology meshes get a forehead band
(:func:`faceaudit.mask.renderer.add_forehead`) so the mask fills the face cut.
``flame``  a user-supplied FLAME model (:mod:`faceaudit.mask.flame`).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from faceaudit.core.contracts import N_FACE_LANDMARKS, N_LANDMARKS
from faceaudit.core.files import InputError
from faceaudit.core.geometry import procrustes_mean, umeyama
from faceaudit.mask.flame import FlameBackend, find_flame, load_flame
from faceaudit.mask.headpose import (
    REFERENCE_SHAPE,
    STABLE_POINTS,
    landmarks_to_viewer,
)
from faceaudit.mask.renderer import add_forehead
from faceaudit.mask.topology import (
    MaskResult,
    append_mouth_centre,
    face_triangles,
    flip_y,
    landmarks_to_image,
)

BACKENDS = ("mediapipe", "meanshape", "flame")


class MediaPipeBackend:
    """The detected 478-point mesh itself (the subject's own shape)."""

    name = "mediapipe"

    def build(self, prep_rgb: np.ndarray, landmarks: np.ndarray) -> MaskResult:
        h, w = prep_rgb.shape[:2]
        verts, faces = add_forehead(landmarks_to_image(landmarks, w, h), face_triangles())
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), {"n_vertices": len(verts)})


def derive_mean_shape(landmark_sets: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """Population mean face, (478, 3), in the head-pose reference frame (frontal, unit RMS).

    landmark_sets: (landmarks (478, 3) normalised, width, height) of many people.
    Generalised Procrustes mean over all 478 points, then rotated/scaled onto
    :data:`faceaudit.mask.headpose.REFERENCE_SHAPE` so it is frontal by the same convention.
    """
    shapes = [landmarks_to_viewer(lm, w, h) for lm, w, h in landmark_sets]
    mean = procrustes_mean(np.stack(shapes))
    rot, s, t = umeyama(mean[STABLE_POINTS], REFERENCE_SHAPE)
    return s * mean @ rot.T + t


@functools.lru_cache(maxsize=1)
def bundled_mean_shape() -> np.ndarray:
    """Mean shape of the 400 ORL photos shipped in ``faceaudit/data/orl_faces`` (3x upscaled
    for MediaPipe). About 3 s; cached per process."""
    from faceaudit.faces.orl import mesh_landmarks, orl_root

    root = orl_root()
    files = sorted(root.glob("s*/*.pgm"))       # lexicographic: the order the mean was fixed in
    if not files:
        raise InputError(f"no ORL photos under {root}; the package data is incomplete")
    sets = [(lm, w, h) for _, lm, w, h in mesh_landmarks(files) if lm is not None]
    return derive_mean_shape(sets)


class MeanShapeBackend:
    """A population mean face placed at the detected pose (similarity fit): identity removed."""

    name = "meanshape"

    def __init__(self, mean_shape: np.ndarray) -> None:
        mean_shape = np.asarray(mean_shape, dtype=np.float64)
        if mean_shape.shape != (N_LANDMARKS, 3):
            raise InputError(f"a mean shape must be ({N_LANDMARKS}, 3), got {mean_shape.shape}")
        self.mean_shape = mean_shape

    def build(self, prep_rgb: np.ndarray, landmarks: np.ndarray) -> MaskResult:
        h, w = prep_rgb.shape[:2]
        target = landmarks_to_viewer(landmarks, w, h)
        # fitted on the face points only: the 10 iris points follow the eyes' gaze, not the pose
        rot, s, t = umeyama(self.mean_shape[:N_FACE_LANDMARKS], target[:N_FACE_LANDMARKS])
        placed = s * self.mean_shape @ rot.T + t  # viewer frame: x, -row, depth
        verts = append_mouth_centre(flip_y(placed))
        verts, faces = add_forehead(verts, face_triangles())
        resid = np.sqrt(((placed[:N_FACE_LANDMARKS] - target[:N_FACE_LANDMARKS]) ** 2).sum(1).mean())
        return MaskResult(self.name, verts, faces, np.asarray(landmarks), {
            "rotation": rot.tolist(), "scale": float(s), "translation": t.tolist(),
            "rms_landmark_px": float(resid)})


def make_backend(name: str, *, model_dir: str | os.PathLike | None = None,
                 mean_shape: np.ndarray | None = None, device: str | None = None):
    """Backend by name: ``mediapipe`` | ``meanshape`` | ``flame`` (needs model_dir/flame_model.npz)."""
    if name == "mediapipe":
        return MediaPipeBackend()
    if name == "meanshape":
        return MeanShapeBackend(bundled_mean_shape() if mean_shape is None else mean_shape)
    if name == "flame":
        return FlameBackend(load_flame(find_flame(model_dir)), device=device)
    raise InputError(f"unknown masking backend {name!r}; expected one of {', '.join(BACKENDS)}")
