"""Landmark placement stage: face-mesh landmarks on CT, raw PET, wavelet PET and
U-Net PET renders of every fold's test set, detection rates and landmark error.

Inputs (by id, never by list position): CT and PET renders ``<id>.png`` (the
reconstruction stage's cts/ and pets/), the cross-validation ``splits.json``, and
for the U-Net variant either the denoised images the cross-validation wrote
(``<denoised_dir>/fold{k}/<id>.png``) or its models (``best_model_fold{k}.pt``).
Renders are centre-cropped to the split's crop size (upstream scores 208 x 208
crops); the wavelet variant is BayesShrink on the PET crop.

Outputs (``save_dir``): fold{k}/landmarks_{variant}.npz (ids, subjects,
landmarks (n, 478, 3) NaN where not detected, detected (n,), settings: JSON of the
crop and framing used, input_sha1: SHA-1 of the ids, subjects and image bytes the
variant was placed on), detection.csv,
placement.csv + placement.json, summary.json, qa_landmarks.png, manifest.csv
(one row per fold x id), run.json; denoised/fold{k}/<id>.png when the U-Net
variant was computed here from models (with sources.json: per id, the SHA-1 of the
model and PET render it was denoised from).

A re-run without ``overwrite`` reuses a fold's variant only when its ids, settings
and input fingerprint all match; a new render, a re-trained denoiser or new
denoised images therefore recompute exactly the variants they feed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from faceaudit.petct.crossval import DEFAULT_CROP
from faceaudit.faces.facemesh import N_FACE_LANDMARKS, N_LANDMARKS
from faceaudit.core.images import center_crop, read_grey, to_uint8, wavelet_denoise
from faceaudit.petct.landmarks import WELL_PLACED_MAD, Framing, landmark_mad, place_landmarks_batch, well_placed
from faceaudit.core.files import (
    column_union,
    file_digest,
    InputError,
    make_private_dir,
    read_json_file,
    read_npz,
    write_csv,
    write_json,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import (
    describe_exception,
    ItemResult,
    Manifest,
    read_manifest,
    STATUS_FAILED,
    STATUS_OK,
)
from faceaudit.core.runner import map_items, write_run_json

VARIANTS = ("ct", "pet", "pet_wavelet", "pet_unet")


# --------------------------------------------------------------------------- inputs


def read_splits(path: str | Path) -> dict:
    """Read and check the cross-validation ``splits.json`` (contract of issue 3)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--splits_file {path}: expected the cross-validation splits.json, found nothing")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--splits_file {path}: not valid JSON ({exc})") from exc
    folds = splits.get("folds") if isinstance(splits, dict) else None
    if not isinstance(folds, list) or not folds:
        raise InputError(f"--splits_file {path}: expected {{'folds': [{{'fold': k, 'test': [ids]}}, ...]}}, "
                         f"found keys {sorted(splits) if isinstance(splits, dict) else type(splits).__name__}")
    for i, fold in enumerate(folds):
        if not isinstance(fold, dict) or not isinstance(fold.get("test"), list):
            raise InputError(f"--splits_file {path}: fold entry {i} has no 'test' id list")
        fold.setdefault("fold", i)
        fold["test"] = [str(x) for x in fold["test"]]
    crop = splits.get("crop", DEFAULT_CROP)
    if crop is not None and (not isinstance(crop, int) or crop <= 0):
        raise InputError(f"--splits_file {path}: 'crop' must be a positive integer, found {crop!r}")
    splits["crop"] = crop
    return splits


def read_subjects(ct_dir: Path) -> dict[str, str]:
    """id -> subject from the reconstruction manifest beside the CT folder (else empty)."""
    manifest = ct_dir.parent / "manifest.csv"
    if not manifest.is_file():
        return {}
    return {row["id"]: row["subject"] or row["id"] for row in read_manifest(manifest)}


@dataclass(frozen=True)
class PlacementTask:
    """One test image of one fold: where its renders are."""

    fold: int
    id: str
    subject: str
    ct_path: str
    pet_path: str
    unet_path: str | None  # None: the U-Net variant is not scored in this fold
    variants: tuple[str, ...] | None = None  # to place; None: every variant it has images for


