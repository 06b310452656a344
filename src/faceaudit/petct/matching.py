"""PET -> CT identification from face-mesh landmarks (stage 4, the matching stage).

Per fold, every probe (a PET variant's landmarks, by default the U-Net-denoised PET)
is compared with a gallery (the CT landmarks of the same fold's test set, plus
optional distractors). The distance is the Frobenius norm of the (478, 3)
difference, either on the raw coordinates (``none``, upstream) or after an
alignment: ``rigid`` / ``similarity`` Procrustes of every face to one common
reference (the generalised Procrustes mean of the gallery), or the upstream
per-pair nearest-neighbour ``icp``. Recognizers (``embedders``) attack the same probes
and gallery from the renders (:mod:`faceaudit.petct.embedding_attack`).

A probe without landmarks, or whose subject has no CT with landmarks in the
gallery, is a miss and is counted. Identity is the subject (patient): another
study of the same patient in the gallery is a correct re-identification.

The items are the folds: a fold whose landmark files are missing, unreadable or of
the wrong shape is a failed row with the reason, and the other folds are scored. A
fold is skipped (its distances reused) when the landmarks it was computed from and
the options that shape it are unchanged. Distance files of folds or attacks this run did
not score (fewer folds, an alignment dropped, a failed fold) are removed, and so is cmc.png
when no fold was scored. A full or read-only output location stops the stage (exit 2);
any other error (an unreadable render too) fails only its fold.

Outputs (``save_dir``): distances_fold{k}_{align}.npz (probe_ids, gallery_ids,
probe_subjects, gallery_subjects, probe_valid, distances, input_sha1) and per recognizer
distances_fold{k}_embedding-<name>_<variant>.npz, topk.csv (one row per attack x k: mean ±
std over folds, and pooled hits / probes with the Wilson 95 % interval), gallery_growth.csv
(one row per attack x gallery size 10/20/40/full: top-1, top-5 and chance when each probe's
gallery is cut to that size by random draws, seeded by RunSettings.seed), ranks.csv (one
row per fold x probe), cmc.png, summary.json, manifest.csv (one row per fold), run.json.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.contracts import GALLERY_GROWTH_FILE, RANKS_FILE, TOPK_FILE, fold_dir, landmarks_file
from faceaudit.core.files import (
    InputError,
    read_npz,
    write_csv,
    write_json,
    write_npz,
)
from faceaudit.core.manifest import (
    STATUS_FAILED,
    STATUS_OK,
    ItemResult,
    describe_exception,
)
from faceaudit.core.options import expect_whole
from faceaudit.core.runner import (
    OptionsError,
    RunSettings,
    StageResult,
    StageRun,
    fingerprint,
    is_location_error,
)
from faceaudit.petct import embedding_attack
from faceaudit.petct.alignment import ALIGN_MODES, distance_matrix
from faceaudit.petct.landmarks import (
    LandmarkSet,
    concat_sets,
    distractors_for,
    read_distractors,
    read_landmark_set,
)
from faceaudit.petct.matching_tables import (
    cmc_curves,
    format_gallery_growth,
    format_topk_table,
    gallery_growth_rows,
    plot_cmc,
    topk_rows,
)

DEFAULT_KS = (1, 3, 5, 10, 15)
DEFAULT_ALIGNS = ("none", "similarity")
CMC_FIGURE = "cmc.png"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MatchingOptions:
    """What the matching stage computes; validated on creation (OptionsError, exit 2)."""

    n_folds: int | None = None            # folds 0..K-1; None: every fold<k>/ found
    probe_variant: str | None = None      # None: pet_unet when every fold has it, else pet
    gallery_variant: str = "ct"
    aligns: tuple[str, ...] = DEFAULT_ALIGNS
    distractors: str | None = None        # a landmarks .npz or a folder of them
    ks: tuple[int, ...] = DEFAULT_KS
    embedders: tuple[str, ...] = ()       # recognizers attacking the renders too (embedding_attack)
    renders_dir: str | None = None        # the reconstruction's output: cts/, pets/ <id>.png
    denoised_dir: str | None = None       # the cross-validation's denoised/: fold{k}/<id>.png

    def __post_init__(self) -> None:
        aligns = tuple(dict.fromkeys(self.aligns))
        if not aligns or any(a not in ALIGN_MODES for a in aligns):
            raise OptionsError(f"expected --align to be a comma-separated list of {list(ALIGN_MODES)}, "
                               f"found {list(self.aligns)}")
        object.__setattr__(self, "aligns", aligns)
        if self.n_folds is not None:
            expect_whole("--n_folds", self.n_folds, 1)
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise OptionsError(f"expected ranks k to be whole numbers >= 1, found {list(self.ks)}")
        object.__setattr__(self, "ks", ks)
        for flag, name in (("--probe", self.probe_variant), ("--gallery", self.gallery_variant)):
            if name is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
                raise OptionsError(f"expected {flag} to be a variant name such as pet_unet or ct, "
                                   f"found {name!r}")
        for name in ("distractors", "renders_dir", "denoised_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        object.__setattr__(self, "embedders",
                           embedding_attack.check_options(self.embedders, self.renders_dir, self.denoised_dir))


# --------------------------------------------------------------------------- inputs


def fold_folders(landmarks_dir: Path, n_folds: int | None) -> list[tuple[int, Path]]:
    """(k, LM/fold{k}) of folds 0..n_folds-1, or of every fold<k>/ found (also fold_<k>/)."""
    if not landmarks_dir.is_dir():
        raise InputError(f"expected a folder with fold<k>/ sub-folders at --landmarks_files "
                         f"{landmarks_dir}, found no such folder")
    found = {}
    for p in landmarks_dir.iterdir():
        m = re.fullmatch(r"fold_?(\d+)", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    if n_folds is None:
        if not found:
            raise InputError(f"expected fold<k>/ sub-folders in --landmarks_files {landmarks_dir}, "
                             f"found none")
        return sorted(found.items())
    return [(k, found.get(k, fold_dir(landmarks_dir, k))) for k in range(n_folds)]


def default_probe_variant(folds: list[tuple[int, Path]]) -> str:
    """pet_unet when every fold has it, else pet."""
    if folds and all(landmarks_file(d, "pet_unet").is_file() for _, d in folds):
        return "pet_unet"
    return "pet"


def input_fingerprint(probe: LandmarkSet, gallery: LandmarkSet) -> str:
    """SHA-1 of the ids, subjects and landmark values a distance matrix was computed from
    (stored in each distances file as ``input_sha1``)."""
    h = hashlib.sha1()
    for s in (probe, gallery):
        h.update("\0".join(s.ids.tolist()).encode())
        h.update("\0".join(s.subjects.tolist()).encode())
        h.update(np.ascontiguousarray(s.landmarks, dtype=np.float64).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- one fold


@dataclass
class FoldMatch:
    """One fold x one attack (an alignment or a recognizer): the matrix with its ids, each probe's rank."""

    align: str                 # the row key: the alignment, or embedding-<name>_<variant>
    probe_ids: np.ndarray
    probe_subjects: np.ndarray
    probe_valid: np.ndarray    # the probe had features (landmarks, a face)
    gallery_ids: np.ndarray
    gallery_subjects: np.ndarray
    distances: np.ndarray
    ranks: np.ndarray
    gallery_valid: np.ndarray | None = None  # None: every gallery item has features
    attack: str = ""           # landmarks-<align> or embedding-<name>
    probe_variant: str = ""
    own_gallery_detected: float = float("nan")  # the fold's own CTs with features

    @property
    def gallery_size(self) -> int:
        return len(self.gallery_ids)

    def usable(self) -> np.ndarray:
        """(P,) the probe and a gallery item of its subject both have features."""
        subjects = self.gallery_subjects if self.gallery_valid is None else self.gallery_subjects[self.gallery_valid]
        return self.probe_valid & np.isin(self.probe_subjects, subjects)


