"""A seeded, SIMULATED AutoPET-like PET/CT cohort for the demo and the tests.

``python -m faceaudit.demo.cohort OUT --n 20 --seed 0`` writes

    OUT/PETCT_<patient>/<study>/CTres.nii.gz   CT in HU (int16) on the PET grid
    OUT/PETCT_<patient>/<study>/SUV.nii.gz     PET in SUV (float32)
    OUT/cohort.json, OUT/SIMULATED.txt         what was simulated (every random parameter);
                                               SIMULATED.txt is written last (done marker)

Nothing here is patient data. The anatomy is one real head CT (the VTK "headsq" CT shipped
in ``faceaudit/data/vtk_headsq_ct``, BSD-style notice kept there) extended and altered:

* base (built once): the head resampled to 2 mm, a skull cap added above the scan's top
  slice (its top slice shrunk as an ellipsoidal dome), a neck and the top of a torso
  (elliptic cross-sections) below it, an ellipsoidal brain inside the skull;
* identity (per patient): smooth Gaussian displacement bumps centred on the nose, chin,
  lips, brow and on mirrored pairs of eyes, cheeks, mouth corners and jaw angles (random
  direction and size, up to 4-8 mm) and a global anisotropic head scale (+-6 %), so
  faces really differ;
* pose (per study): rotation of a few degrees about each axis and a shift of a few mm,
  identical in the CT and the PET of a study, different between studies;
* CT: 2.04 x 2.04 x 3 mm grid stored as in AutoPET files (anterior at high j, "LAS"),
  Gaussian noise 15 HU, a carbon-fibre-like scanner table 12 mm behind the back;
* PET: SUV from the same warped anatomy (soft tissue 0.9, fat 0.35, bone 0.6, brain 6-11,
  0-3 hot lesions in the neck/torso), 7 mm FWHM blur, Poisson counts noise, a 2 mm post
  filter (the reconstruction's Gaussian).
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

from faceaudit.core.files import atomic_path, atomic_write_text, make_private_dir, write_json

SIMULATED_NOTE = "SIMULATED faceaudit demo data, not a patient"
PET_GRID_MM = (2.04, 2.04, 3.0)          # (x, y, z) as in AutoPET
OUTPUT_SHAPE_XYZ = (192, 192, 100)       # 392 x 392 x 300 mm: head, neck, top of the torso
BASE_STEP_MM = 2.0
# base frame = LPS mm of the shipped head CT (x 0..205, y 0..205, z 0..139.5 for its voxels)
BASE_LO = np.array([-90.0, -40.0, -90.0])
BASE_HI = np.array([290.0, 240.0, 232.0])
HEAD_CENTRE = np.array([99.0, 105.0, 100.0])
CAP_HEIGHT_MM = 80.0
OUTPUT_CENTRE_XY = (99.0, 110.0)
OUTPUT_Z0 = -75.0
TABLE_GAP_MM = 12.0
TABLE_THICKNESS_MM = 8.0

#: Face features of the base head (LPS mm), found on a frontal render of the shipped CT:
#: name -> (centre, Gaussian radius mm, max displacement per axis mm (x, y, z)).
#: In-plane (x, z) amplitudes matter most: they move the 2-D landmarks a frontal render
#: shows (depth, y, mostly shades). Every displacement stays below 1.6 x the radius, so
#: the warp stays one-to-one.
FACE_FEATURES = {
    "nose": ((99.0, 18.0, 69.0), 13.0, (2.5, 6.0, 5.0)),
    "chin": ((99.0, 52.0, 8.0), 17.0, (2.5, 6.0, 8.0)),
    "lips": ((99.0, 42.0, 40.0), 11.0, (1.5, 3.5, 4.0)),
    "brow": ((99.0, 18.0, 118.0), 20.0, (1.5, 4.0, 5.0)),
    "cheek_right": ((57.0, 44.0, 65.0), 18.0, (6.0, 4.0, 4.0)),
    "cheek_left": ((141.0, 46.0, 65.0), 18.0, (6.0, 4.0, 4.0)),
    "eye_right": ((73.0, 30.0, 106.0), 11.0, (4.0, 3.0, 4.0)),
    "eye_left": ((126.0, 32.0, 106.0), 11.0, (4.0, 3.0, 4.0)),
    "mouth_right": ((84.0, 44.0, 40.0), 9.0, (4.0, 2.0, 3.0)),
    "mouth_left": ((114.0, 44.0, 40.0), 9.0, (4.0, 2.0, 3.0)),
    "jaw_right": ((62.0, 80.0, 25.0), 20.0, (6.0, 3.0, 4.0)),
    "jaw_left": ((136.0, 80.0, 25.0), 20.0, (6.0, 3.0, 4.0)),
}
#: Left/right features move as mirror images (wider or narrower face), up to 15 % asymmetry.
SYMMETRIC_PAIRS = (("cheek_right", "cheek_left"), ("eye_right", "eye_left"),
                   ("mouth_right", "mouth_left"), ("jaw_right", "jaw_left"))


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
    brain = ((((gx - 99.0) / 70.0) ** 2 + ((gy - 106.0) / 76.0) ** 2 + ((gz - 122.0) / 76.0) ** 2) <= 1.0)
    brain &= (hu > -60.0) & (hu < 150.0)
    base = BaseAnatomy(hu=hu, brain=brain.astype(np.float32), lo=BASE_LO.copy(), step=BASE_STEP_MM)
    # every caller shares the cached arrays: a write into one would alter all later patients
    for array in (base.hu, base.brain, base.lo):
        array.flags.writeable = False
    return base


# --------------------------------------------------------------------------- per patient / study

def draw_identity(rng: np.random.Generator) -> dict:
    """Random facial geometry of one patient: per-feature displacement (mm) and head scale."""
    features = {}
    for name, (_centre, _radius, amplitude) in FACE_FEATURES.items():
        features[name] = rng.uniform(-1.0, 1.0, 3) * np.asarray(amplitude)
    for right, left in SYMMETRIC_PAIRS:
        amplitude = np.asarray(FACE_FEATURES[left][2])
        shared = features[left]
        features[right] = shared * np.array([-1.0, 1.0, 1.0]) + rng.uniform(-0.15, 0.15, 3) * amplitude
    return {"features": {k: v.round(2).tolist() for k, v in features.items()},
            "scale_xyz": rng.uniform(0.94, 1.06, 3).round(3).tolist(),
            "brain_suv": round(float(rng.uniform(6.0, 11.0)), 2)}


def draw_pose(rng: np.random.Generator) -> dict:
    """Small rigid pose change of a study: degrees about x, y, z and a shift in mm."""
    return {"rotation_deg": np.clip(rng.normal(0.0, 2.0, 3), -5.0, 5.0).round(2).tolist(),
            "shift_mm": np.clip(rng.normal(0.0, 3.0, 3), -8.0, 8.0).round(2).tolist()}


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


def warp_anatomy(identity: dict, pose: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp the base anatomy into the output grid. Returns hu, brain (nx, ny, nz) float32 and
    the output world coordinates' y (for the table)."""
    from scipy.ndimage import map_coordinates

    base = base_anatomy()
    origin = output_grid_origin()
    axes = [origin[i] + np.arange(OUTPUT_SHAPE_XYZ[i]) * PET_GRID_MM[i] for i in range(3)]
    px, py, pz = np.meshgrid(*axes, indexing="ij")
    points = np.stack([px, py, pz], -1).reshape(-1, 3)
    rot = _rotation(pose["rotation_deg"])
    # output -> base: undo the pose (rotation about the head centre, then the shift)
    q = (points - HEAD_CENTRE - np.asarray(pose["shift_mm"])) @ rot + HEAD_CENTRE
    q = HEAD_CENTRE + (q - HEAD_CENTRE) / np.asarray(identity["scale_xyz"])
    displacement = np.zeros_like(q)
    for name, (centre, radius, _amp) in FACE_FEATURES.items():
        d2 = np.sum((q - np.asarray(centre)) ** 2, axis=1)
        near = d2 < (4.0 * radius) ** 2
        weight = np.exp(-d2[near] / (2.0 * radius ** 2))
        displacement[near] += weight[:, None] * np.asarray(identity["features"][name])
    q -= displacement      # backward warp: the feature moves by +displacement
    coords = ((q - base.lo) / base.step).T
    shape = OUTPUT_SHAPE_XYZ
    hu = map_coordinates(base.hu, coords, order=1, cval=-1000.0).reshape(shape).astype(np.float32)
    brain = map_coordinates(base.brain, coords, order=1, cval=0.0).reshape(shape).astype(np.float32)
    return hu, brain, py


