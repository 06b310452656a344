"""Clinical hard cases of issue 10 for the SIMULATED cohort (generator options).

Each case alters one study (CT and PET share the anatomy and the pose):

``padding``
    CT voxels outside the reconstruction circle (the largest circle in the axial field)
    hold -3024 HU, as raw scanner DICOM stores them. PET unchanged.
``arms_up``
    Both arms raised beside the head, forearms bent over it, the hands above the head
    inside a field extended upwards by ``ARMS_UP_EXTRA_SLICES`` slices (CT and PET: the
    arms are soft tissue around a humerus/forearm bone).
``oblique``
    The study's grid is tilted by ``OBLIQUE_TILT_DEG`` about the left-right axis (a
    gantry tilt) and stored with those oblique direction cosines: the same physical head,
    sampled on a rotated grid.
``headrest``
    A U-shaped cradle (8 mm shell, 300 HU) under the back of the head whose side arms
    reach forward beside the cheeks, touching the occiput (CT only: no uptake in PET).

Geometry is in the base frame (LPS mm of the shipped head CT, before pose), so the arms
and the headrest follow the head's pose.
"""

from __future__ import annotations

import numpy as np

HARD_CASES = ("padding", "arms_up", "oblique", "headrest")
#: stage 1 handles every case (padding, head found below raised hands, oblique resampling,
#: cradle side plates cut), so the default demo exercises them all
DEFAULT_HARD_CASES = HARD_CASES
PADDING_HU = -3024
ARMS_UP_EXTRA_SLICES = 30
OBLIQUE_TILT_DEG = 10.0
HEADREST_HU = 300.0

#: (start, end, radius mm) of the right arm's capsules; the left arm mirrors x about 99 mm
_RIGHT_ARM = (((-6.0, 140.0, -55.0), (-46.0, 135.0, 170.0), 38.0),      # upper arm
              ((-46.0, 135.0, 170.0), (49.0, 125.0, 262.0), 30.0),      # forearm over the head
              ((49.0, 125.0, 262.0), (84.0, 125.0, 300.0), 18.0))       # hand above the head
_MID_X = 99.0


def parse_hard_cases(text: str) -> tuple[str, ...]:
    """'padding,arms_up' -> ('padding', 'arms_up'); '' or 'none' -> (); 'all' -> every case."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "all":
        return HARD_CASES
    cases = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [c for c in cases if c not in HARD_CASES]
    if unknown:
        raise ValueError(f"expected hard cases among {', '.join(HARD_CASES)}, found {', '.join(unknown)}")
    return cases


def assign_hard_cases(rng: np.random.Generator, n_studies: int, cases, fraction: float) -> list[list[str]]:
    """Per study, the list of its hard cases: each enabled case goes to round(fraction * n)
    studies (at least one), drawn independently per case."""
    per_study: list[list[str]] = [[] for _ in range(n_studies)]
    for case in cases:
        count = min(n_studies, max(1, round(fraction * n_studies)))
        for index in sorted(rng.choice(n_studies, size=count, replace=False)):
            per_study[int(index)].append(case)
    return per_study


def tilt_rotation(deg: float = OBLIQUE_TILT_DEG) -> np.ndarray:
    """Rotation about the left-right (x) axis, as a gantry tilt."""
    a = np.radians(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])


def _capsule(points: np.ndarray, start, end, radius: float) -> np.ndarray:
    """(n,) distance of each point to the segment start-end, minus the radius (< 0 inside)."""
    a, b = np.asarray(start), np.asarray(end)
    ab = b - a
    t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1) - radius


def arms_hu(points: np.ndarray) -> np.ndarray:
    """(n,) HU of raised arms at base-frame points (NaN outside the arms): 40 HU soft tissue,
    -90 HU under a 5 mm skin/fat rim, 400 HU bone along the axis (radius 10 mm)."""
    values = np.full(len(points), np.nan, dtype=np.float32)
    box_lo, box_hi = np.array([-60.0, 80.0, -100.0]), np.array([258.0, 190.0, 330.0])
    near = np.all((points > box_lo) & (points < box_hi), axis=1)
    p = points[near]
    mirrored = p.copy()
    mirrored[:, 0] = 2 * _MID_X - mirrored[:, 0]
    inside = np.full(len(p), np.inf)
    for start, end, radius in _RIGHT_ARM:
        inside = np.minimum(inside, np.minimum(_capsule(p, start, end, radius),
                                               _capsule(mirrored, start, end, radius)))
    hu = np.full(len(p), np.nan, dtype=np.float32)
    hu[inside <= 0] = 40.0
    hu[(inside <= 0) & (inside > -5.0)] = -90.0
    bone = np.full(len(p), np.inf)
    for start, end, radius in _RIGHT_ARM[:2]:
        bone = np.minimum(bone, np.minimum(_capsule(p, start, end, 10.0),
                                           _capsule(mirrored, start, end, 10.0)))
    hu[(inside <= 0) & (bone <= 0)] = 400.0
    values[near] = hu
    return values


def headrest_mask(points: np.ndarray) -> np.ndarray:
    """(n,) bool: the U-shaped cradle at base-frame points. Inner ellipse (x 33..165 mm,
    back at y 190 mm) touches the occiput; the sides reach forward to y = 60 mm (cheeks)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    radius = np.sqrt(((x - _MID_X) / 66.0) ** 2 + ((y - 120.0) / 70.0) ** 2)
    return (radius >= 1.0) & (radius <= 1.0 + 8.0 / 66.0) & (y >= 60.0) & (z >= 0.0) & (z <= 150.0)


def pad_outside_circle(ct: np.ndarray) -> np.ndarray:
    """CT (nx, ny, nz) int16 with PADDING_HU outside the largest axial circle of the field."""
    nx, ny, _nz = ct.shape
    i, j = np.ogrid[:nx, :ny]
    outside = ((i - (nx - 1) / 2.0) ** 2 + (j - (ny - 1) / 2.0) ** 2) > (min(nx, ny) / 2.0) ** 2
    padded = ct.copy()
    padded[outside, :] = PADDING_HU
    return padded
