"""Stage 1: PET/CT volumes -> head skin surfaces -> frontal 512 x 512 renders.

``reconstruct_volume`` is the per-volume function (array in, mesh/render/numbers out);
``run_reconstruction`` is the stage: it discovers the studies (volumes.discover_studies),
processes CT and PET of every study independently (a PET failure keeps the CT render and
a re-run produces the missing PET), and writes

    OUT/cts/<id>.png, OUT/pets/<id>.png        512 x 512 uint8 grey, black background
    OUT/meshes/<id>_{ct,pet}.ply               smoothed head mesh, LPS mm
    OUT/depth/<id>_{ct,pet}.npz                depth (mm, NaN = background) + camera numbers
    OUT/manifest.csv, OUT/run.json, OUT/qa_montage.png (CT row above PET row)
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from faceaudit.petct.render import render_frontal
from faceaudit.core.files import (
    atomic_write_bytes,
    InputError,
    make_private_dir,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import (
    describe_exception,
    ItemResult,
    Manifest,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
)
from faceaudit.core.runner import map_items, write_run_json
from faceaudit.petct.surface import extract_head_surface
from faceaudit.petct.volumes import Study, discover_studies, load_volume

MODALITIES = ("ct", "pet")
PNG_FOLDERS = {"ct": "cts", "pet": "pets"}


@dataclass(frozen=True)
class ReconstructionOptions:
    """Every knob of the stage; the defaults are the fixed pipeline, the comments say upstream."""

    ct_threshold: str | float = "otsu"          # upstream: "otsu"; or HU, e.g. -300
    pet_threshold: str = "adaptive"             # upstream: "percentile" (95th, whole volume)
    pet_percentile: float = 95.0
    pet_body_fraction: float = 0.5              # adaptive: level = fraction x body median SUV
    head_height_mm: float = 240.0               # upstream: top quarter of the slices
    fill_holes: bool = True                     # upstream: no hole filling
    smoothing_iterations: int = 5               # as upstream (Laplacian, lambda 0.5)
    core_radius_mm: float = 10.0                # body vs table: depth of the component core
    opening_radius_mm: float = 6.0              # cut a touching table off the body; 0: upstream (off)
    shading: str = "normals"                    # upstream: grey of |face normal|; or "lambert"
    projection: str = "orthographic"            # or "pinhole"
    head_px: int = 208                          # head box size in pixels (fits the 208 crop)
    size: int = 512


@dataclass
class ModalityResult:
    """One volume's reconstruction: mesh (trimesh, LPS mm), render, numbers, seconds per phase."""

    mesh: object
    render: object
    numbers: dict
    timings: dict


def reconstruct_volume(array: np.ndarray, spacing, *, modality: str, origin=(0.0, 0.0, 0.0),
                       options: ReconstructionOptions = ReconstructionOptions()) -> ModalityResult:
    """Canonical volume (nz, ny, nx) (axis 0 superior, 1 posterior, 2 left; spacing (sz, sy, sx)
    mm; CT in HU, PET in SUV) -> head mesh and frontal render."""
    surface = extract_head_surface(
        array, spacing, modality=modality, origin=origin,
        ct_threshold_method=options.ct_threshold, pet_threshold_method=options.pet_threshold,
        pet_percentile=options.pet_percentile, pet_body_fraction=options.pet_body_fraction,
        head_height_mm=options.head_height_mm, fill_holes=options.fill_holes,
        smoothing_iterations=options.smoothing_iterations, core_radius_mm=options.core_radius_mm,
        opening_radius_mm=options.opening_radius_mm)
    t0 = time.perf_counter()
    render = render_frontal(surface.mesh, size=options.size, head_px=options.head_px,
                            shading=options.shading, projection=options.projection)
    timings = dict(surface.timings)
    timings["render"] = time.perf_counter() - t0
    extent = surface.mesh.bounds[1] - surface.mesh.bounds[0]
    numbers = {"threshold": surface.threshold, "n_components": surface.n_components,
               "head_voxels": surface.body_voxels, "n_vertices": int(len(surface.mesh.vertices)),
               "n_faces": int(len(surface.mesh.faces)),
               "head_width_mm": float(extent[0]), "head_depth_mm": float(extent[1]),
               "head_height_mm": float(extent[2]),
               "render_coverage": float(render.hit.mean())}
    return ModalityResult(mesh=surface.mesh, render=render, numbers=numbers, timings=timings)


# --------------------------------------------------------------------------- files of one study

