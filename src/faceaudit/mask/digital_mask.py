"""The digital-mask stage: select frontal faces, pair database/query images, build and render masks.

Output folder ``DM`` (0700, files 0600)::

    DM/selection.csv     every input image: accepted/rejected, reason, confidences, pose, role
                         (selection.journal.jsonl holds each new decision until it is written)
    DM/<role>/<identity>/<name>_prep.png            224x224 crop (the original face)
    DM/<role>/<identity>/<name>_overlay.png         mask over the photo inside the face cut
    DM/<role>/<identity>/<name>_mask_only.png       mask on white
    DM/<role>/<identity>/<name>_mask_only_black.png mask on black (background set per pixel)
    DM/<role>/<identity>/<name>_mesh.ply            mesh in image geometry (x col, y row, depth)
    DM/<role>/<identity>/<name>_params.json         backend parameters (pose, scale, fit...)
    DM/manifest.csv      one row per selected image (contract columns, paths relative to DM),
                         and a failed row per photo that could not be read
    DM/meanshape.npz     the mean shape used (meanshape backend)
    DM/montage.png       originals beside their masks
    DM/run.json          options, versions, seed, counts, rates

Selection does not depend on the backend, so the same --seed and input give the same
images for every backend (cross-mask runs pair up by id). A re-run reuses a selection
decision, and keeps a mask, only when the photo's content and the options that shape
it are those that produced it; masks of images this run no longer picks (another
--seed, a removed photo) are deleted, and so are files under the role folders that no
finished row names (a run killed while writing a mask). A failed mask leaves no image at
all: the photo is never passed on unmasked. A run killed during selection keeps the
decisions it made (journaled one by one).
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import MASK_PREP_SIZE, N_LANDMARKS, SELECTION_FILE
from faceaudit.core.files import (
    InputError,
    append_line_durably,
    atomic_write_bytes,
    file_digest,
    make_private_dir,
    read_journal,
    read_npz,
    write_csv,
    write_json,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    ItemResult,
    describe_exception,
)
from faceaudit.core.options import expect_choice
from faceaudit.core.runner import (
    RunSettings,
    StageResult,
    StageRun,
    fingerprint,
    map_items,
)
from faceaudit.mask import selection
from faceaudit.mask.backends import BACKENDS, bundled_mean_shape, make_backend
from faceaudit.mask.flame import find_flame, load_flame
from faceaudit.mask.renderer import MaskImages, MaskRenderer, compose, face_cut
from faceaudit.mask.topology import MaskError, MaskResult

log = logging.getLogger(__name__)

VARIANTS = ("prep", "overlay", "mask_only", "mask_only_black")
OUTPUT_KEYS = (*VARIANTS, "mesh", "params")
SELECTION_COLUMNS = ("identity", "video", "name", "source", "status", "reason", "role", "n_faces",
                     "det_score", "other_score", "yaw", "pitch", "roll", "pose_residual",
                     "upscale", "image_w", "image_h", "box_x0", "box_y0", "box_x1", "box_y1",
                     "fingerprint")
#: manifest columns after id, subject, status, reason (the contract recognition reads)
ROW_COLUMNS = ("role", "video", "source", "backend", "det_score", "yaw", "pitch", "roll",
               *OUTPUT_KEYS, "coverage", "rms_landmark_px")
MEANSHAPE_FILE = "meanshape.npz"
MONTAGE_FILE = "montage.png"
#: New selection decisions, one JSON object a line, until selection.csv is written.
SELECTION_JOURNAL = "selection.journal.jsonl"
#: Selection outcomes that are failures, not decisions: a failed manifest row, tried again.
RETRIED_REASONS = ("unreadable", "error")


#: The selection rules' defaults, which the stage's options and the script show as theirs.
_RULES = selection.SelectionOptions()


@dataclass(frozen=True)
class DigitalMaskOptions:
    """What the stage computes: the mask backend, the pairing protocol, the selection rules.

    Validated on creation: a value no run could use raises OptionsError (exit 2).
    """

    backend: str = "mediapipe"
    protocol: str = "same-video"
    model_dir: str | None = None     # flame: holds flame_model.npz; meanshape: meanshape.npz
    # the selection rules the command line sets (defaults and checks: selection.SelectionOptions)
    detector: str = _RULES.detector
    min_confidence: float = _RULES.min_confidence
    max_other_confidence: float = _RULES.max_other_confidence
    max_yaw: float = _RULES.max_yaw
    max_pitch: float = _RULES.max_pitch
    max_roll: float | None = _RULES.max_roll
    min_side: int = _RULES.min_side
    detect_size: int = _RULES.detect_size
    min_face_size: float = _RULES.min_face_size

    def __post_init__(self) -> None:
        expect_choice("--backend", self.backend, BACKENDS)
        expect_choice("--protocol", self.protocol, selection.PROTOCOLS)
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", str(self.model_dir))
        self.selection  # noqa: B018  (validates the selection rules)

    @property
    def selection(self) -> selection.SelectionOptions:
        names = {f.name for f in fields(selection.SelectionOptions)}
        return selection.SelectionOptions(**{f.name: getattr(self, f.name) for f in fields(self)
                                             if f.name in names})


@dataclass(frozen=True)
class MaskModel:
    """The backend's model as loaded before any work: the mean shape (meanshape backend),
    where it came from, and a content tag that goes into each mask's fingerprint."""

    mean_shape: np.ndarray | None = None
    source: str = ""
    tag: str = ""