def variant_images(task: PlacementTask, *, crop: int | None,
                   variants: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The (crop, crop) float [0, 1] grey image of every variant scored for this task
    (of those in ``variants`` when given; CT and PET are always read, to check them)."""
    ct = read_grey(task.ct_path)
    pet = read_grey(task.pet_path)
    if ct.shape != pet.shape:
        raise InputError(f"CT render {task.ct_path} is {ct.shape} but PET render {task.pet_path} is {pet.shape}")
    size = crop or min(ct.shape)
    if size > min(ct.shape):
        raise InputError(f"crop {size} from splits.json exceeds the render size {ct.shape} of {task.ct_path}")
    images = {"ct": center_crop(ct, size), "pet": center_crop(pet, size)}
    if variants is None or "pet_wavelet" in variants:
        images["pet_wavelet"] = wavelet_denoise(images["pet"])
    if task.unet_path is not None and (variants is None or "pet_unet" in variants):
        unet = read_grey(task.unet_path)
        if min(unet.shape) < size:
            raise InputError(f"denoised image {task.unet_path} is {unet.shape}, smaller than the crop {size}")
        images["pet_unet"] = center_crop(unet, size)
    if variants is not None:
        images = {v: im for v, im in images.items() if v in variants}
    return images


def place_task(task: PlacementTask, *, crop: int | None, framing: Framing,
               min_detection_confidence: float) -> dict[str, np.ndarray | None]:
    """Landmarks of every variant of one task: variant -> (478, 3) or None."""
    images = variant_images(task, crop=crop, variants=task.variants)
    names = list(images)
    lm, det = place_landmarks_batch([images[v] for v in names], framing=framing,
                                    min_detection_confidence=min_detection_confidence)
    return {v: (lm[i] if det[i] else None) for i, v in enumerate(names)}


# --------------------------------------------------------------------------- input fingerprints


def file_sha1(path: str | Path) -> str:
    """SHA-1 of a file's bytes; a fixed marker when there is no such file (so a file
    appearing or disappearing changes the fingerprints it feeds)."""
    try:
        return file_digest(path, "sha1")
    except FileNotFoundError:
        return "missing"


#: the image each variant's landmarks are placed on
_VARIANT_SOURCE = {"ct": "ct_path", "pet": "pet_path", "pet_wavelet": "pet_path", "pet_unet": "unet_path"}


def variant_fingerprint(tasks: list[PlacementTask], variant: str, *,
                        sha1: Callable[[str], str] = file_sha1) -> str:
    """SHA-1 of what one fold's landmarks of ``variant`` were computed from: per id
    (in id order) the id, subject and the bytes of the image file placed on.

    The matching stage fingerprints its landmark inputs the same way
    (``faceaudit.petct.matching.input_fingerprint``); here the inputs are image files.
    A U-Net image computed from a model is refreshed by ``denoise_fold`` when the
    model or PET changes, so hashing the image covers the model too.
    """
    attr = _VARIANT_SOURCE[variant]
    h = hashlib.sha1(variant.encode())
    for t in sorted(tasks, key=lambda t: t.id):
        path = getattr(t, attr)
        h.update(f"\0{t.id}\0{t.subject}\0{'none' if path is None else sha1(path)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- U-Net variant


def _default_denoiser_loader(pt_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from faceaudit.petct.crossval import load_denoiser  # imports torch: only when a fold needs its model

    return load_denoiser(pt_path, device="cpu")


def denoise_fold(tasks: list[PlacementTask], model_path: Path, out_dir: Path, *, crop: int | None,
                 load_denoiser: Callable[[Path], Callable[[np.ndarray], np.ndarray]],
                 batch_size: int = 32, overwrite: bool = False,
                 sha1: Callable[[str], str] = file_sha1) -> dict[str, str]:
    """Apply a fold's denoiser to its test PET crops; write out_dir/<id>.png; id -> path.

    An image written before is reused only when out_dir/sources.json says it came
    from this model's and this PET's exact bytes at this crop (a re-trained model or
    a new render is denoised again). Items whose PET cannot be read are left out
    (the placement reports them).
    """
    model_sha1 = sha1(str(model_path))
    sources_path = out_dir / "sources.json"
    try:
        sources = {str(i): str(s) for i, s in read_json_file(sources_path).items()} if sources_path.is_file() else {}
    except (InputError, AttributeError):
        sources = {}  # unreadable: nothing written before is trusted
    wanted = {t.id: hashlib.sha1(f"{model_sha1}\0{crop}\0{sha1(t.pet_path)}".encode()).hexdigest() for t in tasks}
    todo, done = [], {}
    for t in tasks:
        target = out_dir / f"{t.id}.png"
        if target.is_file() and not overwrite and sources.get(t.id) == wanted[t.id]:
            done[t.id] = str(target)
        else:
            todo.append(t)
    if not todo:
        return done
    denoiser = load_denoiser(model_path)
    crops, ids = [], []
    for t in todo:
        try:
            pet = read_grey(t.pet_path)
            crops.append(center_crop(pet, crop or min(pet.shape)))
            ids.append(t.id)
        except (InputError, ValueError):
            continue
    make_private_dir(out_dir)
    for start in range(0, len(ids), batch_size):
        batch = np.stack(crops[start:start + batch_size]).astype(np.float32)
        out = np.asarray(denoiser(batch), dtype=np.float32)
        if out.shape != batch.shape:
            raise InputError(f"denoiser {model_path} returned shape {out.shape} for input {batch.shape}")
        for i, img in enumerate(out):
            path = out_dir / f"{ids[start + i]}.png"
            write_png(path, to_uint8(img))
            done[ids[start + i]] = str(path)
            sources[ids[start + i]] = wanted[ids[start + i]]
        write_json(sources_path, sources)  # per batch: an interrupted run keeps what it finished
    return done


# --------------------------------------------------------------------------- tables


def _fold_rate_rows(per_fold: dict[str, dict[int, np.ndarray]], folds: list[int]) -> list[dict]:
    rows = []
    for variant, by_fold in per_fold.items():
        scored = [k for k in folds if k in by_fold]
        rates = [float(np.mean(by_fold[k])) if len(by_fold[k]) else float("nan") for k in scored]
        rows.append({"variant": variant, **{f"fold{k}": r for k, r in zip(scored, rates)},
                     "mean": float(np.nanmean(rates)), "std": float(np.nanstd(rates)),  # ddof 0, as upstream
                     "n": int(sum(len(by_fold[k]) for k in scored)), "folds_scored": len(scored)})
    return rows


def detection_table(detected: dict[str, dict[int, np.ndarray]], folds: list[int]) -> list[dict]:
    """Per variant: fraction of test images with a face found, per fold, mean ± std (ddof 0)."""
    return _fold_rate_rows(detected, folds)


def placement_table(mads: dict[str, dict[int, np.ndarray]], folds: list[int], *,
                    threshold: float = WELL_PLACED_MAD) -> list[dict]:
    """Per PET variant: median MAD per fold (over images with both faces found) and the
    well-placed rate (MAD < threshold among ALL test images, as upstream)."""
    rows = []
    for variant, by_fold in mads.items():
        scored = [k for k in folds if k in by_fold]
        medians = [float(np.nanmedian(by_fold[k])) if np.isfinite(by_fold[k]).any() else float("nan")
                   for k in scored]
        wp = [float(np.mean(well_placed(by_fold[k], threshold=threshold))) if len(by_fold[k])
              else float("nan") for k in scored]
        any_mad = bool(np.isfinite(medians).any())
        row = {"variant": variant}
        row.update({f"median_mad_fold{k}": m for k, m in zip(scored, medians)})
        row["median_mad_mean"] = float(np.nanmean(medians)) if any_mad else float("nan")
        row["median_mad_std"] = float(np.nanstd(medians)) if any_mad else float("nan")
        row.update({f"well_placed_fold{k}": w for k, w in zip(scored, wp)})
        row["well_placed_mean"] = float(np.nanmean(wp))
        row["well_placed_std"] = float(np.nanstd(wp))  # ddof 0, as upstream
        row["n"] = int(sum(len(by_fold[k]) for k in scored))
        row["n_with_mad"] = int(sum(np.isfinite(by_fold[k]).sum() for k in scored))
        row["folds_scored"] = len(scored)
        rows.append(row)
    return rows


def format_tables(det_rows: list[dict], place_rows: list[dict], *, upstream_mad: bool) -> str:
    """Upstream-style summary: detection and well-placed rates, mean ± std over folds."""
    wp = {r["variant"]: r for r in place_rows}
    lines = ["landmark detection and placement (mean ± std over folds, % of test images)",
             f"{'image':<13}{'detected':>16}{'well placed':>16}{'median MAD %IOD':>18}{'n':>6}{'folds':>7}"]
    for r in det_rows:
        p = wp.get(r["variant"])
        well = f"{100 * p['well_placed_mean']:.1f} ± {100 * p['well_placed_std']:.1f}" if p else "-"
        mad = f"{p['median_mad_mean']:.2f}" if p else "-"
        lines.append(f"{r['variant']:<13}{100 * r['mean']:>9.1f} ± {100 * r['std']:<4.1f}{well:>16}{mad:>18}"
                     f"{r['n']:>6}{r['folds_scored']:>7}")
    lines.append(f"MAD divisor: {'468 (upstream)' if upstream_mad else 'number of landmarks (478)'}; "
                 f"well placed = MAD < {WELL_PLACED_MAD:g} % of the CT inter-ocular distance")
    return "\n".join(lines)


# --------------------------------------------------------------------------- QA


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray | None, *, reference: np.ndarray | None = None,
                   scale: int = 2) -> np.ndarray:
    """Grey (H, W) float image -> RGB uint8 (upscaled), reference landmarks red, landmarks green."""
    from PIL import Image, ImageDraw

    grey = to_uint8(image)
    im = Image.fromarray(grey).convert("RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for pts, colour in ((reference, (255, 60, 60)), (landmarks, (40, 255, 80))):
        if pts is None or not np.isfinite(pts).all():
            continue
        for x, y in zip(pts[:, 0] * im.width, pts[:, 1] * im.height):
            draw.ellipse((float(x) - 1, float(y) - 1, float(x) + 1, float(y) + 1), fill=colour)
    return np.asarray(im)


def qa_montage(tasks: list[PlacementTask], landmarks: dict[tuple[int, str], dict[str, np.ndarray | None]],
               variants: list[str], *, crop: int | None, upstream_mad: bool) -> np.ndarray | None:
    """One row per sampled test image: CT with its landmarks, then every PET variant
    with its landmarks (green) over the CT's (red), labelled with the MAD."""
    from faceaudit.core.figures import montage

    tiles, labels = [], []
    for t in tasks:
        try:
            images = variant_images(t, crop=crop)
        except (InputError, ValueError):
            continue
        found = landmarks.get((t.fold, t.id), {})
        ct_lm = found.get("ct")
        for v in variants:
            lm = found.get(v)
            if v == "ct":
                tiles.append(draw_landmarks(images[v], lm))
                labels.append(f"{'' if lm is not None else 'no face '}{t.id}")
                continue
            if v not in images:
                continue
            tiles.append(draw_landmarks(images[v], lm, reference=ct_lm))
            if lm is None:
                tag = "no face"
            elif ct_lm is None:
                tag = "no CT"
            else:
                tag = f"MAD {landmark_mad(ct_lm, lm, upstream=upstream_mad):.1f}%"
            labels.append(f"{v} {tag}")
    if not tiles:
        return None
    return montage(tiles, labels=labels, ncols=len(variants), tile=2 * (crop or DEFAULT_CROP))


