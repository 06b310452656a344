"""Real face shapes for the SIMULATED cohort: 40 ORL people's MediaPipe meshes warp the base head.

Identity of a simulated patient = one ORL person's facial geometry (or a mix of two):

1. ``orl_identity_shapes``: for each of the 40 ORL people, MediaPipe's 478-point mesh on
   each of their 10 photos (upscaled 3x, as ``faceaudit.mask.backends`` does for the mean
   shape), in an LPS-oriented frame (x = image right = the person's left, y = depth away
   from the camera, z = up), each photo scaled to a common inter-ocular distance (IOD),
   then the person's Procrustes mean (rigid: the IOD fixes the size).
2. ``base_face_landmarks``: the same 478 points on the base head (one frontal render of
   the undeformed base CT through stage 1's surface and renderer; 2-D landmarks lifted
   to 3-D by the render's depth map), in LPS mm.
3. ``identity_deviations``: each person's shape minus the 40 people's mean, in mm (the
   IOD of the base head sets the scale), rotated into the base frame. A patient's face
   landmarks go to ``base + deviation``: the base head's own geometry is shared by all,
   what differs between patients is what differs between the ORL people.
4. ``FaceWarp``: a thin-plate-spline (``scipy.interpolate.RBFInterpolator``) backward
   displacement fitted at the moved landmarks, faded smoothly to zero 5-35 mm away from
   the face (so the skull and the back of the head stay), tabulated on a 3 mm grid.

Nothing runs at import time; the meshes and the base landmarks are cached per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

N_ORL_PEOPLE = 40
#: the face-mesh points the warp follows (the 10 iris points sit on the eyeball)
N_WARP_POINTS = 468
FADE_INNER_MM = 5.0
FADE_OUTER_MM = 35.0
FIELD_STEP_MM = 3.0
#: regularisation of the thin-plate fit (mm^2 scale): per-photo landmark jitter is not face shape
TPS_SMOOTHING = 10.0


def _eye_indices() -> tuple[np.ndarray, np.ndarray]:
    from faceaudit.faces.facemesh import eye_contour_indices

    return eye_contour_indices()


def inter_ocular_3d(points: np.ndarray) -> float:
    """Distance between the centroids of the two eye contours of a (478, 3) shape (its units)."""
    left, right = _eye_indices()
    return float(np.linalg.norm(points[left].mean(0) - points[right].mean(0)))


def _photo_to_lps(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """MediaPipe normalised (x right, y down, z towards the camera negative) -> pixels in an
    LPS-oriented frame: (x right, depth away from the camera, up)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[:, 0] * width, lm[:, 2] * width, -lm[:, 1] * height], axis=1)


@lru_cache(maxsize=1)
def orl_identity_shapes() -> tuple[np.ndarray, tuple[str, ...]]:
    """(40, 478, 3) per-person mean face meshes (LPS orientation, IOD = 1) and the ORL names.

    About 5 s (400 MediaPipe runs); cached per process; the array is read-only.
    """
    from faceaudit.core.files import InputError
    from faceaudit.core.geometry import procrustes_mean
    from faceaudit.faces.orl import mesh_landmarks, orl_people, orl_photos, orl_root

    people = orl_people()
    if len(people) != N_ORL_PEOPLE:
        raise InputError(f"expected {N_ORL_PEOPLE} ORL people at {orl_root()}, found {len(people)}")
    photos: dict[Path, list[np.ndarray]] = {person: [] for person in people}
    for path, lm, width, height in mesh_landmarks([f for p in people for f in orl_photos(p)]):
        if lm is not None:
            points = _photo_to_lps(lm, width, height)
            photos[path.parent].append(points / inter_ocular_3d(points))
    shapes = []
    for person in people:
        if not photos[person]:
            raise InputError(f"expected a face in the ORL photos of {person}, found none")
        shape = procrustes_mean(np.stack(photos[person]), scale=False)
        shapes.append(shape / inter_ocular_3d(shape))
    array = np.stack(shapes)
    array.flags.writeable = False
    return array, tuple(p.name for p in people)


def _lift_to_3d(landmarks: np.ndarray, render, crop_px: int) -> np.ndarray:
    """Normalised landmarks of the central ``crop_px`` crop of a frontal render -> LPS mm on
    the rendered surface (x, z from the orthographic camera, y from the depth map)."""
    from scipy.ndimage import map_coordinates

    camera = render.camera
    size, mpp = camera["size"], camera["mm_per_px_at_face"]
    corner = (size - crop_px) // 2
    col = landmarks[:, 0] * crop_px + corner          # continuous pixel coordinates
    row = landmarks[:, 1] * crop_px + corner
    centre_x, centre_z = camera["centre_xz_mm"]
    x = centre_x + (col - size / 2.0) * mpp
    z = centre_z - (row - size / 2.0) * mpp
    depth = np.where(render.hit, render.depth, np.nan)
    # nearest valid depth where a landmark falls between hit and missed pixels
    y_near = map_coordinates(np.nan_to_num(depth, nan=np.nanmax(depth)), [row - 0.5, col - 0.5],
                             order=1, mode="nearest")
    return np.stack([x, camera["image_plane_y_mm"] + y_near, z], axis=1)


