"""Landmark placement stage (stage 3): face-mesh landmarks on CT, raw PET, wavelet PET
and U-Net PET renders of every fold's test set, detection rates and landmark error.

Inputs (by id, never by list position): CT and PET renders ``<id>.png`` (the
reconstruction stage's cts/ and pets/), the cross-validation ``splits.json`` (read by
:func:`faceaudit.petct.splits.read_splits`: every id must have a render or a
reconstruction row), and for the U-Net variant either the denoised images the
cross-validation wrote (``<denoised_dir>/fold{k}/<id>.png``) or its models
(``best_model_fold{k}.pt``). Renders are centre-cropped to the split's crop size
(upstream scores 208 x 208 crops); the wavelet variant is BayesShrink on the PET crop.

Outputs (``save_dir``): fold{k}/landmarks_{variant}.npz (ids, subjects,
landmarks (n, 478, 3) NaN where not detected, detected (n,), settings: JSON of the
crop and framing used, input_sha1: SHA-1 of the ids, subjects and image bytes the
variant was placed on), detection.csv, placement.csv + placement.json, summary.json,
qa_landmarks.png, manifest.csv (one row per fold x id, and a failed
``fold{k}/denoiser`` row when a fold's model could not be run), run.json;
denoised/fold{k}/<id>.png when the U-Net variant was computed here from models (with
sources.json: per id, the SHA-1 of the model and PET render it was denoised from).

A re-run reuses a fold's variant only when its ids, settings and input fingerprint
all match (``--overwrite`` redoes all); a new render, a re-trained denoiser or new
denoised images therefore recompute exactly the variants they feed. An item none of
whose variants had to be placed again, with the images and options (the MAD divisor
too) of its earlier ok row, is a ``skipped`` row. A test image that cannot be scored is
a failed row; it is left out of every variant of its fold, and no denoised image of it
is left in ``save_dir``. A fold whose model cannot be loaded, run or written out keeps
none of its denoised images and no U-Net landmarks; a full or read-only output location
stops the stage (exit 2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from faceaudit.core.contracts import (
    DENOISED_DIR,
    DETECTION_FILE,
    MANIFEST_FILE,
    N_FACE_LANDMARKS,
    N_LANDMARKS,
    PLACEMENT_FILE,
    denoised_fold_dir,
    fold_dir,
    landmarks_file,
    model_path,
)
from faceaudit.core.files import (
    InputError,
    column_union,
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
    describe_exception,
    read_manifest,
)
from faceaudit.core.options import expect, expect_number, expect_whole
from faceaudit.core.runner import (
    RunSettings,
    StageResult,
    StageRun,
    fingerprint,
    is_location_error,
    map_items,
)
from faceaudit.petct.image_variants import (
    VARIANT_SOURCE,
    VARIANTS,
    DenoiserLoader,
    PlacementTask,
    default_denoiser_loader,
    denoise_fold,
    file_sha1,
    place_task,
    qa_montage,
    variant_fingerprint,
)
from faceaudit.petct.landmarks import (
    WELL_PLACED_MAD,
    Framing,
    detection_table,
    format_tables,
    landmark_mad,
    placement_table,
)
from faceaudit.petct.splits import read_splits

#: PET crops per denoiser call when the U-Net images are computed here from a fold's model
DENOISE_BATCH = 32

# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PlacementOptions:
    """What the placement stage computes; validated on creation (OptionsError, exit 2)."""

    models_dir: str | None = None          # best_model_fold{k}.pt, when denoised_dir lacks a fold
    denoised_dir: str | None = None        # the cross-validation's denoised/fold{k}/<id>.png
    upstream_mad: bool = False             # divide the MAD by 468 as upstream (default: by 478)
    upscale: float = 1.0                   # resample factor before the face mesh (upstream: 1)
    pad: float = 0.0                       # black border: pixels, or a fraction < 1 of the size
    min_detection_confidence: float = 0.5
    n_qa: int = 6                          # test images drawn in qa_landmarks.png

    def __post_init__(self) -> None:
        for name in ("models_dir", "denoised_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        expect_number("--upscale", self.upscale, low=0, low_open=True)
        expect_number("--pad", self.pad, low=0)    # pixels, or a fraction < 1 of the image size
        expect_number("--min_detection_confidence", self.min_detection_confidence, low=0, high=1)
        expect_whole("--n_qa", self.n_qa, 0)
        expect(isinstance(self.upstream_mad, bool), "upstream_mad", "True or False", self.upstream_mad)

    @property
    def framing(self) -> Framing:
        return Framing(upscale=self.upscale, pad=self.pad)

    def settings(self, crop: int | None) -> str:
        """The options landmarks depend on, stored beside them so a re-run never reuses stale ones."""
        return json.dumps({"crop": crop, "upscale": self.upscale, "pad": self.pad,
                           "min_detection_confidence": self.min_detection_confidence}, sort_keys=True)

    def row_options(self, crop: int | None) -> dict:
        """Every option a manifest row depends on: the landmarks' settings and the MAD's divisor."""
        return {"landmarks": self.settings(crop), "upstream_mad": self.upstream_mad}


# --------------------------------------------------------------------------- inputs


def read_subjects(ct_dir: Path) -> dict[str, str]:
    """id -> subject from the reconstruction manifest beside the CT folder (else empty)."""
    manifest = ct_dir.parent / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    return {row["id"]: row["subject"] or row["id"] for row in read_manifest(manifest)}


def known_ids(ct_dir: Path, pet_dir: Path, subjects: dict[str, str]) -> set[str]:
    """Ids a splits file may name: those with a CT or PET render, or a reconstruction row
    (a study that failed there is then a failed row here, not an unknown id)."""
    return {p.stem for d in (ct_dir, pet_dir) for p in d.glob("*.png")} | set(subjects)


# --------------------------------------------------------------------------- the stage's phases


@dataclass
class _Context:
    """What every fold of one run shares."""

    ct_dir: Path
    pet_dir: Path
    save_dir: Path
    options: PlacementOptions
    crop: int | None
    subjects: dict[str, str]
    settings: str
    overwrite: bool
    load_denoiser: DenoiserLoader
    sha1: Callable[[str], str]
    unet_sources: dict[int, str] = field(default_factory=dict)
    unet_errors: dict[int, str] = field(default_factory=dict)

    @property
    def row_options(self) -> dict:
        return self.options.row_options(self.crop)


@dataclass
class FoldPlan:
    """One fold: its tasks, the variants scored, the landmark files an earlier run left
    that are still valid, and the tasks whose missing variants must be placed."""

    fold: int
    tasks: list[PlacementTask]
    variants: list[str]
    folder: Path
    stored: dict[str, dict]
    fingerprints: dict[str, str]
    to_place: list[PlacementTask]


def _task(ctx: _Context, k: int, item_id: str, unet_path: str | None) -> PlacementTask:
    return PlacementTask(k, item_id, ctx.subjects.get(item_id, item_id), str(ctx.ct_dir / f"{item_id}.png"),
                         str(ctx.pet_dir / f"{item_id}.png"), unet_path)


def _unet_images(stage: StageRun, ctx: _Context, k: int, ids: list[str]) -> dict[str, str] | None:
    """id -> the U-Net image of fold k, or None when the fold has none.

    The cross-validation's own images when complete; else the fold's model, run here;
    else what the cross-validation wrote (its missing images then fail those items,
    with the path in the reason). A model that cannot be loaded or run costs this fold
    its U-Net variant (a failed ``fold{k}/denoiser`` row), not the run.
    """
    opts = ctx.options
    cv_dir = denoised_fold_dir(opts.denoised_dir, k) if opts.denoised_dir else None
    model = model_path(opts.models_dir, k) if opts.models_dir else None
    has_model = model is not None and model.is_file()
    if cv_dir is not None and cv_dir.is_dir() and (
            not has_model or all((cv_dir / f"{i}.png").is_file() for i in ids)):
        ctx.unet_sources[k] = str(cv_dir)
        return {i: str(cv_dir / f"{i}.png") for i in ids}
    if not has_model:
        return None
    out_dir = denoised_fold_dir(ctx.save_dir / DENOISED_DIR, k)
    try:
        # a failure leaves none of the fold's denoised images (denoise_fold removes them)
        written = denoise_fold([_task(ctx, k, i, None) for i in ids], model, out_dir, crop=ctx.crop,
                               load_denoiser=ctx.load_denoiser, batch_size=DENOISE_BATCH,
                               overwrite=ctx.overwrite, sha1=ctx.sha1)
    except Exception as exc:        # a bad model, an unwritable image: this fold's U-Net variant only
        if is_location_error(exc):
            raise                   # the output location (full, read-only): exit 2
        ctx.unet_errors[k] = describe_exception(exc)
        stage.record(ItemResult(f"fold{k}/denoiser", "", STATUS_FAILED, ctx.unet_errors[k], {"fold": k}))
        return None
    ctx.unet_sources[k] = str(model)
    return {i: written.get(i, str(out_dir / f"{i}.png")) for i in ids}


def _stored_variant(path: Path, ids: list[str], settings: str, input_sha1: str) -> dict | None:
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
            or str(data["input_sha1"]) != input_sha1):
        return None
    return data


def plan_fold(stage: StageRun, ctx: _Context, fold: dict) -> FoldPlan:
    """Pass 1 for one fold: its tasks, its U-Net source, and which variants an earlier run
    finished from the same inputs and settings."""
    k = int(fold["fold"])
    ids = list(fold["test"])
    unet = _unet_images(stage, ctx, k, ids)
    tasks = [_task(ctx, k, i, None if unet is None else unet[i]) for i in ids]
    variants = [v for v in VARIANTS if v != "pet_unet" or unet is not None]
    folder = make_private_dir(fold_dir(ctx.save_dir, k))
    for v in VARIANTS:
        if v not in variants:   # an earlier run's landmarks of a variant not scored now
            landmarks_file(folder, v).unlink(missing_ok=True)
    fingerprints = {v: variant_fingerprint(tasks, v, sha1=ctx.sha1) for v in variants}
    stored = {} if ctx.overwrite else {
        v: data for v in variants
        if (data := _stored_variant(landmarks_file(folder, v), ids, ctx.settings, fingerprints[v])) is not None}
    missing = tuple(v for v in variants if v not in stored)
    to_place = [PlacementTask(t.fold, t.id, t.subject, t.ct_path, t.pet_path, t.unet_path, missing)
                for t in tasks] if missing else []
    return FoldPlan(k, tasks, variants, folder, stored, fingerprints, to_place)


def _remove_item_images(ctx: _Context, task: PlacementTask) -> None:
    """A failed item leaves no face image in save_dir (the inputs are never touched)."""
    (denoised_fold_dir(ctx.save_dir / DENOISED_DIR, task.fold) / f"{task.id}.png").unlink(missing_ok=True)


def place_missing(stage: StageRun, ctx: _Context, plans: list[FoldPlan], run: RunSettings
                  ) -> dict[tuple[int, str], dict[str, np.ndarray | None]]:
    """Pass 2: one pool over every unfinished fold's images (a pool per fold would pay the
    process start-up and model load again for each fold), placing only the variants
    whose stored landmarks are absent or stale. A task that fails is a failed row."""
    computed: dict[tuple[int, str], dict[str, np.ndarray | None]] = {}
    todo = [t for plan in plans for t in plan.to_place]
    fn = partial(place_task, crop=ctx.crop, framing=ctx.options.framing,
                 min_detection_confidence=ctx.options.min_detection_confidence)
    for task, res, err in map_items(fn, todo, jobs=run.jobs, desc="landmarks", progress=run.progress):
        if err is not None:
            _remove_item_images(ctx, task)
            stage.record(ItemResult(f"fold{task.fold}/{task.id}", task.subject, STATUS_FAILED,
                                    describe_exception(err), {"fold": task.fold}))
            continue
        computed[(task.fold, task.id)] = res
    return computed


@dataclass
class FoldScores:
    """Pass 3 for one fold: the tasks scored, their landmarks, and per variant the
    detected flags and (PET variants) the MAD against the CT, in task order."""

    tasks: list[PlacementTask]
    landmarks: dict[str, dict[str, np.ndarray | None]]
    detected: dict[str, np.ndarray]
    mads: dict[str, np.ndarray]


def _fold_landmarks(plan: FoldPlan, computed: dict) -> tuple[list[PlacementTask], dict]:
    """The tasks of a fold that have landmarks now, and id -> variant -> (478, 3) or None."""
    results: dict[str, dict[str, np.ndarray | None]] = {}
    for v, data in plan.stored.items():
        for i, lm, det in zip(data["ids"].astype(str), data["landmarks"], data["detected"]):
            results.setdefault(i, {})[v] = lm if det else None
    # an item whose placement failed now is left out of every variant of the fold
    k = plan.fold
    placed = ({t.id for t in plan.to_place if (k, t.id) in computed} if plan.to_place
              else {t.id for t in plan.tasks})
    for i in placed:
        if (k, i) in computed:
            results.setdefault(i, {}).update(computed[(k, i)])
    return [t for t in plan.tasks if t.id in placed], results  # split order


def score_fold(ctx: _Context, plan: FoldPlan, computed: dict) -> FoldScores:
    """Pass 3 for one fold: write each variant's landmark file (unless the stored one is
    still exact) and compute the detection flags and MADs."""
    ok_tasks, results = _fold_landmarks(plan, computed)
    ok_ids = [t.id for t in ok_tasks]
    scores = FoldScores(ok_tasks, results, {}, {})
    for v in plan.variants:
        lm = np.full((len(ok_ids), N_LANDMARKS, 3), np.nan)
        det = np.zeros(len(ok_ids), dtype=bool)
        for j, i in enumerate(ok_ids):
            found = results[i].get(v)
            if found is not None:
                lm[j], det[j] = found, True
        # a reused file is left untouched unless a failure elsewhere shrank the fold's ids
        if v not in plan.stored or plan.stored[v]["ids"].astype(str).tolist() != ok_ids:
            write_npz(landmarks_file(plan.folder, v), ids=np.array(ok_ids, dtype=str),
                      subjects=np.array([t.subject for t in ok_tasks], dtype=str),
                      landmarks=lm, detected=det, settings=np.array(ctx.settings),
                      input_sha1=np.array(plan.fingerprints[v]))
        scores.detected[v] = det
        if v != "ct":
            ct_lm = np.stack([results[i]["ct"] if results[i].get("ct") is not None
                              else np.full((N_LANDMARKS, 3), np.nan) for i in ok_ids]) if ok_ids else lm
            scores.mads[v] = np.asarray(landmark_mad(ct_lm, lm, upstream=ctx.options.upstream_mad)).reshape(-1)
    return scores


def record_fold(stage: StageRun, ctx: _Context, plan: FoldPlan, scores: FoldScores,
                computed: dict) -> None:
    """One row per scored task: detected per variant, MAD per PET variant. A row is
    ``skipped`` (its earlier values kept) when none of its landmarks were placed now and
    its images, the variants scored and every option it depends on are those of its ok row."""
    outputs = [landmarks_file(plan.folder, v) for v in plan.variants]
    for j, t in enumerate(scores.tasks):
        item_id = f"fold{plan.fold}/{t.id}"
        sources = {v: ctx.sha1(getattr(t, VARIANT_SOURCE[v])) for v in plan.variants}
        item_fingerprint = fingerprint(ctx.row_options, sources)
        if (plan.fold, t.id) not in computed and stage.is_fresh(item_id, item_fingerprint, outputs):
            stage.record(stage.skipped(item_id), item_fingerprint)
            continue
        res = scores.landmarks[t.id]
        values = {"fold": plan.fold}
        values.update({f"detected_{v}": res.get(v) is not None for v in plan.variants})
        values.update({f"mad_{v}": float(scores.mads[v][j]) for v in plan.variants if v != "ct"})
        stage.record(ItemResult(item_id, t.subject, STATUS_OK, "", values), item_fingerprint)


# --------------------------------------------------------------------------- the stage


def _summary_record(ctx: _Context, folds: list[int], det_rows: list[dict], place_rows: list[dict],
                    scored: list[str], n_failed: int) -> dict:
    opts = ctx.options
    return {"variants_scored": scored,
            "variants_not_scored": {v: "no denoised images (--denoised_dir) or models (--models_path) "
                                       "for any fold" for v in VARIANTS if v not in scored},
            "pet_unet_source": ctx.unet_sources, "pet_unet_errors": ctx.unet_errors, "crop": ctx.crop,
            "folds": folds,
            "mad": {"definition": "100 * sum(|dx|+|dy|) / (IOD_ct * n)",
                    "n": N_FACE_LANDMARKS if opts.upstream_mad else N_LANDMARKS,
                    "well_placed_below": WELL_PLACED_MAD},
            "framing": {"upscale": opts.upscale, "pad": opts.pad},
            "detection": det_rows, "placement": place_rows, "n_failed": n_failed}


def _summary_text(ctx: _Context, summary: dict, n_items: int) -> str:
    lines = [format_tables(summary["detection"], summary["placement"], upstream_mad=ctx.options.upstream_mad)]
    lines += [f"{v}: not scored ({why})" for v, why in summary["variants_not_scored"].items()]
    lines += [f"pet_unet not scored in fold {k}: {why}" for k, why in ctx.unet_errors.items()]
    if summary["n_failed"]:
        lines.append(f"{summary['n_failed']} of {n_items} test image(s) could not be scored; "
                     f"see {ctx.save_dir / MANIFEST_FILE}")
    return "\n".join(lines)


def write_results(ctx: _Context, folds: list[int], scores: dict[int, FoldScores], n_failed: int) -> dict:
    """detection.csv, placement.csv, placement.json and summary.json; the summary record.
    A variant is in the tables for the folds where it was scored (column folds_scored)."""
    detected = {v: {k: s.detected[v] for k, s in scores.items() if v in s.detected} for v in VARIANTS}
    mads = {v: {k: s.mads[v] for k, s in scores.items() if v in s.mads} for v in VARIANTS[1:]}
    det_rows = detection_table({v: d for v, d in detected.items() if d}, folds)
    place_rows = placement_table({v: m for v, m in mads.items() if m}, folds)
    write_csv(ctx.save_dir / DETECTION_FILE, det_rows, column_union(det_rows, first=["variant"]))
    write_csv(ctx.save_dir / PLACEMENT_FILE, place_rows, column_union(place_rows, first=["variant"]))
    write_json(ctx.save_dir / "placement.json", place_rows)
    scored = [v for v in VARIANTS if detected[v]]
    summary = _summary_record(ctx, folds, det_rows, place_rows, scored, n_failed)
    write_json(ctx.save_dir / "summary.json", summary)
    return summary


def write_qa(ctx: _Context, plans: list[FoldPlan], scores: dict[int, FoldScores], scored: list[str],
             seed: int) -> None:
    """qa_landmarks.png: ``n_qa`` scored test images drawn at random (seeded)."""
    landmarks = {(k, i): res for k, s in scores.items() for i, res in s.landmarks.items()}
    ok_all = [t for plan in plans for t in scores[plan.fold].tasks]
    if not ok_all or ctx.options.n_qa <= 0:
        return
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(ok_all), size=min(ctx.options.n_qa, len(ok_all)), replace=False))
    sheet = qa_montage([ok_all[i] for i in pick], landmarks, scored, crop=ctx.crop,
                       upstream_mad=ctx.options.upstream_mad)
    if sheet is not None:
        write_png(ctx.save_dir / "qa_landmarks.png", sheet)


def _open_inputs(ct_files, pet_files, splits_file) -> tuple[Path, Path, dict, dict[str, str]]:
    """The render folders, the checked splits and id -> subject; unusable ones raise InputError."""
    ct_dir, pet_dir = Path(ct_files), Path(pet_files)
    for flag, d in (("--ct_files", ct_dir), ("--pet_files", pet_dir)):
        if not d.is_dir():
            raise InputError(f"expected a folder of <id>.png renders at {flag} {d}, found no such folder")
    subjects = read_subjects(ct_dir)
    splits = read_splits(splits_file, known_ids=known_ids(ct_dir, pet_dir, subjects),
                         subjects=subjects or None)
    return ct_dir, pet_dir, splits, subjects


def run_landmark_placement(ct_files: str | Path, pet_files: str | Path, splits_file: str | Path,
                           save_dir: str | Path, options: PlacementOptions | None = None, *,
                           run: RunSettings | None = None,
                           load_denoiser: DenoiserLoader | None = None) -> StageResult:
    """The placement stage. Exit code 0, or 1 when a test image could not be scored or a
    fold's denoiser could not be run (failed rows in the manifest).

    Missing render folders or an unusable ``splits.json`` (duplicated fold numbers, an id
    in two partitions, an unknown id ...) raise InputError (exit 2) before any work.
    load_denoiser: pt_path -> callable on (N, H, W) float32 [0, 1]; default
    :func:`faceaudit.petct.denoiser.load_denoiser` (used only when models are needed).
    """
    options = options or PlacementOptions()
    run = run or RunSettings()
    ct_dir, pet_dir, splits, subjects = _open_inputs(ct_files, pet_files, splits_file)
    with StageRun("landmark_placement", save_dir, run, options=options) as stage:
        crop = splits["crop"]
        ctx = _Context(ct_dir, pet_dir, stage.save_dir, options, crop, subjects, options.settings(crop),
                       run.overwrite, load_denoiser or default_denoiser_loader,
                       lru_cache(maxsize=None)(file_sha1))  # a PET feeds three fingerprints: read it once
        plans = [plan_fold(stage, ctx, fold) for fold in splits["folds"]]
        computed = place_missing(stage, ctx, plans, run)
        scores = {}
        for plan in plans:
            scores[plan.fold] = score_fold(ctx, plan, computed)
            record_fold(stage, ctx, plan, scores[plan.fold], computed)
        folds = [plan.fold for plan in plans]
        n_items = sum(len(plan.tasks) for plan in plans)
        n_failed = n_items - sum(len(s.tasks) for s in scores.values())
        summary = write_results(ctx, folds, scores, n_failed)
        write_qa(ctx, plans, scores, summary["variants_scored"], run.seed)
        stage.extra["variants_scored"] = summary["variants_scored"]
        keep = [f"fold{p.fold}/{t.id}" for p in plans for t in p.tasks] + [f"fold{k}/denoiser" for k in ctx.unet_errors]
        return stage.finish(keep_ids=keep, summary=_summary_text(ctx, summary, n_items),
                            details={"variants_scored": summary["variants_scored"], "n_failed": n_failed,
                                     "detection": summary["detection"], "placement": summary["placement"]})
