"""A seeded, SIMULATED AutoPET-like PET/CT cohort for the demo and the tests.

``python -m faceaudit.demo.cohort OUT --n 20 --seed 0`` writes

    OUT/PETCT_<patient>/<study>/CTres.nii.gz   CT in HU (int16) on the PET grid
    OUT/PETCT_<patient>/<study>/SUV.nii.gz     PET in SUV (float32)
    OUT/cohort.json                            the plan: every random parameter, per study
    OUT/README.md, OUT/SIMULATED.txt           what was simulated (SIMULATED.txt is written
                                               last: the done marker)

Nothing here is patient data. The anatomy is one real head CT (the VTK "headsq" CT shipped
in ``faceaudit/data/vtk_headsq_ct``, BSD-style notice kept there) extended and altered:

* base (built once): the head resampled to 2 mm, a skull cap added above the scan's top
  slice (its top slice shrunk as an ellipsoidal dome), a neck and the top of a torso
  (elliptic cross-sections) below it, an ellipsoidal brain inside the skull;
* identity (per patient): the facial geometry of one of the 40 real people of the bundled
  ORL photos (their MediaPipe face meshes), carried onto the base head's face by a
  thin-plate landmark warp faded into the skull (``faceaudit.demo.face_shapes``); beyond
  40 patients, a mix of two people's shapes. Plus a head scale (+-6 % per axis) and a
  body habitus scale of the neck/torso cross-section (0.9-1.12);
* sessions: some patients have a second study on another date; every study has its own
  pose (rotation of a few degrees about each axis) and position in the scanner (shift of
  a few mm), identical in its CT and PET;
* CT: 2.04 x 2.04 x 3 mm grid stored as in AutoPET files (anterior at high j, "LAS"),
  Gaussian noise 15 HU, a carbon-fibre-like scanner table 12 mm behind the back;
* PET: SUV from the same warped anatomy (soft tissue 0.9, fat 0.35, bone 0.6, brain 6-11,
  0-3 hot lesions in the neck/torso), 7 mm FWHM blur, Poisson counts noise, a 2 mm post
  filter (the reconstruction's Gaussian);
* the clinical hard cases (``--hard-cases``, see ``faceaudit.demo.hard_cases``), each in
  about a fifth of the studies by default: -3024 HU padding outside the reconstruction
  circle, arms up with the hands above the head, a 10 degree oblique acquisition stored
  with oblique direction cosines, a U-shaped headrest touching the head.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from faceaudit.core.cli import run_guarded
from faceaudit.core.files import (
    atomic_path,
    atomic_write_text,
    make_private_dir,
    write_json,
)
from faceaudit.demo import hard_cases as cases
from faceaudit.demo.face_shapes import N_ORL_PEOPLE

SIMULATED_NOTE = "SIMULATED faceaudit demo data, not a patient"
PET_GRID_MM = (2.04, 2.04, 3.0)          # (x, y, z) as in AutoPET
OUTPUT_SHAPE_XYZ = (192, 192, 100)       # 392 x 392 x 300 mm: head, neck, top of the torso
BASE_STEP_MM = 2.0
# base frame = LPS mm of the shipped head CT (x 0..205, y 0..205, z 0..139.5 for its voxels)
BASE_LO = np.array([-90.0, -40.0, -90.0])
BASE_HI = np.array([290.0, 240.0, 232.0])
HEAD_CENTRE = np.array([99.0, 105.0, 100.0])
NECK_CENTRE_XY = np.array([99.0, 135.0])
CAP_HEIGHT_MM = 80.0
OUTPUT_CENTRE_XY = (99.0, 110.0)
#: the head's top (about z 220 mm, up to 227 mm scaled) stays inside the field (top 240 mm)
OUTPUT_Z0 = -60.0
TABLE_GAP_MM = 12.0
TABLE_THICKNESS_MM = 8.0
MIX_WEIGHT_RANGE = (0.35, 0.65)
#: (lo, hi) mm per axis of the box in front of the mouth and chin holding the base's tube
TUBE_BOX_MM = ((66.0, 106.0), (14.0, 52.0), (-10.0, 44.0))


def _headsq_path() -> Path:
    return Path(str(resources.files("faceaudit") / "data" / "vtk_headsq_ct" / "headsq_quarter.nii.gz"))


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class BaseAnatomy:
    """Base head+neck+torso on a 2 mm grid: hu (nx, ny, nz) float32, brain (nx, ny, nz) float32 0/1."""

    hu: np.ndarray
    brain: np.ndarray
    lo: np.ndarray
    step: float


def _remove_tube(hu: np.ndarray) -> None:
    """Cut the headsq subject's endotracheal tube (a thin-walled ring in front of the chin,
    right of the midline, entering the mouth) off the base, in place: PET/CT patients are
    not intubated, and the tube between the lips made the face mesh's lips jump."""
    from scipy.ndimage import binary_opening

    box = tuple(slice(int((lo - BASE_LO[a]) / BASE_STEP_MM), int((hi - BASE_LO[a]) / BASE_STEP_MM))
                for a, (lo, hi) in enumerate(TUBE_BOX_MM))
    region = hu[box]
    body = region > -750.0              # partial-volume tube wall too (air is -1000 here)
    ball = np.add.outer(np.add.outer(*[np.arange(-3, 4) ** 2] * 2), np.arange(-3, 4) ** 2) <= 9
    thin = body & ~binary_opening(body, structure=ball)
    region[thin] = -1000.0