def output_paths(save_dir: Path, study_id: str, modality: str) -> dict[str, Path]:
    return {"png": save_dir / PNG_FOLDERS[modality] / f"{study_id}.png",
            "ply": save_dir / "meshes" / f"{study_id}_{modality}.ply",
            "depth": save_dir / "depth" / f"{study_id}_{modality}.npz"}


def _modality_done(save_dir: Path, study_id: str, modality: str) -> bool:
    return all(p.is_file() for p in output_paths(save_dir, study_id, modality).values())


def _load(study: Study, modality: str):
    """(volume, seconds); a missing side is an InputError naming the file expected."""
    path = study.ct if modality == "ct" else study.pet
    if path is None:
        if study.layout == "flat":
            expected = f"{study.id}_{modality}.nii.gz"
        else:
            expected = f"{'CTres' if modality == 'ct' else 'SUV'}.nii.gz (or {modality.upper()}.nii.gz)"
        raise InputError(f"study {study.id} has no {modality.upper()} volume (expected {expected})")
    t0 = time.perf_counter()
    volume = load_volume(path)
    return volume, time.perf_counter() - t0


def _reconstruct_and_write(volume, t_load: float, save_dir: Path, study_id: str, modality: str,
                           options: ReconstructionOptions) -> dict:
    result = reconstruct_volume(volume.array, volume.spacing, modality=modality,
                                origin=volume.origin, options=options)
    t0 = time.perf_counter()
    paths = output_paths(save_dir, study_id, modality)
    write_png(paths["png"], result.render.image)
    atomic_write_bytes(paths["ply"], result.mesh.export(file_type="ply"))
    camera = result.render.camera
    write_npz(paths["depth"], depth_mm=result.render.depth,
              mm_per_px=np.float64(camera["mm_per_px_at_face"]),
              centre_xz_mm=np.asarray(camera["centre_xz_mm"]),
              image_plane_y_mm=np.float64(camera["image_plane_y_mm"]),
              projection=np.str_(camera["projection"]))
    timings = {"load": t_load, **result.timings, "write": time.perf_counter() - t0}
    return {"numbers": result.numbers, "timings": timings}