def simulate_ct(hu: np.ndarray, world_y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT (nx, ny, nz) int16 HU: anatomy + a thin table behind the back + 15 HU noise."""
    body = hu > -300.0
    back_y = float(world_y[body].max())
    table = (world_y >= back_y + TABLE_GAP_MM) & (world_y < back_y + TABLE_GAP_MM + TABLE_THICKNESS_MM)
    ct = np.where(table, 250.0, hu)
    ct = ct + rng.normal(0.0, 15.0, ct.shape).astype(np.float32)
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16)


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


def _write_nifti(path: Path, volume_xyz: np.ndarray, origin_canonical: np.ndarray) -> None:
    """Write an (nx, ny, nz) canonical-LPS array as AutoPET stores it: j runs anterior ("LAS")."""
    import SimpleITK as sitk

    flipped = volume_xyz[:, ::-1, :]                      # j now grows towards anterior
    image = sitk.GetImageFromArray(np.ascontiguousarray(flipped.transpose(2, 1, 0)))
    image.SetSpacing(PET_GRID_MM)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    ny = volume_xyz.shape[1]
    origin = origin_canonical.copy()
    origin[1] += (ny - 1) * PET_GRID_MM[1]
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


def plan_cohort(*, n: int = 20, seed: int = 0, second_study_fraction: float = 0.2) -> list[dict]:
    """Every random choice of a cohort, one dict per study (patient, study, id, identity,
    pose, noise_seed), without building any volume. Same arguments -> same plan."""
    rng = np.random.default_rng(seed)
    patients = _patient_names(rng, n)
    plan = []
    for patient in patients:
        identity = draw_identity(rng)
        n_studies = 2 if rng.random() < second_study_fraction else 1
        names = sorted({_study_name(rng) for _ in range(n_studies)})
        for study in names:
            plan.append({"patient": patient, "study": study, "id": f"{patient}_{study}",
                         "identity": identity, "pose": draw_pose(rng),
                         "noise_seed": int(rng.integers(2**31))})
    return plan


def generate_cohort(out_dir: str | os.PathLike, *, n: int = 20, seed: int = 0,
                    second_study_fraction: float = 0.2, progress: bool = True) -> list[dict]:
    """Write ``n`` simulated patients (some with a 2nd study) in the AutoPET layout.

    Returns ``plan_cohort(...)``, which also goes to OUT/cohort.json. Same ``seed`` ->
    identical volumes.
    """
    from tqdm.auto import tqdm

    out = make_private_dir(out_dir)
    # the done marker of an earlier cohort here must not vouch for a half-rewritten one
    (out / "SIMULATED.txt").unlink(missing_ok=True)
    plan = plan_cohort(n=n, seed=seed, second_study_fraction=second_study_fraction)
    origin = output_grid_origin()
    for entry in tqdm(plan, desc="simulate", disable=not progress, file=sys.stderr):
        study_rng = np.random.default_rng(entry["noise_seed"])
        hu, brain, world_y = warp_anatomy(entry["identity"], entry["pose"])
        ct = simulate_ct(hu, world_y, study_rng)
        pet = simulate_pet(hu, brain, entry["identity"], study_rng)
        folder = make_private_dir(out / entry["patient"] / entry["study"])
        _write_nifti(folder / "CTres.nii.gz", ct, origin)
        _write_nifti(folder / "SUV.nii.gz", pet, origin)
    write_json(out / "cohort.json", {
        "simulated": True, "note": SIMULATED_NOTE, "seed": seed, "n_patients": n,
        "n_studies": len(plan), "grid_mm_xyz": PET_GRID_MM, "shape_xyz": OUTPUT_SHAPE_XYZ,
        "base": "VTK headsq quarter CT (faceaudit/data/vtk_headsq_ct), deformed", "studies": plan})
    # written last: its presence means the cohort is complete
    atomic_write_text(out / "SIMULATED.txt", _README.format(n=n, seed=seed, n_studies=len(plan)))
    return plan


_README = """# SIMULATED PET/CT cohort (faceaudit demo data)

Every volume in this folder is SIMULATED: no patient data. {n} simulated patients,
{n_studies} studies, seed {seed}, written by `python -m faceaudit.demo.cohort`.

All heads derive from one real head CT (the VTK "headsq" example data, BSD-style notice in
faceaudit/data/vtk_headsq_ct/LICENSE_VTKData_Copyright.txt), deformed per simulated patient
(nose, chin, lips, cheeks, brow, eyes, head scale), posed per study, given a neck, torso
and scanner table (CT, HU) and a PET (SUV: 7 mm FWHM blur, Poisson noise, brain uptake).
Each NIfTI's description field says "{note}". cohort.json lists every random parameter.
""".replace("{note}", SIMULATED_NOTE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a SIMULATED AutoPET-layout PET/CT cohort.")
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=20, help="number of simulated patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-study-fraction", type=float, default=0.2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    started = time.time()
    plan = generate_cohort(args.out_dir, n=args.n, seed=args.seed,
                           second_study_fraction=args.second_study_fraction, progress=not args.quiet)
    print(f"wrote {len(plan)} simulated studies of {args.n} patients to {args.out_dir} "
          f"in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