def item_id(role: str, identity: str, name: str) -> str:
    return f"{role}/{identity}/{name}"


def output_paths(row: dict[str, Any]) -> dict[str, str]:
    """Paths (relative to the output folder) of one picked image's outputs."""
    rel = Path(row["role"]) / row["identity"]
    paths = {v: (rel / f"{row['name']}_{v}.png").as_posix() for v in VARIANTS}
    paths["mesh"] = (rel / f"{row['name']}_mesh.ply").as_posix()
    paths["params"] = (rel / f"{row['name']}_params.json").as_posix()
    return paths


def remove_outputs(save_dir: Path, rel_paths) -> None:
    """Delete the files of ``rel_paths`` that lie inside ``save_dir`` (a manifest edited by
    hand never makes the stage delete elsewhere), then their folders when left empty."""
    root = save_dir.resolve()
    folders = set()
    for rel in rel_paths:
        if not rel:
            continue
        path = (save_dir / rel).resolve()
        if root not in path.parents:
            log.warning("not removing %s: outside %s", path, root)
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
        folders.update(p for p in path.parents if root in p.parents)
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty


# --------------------------------------------------------------------------- masking worker

_STATE: dict[str, Any] = {}


def _mask_tools(backend: str, model_dir: str | None, mean_shape: np.ndarray | None):
    from faceaudit.faces.facemesh import FaceMesh

    if "mesh" not in _STATE:
        _STATE["mesh"] = FaceMesh()
    if "renderer" not in _STATE:
        _STATE["renderer"] = MaskRenderer(MASK_PREP_SIZE, MASK_PREP_SIZE)
    # keyed by the mean shape's content too: one process may mask with several means
    shape_tag = "" if mean_shape is None else hashlib.sha1(np.ascontiguousarray(mean_shape)).hexdigest()
    key = f"backend:{backend}:{model_dir}:{shape_tag}"
    if key not in _STATE:
        _STATE[key] = make_backend(backend, model_dir=model_dir, mean_shape=mean_shape)
    return _STATE["mesh"], _STATE["renderer"], _STATE[key]