@lru_cache(maxsize=1)
def base_face_landmarks() -> np.ndarray:
    """(478, 3) MediaPipe face-mesh points on the undeformed base head, LPS mm (read-only)."""
    from faceaudit.core.files import InputError
    from faceaudit.core.images import center_crop
    from faceaudit.demo.cohort import base_anatomy
    from faceaudit.faces.facemesh import FaceMesh
    from faceaudit.petct.reconstruction import reconstruct_volume

    base = base_anatomy()
    volume = np.ascontiguousarray(base.hu.transpose(2, 1, 0))          # (z, y, x) canonical
    result = reconstruct_volume(volume, (base.step,) * 3, modality="ct", origin=base.lo)
    crop_px = 208
    with FaceMesh() as mesh:
        landmarks = mesh.detect(center_crop(result.render.image, crop_px))
    if landmarks is None:
        raise InputError("expected a face on the render of the base head CT, found none")
    points = _lift_to_3d(landmarks, result.render, crop_px)
    points.flags.writeable = False
    return points


@lru_cache(maxsize=1)
def identity_deviations() -> np.ndarray:
    """(40, 478, 3) each ORL person's face minus the 40 people's mean, LPS mm of the base head
    (scale: the base head's IOD), read-only."""
    from faceaudit.core.geometry import align_to, procrustes_mean, umeyama

    shapes, _names = orl_identity_shapes()
    base = base_face_landmarks()
    mm_per_iod = inter_ocular_3d(base)
    aligned = align_to(shapes, procrustes_mean(shapes, scale=False), scale=False) * mm_per_iod
    mean = aligned.mean(axis=0)
    # rotate the population frame onto the base head's (rigid fit of the mean face to it)
    fit = umeyama(mean[:N_WARP_POINTS], base[:N_WARP_POINTS], scale=False)
    deviations = (aligned - mean) @ fit.rotation.T
    deviations.flags.writeable = False
    return deviations


def identity_deviation(orl: list[int], weights: list[float]) -> np.ndarray:
    """(478, 3) mm: the weighted sum of the given ORL people's deviations (0-based indices)."""
    deviations = identity_deviations()
    return sum(float(w) * deviations[int(i)] for i, w in zip(orl, weights))


@dataclass
class FaceWarp:
    """Backward displacement (base point = point + field(point)) tabulated on a grid.

    field: (3, nx, ny, nz) mm on the grid ``lo + index * step`` (LPS mm of the base frame).
    """

    field: np.ndarray
    lo: np.ndarray
    step: float

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) LPS mm -> (n, 3) mm backward displacement (0 outside the grid)."""
        from scipy.ndimage import map_coordinates

        coords = ((np.asarray(points) - self.lo) / self.step).T
        return np.stack([map_coordinates(c, coords, order=1, cval=0.0) for c in self.field], axis=1)


def fade(distance_mm: np.ndarray) -> np.ndarray:
    """1 within FADE_INNER_MM of the face landmarks, 0 beyond FADE_OUTER_MM, smooth between."""
    t = np.clip((FADE_OUTER_MM - distance_mm) / (FADE_OUTER_MM - FADE_INNER_MM), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def face_warp(deviation: np.ndarray) -> FaceWarp:
    """Thin-plate backward warp that moves the base face's landmarks by ``deviation`` (478, 3) mm."""
    from scipy.interpolate import RBFInterpolator
    from scipy.spatial import cKDTree

    source = np.asarray(base_face_landmarks()[:N_WARP_POINTS], dtype=np.float64)
    moved = source + np.asarray(deviation, dtype=np.float64)[:N_WARP_POINTS]
    # backward: at a moved landmark, the base point is the original one
    tps = RBFInterpolator(moved, source - moved, kernel="thin_plate_spline",
                          smoothing=TPS_SMOOTHING, degree=1)
    lo = np.floor(moved.min(0) - FADE_OUTER_MM) - FIELD_STEP_MM
    hi = np.ceil(moved.max(0) + FADE_OUTER_MM) + FIELD_STEP_MM
    axes = [np.arange(a, b + FIELD_STEP_MM, FIELD_STEP_MM) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    distance, _ = cKDTree(moved).query(grid)
    weight = fade(distance)
    values = np.zeros_like(grid)
    near = weight > 0
    values[near] = tps(grid[near]) * weight[near, None]
    shape = tuple(len(a) for a in axes)
    field = values.T.reshape((3,) + shape).astype(np.float32)
    return FaceWarp(field=field, lo=lo, step=FIELD_STEP_MM)