def match_fold(probe: LandmarkSet, gallery: LandmarkSet, *, align: str,
               distractors: LandmarkSet | None = None, progress: bool = False) -> FoldMatch:
    """Identify every probe in the gallery (detected gallery items + distractors)."""
    if probe.landmarks.shape[1:] != gallery.landmarks.shape[1:]:
        raise InputError(f"expected probe landmarks ({probe.source}) of the gallery's shape "
                         f"{gallery.landmarks.shape[1:]} ({gallery.source}), found {probe.landmarks.shape[1:]}")
    full_gallery = concat_sets(gallery.subset(gallery.detected), distractors)
    if len(full_gallery.ids) == 0:
        d = np.full((len(probe.ids), 0), np.nan)
    else:
        d = distance_matrix(probe.landmarks, full_gallery.landmarks, align=align, progress=progress)
    return _ranked(align, probe, full_gallery, d)


def _ranked(align: str, probe: LandmarkSet, full_gallery: LandmarkSet, distances: np.ndarray,
            probe_valid: np.ndarray | None = None, **fields) -> FoldMatch:
    valid = (probe.detected if probe_valid is None else probe_valid).copy()
    ranks = ranking.true_match_ranks(distances, probe.subjects, full_gallery.subjects, probe_valid=valid)
    return FoldMatch(align, probe.ids, probe.subjects, valid, full_gallery.ids,
                     full_gallery.subjects, distances, ranks, **{"attack": f"landmarks-{align}", **fields})