def build_mask(prep: np.ndarray, *, backend, face_mesh, renderer) -> tuple[MaskResult, MaskImages]:
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

    Raises on failure (the caller records the reason); whatever it wrote of this image
    before the failure (a full disk at the third file, say) is removed first.
    """
    face_mesh, renderer, be = _mask_tools(backend, model_dir, mean_shape)
    prep = selection.prep_from_row(job, options)
    result, images = build_mask(prep, backend=be, face_mesh=face_mesh, renderer=renderer)
    out = Path(save_dir)
    paths = output_paths(job)
    try:
        make_private_dir(out / job["role"])  # each level 0700, not only the leaf
        make_private_dir(out / job["role"] / job["identity"])
        write_png(out / paths["prep"], prep)
        write_png(out / paths["overlay"], images.overlay)
        write_png(out / paths["mask_only"], images.mask_only)
        write_png(out / paths["mask_only_black"], images.mask_only_black)
        atomic_write_bytes(out / paths["mesh"], _ply_bytes(result.vertices, result.faces))
        write_json(out / paths["params"], {"backend": result.backend, "params": result.params,
                                           "landmarks": result.landmarks})
    except BaseException:
        remove_outputs(out, paths.values())
        raise
    coverage = float(images.covered.sum() / images.cut.sum())
    return {**paths, "coverage": coverage,
            "rms_landmark_px": result.params.get("rms_landmark_px", "")}


# --------------------------------------------------------------------------- model

def load_mask_model(options: DigitalMaskOptions) -> MaskModel:
    """Load (and so check) the backend's model before any work: a missing or broken model
    is an InputError naming the file, and nothing is written."""
    if options.backend == "flame":
        path = find_flame(options.model_dir)
        load_flame(path)
        return MaskModel(source=str(path), tag=file_digest(path))
    if options.backend == "meanshape":
        mean, source = _load_mean_shape(options.model_dir)
        return MaskModel(mean, source, hashlib.sha256(np.ascontiguousarray(mean)).hexdigest())
    return MaskModel()


def _load_mean_shape(model_dir: str | None) -> tuple[np.ndarray, str]:
    if model_dir is None:
        return bundled_mean_shape(), "bundled ORL faces (400 photos, 40 people)"
    path = Path(model_dir) / MEANSHAPE_FILE
    if not path.is_file():
        # a mistyped --model_dir must not fall back to the bundled mean without a word
        found = "a file" if Path(model_dir).is_file() else (
            "a folder without it" if Path(model_dir).is_dir() else "nothing")
        raise InputError(f"expected {MEANSHAPE_FILE} (array mean_shape ({N_LANDMARKS}, 3)) in --model_dir "
                         f"{model_dir}, found {found}; leave --model_dir out for the bundled mean")
    mean = read_npz(path, required=("mean_shape",))["mean_shape"]
    if mean.shape != (N_LANDMARKS, 3):
        raise InputError(f"{path}: mean_shape must be ({N_LANDMARKS}, 3), one row per MediaPipe "
                         f"landmark; found shape {mean.shape}")
    return mean, str(path)


# --------------------------------------------------------------------------- selection phase

def _read_selection(save_dir: Path) -> dict[str, dict]:
    """Earlier selection decisions keyed by source: ``selection.csv`` of the last finished
    run, then the journal of a run killed before it wrote one (later rows win). Rows of
    unreadable files or errors are left out, so a re-run tries them again. A row is reused
    only when its fingerprint (the photo's content and the selection options) is the one
    the photo has now."""
    rows: dict[str, dict] = {}
    csv_path = save_dir / SELECTION_FILE
    if csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = [c for c in ("source", "reason", "fingerprint") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"no column {', '.join(missing)}")
                rows = {r["source"]: r for r in reader}
        except (OSError, ValueError, csv.Error) as exc:
            log.warning("earlier selection decisions in %s not used (every photo is decided again): %s",
                        csv_path, describe_exception(exc))
            rows = {}
    rows.update(_replay_selection_journal(save_dir / SELECTION_JOURNAL))
    return {source: r for source, r in rows.items()
            if source and r.get("fingerprint") and r.get("status")
            and selection.reason_code(r.get("reason") or "") not in RETRIED_REASONS}


def _replay_selection_journal(path: Path) -> dict[str, dict]:
    return {row["source"]: row for row in read_journal(path) if isinstance(row.get("source"), str)}


def _journal_selection(path: Path, row: dict[str, Any]) -> None:
    """Append one decision to the selection journal at once (flushed to disk), so a run
    killed half way through selection keeps every decision it made."""
    append_line_durably(path, json.dumps({k: row.get(k, "") for k in SELECTION_COLUMNS}, default=str) + "\n")


def write_selection(save_dir: Path, rows: list[dict]) -> None:
    """``selection.csv`` of every image; the journal it replaces goes."""
    write_csv(save_dir / SELECTION_FILE, rows, SELECTION_COLUMNS)
    (save_dir / SELECTION_JOURNAL).unlink(missing_ok=True)


def _read_error(source: str, exc: OSError) -> str:
    """A selection reason for a photo the stage cannot read (EACCES, EIO ...)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return (f"unreadable: cannot read {source}: [Errno {exc.errno} {name}] {exc.strerror or exc}"
            if name else f"unreadable: cannot read {source}: {exc}")


def select_images(stage: StageRun, images: list[selection.InputImage],
                  options: selection.SelectionOptions) -> tuple[list[dict], int]:
    """Selection rows of every image, reusing earlier decisions whose fingerprint matches;
    returns the rows (in ``images`` order) and how many images were decided anew. Each new
    decision is journaled at once; a photo that cannot even be read for its fingerprint
    is an ``unreadable`` row (a failed manifest row), not the end of the run."""
    earlier = {} if stage.run.overwrite else _read_selection(stage.save_dir)
    fps, fresh = {}, {}
    for im in images:
        try:
            fps[im.source] = fingerprint(Path(im.source), options)
        except OSError as exc:
            fps[im.source] = ""
            fresh[im.source] = {"source": im.source, "status": selection.REJECTED,
                                "reason": _read_error(im.source, exc)}
    reused = {im.source: earlier[im.source] for im in images
              if im.source in earlier and fps[im.source]
              and earlier[im.source].get("fingerprint") == fps[im.source]}
    todo = [im for im in images if im.source not in reused and im.source not in fresh]
    worker = functools.partial(selection.select_one, options=options)
    journal = stage.save_dir / SELECTION_JOURNAL
    for image, row, error in map_items(worker, todo, jobs=stage.run.jobs, desc="selection",
                                       progress=stage.run.progress):
        if error is not None:
            row = {"identity": image.identity, "video": image.video, "name": image.name,
                   "source": image.source, "status": selection.REJECTED,
                   "reason": f"error: {describe_exception(error)}"}
        fresh[image.source] = {**row, "fingerprint": fps[image.source]}
        _journal_selection(journal, fresh[image.source])
    rows = []
    for image in images:
        row = dict(reused.get(image.source) or fresh[image.source])
        row.update(identity=image.identity, video=image.video, name=image.name,
                   fingerprint=fps[image.source])
        rows.append(row)
    return rows, len(todo)


def _failed_selection_row(row: dict[str, Any]) -> ItemResult:
    """A photo that could not be read (or crashed selection): a failed manifest row."""
    values = {k: "" for k in ROW_COLUMNS}
    values.update(video=row["video"], source=row["source"])
    return ItemResult(f"{row['identity']}/{row['name']}", row["identity"], STATUS_FAILED,
                      row["reason"], values)


# --------------------------------------------------------------------------- masking phase

def mask_images(stage: StageRun, chosen: list[dict], options: DigitalMaskOptions,
                model: MaskModel) -> int:
    """Mask every picked image whose outputs are not fresh; returns how many were tried."""
    todo = []
    for row in chosen:
        iid = item_id(row["role"], row["identity"], row["name"])
        # the selection fingerprint covers the photo's content and the selection options, so
        # the parent never reads the photo a second time (nor fails on it here)
        row["_fp"] = fingerprint(row["fingerprint"], options.backend, model.tag)
        outputs = [stage.save_dir / p for p in output_paths(row).values()]
        if stage.is_fresh(iid, row["_fp"], outputs):
            stage.record(stage.skipped(iid))
        else:
            todo.append(row)
    worker = functools.partial(mask_one, save_dir=str(stage.save_dir), backend=options.backend,
                               model_dir=options.model_dir, mean_shape=model.mean_shape,
                               options=options.selection)
    for row, values, error in map_items(worker, todo, jobs=stage.run.jobs,
                                        desc=f"mask ({options.backend})", progress=stage.run.progress):
        iid = item_id(row["role"], row["identity"], row["name"])
        base = {k: "" for k in ROW_COLUMNS}
        base.update(role=row["role"], video=row["video"], source=row["source"],
                    backend=options.backend, det_score=row["det_score"], yaw=row["yaw"],
                    pitch=row["pitch"], roll=row["roll"])
        if error is None:
            stage.record(ItemResult(iid, row["identity"], STATUS_OK, "", {**base, **values}), row["_fp"])
        else:
            # an earlier run's mask of this image (another photo under the same name) goes too
            remove_outputs(stage.save_dir, output_paths(row).values())
            stage.record(ItemResult(iid, row["identity"], STATUS_FAILED,
                                    describe_exception(error), base))
    return len(todo)


def remove_stale(stage: StageRun, keep_ids: set[str]) -> int:
    """Delete the outputs of earlier rows this run no longer produces (another --seed or
    protocol picks other images, a photo was removed); returns how many rows went."""
    stale = [row for item, row in stage.manifest.rows.items() if item not in keep_ids]
    for row in stale:
        remove_outputs(stage.save_dir, [row.get(k, "") for k in OUTPUT_KEYS])
    return len(stale)


def remove_unrecorded(stage: StageRun) -> int:
    """Delete the files under the role folders that no ok (or kept) manifest row names: the
    outputs of an item a killed run was writing when it died, which no row records and so
    no later run would remove. Returns how many files went."""
    recorded = {os.path.normpath(stage.save_dir / row[k])
                for row in stage.manifest.rows.values() if row.get("status") in (STATUS_OK, STATUS_SKIPPED)
                for k in OUTPUT_KEYS if row.get(k)}
    orphans = []
    for role in (selection.DATABASE, selection.QUERY):
        for folder, _, names in os.walk(stage.save_dir / role):   # symlinks are not followed
            orphans += [Path(folder) / n for n in names if os.path.normpath(Path(folder) / n) not in recorded]
    remove_outputs(stage.save_dir, [p.relative_to(stage.save_dir) for p in orphans])
    return len(orphans)


# --------------------------------------------------------------------------- montage and summary

def _write_montage(save_dir: Path, rows: list[dict[str, Any]], *, max_rows: int = 8) -> None:
    """Originals beside their masks, one image per line, headed by the whole identity name."""
    from PIL import Image, ImageDraw

    from faceaudit.core.figures import montage
    from faceaudit.core.images import read_rgb

    ok = sorted((r for r in rows if r.get("prep")), key=lambda r: (r.get("subject", ""), r["id"]))
    lines = []
    for row in ok[:max_rows]:
        tiles = montage([read_rgb(save_dir / row[v]) for v in VARIANTS], labels=list(VARIANTS),
                        ncols=len(VARIANTS))
        head = Image.new("RGB", (tiles.shape[1], 16), (255, 255, 255))
        text = f"{row['subject']} ({row['role']})"
        ImageDraw.Draw(head).text((2, 2), text, fill=(0, 0, 0))
        lines += [np.asarray(head), tiles]
    if lines:
        write_png(save_dir / MONTAGE_FILE, np.concatenate(lines, axis=0))
    else:   # an earlier run's faces must not stand for this run's (empty) result
        (save_dir / MONTAGE_FILE).unlink(missing_ok=True)


def _summary(options: DigitalMaskOptions, rows: list[dict], counts: dict[str, int], n_pairs: int,
             unpaired: dict[str, str], n_tried: int, save_dir: Path) -> tuple[str, dict]:
    codes = [selection.reason_code(r["reason"]) for r in rows]
    decided = [r for r, code in zip(rows, codes) if code not in RETRIED_REASONS]
    accepted = sum(r["status"] == selection.ACCEPTED for r in decided)
    rejected = Counter(selection.reason_code(r["reason"]) for r in decided
                       if r["status"] != selection.ACCEPTED)
    unreadable, errors = codes.count("unreadable"), codes.count("error")
    built = counts.get(STATUS_OK, 0)
    failed_masks = counts.get(STATUS_FAILED, 0) - unreadable - errors
    by_reason = ", ".join(f"{code} {n}" for code, n in sorted(rejected.items())) or "none"
    selected = (f"digital mask ({options.backend}): {len(rows)} images of "
                f"{len({r['identity'] for r in rows})} identities; accepted {accepted}; "
                f"rejected {sum(rejected.values())} ({by_reason}); unreadable {unreadable}"
                + (f"; selection errors {errors}" if errors else ""))
    masked = (f"masks: {built} built, {counts.get('skipped', 0)} unchanged from an earlier run, "
              f"{failed_masks} failed; {n_pairs} pairs, {len(unpaired)} identities unpaired; "
              f"outputs in {save_dir}")
    text = f"{selected}\n{masked}"
    details = {"n_images": len(rows), "n_accepted": accepted, "rejected": dict(rejected),
               "n_unreadable": unreadable, "n_selection_errors": errors, "n_masks_built": built,
               "n_masks_tried": n_tried, "n_masks_failed": failed_masks}
    return text, details


# --------------------------------------------------------------------------- stage

def run_digital_mask(input_dir: str | os.PathLike, save_dir: str | os.PathLike,
                     options: DigitalMaskOptions, *, run: RunSettings) -> StageResult:
    """Select, pair and mask faces from ``input_dir`` into ``save_dir``.

    Exit code 0 when every picked image was masked and every photo could be read, 1
    otherwise. A bad input folder or a missing model raises InputError before anything
    is written.
    """
    model = load_mask_model(options)
    images = selection.discover_images(input_dir)
    with StageRun("digital_mask", save_dir, run, options=options) as stage:
        remove_unrecorded(stage)
        t_sel = time.time()
        rows, n_selected = select_images(stage, images, options.selection)
        sel_seconds = time.time() - t_sel
        roles, unpaired = selection.choose_pairs(rows, protocol=options.protocol, seed=run.seed)
        for row in rows:
            row["role"] = roles.get(f"{row['identity']}/{row['name']}", "")
        write_selection(stage.save_dir, rows)
        if model.mean_shape is not None:
            write_npz(stage.save_dir / MEANSHAPE_FILE, mean_shape=model.mean_shape)
        failed = [r for r in rows if selection.reason_code(r["reason"]) in RETRIED_REASONS]
        for row in failed:
            stage.record(_failed_selection_row(row))
        chosen = [r for r in rows if r["role"]]
        t_mask = time.time()
        n_tried = mask_images(stage, chosen, options, model)
        mask_seconds = time.time() - t_mask
        keep = {item_id(r["role"], r["identity"], r["name"]) for r in chosen}
        keep |= {f"{r['identity']}/{r['name']}" for r in failed}
        remove_stale(stage, keep)
        _write_montage(stage.save_dir, [r for i, r in stage.manifest.rows.items() if i in keep])
        counts = Counter(r["status"] for i, r in stage.manifest.rows.items() if i in keep)
        summary, details = _summary(options, rows, counts, len(chosen) // 2, unpaired, n_tried,
                                    stage.save_dir)
        stage.extra.update(
            backend=options.backend, protocol=options.protocol, **details,
            selection_outcomes=dict(sorted(Counter(
                "accepted" if r["status"] == selection.ACCEPTED else selection.reason_code(r["reason"])
                for r in rows).items())),
            n_identities=len({r["identity"] for r in rows}), n_pairs=len(chosen) // 2,
            unpaired_identities=unpaired, mean_shape_source=model.source,
            selection_images_per_s=(n_selected / sel_seconds) if n_selected and sel_seconds > 0 else None,
            masking_images_per_s=(n_tried / mask_seconds) if n_tried and mask_seconds > 0 else None)
        return stage.finish(keep_ids=keep, summary=summary, details=details)
