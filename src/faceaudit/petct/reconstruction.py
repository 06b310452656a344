"""Stage 1: PET/CT volumes -> head skin surfaces -> frontal 512 x 512 renders.

``reconstruct_volume`` is the per-volume function (array in, mesh/render/numbers out);
``run_reconstruction`` is the stage: it discovers the studies (volumes.discover_studies),
processes CT and PET of every study independently (a PET failure keeps the CT render and
a re-run produces the missing PET), and writes

    OUT/cts/<id>.png, OUT/pets/<id>.png        512 x 512 uint8 grey, black background
    OUT/meshes/<id>_{ct,pet}.ply               smoothed head mesh, LPS mm
    OUT/depth/<id>_{ct,pet}.npz                depth (mm, NaN = background) + camera numbers
    OUT/manifest.csv, OUT/run.json, OUT/qa_montage.png (CT row above PET row)

Re-runs are keyed on content: each modality's row holds the fingerprint of its volume
(file or DICOM folder) and of the options that shape its render. A modality is redone
when that fingerprint changed (a CT replaced by another patient's, a new threshold), its
earlier attempt failed, or one of its files is gone; otherwise its earlier numbers stay.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from faceaudit.core.contracts import CT_RENDERS, PET_RENDERS, RENDER_CROP, RENDER_SIZE
from faceaudit.core.files import (
    InputError,
    atomic_write_bytes,
    make_private_dir,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import STATUS_FAILED, STATUS_OK, ItemResult, describe_exception
from faceaudit.core.options import expect, expect_choice, expect_number, expect_whole
from faceaudit.core.runner import RunSettings, StageResult, StageRun, fingerprint, is_location_error, map_items
from faceaudit.petct.dicom_study import MIN_SERIES_FILES, pet_in_suv
from faceaudit.petct.render import PROJECTIONS, SHADINGS, render_frontal
from faceaudit.petct.render_qa import (
    FACE,
    IMPLAUSIBLE,
    LABEL_CHARS,
    NO_FACE,
    UNCHECKED,
    mark_no_face,
    qa_labels,
    render_face_qa,
    start_checker,
)
from faceaudit.petct.surface import PET_THRESHOLDS, extract_head_surface
from faceaudit.petct.volumes import NIFTI_SUFFIXES, Study, discover_studies, load_volume

MODALITIES = ("ct", "pet")
PNG_FOLDERS = {"ct": CT_RENDERS, "pet": PET_RENDERS}
MESH_DIR = "meshes"
DEPTH_DIR = "depth"
QA_MONTAGE = "qa_montage.png"


@dataclass(frozen=True)
class ReconstructionOptions:
    """Every knob of the stage; the defaults are the fixed pipeline, the comments say upstream.

    Validated on creation: a value no run could use raises OptionsError (exit 2).
    """

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
    head_px: int = RENDER_CROP                  # head box size in pixels (fits the centre crop)
    size: int = RENDER_SIZE

    def __post_init__(self) -> None:
        # named by the script's flag where there is one (core_radius_mm and size have none)
        object.__setattr__(self, "ct_threshold", _ct_threshold_value(self.ct_threshold))
        expect_choice("--pet-threshold", self.pet_threshold, PET_THRESHOLDS)
        expect_choice("--shading", self.shading, SHADINGS)
        expect_choice("--projection", self.projection, PROJECTIONS)
        expect_number("--pet-percentile", self.pet_percentile, low=0, low_open=True, high=100)
        expect_number("--pet-body-fraction", self.pet_body_fraction, low=0, low_open=True, high=1)
        expect_number("--head-height-mm", self.head_height_mm, low=0, low_open=True)
        expect_number("core_radius_mm", self.core_radius_mm, low=0, low_open=True)
        expect_number("--opening-radius-mm", self.opening_radius_mm, low=0)
        expect_whole("--smoothing-iterations", self.smoothing_iterations, 0)
        expect_whole("size", self.size, 16)
        expect_whole("--head-px", self.head_px, 8)
        expect(self.head_px <= self.size, "--head-px", f"<= size ({self.size})", self.head_px)
        expect(isinstance(self.fill_holes, bool), "fill_holes", "True or False", self.fill_holes)

    def shaping(self, modality: str) -> dict:
        """The options that shape ``modality``'s outputs (the other modality's threshold
        options do not), as a dict for fingerprints."""
        other = {"ct": ("pet_threshold", "pet_percentile", "pet_body_fraction"),
                 "pet": ("ct_threshold",)}[modality]
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in other}


def _ct_threshold_value(value) -> str | float:
    """'otsu', or the level as a float (the script passes the flag's text, "-300")."""
    if value == "otsu":
        return value
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    expect(math.isfinite(number), "--ct-threshold", "'otsu' or a finite number of HU", value)
    return number


@dataclass
class ModalityResult:
    """One volume's reconstruction: mesh (SurfaceMesh, LPS mm), render, numbers, seconds per phase."""

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
    save_dir = Path(save_dir)
    return {"png": save_dir / PNG_FOLDERS[modality] / f"{study_id}.png",
            "ply": save_dir / MESH_DIR / f"{study_id}_{modality}.ply",
            "depth": save_dir / DEPTH_DIR / f"{study_id}_{modality}.npz"}


def _remove_outputs(save_dir: Path, study_id: str, modality: str) -> None:
    for path in output_paths(save_dir, study_id, modality).values():
        path.unlink(missing_ok=True)


def remove_stale_outputs(save_dir: Path, study_ids) -> list[Path]:
    """Delete the renders, meshes and depth maps in ``save_dir`` of studies no longer among
    ``study_ids`` (later stages take every ``*.png`` of cts/ and pets/, so a removed study's
    renders would still be trained on). Only files named as this stage names its outputs
    are touched; returns them."""
    save_dir = Path(save_dir)
    kept = {path for study_id in study_ids for m in MODALITIES
            for path in output_paths(save_dir, study_id, m).values()}
    patterns = {folder: "*.png" for folder in PNG_FOLDERS.values()}
    patterns.update({MESH_DIR: "*.ply", DEPTH_DIR: "*.npz"})
    removed = []
    for folder, pattern in patterns.items():
        for path in sorted((save_dir / folder).glob(pattern)):
            if path.is_file() and not path.name.startswith(".") and path not in kept:
                path.unlink()
                removed.append(path)
    return removed


def _source(study: Study, modality: str) -> Path | None:
    return study.ct if modality == "ct" else study.pet


def _load(study: Study, modality: str):
    """(volume, seconds, unit numbers); a missing or ambiguous side is an InputError naming
    what was expected."""
    problem = study.problems.get(modality)
    if problem:
        raise InputError(f"study {study.id}: {problem}")
    path = _source(study, modality)
    if path is None:
        if study.layout == "flat":
            expected = f"{study.id}_{modality}.nii.gz or a DICOM folder {study.id}_{modality}/"
        elif study.layout == "tcia":
            expected = (f"a DICOM series with Modality {'CT' if modality == 'ct' else 'PT'} and at "
                        f"least {MIN_SERIES_FILES} files")
        else:
            expected = f"{'CTres' if modality == 'ct' else 'SUV'}.nii.gz (or {modality.upper()}.nii.gz)"
        raise InputError(f"study {study.id} has no {modality.upper()} volume (expected {expected})")
    t0 = time.perf_counter()
    # as stored: thresholds, labels and masks work on an int16 CT as they are
    volume = load_volume(path, dtype=None)
    units = {}
    if modality == "pet":
        volume, units = pet_in_suv(volume, path)
    return volume, time.perf_counter() - t0, units


def _import_processing_modules(*, nifti: bool = False) -> None:
    """Import what the surface, render and write steps use, in this one thread; with
    ``nifti``, nibabel first.

    Why one thread: the CT and PET are processed in two threads, and two threads importing
    one package for the first time at once (scipy from ndimage and from skimage) can be
    handed each other's partially initialised modules (trimesh is not among them: stage 1
    never imports it, see petct.mesh). Importing here while the volumes are
    inflated (igzip releases the GIL) also takes the imports off the critical path.
    nibabel comes first because both readers wait for it to parse their headers: imported
    alone, before scipy, it is not slowed by another import holding the GIL half the time.
    """
    if nifti:
        import nibabel  # noqa: F401
    import cc3d  # noqa: F401
    import embreex.mesh_construction  # noqa: F401
    import embreex.rtcore_scene  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.sparse  # noqa: F401
    import skimage.filters  # noqa: F401
    import skimage.measure  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401
    from skimage.filters import threshold_otsu  # noqa: F401  (lazy-loaded attributes)
    from skimage.measure import marching_cubes  # noqa: F401


def _reconstruct_and_write(volume, t_load: float, save_dir: Path, study_id: str, modality: str,
                           options: ReconstructionOptions, units: dict) -> dict:
    result = reconstruct_volume(volume.array, volume.spacing, modality=modality,
                                origin=volume.origin, options=options)
    t0 = time.perf_counter()
    # what the landmark stage will see: a render without a face stays ok but is counted
    numbers = {**result.numbers, **units, "face_qa": render_face_qa(result.render.image)}
    t_qa = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = output_paths(save_dir, study_id, modality)
    write_png(paths["png"], result.render.image)
    atomic_write_bytes(paths["ply"], result.mesh.ply_bytes())
    camera = result.render.camera
    write_npz(paths["depth"], depth_mm=result.render.depth,
              mm_per_px=np.float64(camera["mm_per_px_at_face"]),
              centre_xz_mm=np.asarray(camera["centre_xz_mm"]),
              image_plane_y_mm=np.float64(camera["image_plane_y_mm"]),
              projection=np.str_(camera["projection"]))
    timings = {"load": t_load, **result.timings, "face_qa": t_qa, "write": time.perf_counter() - t0}
    return {"numbers": numbers, "timings": timings}


def _process_modality(study: Study, modality: str, save_dir: Path, options: ReconstructionOptions,
                      imported, loaded) -> dict:
    """Load, reconstruct, check and write one modality; a bad volume becomes the record's
    reason (its output files removed), a full or read-only disk is raised. ``loaded`` (an
    Event) is set once the volume is read or failed to read."""
    t0 = time.perf_counter()
    try:
        try:
            volume, t_load, units = _load(study, modality)
        finally:
            loaded.set()
        imported.result()           # the processing modules (an ImportError is this volume's failure)
        record = _reconstruct_and_write(volume, t_load, save_dir, study.id, modality, options, units)
        del volume
        record["status"], record["reason"] = STATUS_OK, ""
    except Exception as exc:  # one bad volume must not lose the other modality
        with contextlib.suppress(OSError):      # nothing to remove on a read-only disk
            _remove_outputs(save_dir, study.id, modality)
        if is_location_error(exc):
            raise
        record = {"status": STATUS_FAILED, "reason": describe_exception(exc)}
    record["seconds"] = time.perf_counter() - t0
    return record


def process_study(study: Study, *, save_dir: str | os.PathLike, options: ReconstructionOptions,
                  modalities=MODALITIES, fingerprints: dict | None = None) -> dict:
    """Reconstruct the listed modalities of one study, each on its own.

    Returns ``{"id", "subject", <modality>: {"status", "reason", "seconds", "numbers",
    "timings", "fingerprint"}}`` for each modality in ``modalities`` (the stage decides
    which need work). ``fingerprints``: the modalities' fingerprints where the caller
    already computed them; the others are computed here, while the volumes are read.
    Never raises for a bad volume: the error becomes that modality's reason and its output
    files are removed (an earlier run's render of a since replaced volume included). A full,
    read-only or over-quota disk (runner.is_location_error) is raised: no study could be
    written after it, so the stage stops (exit 2) instead of failing every study.

    The CT and PET each run in their own thread from reading to writing: inflating a
    volume releases the GIL, and so do most of the array work, the mesh smoothing and
    the ray casting, so on two cores the two modalities overlap. The processing modules
    are imported in a third thread meanwhile, the face-QA model in a checker process
    (render_qa.start_checker), and each fingerprint is hashed once its volume is read
    (hashlib releases the GIL too).
    """
    from concurrent.futures import ThreadPoolExecutor

    save_dir = Path(save_dir)
    out: dict = {"id": study.id, "subject": study.subject}
    todo = [m for m in MODALITIES if m in modalities]
    known = dict(fingerprints or {})
    start_checker()           # MediaPipe is imported in the checker process, on another core
    with ThreadPoolExecutor(max_workers=2 * len(todo) + 1) as pool:
        sources = [_source(study, m) for m in todo]
        imported = pool.submit(_import_processing_modules, nifti=any(
            p is not None and p.name.lower().endswith(NIFTI_SUFFIXES) for p in sources))
        loaded = {m: threading.Event() for m in todo}
        records = {m: pool.submit(_process_modality, study, m, save_dir, options, imported, loaded[m])
                   for m in todo}
        # hashed once the volume is read: the file is in the page cache then, and the
        # inflating, which everything after waits for, has the cores to itself before
        hashed = {m: pool.submit(lambda m=m: (loaded[m].wait(), modality_fingerprint(study, m, options))[1])
                  for m in todo if m not in known}
        for modality in todo:
            record = records[modality].result()
            if record["status"] == STATUS_OK:
                record["fingerprint"] = known.get(modality) or hashed[modality].result()
            out[modality] = record
    return out


# --------------------------------------------------------------------------- rows

def modality_fingerprint(study: Study, modality: str, options: ReconstructionOptions) -> str | None:
    """Content of the modality's volume (file or DICOM folder) and the options that shape
    its render; None when the volume is missing or ambiguous (nothing to skip)."""
    path = _source(study, modality)
    if path is None or study.problems.get(modality):
        return None
    return fingerprint(path, {"modality": modality, **options.shaping(modality)})


def _is_fresh(stage: StageRun, study: Study, modality: str, options: ReconstructionOptions,
              hashed: dict) -> bool:
    """The modality finished ok earlier from the same volume content and options, and its
    files are all there (its own status and fingerprint columns of the study's row). The
    volume is hashed only when the earlier row could make it fresh; what was hashed is
    kept in ``hashed`` (modality -> fingerprint) for the worker."""
    def fingerprint_now():
        hashed[modality] = modality_fingerprint(study, modality, options)
        return hashed[modality]

    return stage.is_fresh(study.id, fingerprint_now, output_paths(stage.save_dir, study.id, modality).values(),
                          column=f"{modality}_fingerprint", status_column=f"{modality}_status")


def _modality_values(modality: str, record: dict) -> dict:
    values = {f"{modality}_status": record["status"],
              f"{modality}_seconds": round(record["seconds"], 3)}
    for key, value in record.get("numbers", {}).items():
        values[f"{modality}_{key}"] = value
    for key, value in record.get("timings", {}).items():
        values[f"{modality}_t_{key}"] = round(value, 4)
    if record["status"] == STATUS_OK and record.get("fingerprint") is not None:
        values[f"{modality}_fingerprint"] = record["fingerprint"]
    return values


def study_row(study: Study, result: dict, previous: dict | None) -> ItemResult:
    """The manifest row of a study: the redone modalities' new numbers, the earlier numbers of
    the modalities left as they were. ``study_seconds`` is the sum of the modalities' seconds,
    so it stays coherent with them when one modality is kept from an earlier run."""
    values: dict = {}
    reasons, statuses, seconds = [], [], 0.0
    for modality in MODALITIES:
        if modality in result:
            record = result[modality]
            values.update(_modality_values(modality, record))
            if record["status"] == STATUS_FAILED:
                reasons.append(f"{modality}: {record['reason']}")
        else:           # fresh: this modality's columns of the earlier row
            values.update({k: v for k, v in (previous or {}).items() if k.startswith(f"{modality}_")})
        values[f"{modality}_source"] = str(_source(study, modality) or "")
        statuses.append(values[f"{modality}_status"])
        seconds += float(values.get(f"{modality}_seconds") or 0.0)     # a kept one: CSV text
    values["study_seconds"] = round(seconds, 3)
    status = STATUS_FAILED if STATUS_FAILED in statuses else STATUS_OK
    return ItemResult(id=study.id, subject=study.subject, status=status,
                      reason="; ".join(reasons), values=values)


# --------------------------------------------------------------------------- QA sheet

def qa_montage(save_dir: str | os.PathLike, ids: list[str], *, max_studies: int = 24,
               ncols: int = 8, crop: int = 256,
               verdicts: dict[tuple[str, str], str] | None = None) -> np.ndarray | None:
    """RGB sheet: for each block of ``ncols`` studies, a row of CT renders above their PET
    renders (central ``crop`` pixels of each render, where the head is); black = missing
    or unreadable. ``verdicts``: (id, modality) -> face QA verdict; a render whose verdict
    is not "face" (render_qa: no_face, implausible, unchecked) gets a red frame and its
    verdict in red; the stage's summary counts the same renders."""
    from faceaudit.core.figures import montage
    from faceaudit.core.images import center_crop, read_grey

    save_dir = Path(save_dir)
    ids = ids[:max_studies]
    if not ids:
        return None
    ncols = min(ncols, len(ids))
    names = dict(zip(ids, qa_labels(ids, width=LABEL_CHARS - 4)))
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
                verdict = (verdicts or {}).get((study_id, modality), FACE)
                if image is not blank and verdict not in (FACE, ""):
                    image = mark_no_face(image, verdict)
                images.append(image)
                labels.append(f"{modality.upper()} {names[study_id]}")
            images.extend([blank] * (ncols - len(block)))
            labels.extend([""] * (ncols - len(block)))
    return montage(images, labels=labels, ncols=ncols, tile=160)


# --------------------------------------------------------------------------- the stage

def run_reconstruction(petct_path: str | os.PathLike, save_dir: str | os.PathLike,
                       options: ReconstructionOptions | None = None, *,
                       run: RunSettings | None = None) -> StageResult:
    """The stage: every study's CT and PET, each redone only when its content fingerprint
    changed. Exit code 0 when every study has CT and PET renders, 1 when one failed.

    Raises InputError when ``petct_path`` holds no study (the script turns it into exit 2),
    and the OSError of a full, read-only or over-quota output disk (exit 2, after the rows
    finished so far are written). The outputs of studies no longer in ``petct_path`` are
    removed with their rows. The stage makes no random choice; ``run.seed`` is only recorded.
    """
    options = options or ReconstructionOptions()
    run = run or RunSettings()
    studies = discover_studies(petct_path)
    ids = [s.id for s in studies]
    with StageRun("reconstruction", save_dir, run, options=options) as stage:
        for folder in (*PNG_FOLDERS.values(), MESH_DIR, DEPTH_DIR):
            make_private_dir(stage.save_dir / folder)
        stage.extra["n_studies"] = len(studies)
        stale = remove_stale_outputs(stage.save_dir, ids)
        work = _plan(stage, studies, options)
        worker = functools.partial(_process_task, save_dir=str(stage.save_dir), options=options)
        for (study, todo, _hashed), result, error in map_items(worker, work, jobs=run.jobs,
                                                       desc="reconstruct", progress=run.progress):
            if error is not None and is_location_error(error):
                raise error
            if error is not None:   # outside the per-modality guard (the worker died)
                for modality in todo:
                    _remove_outputs(stage.save_dir, study.id, modality)
                stage.record(ItemResult(id=study.id, subject=study.subject, status=STATUS_FAILED,
                                        reason=describe_exception(error)))
                continue
            stage.record(study_row(study, result, stage.previous(study.id)))
        _write_qa_montage(stage, ids)
        result = stage.finish(keep_ids=ids, details={"n_studies": len(studies), "n_processed": len(work),
                                                     "n_stale_files_removed": len(stale)})
        result.summary = _summary(stage, result.counts, ids, n_stale=len(stale))
        return result


def _process_task(task, *, save_dir: str, options: ReconstructionOptions) -> dict:
    study, todo, hashed = task
    return process_study(study, save_dir=save_dir, options=options, modalities=todo, fingerprints=hashed)


def _plan(stage: StageRun, studies: list[Study], options: ReconstructionOptions):
    """Record the studies whose CT and PET are both fresh as skipped; return the others as
    (study, the modalities to redo, the fingerprints hashed here). A volume is hashed here
    only when an earlier row could make it fresh; on a first run the workers hash it while
    they read it, so the pool starts at once instead of after every volume was read once."""
    work = []
    for study in studies:
        hashed: dict = {}
        todo = tuple(m for m in MODALITIES if not _is_fresh(stage, study, m, options, hashed))
        if todo:
            work.append((study, todo, {m: hashed[m] for m in todo if hashed.get(m)}))
            continue
        row = stage.skipped(study.id)
        row.values.pop("fingerprint", None)        # a study-wide column of earlier versions, unread
        row.values.update({f"{m}_source": str(_source(study, m)) for m in MODALITIES})
        stage.record(row)
    return work


def _write_qa_montage(stage: StageRun, ids: list[str]) -> None:
    save_dir = stage.save_dir
    rendered = [i for i in sorted(ids)
                if any(output_paths(save_dir, i, m)["png"].is_file() for m in MODALITIES)]
    verdicts = {(i, m): (stage.previous(i) or {}).get(f"{m}_face_qa") or FACE
                for i in rendered for m in MODALITIES}
    sheet = qa_montage(save_dir, rendered, verdicts=verdicts)
    if sheet is not None:
        write_png(save_dir / QA_MONTAGE, sheet)


def _listed(ids: list[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _summary(stage: StageRun, counts: dict[str, int], ids: list[str], *, n_stale: int = 0) -> str:
    """The lines the script prints. Every render the QA sheet frames in red is counted: those
    without a face (no_face, implausible) and those whose face QA could not run (unchecked)."""
    rows = [stage.previous(i) for i in sorted(ids)]
    lines = [(f"reconstruction: {len(ids)} studies: {counts['ok']} ok, {counts['failed']} failed, "
              f"{counts['skipped']} skipped (unchanged); renders in {stage.save_dir}")]
    if n_stale:
        lines.append(f"  removed {n_stale} render, mesh and depth files of studies no longer in the input")
    for modality in MODALITIES:
        def with_verdict(*verdicts):
            return [row["id"] for row in rows if row and row.get(f"{modality}_status") == STATUS_OK
                    and row.get(f"{modality}_face_qa") in verdicts]

        faceless, unchecked = with_verdict(NO_FACE, IMPLAUSIBLE), with_verdict(UNCHECKED)
        if faceless:
            lines.append(f"  {len(faceless)} {modality.upper()} renders without a face ({modality}_face_qa "
                         f"{NO_FACE} or {IMPLAUSIBLE}; see {QA_MONTAGE}): {_listed(faceless)}")
        if unchecked:
            lines.append(f"  {len(unchecked)} {modality.upper()} renders not checked for a face ({modality}_face_qa "
                         f"{UNCHECKED}: the face mesh could not run, see the warnings): {_listed(unchecked)}")
    failed = [row for row in rows if row and row.get("status") == STATUS_FAILED]
    for row in failed[:10]:
        lines.append(f"  failed {row['id']}: {row.get('reason', '')}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (see manifest.csv)")
    return "\n".join(lines)
