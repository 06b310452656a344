"""Per-study time and peak memory of the reconstruction on an AutoPET-sized PET/CT pair,
faceaudit's path beside an in-file re-implementation of the upstream algorithm path.

Study: 400 x 400 x 326 float32 CT (HU) and SUV on 2.04 x 2.04 x 3 mm voxels stored "LAS"
like AutoPET (body with lungs and spine, neck, head with skull, brain, nose, chin, eye
sockets, a table 12 mm behind the back; CT noise 15 HU; SUV tissue 1, lungs 0.4, brain 8,
6 mm blur, signal-dependent noise), the phantom of ../shared/reference/upstream_baseline.md.
It is generated once into bench_output/ (gitignored) and reused.

Upstream path (as reference/upstream_pipelines.md A1.1 describes it): nibabel's load
(emulated: nibabel is not installed; Python's gzip module, as nibabel uses, then float64
as ``get_fdata`` returns);
Otsu over the whole volume (CT) or the 95th percentile (PET); cc3d labelling of the whole
volume; ``np.unique`` to pick the 2nd most frequent label; float mask; top quarter of the
slices; marching cubes on that 400 x 400 x 82 block; Laplacian smoothing x5; 90-degree
pinhole at the fixed voxel positions. Open3D is not installed, so BOTH paths cast their
rays with the same Embree intersector (trimesh + embreex); the upstream ray-cast time
here is therefore not Open3D's (0.07-0.13 s in the baseline, small either way).

faceaudit is timed through ``reconstruction.process_study`` (the stage's per-study function,
writing png/ply/npz to bench_output/): it reads the PET in a second thread while the CT is
processed, so its study wall time is below the sum of its phases; both are printed.

Each path runs CT then PET in its own fresh process (spawn), so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Printed: per-phase seconds,
the per-study ratio upstream / faceaudit, peak RSS. Usage:
    python benchmarks/bench_reconstruction.py [--repeats 1] [--work-dir bench_output/reconstruction]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (326, 400, 400)
SPACING_XYZ = (2.04, 2.04, 3.0)


# --------------------------------------------------------------------------- phantom

def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def build_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (z superior, y posterior, x left) CT (HU) and SUV, float32, SHAPE_ZYX."""
    from scipy.ndimage import gaussian_filter

    nz, ny, nx = SHAPE_ZYX
    sx, sy, sz = SPACING_XYZ
    xs = (np.arange(nx) - nx / 2) * sx
    ys = (np.arange(ny) - ny / 2) * sy
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ct = np.full(SHAPE_ZYX, -1000.0, dtype=np.float32)
    tissue = np.zeros(SHAPE_ZYX, dtype=np.uint8)  # 1 soft, 2 lung, 3 bone, 4 brain
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
    rng = np.random.default_rng(seed)
    ct += rng.normal(0, 15, SHAPE_ZYX).astype(np.float32)
    suv = np.choose(tissue, [0.0, 1.0, 0.4, 0.8, 8.0]).astype(np.float32)
    suv = gaussian_filter(suv, [6.0 / s for s in (sz, sy, sx)])
    suv += (rng.standard_normal(SHAPE_ZYX, dtype=np.float32) * 0.15 * np.sqrt(np.clip(suv, 0, None)))
    return ct, np.clip(suv, 0, None).astype(np.float32)


def write_las_nifti(path: Path, array_zyx: np.ndarray) -> None:
    """Store like AutoPET: j grows anterior (direction diag(1, -1, 1) in LPS). Atomic, so an
    interrupted generation never leaves a truncated file that ``ensure_study`` would reuse."""
    import SimpleITK as sitk

    from faceaudit.core.files import atomic_path

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx[:, ::-1, :]))
    image.SetSpacing(SPACING_XYZ)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((-408.0, 408.0, 0.0))
    with atomic_path(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), True, 1)


def ensure_study(work_dir: Path) -> tuple[Path, Path]:
    ct_path, pet_path = work_dir / "CTres.nii.gz", work_dir / "SUV.nii.gz"
    if not (ct_path.is_file() and pet_path.is_file()):
        work_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ct, suv = build_phantom()
        write_las_nifti(ct_path, ct)
        write_las_nifti(pet_path, suv)
        print(f"generated the AutoPET-sized phantom in {time.perf_counter() - start:.1f} s "
              f"({ct_path.stat().st_size / 2**20:.0f} + {pet_path.stat().st_size / 2**20:.0f} MiB gz)")
    return ct_path, pet_path