def distances_path(save_dir: Path, fold: int, align: str) -> Path:
    return Path(save_dir) / f"distances_fold{fold}_{align}.npz"


def _load_cached(path: Path, input_sha1: str) -> np.ndarray | None:
    """Distances from an earlier run, if they were computed from exactly these inputs."""
    if not path.is_file():
        return None
    try:
        old = read_npz(path, required=("distances", "input_sha1"))
    except InputError:
        return None
    return old["distances"] if str(old["input_sha1"]) == input_sha1 else None


@dataclass
class FoldOutcome:
    """A scored fold: its matches per attack, its counts and its per-probe rows."""

    fold: int
    matches: dict[str, FoldMatch]
    info: dict
    probe_rows: list[dict] = field(default_factory=list)
    recomputed: bool = False


@dataclass(frozen=True)
class _Context:
    """What every fold of one run shares."""

    save_dir: Path
    options: MatchingOptions
    probe_variant: str
    distractors: list[LandmarkSet] | None
    overwrite: bool
    progress: bool
    recognizers: dict[str, embedding_attack.Recognizer] = field(default_factory=dict)
    renders: embedding_attack.RenderFolders | None = None
    seed: int = 0


def _fold_distances(ctx: _Context, k: int, probe: LandmarkSet, gallery: LandmarkSet,
                    extra: LandmarkSet | None, full_gallery: LandmarkSet, input_sha1: str
                    ) -> tuple[dict[str, FoldMatch], bool]:
    """Every alignment's FoldMatch, reusing a stored matrix of the same inputs; whether any
    matrix was computed anew."""
    matches, recomputed = {}, False
    for align in ctx.options.aligns:
        out = distances_path(ctx.save_dir, k, align)
        cached = None if ctx.overwrite else _load_cached(out, input_sha1)
        if cached is not None:
            matches[align] = _ranked(align, probe, full_gallery, cached)
            continue
        fm = match_fold(probe, gallery, align=align, distractors=extra, progress=ctx.progress)
        write_npz(out, probe_ids=fm.probe_ids, gallery_ids=fm.gallery_ids,
                  probe_subjects=fm.probe_subjects, gallery_subjects=fm.gallery_subjects,
                  probe_valid=fm.probe_valid, distances=fm.distances, input_sha1=np.array(input_sha1))
        matches[align] = fm
        recomputed = True
    return matches, recomputed


