"""The digital-mask stage: select frontal faces, pair database/query images, build and render masks.

Output folder ``DM`` (0700, files 0600)::

    DM/selection.csv     every input image: accepted/rejected, reason, confidences, pose, role
    DM/selection.json    the selection options (a re-run reuses selection.csv only if they match)
    DM/<role>/<identity>/<name>_prep.png            224x224 crop (the original face)
    DM/<role>/<identity>/<name>_overlay.png         mask over the photo inside the face cut
    DM/<role>/<identity>/<name>_mask_only.png       mask on white
    DM/<role>/<identity>/<name>_mask_only_black.png mask on black (background set per pixel)
    DM/<role>/<identity>/<name>_mesh.ply            mesh in image geometry (x col, y row, depth)
    DM/<role>/<identity>/<name>_params.json         backend parameters (pose, scale, fit...)
    DM/manifest.csv      one row per selected image (contract columns, paths relative to DM)
    DM/montage.png       originals beside their masks
    DM/run.json          arguments, versions, seed, counts, rates

Selection does not depend on the backend, so the same --seed and input give the same
images for every backend (cross-mask runs pair up by id). A failed mask writes no image
at all: the photo is never passed on unmasked.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.files import (
    InputError,
    atomic_write_bytes,
    make_private_dir,
    read_npz,
    write_csv,
    write_json,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import (
    STATUS_FAILED,
    STATUS_OK,
    ItemResult,
    Manifest,
    describe_exception,
)
from faceaudit.core.runner import map_items, write_run_json
from faceaudit.mask import selection
from faceaudit.mask.backends import BACKENDS, bundled_mean_shape, make_backend
from faceaudit.mask.flame import find_flame, load_flame
from faceaudit.mask.renderer import MaskImages, MaskRenderer, compose, face_cut
from faceaudit.mask.topology import MaskError, MaskResult

VARIANTS = ("prep", "overlay", "mask_only", "mask_only_black")
SELECTION_COLUMNS = ("identity", "video", "name", "source", "status", "reason", "role", "n_faces",
                     "det_score", "other_score", "yaw", "pitch", "roll", "pose_residual",
                     "upscale", "image_w", "image_h", "box_x0", "box_y0", "box_x1", "box_y1")
MEANSHAPE_FILE = "meanshape.npz"


def item_id(role: str, identity: str, name: str) -> str:
    return f"{role}/{identity}/{name}"


# --------------------------------------------------------------------------- masking worker

_STATE: dict[str, Any] = {}


def _mask_tools(backend: str, model_dir: str | None, mean_shape: np.ndarray | None):
    from faceaudit.faces.facemesh import FaceMesh

    if "mesh" not in _STATE:
        _STATE["mesh"] = FaceMesh()
    if "renderer" not in _STATE:
        _STATE["renderer"] = MaskRenderer(224, 224)
    # keyed by the mean shape's content too: one process may mask with several means
    shape_tag = "" if mean_shape is None else hashlib.sha1(np.ascontiguousarray(mean_shape)).hexdigest()
    key = f"backend:{backend}:{model_dir}:{shape_tag}"
    if key not in _STATE:
        _STATE[key] = make_backend(backend, model_dir=model_dir, mean_shape=mean_shape)
    return _STATE["mesh"], _STATE["renderer"], _STATE[key]


def build_mask(prep: np.ndarray, *, backend, face_mesh, renderer
               ) -> tuple[MaskResult, MaskImages]:
    """Mask one 224x224 RGB prep image: landmarks, backend mesh, render, cut, compose.

    Raises MaskError when any step fails.
    """
    landmarks = face_mesh.detect(prep)
    if landmarks is None:
        raise MaskError("no landmarks: MediaPipe face mesh found no face on the prep image")
    result = backend.build(prep, landmarks)
    render, covered = renderer.render(result.vertices, result.faces)
    h, w = prep.shape[:2]
    cut = face_cut(landmarks, w, h)
    return result, compose(prep, render, covered, cut)


def _ply_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    import trimesh

    return trimesh.Trimesh(vertices, faces, process=False).export(file_type="ply")


def mask_one(job: dict[str, Any], *, save_dir: str, backend: str, model_dir: str | None,
             mean_shape: np.ndarray | None, options: selection.SelectionOptions) -> dict[str, Any]:
    """Build and write every variant of one selected image; returns the manifest values.

    Raises on failure (the caller records the reason); nothing is written then.
    """
    face_mesh, renderer, be = _mask_tools(backend, model_dir, mean_shape)
    prep = selection.prep_from_row(job, options)
    result, images = build_mask(prep, backend=be, face_mesh=face_mesh, renderer=renderer)
    out = Path(save_dir)
    rel = Path(job["role"]) / job["identity"]
    stem = job["name"]
    paths = {v: (rel / f"{stem}_{v}.png").as_posix() for v in VARIANTS}
    paths["mesh"] = (rel / f"{stem}_mesh.ply").as_posix()
    paths["params"] = (rel / f"{stem}_params.json").as_posix()
    make_private_dir(out / job["role"])  # each level 0700, not only the leaf
    make_private_dir(out / rel)
    write_png(out / paths["prep"], prep)
    write_png(out / paths["overlay"], images.overlay)
    write_png(out / paths["mask_only"], images.mask_only)
    write_png(out / paths["mask_only_black"], images.mask_only_black)
    atomic_write_bytes(out / paths["mesh"], _ply_bytes(result.vertices, result.faces))
    write_json(out / paths["params"], {"backend": result.backend, "params": result.params,
                                       "landmarks": result.landmarks})
    coverage = float(images.covered.sum() / images.cut.sum())
    return {**paths, "coverage": coverage,
            "rms_landmark_px": result.params.get("rms_landmark_px", "")}


# --------------------------------------------------------------------------- stage

#: Selection outcomes that are failures, not decisions: tried again on a re-run.
RETRIED_REASONS = ("unreadable", "error")


def _read_selection(save_dir: Path, options: selection.SelectionOptions) -> dict[str, dict]:
    """Earlier selection decisions keyed by source, when made with the same options
    (rows of unreadable files or errors are left out, so a re-run tries them again)."""
    csv_path, opt_path = save_dir / "selection.csv", save_dir / "selection.json"
    if not (csv_path.is_file() and opt_path.is_file()):
        return {}
    try:
        if json.loads(opt_path.read_text()) != options.as_dict():
            return {}
        with open(csv_path, newline="", encoding="utf-8") as fh:
            return {r["source"]: r for r in csv.DictReader(fh)
                    if selection.reason_code(r["reason"]) not in RETRIED_REASONS}
    except (OSError, ValueError, KeyError):
        return {}


def _load_mean_shape(model_dir: str | None) -> tuple[np.ndarray, str]:
    if model_dir is not None and (Path(model_dir) / MEANSHAPE_FILE).is_file():
        path = Path(model_dir) / MEANSHAPE_FILE
        mean = read_npz(path, required=("mean_shape",))["mean_shape"]
        if mean.shape != (478, 3):
            raise InputError(f"{path}: mean_shape must be (478, 3), one row per MediaPipe "
                             f"landmark; found shape {mean.shape}")
        return mean, str(path)
    return bundled_mean_shape(), "bundled ORL faces (400 photos, 40 people)"


def _write_montage(save_dir: Path, manifest: Manifest, *, max_rows: int = 8) -> None:
    from faceaudit.core.figures import montage
    from faceaudit.core.images import read_rgb

    ok = [r for r in sorted(manifest.rows.values(), key=lambda r: (r.get("subject", ""), r["id"]))
          if r.get("status") == STATUS_OK and r.get("prep")]
    images, labels = [], []
    for row in ok[:max_rows]:
        for variant in VARIANTS:
            images.append(read_rgb(save_dir / row[variant]))
            labels.append(f"{row['subject']} {row['role'][0]} {variant}")
    if images:
        write_png(save_dir / "montage.png", montage(images, labels=labels, ncols=len(VARIANTS)))


def run_digital_mask(input_dir: str | Path, save_dir: str | Path, *, backend: str = "mediapipe",
                     protocol: str = "same-video", detector: str = "retinaface",
                     min_confidence: float = 0.9, max_other_confidence: float = 0.1,
                     max_yaw: float = 20.0, max_pitch: float = 20.0, max_roll: float | None = None,
                     min_side: int = 224, model_dir: str | Path | None = None, seed: int = 0,
                     jobs: int = 1, overwrite: bool = False, progress: bool = True,
                     run_args: dict[str, Any] | None = None) -> int:
    """Select, pair and mask faces from ``input_dir`` into ``save_dir``; returns the exit code
    (0 all selected images masked, 1 some failed). Bad input folder or missing model: InputError."""
    started = time.time()
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if protocol not in selection.PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(selection.PROTOCOLS)}")
    if detector not in ("retinaface", "mediapipe"):
        raise InputError(f"unknown detector {detector!r}; expected retinaface or mediapipe")
    model_dir = None if model_dir is None else str(model_dir)
    mean_shape, mean_source = None, ""
    # a missing or broken model fails here, before selection
    if backend == "flame":
        load_flame(find_flame(model_dir))
    elif backend == "meanshape":
        mean_shape, mean_source = _load_mean_shape(model_dir)
    images = selection.discover_images(input_dir)
    out = make_private_dir(save_dir)
    options = selection.SelectionOptions(detector, float(min_confidence), float(max_other_confidence),
                                         float(max_yaw), float(max_pitch),
                                         None if max_roll is None else float(max_roll), int(min_side))

    # ---- selection (backend-independent, reused on re-runs with the same options)
    earlier = {} if overwrite else _read_selection(out, options)
    todo = [im for im in images if im.source not in earlier]
    t_sel = time.time()
    fresh = {}
    for image, row, error in map_items(functools.partial(selection.select_one, options=options),
                                       todo, jobs=jobs, desc="selection", progress=progress):
        if error is not None:
            row = {"identity": image.identity, "video": image.video, "name": image.name,
                   "source": image.source, "status": selection.REJECTED,
                   "reason": f"error: {describe_exception(error)}"}
        fresh[image.source] = row
    sel_seconds = time.time() - t_sel
    rows = []
    for image in images:
        row = dict(earlier.get(image.source) or fresh[image.source])
        row.update(identity=image.identity, video=image.video, name=image.name)
        rows.append(row)
    roles, unpaired = selection.choose_pairs(rows, protocol=protocol, seed=seed)
    for row in rows:
        row["role"] = roles.get(f"{row['identity']}/{row['name']}", "")
    write_csv(out / "selection.csv", rows, SELECTION_COLUMNS)
    write_json(out / "selection.json", options.as_dict())

    # ---- masking
    if mean_shape is not None:
        write_npz(out / MEANSHAPE_FILE, mean_shape=mean_shape)
    manifest = Manifest(out / "manifest.csv")
    chosen = [r for r in rows if r["role"]]
    chosen_ids = {item_id(r["role"], r["identity"], r["name"]) for r in chosen}
    for stale in [i for i in manifest.rows if i not in chosen_ids]:
        del manifest.rows[stale]  # an earlier run's pick that this seed/protocol no longer makes
    jobs_todo = []
    for row in chosen:
        iid = item_id(row["role"], row["identity"], row["name"])
        old = manifest.get(iid)
        if (not overwrite and old is not None and old.get("status") == STATUS_OK
                and old.get("backend") == backend
                and all(old.get(v) and (out / old[v]).is_file() for v in VARIANTS)):
            continue
        jobs_todo.append(row)
    worker = functools.partial(mask_one, save_dir=str(out), backend=backend, model_dir=model_dir,
                               mean_shape=mean_shape, options=options)
    t_mask = time.time()
    for row, values, error in map_items(worker, jobs_todo, jobs=jobs, desc=f"mask ({backend})",
                                        progress=progress):
        base = {"role": row["role"], "video": row["video"], "source": row["source"],
                "backend": backend, "det_score": row["det_score"], "yaw": row["yaw"],
                "pitch": row["pitch"], "roll": row["roll"]}
        empty = {k: "" for k in (*VARIANTS, "mesh", "params", "coverage", "rms_landmark_px")}
        iid = item_id(row["role"], row["identity"], row["name"])
        if error is None:
            manifest.add(ItemResult(iid, row["identity"], STATUS_OK, "", {**base, **values}))
        else:
            manifest.add(ItemResult(iid, row["identity"], STATUS_FAILED,
                                    describe_exception(error), {**base, **empty}))
    mask_seconds = time.time() - t_mask
    manifest.write()
    _write_montage(out, manifest)

    reasons = Counter(selection.reason_code(r["reason"]) if r["status"] != selection.ACCEPTED
                      else "accepted" for r in rows)
    write_run_json(out, stage="digital_mask", args=run_args or {
        "input_dir": str(input_dir), "save_dir": str(save_dir), "backend": backend,
        "protocol": protocol, "detector": detector, "model_dir": model_dir, "jobs": jobs,
        "overwrite": overwrite, **options.as_dict()}, seed=seed, started=started, extra={
        "n_images": len(rows),
        "n_accepted": sum(r["status"] == selection.ACCEPTED for r in rows),
        "selection_outcomes": dict(sorted(reasons.items())),
        "n_identities": len({r["identity"] for r in rows}),
        "n_pairs": len(chosen) // 2, "unpaired_identities": unpaired,
        "n_masked_ok": manifest.count(STATUS_OK), "n_mask_failed": manifest.count(STATUS_FAILED),
        "mean_shape_source": mean_source,
        "selection_images_per_s": (len(todo) / sel_seconds) if todo and sel_seconds > 0 else None,
        "masking_images_per_s": (len(jobs_todo) / mask_seconds) if jobs_todo and mask_seconds > 0 else None,
    })
    return manifest.exit_code()
