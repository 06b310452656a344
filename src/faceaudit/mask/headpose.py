"""Head pose (yaw, pitch, roll in degrees) from MediaPipe's 478 3D face landmarks.

Method: a similarity Procrustes fit (:func:`faceaudit.core.geometry.umeyama`) of a frontal
reference shape of 22 stable landmarks (eye corners, eyebrows, nose, mouth
corners, lips, chin, forehead, cheeks, jaw) to the detected landmarks, then a
Tait-Bryan decomposition of the fitted rotation (scipy's, through
:func:`faceaudit.core.geometry.euler_angles`).

Frames. Landmarks come normalised (x by the image width, y by the height, z on
roughly the x scale, negative towards the camera). They are converted to pixels
``(x*w, y*h, z*w)`` and then to a right-handed *viewer frame*: X to the image
right, Y up, Z towards the viewer. The reference is expressed in a *face frame*
with the same axes for a face that looks straight at the camera.

Convention (documented, tested): with ``R = Ry(yaw) @ Rx(-pitch) @ Rz(roll)``
mapping face-frame directions to viewer-frame directions,

* yaw > 0: the face turns towards the image right (the subject's left);
* pitch > 0: the face tilts up (chin up);
* roll > 0: the face rotates counter-clockwise in the image (as a viewer sees it).

Frontal (0, 0, 0) means: the bilateral axis (mean of the left-right landmark
pair vectors) is horizontal in the image plane, and the face is pitched like the
median of the frontal photo set the reference was derived from (the purely
geometric choice, chin (152) -> forehead top (10) in the image plane, reads the
ORL faces as looking down by a median 7.8 degrees because the forehead slopes
back, which would bias the |pitch| < 20 rule). The reference table
below was derived with :func:`derive_reference` from the 400 ORL photos shipped
with the package (generalised Procrustes mean, then put in that frame); the
test suite re-derives it from a subset and checks it agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceaudit.core.geometry import (
    euler_angles,
    procrustes_mean,
    rotation_from_euler,
    umeyama,
)

#: scipy's intrinsic y-x-z sequence: R = Ry(a) @ Rx(b) @ Rz(c), with b = -pitch.
EULER_ORDER = "YXZ"
#: MediaPipe indices of the stable points used for the pose fit.
STABLE_POINTS = np.array([10, 151, 9, 168, 6, 1, 2, 0, 17, 152,        # midline
                          33, 263, 133, 362, 105, 334, 61, 291, 234, 454, 172, 397])
#: Left/right pairs among them as (image-left, image-right) for a frontal face
#: (MediaPipe's 33 is the subject's right outer eye corner, seen on the image left).
MIRROR_PAIRS = ((33, 263), (133, 362), (105, 334), (61, 291), (234, 454), (172, 397))
MIDLINE_TOP, MIDLINE_BOTTOM = 10, 152

#: Frontal reference of STABLE_POINTS in the face frame (unit RMS radius, centred),
#: measured with derive_reference() on the bundled ORL faces (see module docstring).
REFERENCE_SHAPE = np.array([
    [-0.0005, 1.2088, 0.2816],
    [-0.0012, 0.9534, 0.3302],
    [-0.0009, 0.6731, 0.3640],
    [-0.0005, 0.4298, 0.3204],
    [0.0000, 0.3120, 0.3873],
    [0.0006, -0.2635, 0.6336],
    [-0.0008, -0.3562, 0.3643],
    [0.0040, -0.5992, 0.3367],
    [0.0025, -0.8832, 0.2254],
    [0.0018, -1.4293, -0.0809],
    [-0.7500, 0.3762, -0.0614],
    [0.7550, 0.3741, -0.0606],
    [-0.2941, 0.3555, 0.0294],
    [0.2945, 0.3544, 0.0304],
    [-0.6978, 0.7191, 0.2030],
    [0.6958, 0.7218, 0.2042],
    [-0.4518, -0.6772, -0.0192],
    [0.4533, -0.6753, -0.0192],
    [-1.1546, 0.0800, -0.9895],
    [1.1434, 0.0771, -0.9931],
    [-0.9252, -0.8762, -0.7422],
    [0.9266, -0.8754, -0.7447],
])


@dataclass(frozen=True)
class HeadPose:
    yaw: float    # degrees
    pitch: float  # degrees
    roll: float   # degrees
    rotation: np.ndarray  # (3, 3) face frame -> viewer frame
    scale: float          # pixels per reference unit
    translation: np.ndarray  # (3,) viewer-frame pixels
    rms_residual: float   # fit residual, in reference units (shape mismatch)


def landmarks_to_viewer(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 3) MediaPipe normalised landmarks -> (N, 3) viewer-frame pixels (X right, Y up, Z to viewer).

    Y and Z are negated image-pixel y and MediaPipe z, so the frame stays right-handed;
    X equals the image column and -Y the image row.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 3:
        raise ValueError(f"expected (N, 3) landmarks, got shape {lm.shape}")
    return np.stack([lm[:, 0] * width, -lm[:, 1] * height, -lm[:, 2] * width], axis=1)


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``Ry(yaw) @ Rx(-pitch) @ Rz(roll)``, angles in degrees (the convention above)."""
    return rotation_from_euler([yaw, -pitch, roll], order=EULER_ORDER)