def _probe_rows(k: int, matches: dict[str, FoldMatch], gallery: LandmarkSet, ctx: _Context) -> list[dict]:
    """One row per probe: whether it and its subject's CT had landmarks, its rank per attack
    (and for a recognizer whether it found a face)."""
    gallery_variant = ctx.options.gallery_variant
    first = next(iter(matches.values()))
    ct_detected = dict(zip(gallery.ids.tolist(), gallery.detected.tolist()))
    gallery_subjects = set(first.gallery_subjects.tolist())
    rows = []
    for i, pid in enumerate(first.probe_ids.tolist()):
        has_probe = bool(first.probe_valid[i])
        has_ct = first.probe_subjects[i] in gallery_subjects
        reason = "" if has_probe and has_ct else "miss: " + ", ".join(
            ([f"no landmarks on {ctx.probe_variant}"] if not has_probe else [])
            + ([f"no {gallery_variant} landmarks of this subject in the gallery"] if not has_ct else []))
        row = {"fold": k, "id": pid, "subject": str(first.probe_subjects[i]), "probe_landmarks": has_probe,
               f"own_{gallery_variant}_landmarks": bool(ct_detected.get(pid, False)),
               "gallery_has_subject": has_ct}
        row.update({f"rank_{a}": int(fm.ranks[i]) for a, fm in matches.items()})
        row.update({f"face_{a}": bool(fm.probe_valid[i]) for a, fm in matches.items() if fm.gallery_valid is not None})
        row["reason"] = reason
        rows.append(row)
    return rows


def _fold_info(k: int, matches: dict[str, FoldMatch], extra: LandmarkSet | None) -> dict:
    first = next(iter(matches.values()))
    gallery_subjects = set(first.gallery_subjects.tolist())
    n_ct_missing = sum(1 for s in first.probe_subjects.tolist() if s not in gallery_subjects)
    return {"fold": k, "n_probes": len(first.probe_ids),
            "n_probe_no_landmarks": int((~first.probe_valid).sum()),
            "n_subject_not_in_gallery": n_ct_missing,
            "gallery_size": first.gallery_size,
            "gallery_subjects": len(gallery_subjects),
            "n_distractors": 0 if extra is None else len(extra.ids)}


def score_fold(ctx: _Context, k: int, folder: Path) -> tuple[FoldOutcome, str]:
    """Read one fold's landmark files and rank its probes; returns the outcome and the
    fold's fingerprint (its landmark content and the options that shape its outputs)."""
    probe = read_landmark_set(landmarks_file(folder, ctx.probe_variant))
    gallery = read_landmark_set(landmarks_file(folder, ctx.options.gallery_variant))
    extra = distractors_for(ctx.distractors, probe.source, gallery.source)
    full_gallery = concat_sets(gallery.subset(gallery.detected), extra)
    input_sha1 = input_fingerprint(probe, full_gallery)
    matches, recomputed = _fold_distances(ctx, k, probe, gallery, extra, full_gallery, input_sha1)
    ct_rate = float(np.mean(gallery.detected)) if len(gallery.ids) else float("nan")
    matches = {a: replace(fm, probe_variant=ctx.probe_variant, own_gallery_detected=ct_rate)
               for a, fm in matches.items()}
    shaping = {"probe": ctx.probe_variant, "gallery": ctx.options.gallery_variant,
               "aligns": list(ctx.options.aligns)}
    parts = [input_sha1, shaping]
    if ctx.recognizers:
        embedded, embedding_sha1 = embedding_attack.attack_fold(
            ctx.recognizers, ctx.renders, k, probe, gallery, full_gallery,
            distances_path=lambda key: distances_path(ctx.save_dir, k, key))
        matches.update({e.key: _ranked(e.key, probe, full_gallery, e.distances, **e.match_fields()) for e in embedded})
        recomputed |= any(e.recomputed for e in embedded)
        parts.append(embedding_sha1)
    outcome = FoldOutcome(k, matches, _fold_info(k, matches, extra), _probe_rows(k, matches, gallery, ctx),
                          recomputed)
    return outcome, fingerprint(*parts)


def _fold_row_values(outcome: FoldOutcome) -> dict:
    values = dict(outcome.info)
    values.update({f"top1_{a}": ranking.topk_accuracy(fm.ranks, (1,))[1] if len(fm.ranks) else float("nan")
                   for a, fm in outcome.matches.items()})
    return values