def process_study(study: Study, *, save_dir: str | os.PathLike, options: ReconstructionOptions,
                  overwrite: bool = False) -> dict:
    """CT and PET of one study, each on its own: returns per modality status/reason/numbers.

    A modality whose png, ply and depth files exist is skipped unless ``overwrite``.
    Never raises for a bad volume: the error becomes that modality's reason and its
    output files are removed. Both volumes are read in two threads at once (decompression
    releases the GIL), so the PET is decompressed while the CT is processed; the CT is
    freed before the PET is processed.
    """
    from concurrent.futures import ThreadPoolExecutor

    save_dir = Path(save_dir)
    out: dict = {"id": study.id, "subject": study.subject}
    todo = [m for m in MODALITIES if overwrite or not _modality_done(save_dir, study.id, m)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        loads = {m: pool.submit(_load, study, m) for m in todo}
        for modality in MODALITIES:
            if modality not in todo:
                out[modality] = {"status": STATUS_SKIPPED, "reason": "outputs exist"}
                continue
            t0 = time.perf_counter()
            try:
                volume, t_load = loads.pop(modality).result()
                record = _reconstruct_and_write(volume, t_load, save_dir, study.id, modality, options)
                del volume
                record["status"], record["reason"] = STATUS_OK, ""
            except Exception as exc:  # one bad volume must not lose the other modality
                record = {"status": STATUS_FAILED, "reason": describe_exception(exc)}
                # outputs of an earlier run (--overwrite) or a partial write would make the
                # next run skip this modality and report it ok
                for path in output_paths(save_dir, study.id, modality).values():
                    path.unlink(missing_ok=True)
            record["seconds"] = time.perf_counter() - t0
            out[modality] = record
    out["study_seconds"] = time.perf_counter() - started
    return out


def _manifest_row(result: dict, previous: dict | None) -> ItemResult:
    values: dict = {}
    reasons, statuses = [], []
    for modality in MODALITIES:
        record = result[modality]
        status = record["status"]
        if status == STATUS_SKIPPED and previous is not None:
            # finished earlier: keep that run's numbers for this modality
            values.update({k: v for k, v in previous.items() if k.startswith(f"{modality}_")})
            status = previous.get(f"{modality}_status", STATUS_OK) or STATUS_OK
            if status == STATUS_FAILED:     # outputs exist, so the earlier failure was fixed since
                status = STATUS_OK
        values[f"{modality}_status"] = status
        if record.get("reason") and record["status"] == STATUS_FAILED:
            reasons.append(f"{modality}: {record['reason']}")
        if "seconds" in record:
            values[f"{modality}_seconds"] = round(record["seconds"], 3)
        for key, value in record.get("numbers", {}).items():
            values[f"{modality}_{key}"] = value
        for key, value in record.get("timings", {}).items():
            values[f"{modality}_t_{key}"] = round(value, 4)
        statuses.append(status)
    if "study_seconds" in result:
        values["study_seconds"] = round(result["study_seconds"], 3)
    if STATUS_FAILED in statuses:
        status = STATUS_FAILED
    elif all(s == STATUS_SKIPPED for s in statuses):
        status = STATUS_SKIPPED
    else:
        status = STATUS_OK
    return ItemResult(id=result["id"], subject=result["subject"], status=status,
                      reason="; ".join(reasons), values=values)


def qa_montage(save_dir: str | os.PathLike, ids: list[str], *, max_studies: int = 24,
               ncols: int = 8, crop: int = 256) -> np.ndarray | None:
    """RGB sheet: for each block of ``ncols`` studies, a row of CT renders above their PET
    renders (central ``crop`` pixels of each render, where the head is); black = missing
    or unreadable."""
    from faceaudit.core.images import center_crop, read_grey
    from faceaudit.core.figures import montage

    save_dir = Path(save_dir)
    ids = ids[:max_studies]
    if not ids:
        return None
    ncols = min(ncols, len(ids))
    images, labels = [], []
    blank = np.zeros((64, 64), dtype=np.uint8)
    for start in range(0, len(ids), ncols):
        block = ids[start: start + ncols]
        for modality in MODALITIES:
            for study_id in block:
                try:
                    image = read_grey(output_paths(save_dir, study_id, modality)["png"])
                except InputError:          # missing or unreadable: a QA sheet never stops the run
                    image = blank
                if min(image.shape[:2]) > crop:
                    image = center_crop(image, crop)
                images.append(image)
                labels.append(f"{modality.upper()} {study_id.removeprefix('PETCT_')[:8]}"
                              f"..{study_id[-5:]}")
            images.extend([blank] * (ncols - len(block)))
            labels.extend([""] * (ncols - len(block)))
    return montage(images, labels=labels, ncols=ncols, tile=160)


def run_reconstruction(petct_path: str | os.PathLike, save_dir: str | os.PathLike, *,
                       jobs: int = 1, overwrite: bool = False, seed: int = 0,
                       progress: bool = True, options: ReconstructionOptions | None = None,
                       cli_args: dict | None = None) -> int:
    """The stage. Returns EXIT_OK (0) when every study has CT and PET renders, else 1.

    Raises InputError when ``petct_path`` holds no study (the script turns it into exit 2).
    ``seed`` is recorded only: the stage makes no random choice.
    """
    started = time.time()
    options = options or ReconstructionOptions()
    studies = discover_studies(petct_path)
    save_dir = make_private_dir(save_dir)
    for folder in ("cts", "pets", "meshes", "depth"):
        make_private_dir(save_dir / folder)
    manifest = Manifest(save_dir / "manifest.csv")
    worker = functools.partial(process_study, save_dir=str(save_dir), options=options,
                               overwrite=overwrite)
    ids = {s.id for s in studies}
    for study, result, error in map_items(worker, studies, jobs=jobs, desc="reconstruct",
                                          progress=progress):
        if error is not None:   # a crash outside the per-modality guard (e.g. worker died)
            manifest.add(ItemResult(id=study.id, subject=study.subject, status=STATUS_FAILED,
                                    reason=describe_exception(error)))
            continue
        manifest.add(_manifest_row(result, manifest.get(result["id"])))
        for modality in MODALITIES:
            source = study.ct if modality == "ct" else study.pet
            manifest.rows[study.id][f"{modality}_source"] = str(source) if source else ""
    # rows of studies no longer present in the input stay out of this run's manifest
    manifest.rows = {k: v for k, v in manifest.rows.items() if k in ids}
    manifest.write()
    rendered = sorted(k for k in manifest.rows
                      if any(output_paths(save_dir, k, m)["png"].is_file() for m in MODALITIES))
    sheet = qa_montage(save_dir, rendered)
    if sheet is not None:
        write_png(save_dir / "qa_montage.png", sheet)
    counts = {s: manifest.count(s) for s in (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)}
    write_run_json(save_dir, stage="reconstruction",
                   args=cli_args or {"petct_path": str(petct_path), "save_dir": str(save_dir),
                                     "jobs": jobs, "overwrite": overwrite},
                   seed=seed, started=started,
                   extra={"options": asdict(options), "n_studies": len(studies), "counts": counts})
    return manifest.exit_code()