# --------------------------------------------------------------------------- the two paths

def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_imports() -> None:
    """Import the heavy modules both paths use before any timer starts (fair to both)."""
    import cc3d  # noqa: F401
    import SimpleITK  # noqa: F401
    import trimesh.ray.ray_pyembree  # noqa: F401
    import trimesh.smoothing  # noqa: F401
    from PIL import Image  # noqa: F401
    from scipy import ndimage  # noqa: F401
    from skimage import filters, measure  # noqa: F401


def run_faceaudit(ct_path: str, pet_path: str, out_dir: str) -> dict:
    """The stage's own per-study function (process_study), outputs to a scratch folder."""
    _warm_imports()
    import shutil

    from faceaudit.petct.reconstruction import ReconstructionOptions, process_study
    from faceaudit.petct.render_qa import _face_mesh

    # the face-QA model loads once per worker process (about 0.6 s), not once per study:
    # in a cohort it is paid once, so it is loaded before the per-study timer starts
    _face_mesh()
    from faceaudit.petct.volumes import Study

    scratch = Path(out_dir) / "faceaudit_out"
    shutil.rmtree(scratch, ignore_errors=True)
    study = Study(id="bench", subject="bench", ct=Path(ct_path), pet=Path(pet_path), layout="flat")
    start = time.perf_counter()
    result = process_study(study, save_dir=scratch, options=ReconstructionOptions())
    wall = time.perf_counter() - start
    phases = {}
    for modality in ("ct", "pet"):
        record = result[modality]
        if record["status"] != "ok":
            raise RuntimeError(f"faceaudit {modality} failed: {record['reason']}")
        t = record["timings"]
        phases[modality] = {"load": t["load"], "threshold": t["threshold"],
                            "components": t["components"],
                            "surface": t["crop_fill"] + t["surface"], "render": t["render"],
                            "write": t["write"], "n_vertices": record["numbers"]["n_vertices"]}
    return {"phases": phases, "peak_rss_mib": _peak_rss_mib(), "study_wall_s": wall}


def _upstream_rays(nx: int, ny: int, h: int, spacing_xyz, size: int = 512):
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