def _run_fold(stage: StageRun, ctx: _Context, k: int, folder: Path) -> FoldOutcome | dict:
    """Score one fold and journal its row. A fold that cannot be scored is a failed row
    (its distance files removed); then ``{"fold": k, "reason": ...}`` is returned."""
    item_id = f"fold{k}"
    try:
        outcome, item_fingerprint = score_fold(ctx, k, folder)
    except Exception as exc:    # a bad fold (an unreadable render too) never stops the others
        if is_location_error(exc):
            raise               # the output location (full, read-only): exit 2, not a bad fold
        for path in ctx.save_dir.glob(f"distances_fold{k}_*.npz"):
            path.unlink(missing_ok=True)
        reason = describe_exception(exc)
        stage.record(ItemResult(item_id, "", STATUS_FAILED, reason, {"fold": k}))
        return {"fold": k, "reason": reason}
    outputs = [distances_path(ctx.save_dir, k, a) for a in outcome.matches]
    if not outcome.recomputed and stage.is_fresh(item_id, item_fingerprint, outputs):
        row = stage.skipped(item_id)
    else:
        row = ItemResult(item_id, "", STATUS_OK, "", _fold_row_values(outcome))
    stage.record(row, item_fingerprint)
    return outcome


# --------------------------------------------------------------------------- tables and figure


def _summary_record(ctx: _Context, outcomes: list[FoldOutcome], rows: list[dict],
                    curves: dict[str, np.ndarray], failed: list[dict]) -> dict:
    opts = ctx.options
    topk = {a: {str(r["k"]): r for r in rows if r["align"] == a} for a in dict.fromkeys(r["align"] for r in rows)}
    return {"probe_variant": ctx.probe_variant, "gallery_variant": opts.gallery_variant,
            "aligns": list(opts.aligns), "ks": list(opts.ks), "folds": [o.info for o in outcomes],
            "failed_folds": failed,
            "distractors": None if not ctx.distractors else {
                "source": opts.distractors, "files": [p.source for p in ctx.distractors],
                "n": int(sum(len(p.ids) for p in ctx.distractors)),
                "note": "a fold's own landmark files are never its distractors"},
            "identity": "subject (another study of the same patient counts as a correct match)",
            "distance": "Frobenius norm of the (n_points, 3) landmark difference",
            "reference_frame": "generalised Procrustes mean of each fold's gallery (rigid/similarity)",
            "topk": topk, "cmc_mean": {a: c.tolist() for a, c in curves.items()},
            "embedding": embedding_attack.describe(ctx.recognizers, ctx.renders) if ctx.recognizers else None}