# --------------------------------------------------------------------------- stage


def _settings(crop: int | None, framing: Framing, min_detection_confidence: float) -> str:
    """The options landmarks depend on, stored beside them so a re-run never reuses stale ones."""
    return json.dumps({"crop": crop, "upscale": framing.upscale, "pad": framing.pad,
                       "min_detection_confidence": min_detection_confidence}, sort_keys=True)


def _stored_variant(path: Path, ids: list[str], settings: str, fingerprint: str) -> dict | None:
    """Landmarks of an earlier run of one fold's variant, if they were stored for exactly
    these ids with the same settings from the same input files (an older file
    without a fingerprint is not trusted)."""
    if not path.is_file():
        return None
    try:
        data = read_npz(path, required=("ids", "landmarks", "detected", "settings", "input_sha1"))
    except InputError:
        return None
    if (sorted(data["ids"].astype(str).tolist()) != sorted(ids) or str(data["settings"]) != settings
            or str(data["input_sha1"]) != fingerprint):
        return None
    return data


def run_landmark_placement(ct_files: str | Path, pet_files: str | Path, splits_file: str | Path,
                           save_dir: str | Path, *, models_path: str | Path | None = None,
                           denoised_dir: str | Path | None = None, upstream_mad: bool = False,
                           framing: Framing = Framing(), min_detection_confidence: float = 0.5,
                           n_qa: int = 6, jobs: int = 1, overwrite: bool = False, seed: int = 0,
                           quiet: bool = False, args: dict | None = None,
                           load_denoiser: Callable[[Path], Callable[[np.ndarray], np.ndarray]] | None = None) -> int:
    """The placement stage; returns 0, or 1 when some test images could not be scored.

    load_denoiser: pt_path -> callable on (N, H, W) float32 [0, 1]; default
    ``faceaudit.petct.crossval.load_denoiser`` (used only when models are needed).
    """
    started = time.time()
    ct_dir, pet_dir, save_dir = Path(ct_files), Path(pet_files), Path(save_dir)
    for flag, d in (("--ct_files", ct_dir), ("--pet_files", pet_dir)):
        if not d.is_dir():
            raise InputError(f"{flag} {d}: expected a folder of <id>.png renders, found no such folder")
    splits = read_splits(splits_file)
    crop = splits["crop"]
    subjects = read_subjects(ct_dir)
    models_dir = Path(models_path) if models_path else None
    den_dir = Path(denoised_dir) if denoised_dir else None
    load_denoiser = load_denoiser or _default_denoiser_loader
    make_private_dir(save_dir)
    manifest = Manifest(save_dir / "manifest.csv")
    manifest.rows.clear()  # every row is re-derived below, reused folds included: none goes stale

    folds = [int(f["fold"]) for f in splits["folds"]]
    detected: dict[str, dict[int, np.ndarray]] = {}
    mads: dict[str, dict[int, np.ndarray]] = {}
    all_landmarks: dict[tuple[int, str], dict[str, np.ndarray | None]] = {}
    all_tasks: list[PlacementTask] = []
    unet_sources: dict[int, str] = {}
    unet_errors: dict[int, str] = {}
    n_failed = 0
    settings = _settings(crop, framing, min_detection_confidence)
    sha1 = lru_cache(maxsize=None)(file_sha1)  # a PET feeds three fingerprints: read it once
    # pass 1: each fold's tasks, its U-Net source, and which variants an earlier run finished
    plan = []
    for fold in splits["folds"]:
        k = int(fold["fold"])
        ids = list(dict.fromkeys(fold["test"]))
        # where the U-Net images of this fold come from: the CV's own, or our models run
        unet_paths: dict[str, str] | None = None
        cv_dir = den_dir / f"fold{k}" if den_dir is not None else None
        has_cv_dir = cv_dir is not None and cv_dir.is_dir()
        has_model = models_dir is not None and (models_dir / f"best_model_fold{k}.pt").is_file()
        # the CV's own images when complete; else the model; else what the CV wrote
        # (its missing images then fail those items, with the path in the reason)
        if has_cv_dir and (not has_model or all((cv_dir / f"{i}.png").is_file() for i in ids)):
            unet_paths = {i: str(cv_dir / f"{i}.png") for i in ids}
            unet_sources[k] = str(cv_dir)
        elif has_model:
            pre = [PlacementTask(k, i, subjects.get(i, i), str(ct_dir / f"{i}.png"),
                                 str(pet_dir / f"{i}.png"), None) for i in ids]
            model = models_dir / f"best_model_fold{k}.pt"
            try:
                written = denoise_fold(pre, model, save_dir / "denoised" / f"fold{k}", crop=crop,
                                       load_denoiser=load_denoiser, overwrite=overwrite, sha1=sha1)
            except Exception as exc:  # a bad model costs this fold its U-Net variant, not the run
                unet_errors[k] = describe_exception(exc)
                manifest.add(ItemResult(f"fold{k}/denoiser", "", STATUS_FAILED, unet_errors[k], {"fold": k}))
                written = None
            if written is not None:
                unet_paths = {i: written.get(i, str(save_dir / "denoised" / f"fold{k}" / f"{i}.png"))
                              for i in ids}
                unet_sources[k] = str(model)
        tasks = [PlacementTask(k, i, subjects.get(i, i), str(ct_dir / f"{i}.png"), str(pet_dir / f"{i}.png"),
                               None if unet_paths is None else unet_paths[i]) for i in ids]
        all_tasks += tasks
        variants = [v for v in VARIANTS if v != "pet_unet" or unet_paths is not None]
        fold_dir = make_private_dir(save_dir / f"fold{k}")
        fingerprints = {v: variant_fingerprint(tasks, v, sha1=sha1) for v in variants}
        stored = {} if overwrite else {
            v: data for v in variants
            if (data := _stored_variant(fold_dir / f"landmarks_{v}.npz", ids, settings, fingerprints[v])) is not None}
        missing = tuple(v for v in variants if v not in stored)
        to_place = [PlacementTask(t.fold, t.id, t.subject, t.ct_path, t.pet_path, t.unet_path, missing)
                    for t in tasks] if missing else []
        plan.append((k, tasks, to_place, variants, fold_dir, stored, fingerprints))

    # pass 2: one pool over every unfinished fold's images (a pool per fold would
    # pay the process start-up and model load again for each fold), placing only
    # the variants whose stored landmarks are absent or stale
    computed: dict[tuple[int, str], dict[str, np.ndarray | None]] = {}
    todo = [t for _, _, to_place, *_ in plan for t in to_place]
    fn = partial(place_task, crop=crop, framing=framing, min_detection_confidence=min_detection_confidence)
    for task, res, err in map_items(fn, todo, jobs=jobs, desc="landmarks", progress=not quiet):
        if err is not None:
            manifest.add(ItemResult(f"fold{task.fold}/{task.id}", task.subject, STATUS_FAILED,
                                    describe_exception(err), {"fold": task.fold}))
            n_failed += 1
            continue
        computed[(task.fold, task.id)] = res

    # pass 3: per fold, the landmark files and the numbers
    for k, tasks, to_place, variants, fold_dir, stored, fingerprints in plan:
        results: dict[str, dict[str, np.ndarray | None]] = {}
        for v, data in stored.items():
            for i, lm, det in zip(data["ids"].astype(str), data["landmarks"], data["detected"]):
                results.setdefault(i, {})[v] = lm if det else None
        # an item whose placement failed now is left out of every variant of the fold
        placed = {t.id for t in to_place if (k, t.id) in computed} if to_place else {t.id for t in tasks}
        for i in placed:
            if (k, i) in computed:
                results.setdefault(i, {}).update(computed[(k, i)])
        ok_tasks = [t for t in tasks if t.id in placed]
        ok_ids = [t.id for t in ok_tasks]  # split order
        for v in variants:
            lm = np.full((len(ok_ids), N_LANDMARKS, 3), np.nan)
            det = np.zeros(len(ok_ids), dtype=bool)
            for j, i in enumerate(ok_ids):
                found = results[i].get(v)
                if found is not None:
                    lm[j], det[j] = found, True
            # a reused file is left untouched unless a failure elsewhere shrank the fold's ids
            if v not in stored or stored[v]["ids"].astype(str).tolist() != ok_ids:
                write_npz(fold_dir / f"landmarks_{v}.npz", ids=np.array(ok_ids, dtype=str),
                          subjects=np.array([t.subject for t in ok_tasks], dtype=str),
                          landmarks=lm, detected=det, settings=np.array(settings),
                          input_sha1=np.array(fingerprints[v]))
            detected.setdefault(v, {})[k] = det
            if v != "ct":
                ct_lm = np.stack([results[i]["ct"] if results[i].get("ct") is not None
                                  else np.full((N_LANDMARKS, 3), np.nan) for i in ok_ids]) if ok_ids else lm
                mads.setdefault(v, {})[k] = np.asarray(landmark_mad(ct_lm, lm, upstream=upstream_mad)).reshape(-1)
        for j, t in enumerate(ok_tasks):
            res = results[t.id]
            all_landmarks[(k, t.id)] = res
            values = {"fold": k}
            values.update({f"detected_{v}": res.get(v) is not None for v in variants})
            values.update({f"mad_{v}": float(mads[v][k][j]) for v in variants if v != "ct"})
            manifest.add(ItemResult(f"fold{k}/{t.id}", t.subject, STATUS_OK, "", values))

    # a variant is in the tables for the folds where it was scored (column folds_scored)
    det_rows = detection_table(detected, folds)
    place_rows = placement_table(mads, folds)
    write_csv(save_dir / "detection.csv", det_rows, column_union(det_rows, first=["variant"]))
    write_csv(save_dir / "placement.csv", place_rows, column_union(place_rows, first=["variant"]))
    write_json(save_dir / "placement.json", place_rows)
    scored = [v for v in VARIANTS if v in detected]
    summary = {"variants_scored": scored,
               "variants_not_scored": {v: "no denoised images (--denoised_dir) or models (--models_path) "
                                          "for any fold" for v in VARIANTS if v not in detected},
               "pet_unet_source": unet_sources, "pet_unet_errors": unet_errors, "crop": crop, "folds": folds,
               "mad": {"definition": "100 * sum(|dx|+|dy|) / (IOD_ct * n)",
                       "n": N_FACE_LANDMARKS if upstream_mad else N_LANDMARKS, "well_placed_below": WELL_PLACED_MAD},
               "framing": {"upscale": framing.upscale, "pad": framing.pad},
               "detection": det_rows, "placement": place_rows, "n_failed": n_failed}
    write_json(save_dir / "summary.json", summary)

    rng = np.random.default_rng(seed)
    ok_all = [t for t in all_tasks if (t.fold, t.id) in all_landmarks]
    if ok_all and n_qa > 0:
        pick = sorted(rng.choice(len(ok_all), size=min(n_qa, len(ok_all)), replace=False))
        sheet = qa_montage([ok_all[i] for i in pick], all_landmarks, scored, crop=crop, upstream_mad=upstream_mad)
        if sheet is not None:
            write_png(save_dir / "qa_landmarks.png", sheet)
    manifest.write()
    write_run_json(save_dir, stage="landmark_placement", args=args or {
        "ct_files": str(ct_dir), "pet_files": str(pet_dir), "splits_file": str(splits_file),
        "models_path": models_path and str(models_path), "denoised_dir": denoised_dir and str(denoised_dir),
        "save_dir": str(save_dir), "upstream_mad": upstream_mad}, seed=seed, started=started,
        extra={"variants_scored": scored})
    if not quiet:
        print(format_tables(det_rows, place_rows, upstream_mad=upstream_mad))
        for v, why in summary["variants_not_scored"].items():
            print(f"{v}: not scored ({why})")
        for k, why in unet_errors.items():
            print(f"pet_unet not scored in fold {k}: {why}")
        if n_failed:
            print(f"{n_failed} test image(s) could not be scored; see {save_dir / 'manifest.csv'}")
    return manifest.exit_code()