def angles_from_rotation(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_angles`: (yaw, pitch, roll) in degrees."""
    yaw, minus_pitch, roll = euler_angles(rot, order=EULER_ORDER)
    return float(yaw), float(-minus_pitch), float(roll)


def face_frame(points: np.ndarray, indices: np.ndarray = STABLE_POINTS) -> np.ndarray:
    """(3, 3) rows = the face frame's X, Y, Z axes for a viewer-frame shape.

    ``points`` are the shape's rows for ``indices`` (MediaPipe ids). X: mean of the
    mirror-pair vectors; Y: chin -> forehead-top, orthogonalised against X; Z = X x Y.
    """
    pos = {int(i): k for k, i in enumerate(indices)}
    x = np.zeros(3)
    for left, right in MIRROR_PAIRS:
        v = points[pos[right]] - points[pos[left]]
        x += v / np.linalg.norm(v)
    x /= np.linalg.norm(x)
    y = points[pos[MIDLINE_TOP]] - points[pos[MIDLINE_BOTTOM]]
    y = y - (y @ x) * x
    y /= np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)])


def canonicalise(points: np.ndarray, indices: np.ndarray = STABLE_POINTS) -> np.ndarray:
    """Express a viewer-frame shape in its own face frame: centred, unit RMS radius."""
    points = np.asarray(points, dtype=np.float64)
    centred = points - points.mean(0)
    local = centred @ face_frame(points, indices).T
    return local / np.sqrt((local ** 2).sum(1).mean())


def derive_reference(landmark_sets: list[tuple[np.ndarray, int, int]],
                     indices: np.ndarray = STABLE_POINTS) -> np.ndarray:
    """Frontal reference of ``indices`` from (landmarks (478, 3) normalised, width, height) triples.

    Generalised Procrustes mean of the viewer-frame shapes, put in its own face frame.
    Used offline to produce ``REFERENCE_SHAPE``; kept so anyone can re-derive it.
    """
    shapes = [landmarks_to_viewer(lm, w, h)[indices] for lm, w, h in landmark_sets]
    geometric = canonicalise(procrustes_mean(np.stack(shapes)), indices)
    # The chin -> forehead-top line leans back on real faces (the forehead slopes), so
    # the geometric frame reads frontal photos as looking down by several degrees; zero
    # pitch is instead the median pitch of the (frontal) photo set the mean comes from.
    pitches = [estimate_pose(lm, w, h, reference=geometric, indices=indices).pitch
               for lm, w, h in landmark_sets]
    tilt = rotation_from_angles(0.0, -float(np.median(pitches)), 0.0)
    return geometric @ tilt


def estimate_pose(landmarks: np.ndarray, width: int, height: int, *,
                  reference: np.ndarray | None = None,
                  indices: np.ndarray = STABLE_POINTS) -> HeadPose:
    """Yaw, pitch, roll (degrees) of a face from its (478, 3) normalised MediaPipe landmarks.

    width, height: the pixel size of the image the landmarks were found on.
    """
    ref = REFERENCE_SHAPE if reference is None else np.asarray(reference, dtype=np.float64)
    pts = landmarks_to_viewer(landmarks, width, height)[indices]
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or inf; cannot estimate a pose")
    rot, scale, trans = umeyama(ref, pts)
    resid = pts - (scale * ref @ rot.T + trans)
    rms = float(np.sqrt((resid ** 2).sum(1).mean()) / scale)
    yaw, pitch, roll = angles_from_rotation(rot)
    return HeadPose(yaw, pitch, roll, rot, float(scale), trans, rms)