def remove_stale_distances(save_dir: Path, outcomes: list[FoldOutcome]) -> list[Path]:
    """Remove every distances_fold{k}_*.npz this run did not score: folds that are gone
    (fewer folds, a fold folder removed) and attacks no longer asked for (an alignment or
    recognizer dropped). Returns the removed paths."""
    keep = {distances_path(save_dir, o.fold, key).name for o in outcomes for key in o.matches}
    removed = [p for p in save_dir.glob("distances_fold*_*.npz") if p.name not in keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_results(ctx: _Context, outcomes: list[FoldOutcome], failed: list[dict]) -> tuple[list[dict], list[dict]]:
    """topk.csv, gallery_growth.csv, ranks.csv, cmc.png and summary.json of the scored folds;
    the top-k rows and the gallery-growth rows."""
    opts, save_dir = ctx.options, ctx.save_dir
    rows = topk_rows(outcomes, opts.ks)
    columns = (["attack", "probe", "align", "k", "mean", "std"] + [f"fold{o.fold}" for o in outcomes]
               + ["pooled_hits", "pooled_n", "pooled_topk", "ci_lo", "ci_hi",
                  "gallery_size", "chance", "mean_probe_detected", "std_probe_detected", "mean_both_detected",
                  "n_probes", "n_miss_no_landmarks", "probe_detection_rate", "gallery_detection_rate"])
    write_csv(save_dir / TOPK_FILE, rows, columns)
    write_csv(save_dir / RANKS_FILE, [r for o in outcomes for r in o.probe_rows])
    growth = gallery_growth_rows(outcomes, seed=ctx.seed)
    if growth:
        write_csv(save_dir / GALLERY_GROWTH_FILE, growth)
    else:                           # no fold scored: an earlier run's table would describe other folds
        (save_dir / GALLERY_GROWTH_FILE).unlink(missing_ok=True)
    curves, chance = cmc_curves(outcomes)
    if curves:
        gsize = np.mean([o.info["gallery_size"] for o in outcomes])
        plot_cmc(curves, chance, save_dir / CMC_FIGURE,
                 title=f"{ctx.probe_variant} probes vs {opts.gallery_variant} gallery, {len(outcomes)} folds, "
                       f"mean gallery {gsize:.0f}")
    else:                           # no fold scored: an earlier run's curve would describe other folds
        (save_dir / CMC_FIGURE).unlink(missing_ok=True)
    write_json(save_dir / "summary.json", {**_summary_record(ctx, outcomes, rows, curves, failed),
                                           "gallery_growth": growth})
    return rows, growth


def _summary_text(ctx: _Context, rows: list[dict], growth: list[dict], n_folds: int, failed: list[dict]) -> str:
    lines = [format_topk_table(rows, ctx.probe_variant, ctx.options.gallery_variant)] if rows else []
    lines += [format_gallery_growth(growth)] if growth else []
    lines += embedding_attack.detection_lines(rows)
    lines.append(f"landmark matching: {n_folds - len(failed)} of {n_folds} folds scored; "
                 f"results in {ctx.save_dir}")
    lines += [f"  failed fold {f['fold']}: {f['reason']}" for f in failed]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stage


def run_landmark_matching(landmarks_dir: str | Path, save_dir: str | Path,
                          options: MatchingOptions | None = None, *,
                          run: RunSettings | None = None,
                          make_embedder: Callable[[str], object] | None = None) -> StageResult:
    """The matching stage: read LM/fold{k}/landmarks_*.npz, write distances, top-k, CMC
    (and the embedding attack's, see :func:`embedding_attack.prepare` for ``make_embedder``).

    Exit code 0, or 1 when a fold could not be scored (missing, unreadable or
    wrong-shaped landmark files or renders): that fold is a failed manifest row with the
    reason and is left out of the means; the other folds are scored and written. A missing
    landmarks folder or unreadable distractors raise InputError (exit 2), and so do the
    embedding attack's missing inputs or models, before any work.
    """
    options = options or MatchingOptions()
    run = run or RunSettings()
    folds = fold_folders(Path(landmarks_dir), options.n_folds)
    distractor_sets = (read_distractors(options.distractors, variant=options.gallery_variant)
                       if options.distractors else None)
    renders, embedders = embedding_attack.prepare(options.embedders, options.renders_dir, options.denoised_dir,
                                                  distractor_sets, make_embedder)
    with StageRun("landmark_matching", save_dir, run, options=options) as stage:
        recognizers = embedding_attack.open_recognizers(embedders, stage.save_dir, overwrite=run.overwrite)
        ctx = _Context(stage.save_dir, options, options.probe_variant or default_probe_variant(folds),
                       distractor_sets, run.overwrite, run.progress, recognizers, renders, run.seed)
        stage.extra.update(probe_variant=ctx.probe_variant, landmarks_dir=str(landmarks_dir),
                           embedders={n: r.description for n, r in recognizers.items()})
        results = [_run_fold(stage, ctx, k, folder) for k, folder in folds]
        outcomes = [r for r in results if isinstance(r, FoldOutcome)]
        failed = [r for r in results if not isinstance(r, FoldOutcome)]
        remove_stale_distances(stage.save_dir, outcomes)
        rows, growth = write_results(ctx, outcomes, failed)
        return stage.finish(keep_ids=[f"fold{k}" for k, _ in folds],
                            summary=_summary_text(ctx, rows, growth, len(folds), failed),
                            details={"probe_variant": ctx.probe_variant, "topk": rows, "gallery_growth": growth,
                                     "folds": [o.info for o in outcomes], "failed_folds": failed})