def run_upstream(ct_path: str, pet_path: str, out_dir: str) -> dict:
    import gzip

    import cc3d
    import SimpleITK as sitk
    import trimesh
    from PIL import Image
    from skimage.filters import threshold_otsu
    from skimage.measure import marching_cubes
    from trimesh.ray.ray_pyembree import RayMeshIntersector
    from trimesh.smoothing import filter_laplacian

    _warm_imports()
    phases: dict = {}
    for modality, path in (("ct", ct_path), ("pet", pet_path)):
        t = {}
        start = time.perf_counter()
        # nibabel (not installed) load + get_fdata(): Python's gzip, file order, float64
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
        t["load"] = time.perf_counter() - start
        start = time.perf_counter()
        if modality == "ct":
            binary = data >= threshold_otsu(data)
        else:
            binary = data > np.percentile(data, 95)
        t["threshold"] = time.perf_counter() - start
        start = time.perf_counter()
        labels = cc3d.connected_components(binary)
        lab = labels.copy()                   # generate_morpho
        values, counts = np.unique(lab, return_counts=True)
        largest = values[np.argsort(counts)[-2]]
        morpho = (lab == largest).astype(float)
        del binary, labels, lab
        t["components"] = time.perf_counter() - start
        start = time.perf_counter()
        nz = morpho.shape[2]
        sub = morpho[:, :, -nz // 4:]
        verts, faces, _n, _v = marching_cubes(sub, 0.5, spacing=spacing)
        mesh = trimesh.Trimesh(verts, faces, process=False)
        _ = mesh.vertex_normals
        filter_laplacian(mesh, lamb=0.5, iterations=5, volume_constraint=False)
        _ = mesh.vertex_normals
        t["surface"] = time.perf_counter() - start
        start = time.perf_counter()
        origins, directions = _upstream_rays(data.shape[0], data.shape[1], nz // 8, spacing)
        tri = RayMeshIntersector(mesh).intersects_first(origins, directions)
        proj = np.zeros((origins.shape[0], 3))
        proj[tri >= 0] = np.abs(mesh.face_normals[tri[tri >= 0]])
        grey = (proj @ np.array([0.2125, 0.7154, 0.0721]) * 255).astype(np.uint8).reshape(512, 512)
        t["render"] = time.perf_counter() - start
        start = time.perf_counter()
        Image.fromarray(grey).save(Path(out_dir) / f"upstream_{modality}.png", dpi=(300, 300))
        t["write"] = time.perf_counter() - start
        t["n_vertices"] = len(mesh.vertices)
        phases[modality] = t
        del data, morpho, sub
    return {"phases": phases, "peak_rss_mib": _peak_rss_mib()}


def _in_fresh_process(fn, *args) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


PHASES = ("load", "threshold", "components", "surface", "render", "write")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "bench_output" / "reconstruction"))
    parser.add_argument("--repeats", type=int, default=1, help="runs per path; the median is printed")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(args.work_dir)
    ct_path, pet_path = ensure_study(work)
    results = {"upstream": [], "faceaudit": []}
    for _ in range(args.repeats):
        for name, fn in (("upstream", run_upstream), ("faceaudit", run_faceaudit)):
            start = time.perf_counter()
            record = _in_fresh_process(fn, str(ct_path), str(pet_path), str(work))
            record["process_s"] = time.perf_counter() - start
            results[name].append(record)

    def median(name, modality, phase):
        return float(np.median([r["phases"][modality][phase] for r in results[name]]))

    print(f"\nAutoPET-sized study {SHAPE_ZYX[::-1]} x 2 (CT + PET), median of {args.repeats} run(s), seconds")
    print(f"{'phase':<12}{'upstream CT':>12}{'ours CT':>10}{'upstream PET':>14}{'ours PET':>10}")
    totals = {(n, m): 0.0 for n in results for m in ("ct", "pet")}
    for phase in PHASES:
        row = [median(n, m, phase) for m in ("ct", "pet") for n in ("upstream", "faceaudit")]
        for (n, m), v in zip([(n, m) for m in ("ct", "pet") for n in ("upstream", "faceaudit")], row):
            totals[(n, m)] += v
        print(f"{phase:<12}{row[0]:>12.3f}{row[1]:>10.3f}{row[2]:>14.3f}{row[3]:>10.3f}")
    print(f"{'total':<12}{totals[('upstream', 'ct')]:>12.3f}{totals[('faceaudit', 'ct')]:>10.3f}"
          f"{totals[('upstream', 'pet')]:>14.3f}{totals[('faceaudit', 'pet')]:>10.3f}")
    up = totals[("upstream", "ct")] + totals[("upstream", "pet")]
    ours = totals[("faceaudit", "ct")] + totals[("faceaudit", "pet")]
    for name in results:
        vertices = {m: results[name][0]["phases"][m]["n_vertices"] for m in ("ct", "pet")}
        rss = max(r["peak_rss_mib"] for r in results[name])
        proc = float(np.median([r["process_s"] for r in results[name]]))
        print(f"{name:<10} peak RSS {rss:7.0f} MiB   process wall {proc:6.2f} s   "
              f"mesh vertices CT {vertices['ct']}, PET {vertices['pet']}")
    wall = float(np.median([r["study_wall_s"] for r in results["faceaudit"]]))
    print(f"per-study time, sum of phases: upstream {up:.2f} s, faceaudit {ours:.2f} s "
          f"-> {up / ours:.1f}x faster")
    print(f"per-study wall time: upstream {up:.2f} s (sequential), faceaudit {wall:.2f} s "
          f"(PET read in a 2nd thread while the CT is processed) -> {up / wall:.1f}x faster")
    print("(both paths cast rays with Embree; Open3D, the upstream ray caster, is not installed)")
    print("(faceaudit's wall time includes its face check of both renders; the check's model is loaded "
          "once per process before timing, as a cohort pays it once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
