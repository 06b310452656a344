"""Stage 1 on an AutoPET-sized PET/CT study, whole process: faceaudit against the upstream
code and against the decode floor, the NIfTI gzip decoders, and --jobs scaling on a cohort.

Study: 400 x 400 x 326 float32 CT (HU) and SUV on 2.04 x 2.04 x 3 mm voxels stored "LAS"
like AutoPET (body with lungs and spine, neck, head with skull, brain, nose, chin, eye
sockets, a table 12 mm behind the back; CT noise 15 HU; SUV tissue 1, lungs 0.4, brain 8,
6 mm blur, signal-dependent noise, and the low positive background an iterative PET
reconstruction leaves in the air of its field of view), the phantom of
../shared/reference/upstream_baseline.md. Its gzip files are about 168 and 125 MB, as
AutoPET's are. It is generated once into bench_output/ (gitignored) and reused.

Every path runs as its own process on the same files, alternating, ``--repeats`` times;
wall time and peak RSS (``os.wait4``) are of the whole process, start-up and imports
included:

- faceaudit: ``perform_morphological_reconstruction.py --jobs 1`` into a fresh folder;
- upstream, real: with ``--upstream DIR`` (a checkout of SebastianPartarrieu/
  pet-deanonymization), its ``scripts/perform_morphological_reconstruction.py`` unmodified,
  run by ``--upstream-python`` (an environment with nibabel, Open3D, cc3d, scikit-image,
  opencv) with ``DIR/src`` on PYTHONPATH;
- upstream, emulated (without ``--upstream``, and labelled so): this file's re-implementation
  of the upstream algorithm (nibabel-style gzip and float64 read, Otsu / 95th percentile over
  the whole volume, cc3d, np.unique, top quarter, marching cubes, Laplacian x 5, 90-degree
  pinhole), with Embree in place of Open3D's ray caster;
- the decode floor: SimpleITK reading both .nii.gz files into arrays, what any tool pays.

Then each installed gzip decoder inflates the CT in this process (median of the repeats),
and the stage runs on a generated cohort of ``--cohort`` studies with ``--jobs 1`` pinned to one
core, ``--jobs 1`` and ``--jobs N`` (N = the cores, at most ``--max-jobs``), alternating,
``--cohort-repeats`` times; the speed-up of the medians is printed against N.

Usage:
    python benchmarks/bench_reconstruction.py [--repeats 5] [--upstream DIR
        --upstream-python PY] [--cohort 8] [--cohort-repeats 3] [--work-dir bench_output/reconstruction]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (326, 400, 400)
SPACING_XYZ = (2.04, 2.04, 3.0)
#: bump when the phantom changes, so stale files are not reused
PHANTOM_VERSION = 2
STUDY_DATE = "01-01-2000-NA-PET-CT"


# --------------------------------------------------------------------------- phantom

def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def phantom_tissue() -> tuple[np.ndarray, np.ndarray]:
    """Canonical (z superior, y posterior, x left) noise-free CT (HU, float32) and tissue
    labels (uint8: 0 air, 1 soft, 2 lung, 3 bone, 4 brain), SHAPE_ZYX."""
    nz, ny, nx = SHAPE_ZYX
    sx, sy, sz = SPACING_XYZ
    xs = (np.arange(nx) - nx / 2) * sx
    ys = (np.arange(ny) - ny / 2) * sy
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ct = np.full(SHAPE_ZYX, -1000.0, dtype=np.float32)
    tissue = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    back_y = 110.0
    for k in range(nz):
        z = k * sz
        soft = np.zeros((ny, nx), bool)
        if z < 700:                                                  # torso
            soft |= _ellipse(xx, yy, 0, 0, 170, 110)
        if 680 <= z < 800:                                           # neck
            soft |= _ellipse(xx, yy, 0, 20, 55, 55)
        dz = (z - 870) / 110.0
        if abs(dz) < 1:                                              # head
            s = np.sqrt(1 - dz * dz)
            soft |= _ellipse(xx, yy, 0, 0, 75 * s, 95 * s)
        for cz, (cx, cy, ax, ay, az) in ((860, (0, -103, 10, 15, 20)), (790, (0, -78, 35, 25, 25))):
            dz2 = (z - cz) / az                                      # nose, chin
            if abs(dz2) < 1:
                s = np.sqrt(1 - dz2 * dz2)
                soft |= _ellipse(xx, yy, cx, cy, ax * s, ay * s)
        label = np.where(soft, 1, 0).astype(np.uint8)
        if 400 <= z < 650:                                           # lungs
            s = np.sqrt(max(0.0, 1 - ((z - 525) / 125) ** 2))
            for cx in (-80, 80):
                label[_ellipse(xx, yy, cx, 0, 55 * s + 1e-3, 70 * s + 1e-3) & soft] = 2
        if z < 760:
            label[_ellipse(xx, yy, 0, 80 if z < 700 else 45, 15, 15)] = 3   # spine
        dzb = (z - 885) / 95.0
        if abs(dzb) < 1:                                             # skull and brain
            s = np.sqrt(1 - dzb * dzb)
            skull = _ellipse(xx, yy, 0, 5, 68 * s, 86 * s)
            label[skull] = 3
            label[_ellipse(xx, yy, 0, 5, 62 * s, 80 * s)] = 4
        for cx in (-30, 30):                                         # eye sockets
            dze = (z - 900) / 10.0
            if abs(dze) < 1:
                s = np.sqrt(1 - dze * dze)
                label[_ellipse(xx, yy, cx, -90, 14 * s, 10 * s)] = 0
        hu = np.choose(label, [-1000.0, 40.0, -800.0, 700.0, 35.0]).astype(np.float32)
        table = (yy >= back_y + 12) & (yy < back_y + 22) & (np.abs(xx) < 230)
        hu[table] = 200.0
        ct[k] = hu
        tissue[k] = label
    return ct, tissue


def noisy_study(ct: np.ndarray, tissue: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(CT with 15 HU noise, SUV) for one seed, float32, SHAPE_ZYX. The SUV outside the body
    is the low positive background of an iterative reconstruction (gamma, mean 0.02) within
    the 700 mm field of view, 0 beyond it."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noisy_ct = ct + rng.normal(0, 15, SHAPE_ZYX).astype(np.float32)
    suv = np.choose(tissue, [0.0, 1.0, 0.4, 0.8, 8.0]).astype(np.float32)
    suv = gaussian_filter(suv, [6.0 / s for s in (SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0])])
    suv += rng.standard_normal(SHAPE_ZYX, dtype=np.float32) * 0.15 * np.sqrt(np.clip(suv, 0, None))
    ny, nx = SHAPE_ZYX[1:]
    yy, xx = np.meshgrid((np.arange(ny) - ny / 2) * SPACING_XYZ[1], (np.arange(nx) - nx / 2) * SPACING_XYZ[0],
                         indexing="ij")
    in_view = (xx ** 2 + yy ** 2 <= 350.0 ** 2)[None]
    suv += np.where(in_view, rng.gamma(1.0, 0.02, SHAPE_ZYX).astype(np.float32), np.float32(0))
    return noisy_ct, np.clip(suv, 0, None).astype(np.float32)


def write_las_nifti(path: Path, array_zyx: np.ndarray) -> None:
    """Store like AutoPET: j grows anterior (direction diag(1, -1, 1) in LPS). Atomic, so an
    interrupted generation never leaves a truncated file that a later run would reuse."""
    import SimpleITK as sitk

    from faceaudit.core.files import atomic_path

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx[:, ::-1, :]))
    image.SetSpacing(SPACING_XYZ)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((-408.0, 408.0, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), True, 1)


def ensure_cohort(root: Path, n: int, *, first_seed: int = 0) -> list[Path]:
    """``root/PETCT_<k>/<date>/{CTres,SUV}.nii.gz`` for n seeds (AutoPET layout, which the
    upstream script walks too); existing complete studies are reused. Returns study folders."""
    folders = [root / f"PETCT_{k:02d}" / STUDY_DATE for k in range(n)]
    missing = [f for f in folders if not ((f / "CTres.nii.gz").is_file() and (f / "SUV.nii.gz").is_file())]
    if missing:
        start = time.perf_counter()
        ct, tissue = phantom_tissue()
        for folder in missing:
            seed = first_seed + folders.index(folder)
            noisy_ct, suv = noisy_study(ct, tissue, seed)
            write_las_nifti(folder / "CTres.nii.gz", noisy_ct)
            write_las_nifti(folder / "SUV.nii.gz", suv)
        print(f"generated {len(missing)} AutoPET-sized phantom studies in {root} in "
              f"{time.perf_counter() - start:.0f} s")
    return folders


# --------------------------------------------------------------------------- emulated upstream

def _upstream_rays(h: int, spacing_xyz, size: int = 512):
    """Open3D create_rays_pinhole(fov 90, center, eye, up=[0,1,0], 512, 512) as upstream set it."""
    vx, vy, vz = spacing_xyz
    centre = np.array([200 * vx, 0.0, h * vz])
    eye = np.array([200 * vx, 400 * vy, 1.01 * h * vz])
    forward = (centre - eye) / np.linalg.norm(centre - eye)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    half = np.tan(np.radians(45.0))
    u = (np.arange(size) + 0.5) / size * 2 - 1
    uu, vv = np.meshgrid(u * half, -u * half)
    directions = forward + uu[..., None] * right + vv[..., None] * up
    directions = directions.reshape(-1, 3)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return np.tile(eye, (directions.shape[0], 1)), directions


def emulated_upstream(ct_path: str, pet_path: str, out_dir: str) -> None:
    """The upstream per-study algorithm (reference/upstream_pipelines.md A1.1), Open3D's ray
    caster replaced by Embree (Open3D 0.07-0.13 s in the baseline, small either way)."""
    import gzip

    import cc3d
    import SimpleITK as sitk
    import trimesh
    from PIL import Image
    from skimage.filters import threshold_otsu
    from skimage.measure import marching_cubes
    from trimesh.ray.ray_pyembree import RayMeshIntersector
    from trimesh.smoothing import filter_laplacian

    for modality, path in (("ct", ct_path), ("pet", pet_path)):
        # nibabel's load + get_fdata(): Python's gzip, file order, float64
        info = sitk.ImageFileReader()
        info.SetFileName(path)
        info.ReadImageInformation()
        spacing = info.GetSpacing()
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
        vox_offset = int(np.frombuffer(raw, "<f4", 1, 108)[0])
        data = np.frombuffer(raw, "<f4", int(np.prod(info.GetSize())), vox_offset)
        data = data.reshape(info.GetSize()[::-1]).transpose(2, 1, 0).astype(np.float64)  # (x, y, z)
        del raw
        binary = data >= threshold_otsu(data) if modality == "ct" else data > np.percentile(data, 95)
        labels = cc3d.connected_components(binary)
        values, counts = np.unique(labels, return_counts=True)
        morpho = (labels == values[np.argsort(counts)[-2]]).astype(float)
        del binary, labels
        nz = morpho.shape[2]
        verts, faces, _n, _v = marching_cubes(morpho[:, :, -nz // 4:], 0.5, spacing=spacing)
        mesh = trimesh.Trimesh(verts, faces, process=False)
        filter_laplacian(mesh, lamb=0.5, iterations=5, volume_constraint=False)
        origins, directions = _upstream_rays(nz // 8, spacing)
        tri = RayMeshIntersector(mesh).intersects_first(origins, directions)
        proj = np.zeros((origins.shape[0], 3))
        proj[tri >= 0] = np.abs(mesh.face_normals[tri[tri >= 0]])
        grey = (proj @ np.array([0.2125, 0.7154, 0.0721]) * 255).astype(np.uint8).reshape(512, 512)
        Image.fromarray(grey).save(Path(out_dir) / f"upstream_{modality}.png", dpi=(300, 300))
        del data, morpho


# --------------------------------------------------------------------------- whole-process runs

FLOOR_CODE = ("import sys, SimpleITK as sitk\n"
              "images = [sitk.ReadImage(path) for path in sys.argv[1:]]\n"
              "arrays = [sitk.GetArrayViewFromImage(image) for image in images]\n")


def timed_process(argv: list[str], *, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one whole process; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited with {proc.returncode}:\n"
                           f"{stderr.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def _stage_argv(cohort: Path, out: Path, jobs: int) -> list[str]:
    return [sys.executable, str(ROOT / "perform_morphological_reconstruction.py"), "--petct_path", str(cohort),
            "--save_dir", str(out), "--jobs", str(jobs), "--quiet"]


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def whole_process_paths(cohort: Path, study: Path, work: Path, args) -> dict[str, list[tuple[float, float]]]:
    ct, pet = str(study / "CTres.nii.gz"), str(study / "SUV.nii.gz")
    paths = {"floor": lambda: [sys.executable, "-c", FLOOR_CODE, ct, pet],
             "faceaudit": lambda: _stage_argv(cohort, _fresh(work / "faceaudit_out"), 1)}
    env = None
    if args.upstream:
        upstream = Path(args.upstream)
        script = upstream / "scripts" / "perform_morphological_reconstruction.py"
        if not script.is_file():
            raise SystemExit(f"expected the upstream script at {script}, found nothing")
        env = {**os.environ, "PYTHONPATH": str(upstream / "src")}

        def upstream_argv():
            out = _fresh(work / "upstream_out")
            (out / "cts").mkdir()
            (out / "pets").mkdir()
            # the script joins save_dir and "cts/" without a separator
            return [args.upstream_python, str(script), "--petct_path", str(cohort), "--save_dir", f"{out}/"]
        paths["upstream"] = upstream_argv
    else:
        paths["upstream"] = lambda: [sys.executable, __file__, "--emulated-upstream", ct, pet,
                                     str(_fresh(work / "upstream_out"))]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, argv in paths.items():
            runs[name].append(timed_process(argv(), env=env if name == "upstream" else None))
    return runs


# --------------------------------------------------------------------------- decoders

def decoder_table(path: Path, repeats: int) -> list[tuple[str, float, str]]:
    """(decoder, median seconds to inflate ``path`` in this process, note) for each one installed."""
    import zlib

    raw = path.read_bytes()
    decoders: list[tuple[str, object, str]] = [("zlib (Python's gzip, nibabel's default)",
                                               lambda: zlib.decompress(raw, 31), "")]
    try:
        from isal import igzip
        decoders.append(("isal igzip (faceaudit)", lambda: igzip.decompress(raw),
                         "every member, CRC checked, EOFError when truncated"))
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng
        decoders.append(("zlib-ng", lambda: zlib_ng.decompress(raw, 31), "first member only"))
    except ImportError:
        pass
    try:
        import deflate
        decoders.append(("libdeflate (deflate)", lambda: deflate.gzip_decompress(raw),
                         "trusts the trailer's size: drops members"))
    except ImportError:
        pass
    try:
        import SimpleITK as sitk
        decoders.append(("SimpleITK ReadImage", lambda: sitk.ReadImage(str(path)),
                         "zero-fills a truncated file"))
    except ImportError:
        pass
    table = []
    for name, decode, note in decoders:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode()
            seconds.append(time.perf_counter() - start)
        table.append((name, float(np.median(seconds)), note))
    return table


# --------------------------------------------------------------------------- report

def _summary(values: list[float]) -> str:
    return f"{np.median(values):6.2f} s [{min(values):.2f}-{max(values):.2f}]"


def _stage_phases(out: Path) -> str:
    import csv

    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    parts = []
    for modality in ("ct", "pet"):
        keys = [k for k in row if k.startswith(f"{modality}_t_")]
        parts.append(f"{modality.upper()} " + ", ".join(f"{k.split('_t_')[1]} {float(row[k]):.2f}" for k in keys))
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "bench_output" / "reconstruction"))
    parser.add_argument("--repeats", type=int, default=5, help="alternating whole-process runs per path")
    parser.add_argument("--upstream", help="a checkout of SebastianPartarrieu/pet-deanonymization")
    parser.add_argument("--upstream-python", default=sys.executable,
                        help="the Python of the upstream's own environment (nibabel, open3d, cc3d, "
                             "scikit-image, opencv)")
    parser.add_argument("--cohort", type=int, default=8, help="studies of the --jobs scaling run (0: skip)")
    parser.add_argument("--cohort-repeats", type=int, default=3, help="alternating runs of each --jobs setting")
    parser.add_argument("--max-jobs", type=int, default=8)
    parser.add_argument("--emulated-upstream", nargs=3, metavar=("CT", "PET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.emulated_upstream:
        emulated_upstream(*args.emulated_upstream)
        return 0
    work = Path(args.work_dir) / f"v{PHANTOM_VERSION}"
    single = work / "one_study"
    study = ensure_cohort(single, 1)[0]
    sizes = [(study / name).stat().st_size / 2**20 for name in ("CTres.nii.gz", "SUV.nii.gz")]
    runs = whole_process_paths(single, study, work, args)
    label = (f"upstream (real: {args.upstream}, run by {args.upstream_python})" if args.upstream
             else "upstream (EMULATED in this file: no --upstream checkout given; Embree for Open3D)")
    print(f"\nOne AutoPET-sized study {SHAPE_ZYX[::-1]}, CT + PET ({sizes[0]:.0f} + {sizes[1]:.0f} MiB gz), "
          f"whole process, {args.repeats} alternating runs each: median [range]")
    names = {"floor": "decode floor (SimpleITK reads both files)", "faceaudit": "faceaudit stage 1 (--jobs 1)",
             "upstream": label}
    for name in ("upstream", "faceaudit", "floor"):
        walls = [w for w, _ in runs[name]]
        print(f"  {_summary(walls)}   peak RSS {max(r for _, r in runs[name]):6.0f} MiB   {names[name]}")
    ours = float(np.median([w for w, _ in runs["faceaudit"]]))
    upstream = float(np.median([w for w, _ in runs["upstream"]]))
    floor = float(np.median([w for w, _ in runs["floor"]]))
    print(f"  upstream / faceaudit = {upstream / ours:.2f}   (goal >= 4)"
          f"{'   [upstream emulated]' if not args.upstream else ''}")
    print(f"  faceaudit / floor    = {ours / floor:.2f}   (goal <= 1.5)")
    print(f"  faceaudit phases of the last run (s; CT and PET overlap in two threads): "
          f"{_stage_phases(work / 'faceaudit_out')}")

    print(f"\nInflating the CT ({sizes[0]:.0f} MiB gz) in this process, median of {args.repeats}:")
    for name, seconds, note in decoder_table(study / "CTres.nii.gz", args.repeats):
        print(f"  {seconds:6.2f} s  {name}{'  (' + note + ')' if note else ''}")

    if args.cohort > 0:
        jobs = max(2, min(args.max_jobs, os.cpu_count() or 1))
        cohort_root = work / f"cohort_{args.cohort}"
        ensure_cohort(cohort_root, args.cohort, first_seed=1)
        runs = [("--jobs 1 on 1 core", 1, [0]), ("--jobs 1", 1, None), (f"--jobs {jobs}", jobs, None)]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
        for _ in range(args.cohort_repeats):             # alternating, as the single-study runs
            for k, (name, j, cores) in enumerate(runs):
                argv = _stage_argv(cohort_root, _fresh(work / f"cohort_out_{k}"), j)
                if cores is not None:        # one job on one core: what N jobs on N cores multiply
                    argv = ["taskset", "-c", ",".join(map(str, cores))] + argv
                results[name].append(timed_process(argv))
        print(f"\n--jobs scaling, {args.cohort} studies, {os.cpu_count()} cores, whole process, "
              f"{args.cohort_repeats} alternating runs each: median [range] (peak RSS: the largest process)")
        walls = {name: float(np.median([w for w, _ in found])) for name, found in results.items()}
        for name, found in results.items():
            print(f"  {name:<20}{_summary([w for w, _ in found])} ({walls[name] / args.cohort:.2f} s per "
                  f"study)   peak RSS {max(r for _, r in found):5.0f} MiB")
        one_core = walls["--jobs 1 on 1 core"]
        speedup = one_core / walls[f"--jobs {jobs}"]
        print(f"  --jobs {jobs} on {jobs} cores against one job on one core: {speedup:.2f}x, "
              f"{jobs / speedup:.2f}x from {jobs}-fold (goal within 1.3x)")
        print(f"  (one job alone already uses the other cores: the CT and PET of a study overlap in "
              f"threads, {one_core / walls['--jobs 1']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