@lru_cache(maxsize=1)
def base_anatomy() -> BaseAnatomy:
    """Build the shared base anatomy (about a second; cached per process, arrays read-only)."""
    import SimpleITK as sitk
    from scipy.ndimage import map_coordinates

    image = sitk.ReadImage(str(_headsq_path()))
    raw = sitk.GetArrayFromImage(image).astype(np.float32)     # (z, y, x), LPS, identity direction
    head_hu = raw.transpose(2, 1, 0) - 1024.0                  # (x, y, z); raw units -> HU
    sx, sy, sz = image.GetSpacing()
    top_z = (head_hu.shape[2] - 1) * sz
    axes = [np.arange(lo, hi, BASE_STEP_MM) for lo, hi in zip(BASE_LO, BASE_HI)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    # head: resample the CT; above its top slice, the top slice shrunk as an ellipsoidal dome
    above = np.clip(gz - top_z, 0.0, None)
    shrink = np.sqrt(np.clip(1.0 - (above / CAP_HEIGHT_MM) ** 2, 1e-6, None))
    cx, cy = HEAD_CENTRE[0], HEAD_CENTRE[1]
    src_x = np.where(above > 0, cx + (gx - cx) / shrink, gx)
    src_y = np.where(above > 0, cy + (gy - cy) / shrink, gy)
    src_z = np.minimum(gz, top_z)
    coords = np.stack([src_x / sx, src_y / sy, src_z / sz])
    hu = map_coordinates(head_hu, coords, order=1, cval=-1000.0).astype(np.float32)
    hu[(above >= CAP_HEIGHT_MM) | (gz < 0)] = -1000.0
    # neck (elliptic cylinder) and the top of the torso (widening into the shoulders)
    shoulder = _smoothstep((-35.0 - gz) / 45.0)
    ax = 50.0 + (165.0 - 50.0) * shoulder
    ay = 52.0 + (92.0 - 52.0) * shoulder
    centre_y = 135.0 - 17.0 * shoulder
    inside = (((gx - 99.0) / ax) ** 2 + ((gy - centre_y) / ay) ** 2 <= 1.0) & (gz <= 20.0)
    spine = (((gx - 99.0) / 14.0) ** 2 + ((gy - (centre_y + ay - 35.0)) / 14.0) ** 2 <= 1.0)
    fat = inside & ((((gx - 99.0) / (ax - 8.0)) ** 2 + ((gy - centre_y) / (ay - 8.0)) ** 2) > 1.0)
    body_hu = np.where(spine, 400.0, np.where(fat, -90.0, 40.0))
    fill = inside & (hu < -200.0)
    hu[fill] = body_hu[fill]
    hu[inside & spine] = 400.0
    _remove_tube(hu)
    brain = ((((gx - 99.0) / 70.0) ** 2 + ((gy - 106.0) / 76.0) ** 2 + ((gz - 122.0) / 76.0) ** 2) <= 1.0)
    brain &= (hu > -60.0) & (hu < 150.0)
    base = BaseAnatomy(hu=hu, brain=brain.astype(np.float32), lo=BASE_LO.copy(), step=BASE_STEP_MM)
    # every caller shares the cached arrays: a write into one would alter all later patients
    for array in (base.hu, base.brain, base.lo):
        array.flags.writeable = False
    return base


# --------------------------------------------------------------------------- per patient / study

def assign_people(rng: np.random.Generator, n: int) -> list[tuple[list[int], list[float]]]:
    """ORL people (0-based) and weights of each of ``n`` patients: the first 40 patients are
    40 different people (shuffled); every further patient mixes two different people."""
    order = rng.permutation(N_ORL_PEOPLE)
    people: list[tuple[list[int], list[float]]] = [([int(i)], [1.0]) for i in order[:n]]
    while len(people) < n:
        a, b = (int(i) for i in rng.choice(N_ORL_PEOPLE, size=2, replace=False))
        w = round(float(rng.uniform(*MIX_WEIGHT_RANGE)), 3)
        people.append(([a, b], [w, round(1.0 - w, 3)]))
    return people


def draw_identity(rng: np.random.Generator, orl: list[int], weights: list[float]) -> dict:
    """One patient: whose face shape (ORL people, weights), head and body scale, brain uptake."""
    return {"orl": list(orl), "orl_people": [f"s{i + 1}" for i in orl], "weights": list(weights),
            "scale_xyz": rng.uniform(0.94, 1.06, 3).round(3).tolist(),
            "body_scale": round(float(rng.uniform(0.9, 1.12)), 3),
            "brain_suv": round(float(rng.uniform(6.0, 11.0)), 2)}


def draw_pose(rng: np.random.Generator) -> dict:
    """Pose of a study: degrees about x, y, z and its position in the scanner (shift, mm)."""
    return {"rotation_deg": np.clip(rng.normal(0.0, 2.0, 3), -5.0, 5.0).round(2).tolist(),
            "shift_mm": (np.clip(rng.normal(0.0, 1.0, 3), -2.5, 2.5) * [4.0, 4.0, 3.0]).round(2).tolist()}


def _rotation(deg_xyz) -> np.ndarray:
    ax, ay, az = np.radians(deg_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def output_grid_origin() -> np.ndarray:
    """LPS (x, y, z) mm of output voxel (i=0, j=0, k=0) in canonical (LPS) index order."""
    nx, ny, _nz = OUTPUT_SHAPE_XYZ
    return np.array([OUTPUT_CENTRE_XY[0] - nx * PET_GRID_MM[0] / 2.0,
                     OUTPUT_CENTRE_XY[1] - ny * PET_GRID_MM[1] / 2.0, OUTPUT_Z0])


@dataclass(frozen=True)
class StudyGrid:
    """Where a study's voxels are: canonical index (i, j, k) -> LPS mm
    ``origin + rotation @ (index * spacing)``; rotation is the identity unless oblique."""

    shape: tuple[int, int, int]
    origin: np.ndarray
    rotation: np.ndarray

    def points(self) -> np.ndarray:
        """(nx * ny * nz, 3) LPS mm of the voxel centres, i slowest."""
        axes = [np.arange(n) * s for n, s in zip(self.shape, PET_GRID_MM)]
        local = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        return self.origin + local @ self.rotation.T


def study_grid(hard_cases=()) -> StudyGrid:
    """The output grid of a study: taller for ``arms_up``, tilted about the field's centre
    (and stored with those direction cosines) for ``oblique``."""
    nx, ny, nz = OUTPUT_SHAPE_XYZ
    if "arms_up" in hard_cases:
        nz += cases.ARMS_UP_EXTRA_SLICES
    origin, rotation = output_grid_origin(), np.eye(3)
    if "oblique" in hard_cases:
        rotation = cases.tilt_rotation()
        centre = origin + (np.array([nx, ny, OUTPUT_SHAPE_XYZ[2]]) - 1) * PET_GRID_MM / 2.0
        origin = centre + rotation @ (origin - centre)
    return StudyGrid(shape=(nx, ny, nz), origin=origin, rotation=rotation)


@lru_cache(maxsize=8)
def _face_warp(orl: tuple[int, ...], weights: tuple[float, ...]):
    from faceaudit.demo.face_shapes import face_warp, identity_deviation

    return face_warp(identity_deviation(list(orl), list(weights)))


def to_base_frame(points: np.ndarray, identity: dict, pose: dict) -> np.ndarray:
    """Backward map of output LPS mm points to the base anatomy: undo the pose (rotation
    about the head centre, then the shift), the head scale, the body scale (below the
    chin, faded in over 50 mm) and the face warp."""
    rot = _rotation(pose["rotation_deg"])
    q = (points - HEAD_CENTRE - np.asarray(pose["shift_mm"])) @ rot + HEAD_CENTRE
    q = HEAD_CENTRE + (q - HEAD_CENTRE) / np.asarray(identity["scale_xyz"])
    body = 1.0 + (identity["body_scale"] - 1.0) * _smoothstep((10.0 - q[:, 2]) / 50.0)
    q[:, :2] = NECK_CENTRE_XY + (q[:, :2] - NECK_CENTRE_XY) / body[:, None]
    warp = _face_warp(tuple(identity["orl"]), tuple(float(w) for w in identity["weights"]))
    upper = warp.lo + (np.asarray(warp.field.shape[1:]) - 1) * warp.step
    near = np.all((q >= warp.lo) & (q <= upper), axis=1)
    q[near] += warp.displacement(q[near])
    return q


@dataclass
class StudyAnatomy:
    """A study's warped anatomy on its grid: hu, brain (nx, ny, nz) float32, world_y (LPS y mm
    of each voxel, for the table), headrest (bool, CT-only object) or None."""

    hu: np.ndarray
    brain: np.ndarray
    world_y: np.ndarray
    headrest: np.ndarray | None
    grid: StudyGrid


def warp_anatomy(identity: dict, pose: dict, hard_cases=()) -> StudyAnatomy:
    """Warp the base anatomy into a study's grid (``study_grid(hard_cases)``). Raised arms are
    part of the anatomy (CT and PET); the headrest and the padding are CT-only."""
    from scipy.ndimage import map_coordinates

    base = base_anatomy()
    grid = study_grid(hard_cases)
    points = grid.points()
    q = to_base_frame(points, identity, pose)
    coords = ((q - base.lo) / base.step).T
    hu = map_coordinates(base.hu, coords, order=1, cval=-1000.0).astype(np.float32)
    brain = map_coordinates(base.brain, coords, order=1, cval=0.0).astype(np.float32)
    if "arms_up" in hard_cases:
        arms = cases.arms_hu(q)
        inside = np.isfinite(arms) & (hu < -300.0)
        hu[inside] = arms[inside]
    headrest = cases.headrest_mask(q).reshape(grid.shape) if "headrest" in hard_cases else None
    return StudyAnatomy(hu=hu.reshape(grid.shape), brain=brain.reshape(grid.shape),
                        world_y=points[:, 1].reshape(grid.shape), headrest=headrest, grid=grid)


def simulate_ct(hu: np.ndarray, world_y: np.ndarray, rng: np.random.Generator, *,
                headrest: np.ndarray | None = None, padding: bool = False) -> np.ndarray:
    """CT (nx, ny, nz) int16 HU: anatomy + a thin table behind the back + 15 HU noise; a
    headrest mask (CT-only object, in air) and -3024 HU padding when asked."""
    body = hu > -300.0
    back_y = float(world_y[body].max())
    table = (world_y >= back_y + TABLE_GAP_MM) & (world_y < back_y + TABLE_GAP_MM + TABLE_THICKNESS_MM)
    ct = np.where(table, 250.0, hu)
    if headrest is not None:
        ct = np.where(headrest & ~body, cases.HEADREST_HU, ct)
    ct = ct + rng.normal(0.0, 15.0, ct.shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    return cases.pad_outside_circle(ct) if padding else ct


def simulate_pet(hu: np.ndarray, brain: np.ndarray, identity: dict,
                 rng: np.random.Generator) -> np.ndarray:
    """PET (nx, ny, nz) float32 SUV from the same warped anatomy (see module docstring)."""
    from scipy.ndimage import gaussian_filter

    suv = np.zeros(hu.shape, dtype=np.float32)
    suv[(hu > -300.0) & (hu <= -30.0)] = 0.35          # fat
    suv[(hu > -30.0) & (hu <= 250.0)] = 0.9            # soft tissue, skin
    suv[hu > 250.0] = 0.6                              # bone
    suv = np.maximum(suv, brain * identity["brain_suv"])
    # hot lesions in the neck / upper torso (tumour burden the adaptive threshold ignores)
    nx, ny, nz = hu.shape
    tissue = np.argwhere((hu[:, :, : nz // 3] > -30.0) & (hu[:, :, : nz // 3] < 250.0))
    for _ in range(int(rng.integers(0, 4))):
        centre = tissue[rng.integers(len(tissue))]
        radius_mm = rng.uniform(6.0, 14.0)
        grid = np.ogrid[:nx, :ny, :nz]
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, PET_GRID_MM))
        suv[d2 <= radius_mm ** 2] = rng.uniform(5.0, 15.0)
    fwhm_mm = 7.0
    sigma = [fwhm_mm / 2.355 / s for s in PET_GRID_MM]
    suv = gaussian_filter(suv, sigma)
    counts_per_suv = 100.0
    suv = rng.poisson(np.clip(suv, 0, None) * counts_per_suv).astype(np.float32) / counts_per_suv
    suv = gaussian_filter(suv, [2.0 / 2.355 / s for s in PET_GRID_MM])
    return suv.astype(np.float32)


def _write_nifti(path: Path, volume_xyz: np.ndarray, grid: StudyGrid) -> None:
    """Write an (nx, ny, nz) canonical-index array as AutoPET stores it: j runs anterior
    ("LAS"); an oblique grid keeps its direction cosines."""
    import SimpleITK as sitk

    flipped = volume_xyz[:, ::-1, :]                      # j now grows towards anterior
    image = sitk.GetImageFromArray(np.ascontiguousarray(flipped.transpose(2, 1, 0)))
    image.SetSpacing(PET_GRID_MM)
    direction = grid.rotation @ np.diag([1.0, -1.0, 1.0])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    ny = volume_xyz.shape[1]
    origin = grid.origin + grid.rotation @ np.array([0.0, (ny - 1) * PET_GRID_MM[1], 0.0])
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetMetaData("ITK_FileNotes", SIMULATED_NOTE)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _patient_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "PETCT_" + "".join(rng.choice(list("0123456789abcdef"), 10))
        if name not in names:
            names.append(name)
    return names


def _study_name(rng: np.random.Generator) -> str:
    year, month, day = int(rng.integers(2002, 2021)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return f"{month:02d}-{day:02d}-{year}-NA-PET-CT-{int(rng.integers(10000, 100000))}"


def _study_names(rng: np.random.Generator, n_studies: int) -> list[str]:
    """Distinct study names, in date order (the first session first)."""
    names: set[str] = set()
    while len(names) < n_studies:
        names.add(_study_name(rng))

    def date(name: str) -> tuple[str, str, str]:
        month, day, year = name.split("-")[:3]
        return year, month, day

    return sorted(names, key=lambda name: (date(name), name))


def plan_cohort(*, n: int = 20, seed: int = 0, second_study_fraction: float = 0.2,
                hard_cases=cases.DEFAULT_HARD_CASES, hard_case_fraction: float = 0.2) -> list[dict]:
    """Every random choice of a cohort, one dict per study (patient, study, id, session,
    n_sessions, identity, pose, noise_seed, hard_cases), without building any volume.
    Same arguments -> same plan."""
    if not 1 <= n:
        raise ValueError(f"expected n >= 1 patients, found {n}")
    rng = np.random.default_rng(seed)
    patients = _patient_names(rng, n)
    people = assign_people(rng, n)
    plan = []
    for patient, (orl, weights) in zip(patients, people):
        identity = draw_identity(rng, orl, weights)
        n_studies = 2 if rng.random() < second_study_fraction else 1
        for session, study in enumerate(_study_names(rng, n_studies), start=1):
            plan.append({"patient": patient, "study": study, "id": f"{patient}_{study}",
                         "session": session, "n_sessions": n_studies,
                         "identity": identity, "pose": draw_pose(rng),
                         "noise_seed": int(rng.integers(2**31))})
    # drawn last, so a plan with other cases keeps every other choice
    case_rng = np.random.default_rng([seed, 10])
    for entry, study_cases in zip(plan, cases.assign_hard_cases(case_rng, len(plan), hard_cases,
                                                                hard_case_fraction)):
        entry["hard_cases"] = study_cases
    return plan


def simulate_study(entry: dict) -> tuple[np.ndarray, np.ndarray, StudyGrid]:
    """CT (int16 HU) and PET (float32 SUV) of one planned study, and its grid."""
    study_rng = np.random.default_rng(entry["noise_seed"])
    anatomy = warp_anatomy(entry["identity"], entry["pose"], entry["hard_cases"])
    ct = simulate_ct(anatomy.hu, anatomy.world_y, study_rng, headrest=anatomy.headrest,
                     padding="padding" in entry["hard_cases"])
    pet = simulate_pet(anatomy.hu, anatomy.brain, entry["identity"], study_rng)
    return ct, pet, anatomy.grid


def generate_cohort(out_dir: str | os.PathLike, *, n: int = 20, seed: int = 0,
                    second_study_fraction: float = 0.2, hard_cases=cases.DEFAULT_HARD_CASES,
                    hard_case_fraction: float = 0.2, progress: bool = True) -> list[dict]:
    """Write ``n`` simulated patients (some with a 2nd study) in the AutoPET layout.

    Returns ``plan_cohort(...)``, which also goes to OUT/cohort.json. Same arguments ->
    identical files.
    """
    from tqdm.auto import tqdm

    out = make_private_dir(out_dir)
    # the done marker of an earlier cohort here must not vouch for a half-rewritten one
    (out / "SIMULATED.txt").unlink(missing_ok=True)
    plan = plan_cohort(n=n, seed=seed, second_study_fraction=second_study_fraction,
                       hard_cases=hard_cases, hard_case_fraction=hard_case_fraction)
    for entry in tqdm(plan, desc="simulate", disable=not progress, file=sys.stderr):
        ct, pet, grid = simulate_study(entry)
        folder = make_private_dir(out / entry["patient"] / entry["study"])
        _write_nifti(folder / "CTres.nii.gz", ct, grid)
        _write_nifti(folder / "SUV.nii.gz", pet, grid)
    write_json(out / "cohort.json", {
        "simulated": True, "note": SIMULATED_NOTE, "seed": seed, "n_patients": n,
        "n_studies": len(plan), "n_patients_two_sessions": sum(e["session"] == 2 for e in plan),
        "grid_mm_xyz": PET_GRID_MM, "shape_xyz": OUTPUT_SHAPE_XYZ,
        "base": "VTK headsq quarter CT (faceaudit/data/vtk_headsq_ct), deformed",
        "face_shapes": "MediaPipe face meshes of the 40 ORL people (faceaudit/data/orl_faces), "
                       "thin-plate warp of the base face (faceaudit.demo.face_shapes)",
        "hard_cases": list(hard_cases), "hard_case_fraction": hard_case_fraction, "studies": plan})
    text = _readme(n=n, seed=seed, plan=plan, hard_cases=hard_cases)
    atomic_write_text(out / "README.md", text)
    # written last: its presence means the cohort is complete
    atomic_write_text(out / "SIMULATED.txt", text)
    return plan


def _readme(*, n: int, seed: int, plan: list[dict], hard_cases) -> str:
    mixed = sum(len(e["identity"]["orl"]) > 1 for e in plan if e["session"] == 1)
    per_case = {c: [e["id"] for e in plan if c in e["hard_cases"]] for c in hard_cases}
    lines = [f"- {c}: {len(ids)} studies ({', '.join(ids)})" for c, ids in per_case.items()]
    return _README.format(
        n=n, n_studies=len(plan), seed=seed, note=SIMULATED_NOTE,
        n_people=min(n, N_ORL_PEOPLE), mixed=mixed,
        two_sessions=sum(e["session"] == 2 for e in plan),
        cases="\n".join(lines) if lines else "- none")


_README = """# SIMULATED PET/CT cohort (faceaudit demo data)

Every volume in this folder is SIMULATED: no patient data. {n} simulated patients,
{n_studies} studies, seed {seed}, written by `python -m faceaudit.demo.cohort`.

The faces are simulated from 40 real face shapes: the MediaPipe face meshes of the 40
people of the ORL / AT&T Database of Faces (Olivetti Research Laboratory; credit and
citation in faceaudit/data/orl_faces/LICENSE_NOTE.md). Each patient's face carries one
person's facial geometry ({n_people} people used; {mixed} patients mix two people's
shapes), warped onto one real head CT (the VTK "headsq" example data, BSD-style notice in
faceaudit/data/vtk_headsq_ct/LICENSE_VTKData_Copyright.txt) that every patient shares
otherwise, with a head and body scale. The result is a face shape, not a photograph or a
person: skin, eyes, hair and texture are not simulated.

{two_sessions} patients have a second study (session) on another date with another pose
and position in the scanner; a study's CT (HU, with a neck, torso and scanner table) and
PET (SUV: 7 mm FWHM blur, Poisson noise, brain uptake) share its pose.

Clinical hard cases (issue 10):
{cases}

Each NIfTI's description field says "{note}". cohort.json lists every random parameter.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a SIMULATED AutoPET-layout PET/CT cohort.")
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=20,
                        help="number of simulated patients (up to 40 distinct ORL face shapes; "
                             "beyond, mixes of two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-study-fraction", type=float, default=0.2)
    parser.add_argument("--hard-cases", default=",".join(cases.DEFAULT_HARD_CASES),
                        help=f"comma-separated among {', '.join(cases.HARD_CASES)}, 'all' or "
                             f"'none' (default: %(default)s)")
    parser.add_argument("--hard-case-fraction", type=float, default=0.2,
                        help="share of the studies given each enabled hard case (at least one)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        hard = cases.parse_hard_cases(args.hard_cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.n < 1 or not 0.0 <= args.hard_case_fraction <= 1.0:
        parser.error(f"expected --n >= 1 and --hard-case-fraction in [0, 1], found {args.n}, "
                     f"{args.hard_case_fraction}")
    started = time.time()

    def generate() -> int:
        plan = generate_cohort(args.out_dir, n=args.n, seed=args.seed,
                               second_study_fraction=args.second_study_fraction, hard_cases=hard,
                               hard_case_fraction=args.hard_case_fraction, progress=not args.quiet)
        print(f"wrote {len(plan)} simulated studies of {args.n} patients to {args.out_dir} "
              f"in {time.time() - started:.1f} s")
        return 0

    # a crash is exit 3 (not 1, "some items failed"), so the demo stops instead of going on
    return run_guarded(generate)


if __name__ == "__main__":
    sys.exit(main())
