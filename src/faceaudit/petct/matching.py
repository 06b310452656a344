"""PET -> CT identification from face-mesh landmarks (stage 4, the matching stage).

Per fold, every probe (a PET variant's landmarks, by default the U-Net-denoised PET)
is compared with a gallery (the CT landmarks of the same fold's test set, plus
optional distractors). The distance is the Frobenius norm of the (478, 3)
difference, either on the raw coordinates (``none``, upstream) or after an
alignment: ``rigid`` / ``similarity`` Procrustes of every face to one common
reference (the generalised Procrustes mean of the gallery), or the upstream
per-pair nearest-neighbour ``icp``.

A probe without landmarks, or whose subject has no CT with landmarks in the
gallery, is a miss and is counted. Identity is the subject (patient): another
study of the same patient in the gallery is a correct re-identification.

The items are the folds: a fold whose landmark files are missing, unreadable or of
the wrong shape is a failed row with the reason, and the other folds are scored. A
fold is skipped (its distances reused) when the landmarks it was computed from and
the options that shape it are unchanged.

Outputs (``save_dir``): distances_fold{k}_{align}.npz (probe_ids, gallery_ids,
probe_subjects, gallery_subjects, probe_valid, distances, input_sha1), topk.csv,
ranks.csv (one row per fold x probe), cmc.png, summary.json, manifest.csv (one row
per fold), run.json.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.contracts import fold_dir, landmarks_file
from faceaudit.core.figures import figure_png, new_axes
from faceaudit.core.files import (
    InputError,
    atomic_write_bytes,
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
from faceaudit.core.runner import (
    OptionsError,
    RunSettings,
    StageResult,
    StageRun,
    fingerprint,
)
from faceaudit.petct.alignment import ALIGN_MODES, distance_matrix
from faceaudit.petct.landmarks import (
    LandmarkSet,
    concat_sets,
    distractors_for,
    read_distractors,
    read_landmark_set,
)

DEFAULT_KS = (1, 3, 5, 10, 15)
DEFAULT_ALIGNS = ("none", "similarity")
RANKS_FILE = "ranks.csv"


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

    def __post_init__(self) -> None:
        aligns = tuple(dict.fromkeys(self.aligns))
        if not aligns or any(a not in ALIGN_MODES for a in aligns):
            raise OptionsError(f"expected --align to be a comma-separated list of {list(ALIGN_MODES)}, "
                               f"found {list(self.aligns)}")
        object.__setattr__(self, "aligns", aligns)
        if self.n_folds is not None and (isinstance(self.n_folds, bool) or not isinstance(self.n_folds, int)
                                         or self.n_folds < 1):
            raise OptionsError(f"expected --n_folds to be a whole number >= 1, found {self.n_folds!r}")
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise OptionsError(f"expected ranks k to be whole numbers >= 1, found {list(self.ks)}")
        object.__setattr__(self, "ks", ks)
        for flag, name in (("--probe", self.probe_variant), ("--gallery", self.gallery_variant)):
            if name is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
                raise OptionsError(f"expected {flag} to be a variant name such as pet_unet or ct, "
                                   f"found {name!r}")
        if self.distractors is not None:
            object.__setattr__(self, "distractors", str(self.distractors))


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
    """One fold x one alignment: the matrix with its ids, and each probe's rank."""

    align: str
    probe_ids: np.ndarray
    probe_subjects: np.ndarray
    probe_valid: np.ndarray  # probe had landmarks
    gallery_ids: np.ndarray
    gallery_subjects: np.ndarray
    distances: np.ndarray
    ranks: np.ndarray

    @property
    def gallery_size(self) -> int:
        return len(self.gallery_ids)


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


def _ranked(align: str, probe: LandmarkSet, full_gallery: LandmarkSet, distances: np.ndarray) -> FoldMatch:
    ranks = ranking.true_match_ranks(distances, probe.subjects, full_gallery.subjects,
                                     probe_valid=probe.detected)
    return FoldMatch(align, probe.ids, probe.subjects, probe.detected.copy(), full_gallery.ids,
                     full_gallery.subjects, distances, ranks)


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
    """A scored fold: its matches per alignment, its counts and its per-probe rows."""

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
    """One row per probe: whether it and its subject's CT had landmarks, its rank per alignment."""
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
    outcome = FoldOutcome(k, matches, _fold_info(k, matches, extra), _probe_rows(k, matches, gallery, ctx),
                          recomputed)
    shaping = {"probe": ctx.probe_variant, "gallery": ctx.options.gallery_variant,
               "aligns": list(ctx.options.aligns)}
    return outcome, fingerprint(input_sha1, shaping)


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
    except OSError:
        raise                   # the output location (full, read-only): exit 2, not a bad fold
    except Exception as exc:    # a bad fold never stops the others
        for path in ctx.save_dir.glob(f"distances_fold{k}_*.npz"):
            path.unlink(missing_ok=True)
        reason = describe_exception(exc)
        stage.record(ItemResult(item_id, "", STATUS_FAILED, reason, {"fold": k}))
        return {"fold": k, "reason": reason}
    outputs = [distances_path(ctx.save_dir, k, a) for a in ctx.options.aligns]
    if not outcome.recomputed and stage.is_fresh(item_id, item_fingerprint, outputs):
        row = stage.skipped(item_id)
    else:
        row = ItemResult(item_id, "", STATUS_OK, "", _fold_row_values(outcome))
    stage.record(row, item_fingerprint)
    return outcome


# --------------------------------------------------------------------------- tables and figure


def _topk_row(align: str, kk: int, fms: list[FoldMatch], fold_ids: list[int]) -> dict:
    accs = np.array([ranking.topk_accuracy(fm.ranks, (kk,))[kk] for fm in fms])
    # upstream's denominator: probes with landmarks (their CT missing is still a miss)
    probe_det = [_subset_topk(fm.ranks, fm.probe_valid, kk) for fm in fms]
    # both landmark sets present: how well the landmarks identify, detection aside
    both = [_subset_topk(fm.ranks, fm.probe_valid & np.isin(fm.probe_subjects, fm.gallery_subjects), kk)
            for fm in fms]
    chance = np.array([ranking.chance_topk(fm.gallery_size, kk) for fm in fms])
    # a fold without probes (all its placements failed) has no accuracy: left out
    return {"align": align, "k": kk, "mean": _nanmean(accs), "std": _nanstd(accs),
            **{f"fold{f}": float(a) for f, a in zip(fold_ids, accs)},
            "gallery_size": float(np.mean([fm.gallery_size for fm in fms])),
            "chance": float(np.mean(chance)),
            "mean_probe_detected": _nanmean(probe_det), "std_probe_detected": _nanstd(probe_det),
            "mean_both_detected": _nanmean(both),
            "n_probes": int(sum(len(fm.probe_ids) for fm in fms)),
            "n_miss_no_landmarks": int(sum(
                int((~fm.probe_valid | ~np.isin(fm.probe_subjects, fm.gallery_subjects)).sum())
                for fm in fms))}


def topk_rows(outcomes: list[FoldOutcome], aligns: tuple[str, ...], ks: tuple[int, ...]) -> list[dict]:
    """One row per (alignment, k): mean ± std over the scored folds, per fold, chance."""
    fold_ids = [o.fold for o in outcomes]
    if not outcomes:
        return []
    return [_topk_row(align, kk, [o.matches[align] for o in outcomes], fold_ids)
            for align in aligns for kk in ks]


def cmc_curves(outcomes: list[FoldOutcome], aligns: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Mean CMC over folds per alignment, up to the smallest gallery (at most 50), and
    the matching chance curve."""
    if not outcomes:
        return {}, np.zeros(0)
    max_rank = max(1, min(50, min(o.info["gallery_size"] for o in outcomes) or 1))
    curves = {a: np.mean([ranking.cmc_curve(o.matches[a].ranks, max_rank) for o in outcomes], axis=0)
              for a in aligns}
    chance = np.array([np.mean([ranking.chance_topk(o.info["gallery_size"], r) for o in outcomes])
                       for r in range(1, max_rank + 1)])
    return curves, chance


def plot_cmc(curves: dict[str, np.ndarray], chance: np.ndarray, path: Path, *, title: str) -> None:
    """CMC curves (mean over folds) of every alignment, with the chance line."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(figsize=(6, 4.2), dpi=120)
    for align, curve in curves.items():
        ranks = np.arange(1, len(curve) + 1)
        ax.plot(ranks, 100 * curve, marker="o", ms=3, label=align)
    ax.plot(np.arange(1, len(chance) + 1), 100 * chance, ls="--", color="grey", label="chance")
    ax.set_xlabel("rank k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_ylim(0, 102)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_bytes(path, figure_png(fig))


def _summary_record(ctx: _Context, outcomes: list[FoldOutcome], rows: list[dict],
                    curves: dict[str, np.ndarray], failed: list[dict]) -> dict:
    opts = ctx.options
    topk = {a: {str(r["k"]): r for r in rows if r["align"] == a} for a in opts.aligns}
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
            "topk": topk, "cmc_mean": {a: c.tolist() for a, c in curves.items()}}


def write_results(ctx: _Context, outcomes: list[FoldOutcome], failed: list[dict]) -> list[dict]:
    """topk.csv, ranks.csv, cmc.png and summary.json of the scored folds; the top-k rows."""
    opts, save_dir = ctx.options, ctx.save_dir
    rows = topk_rows(outcomes, opts.aligns, opts.ks)
    columns = (["align", "k", "mean", "std"] + [f"fold{o.fold}" for o in outcomes]
               + ["gallery_size", "chance", "mean_probe_detected", "std_probe_detected", "mean_both_detected",
                  "n_probes", "n_miss_no_landmarks"])
    write_csv(save_dir / "topk.csv", rows, columns)
    write_csv(save_dir / RANKS_FILE, [r for o in outcomes for r in o.probe_rows])
    curves, chance = cmc_curves(outcomes, opts.aligns)
    if curves:
        gsize = np.mean([o.info["gallery_size"] for o in outcomes])
        plot_cmc(curves, chance, save_dir / "cmc.png",
                 title=f"{ctx.probe_variant} probes vs {opts.gallery_variant} gallery, {len(outcomes)} folds, "
                       f"mean gallery {gsize:.0f}")
    write_json(save_dir / "summary.json", _summary_record(ctx, outcomes, rows, curves, failed))
    return rows


def format_topk_table(rows: list[dict], probe_variant: str, gallery_variant: str) -> str:
    """The upstream-style table: one line per (alignment, k), mean ± std over folds, gallery, chance."""
    lines = [f"top-k identification, {probe_variant} probes vs {gallery_variant} gallery (mean ± std over folds, %)",
             "  all: every test image is a probe (no landmarks = miss); probe lm: only probes with landmarks "
             "(upstream's denominator); both lm: probe and its CT have landmarks",
             f"{'align':<11}{'k':>4}{'all':>15}{'probe lm':>15}{'both lm':>9}{'gallery':>9}{'chance':>8}"]
    for r in rows:
        lines.append(f"{r['align']:<11}{r['k']:>4}{100 * r['mean']:>9.1f} ± {100 * r['std']:<4.1f}"
                     f"{100 * r['mean_probe_detected']:>9.1f} ± {100 * r['std_probe_detected']:<4.1f}"
                     f"{100 * r['mean_both_detected']:>9.1f}{r['gallery_size']:>9.1f}{100 * r['chance']:>8.1f}")
    return "\n".join(lines)


def _summary_text(ctx: _Context, rows: list[dict], n_folds: int, failed: list[dict]) -> str:
    lines = [format_topk_table(rows, ctx.probe_variant, ctx.options.gallery_variant)] if rows else []
    lines.append(f"landmark matching: {n_folds - len(failed)} of {n_folds} folds scored; "
                 f"results in {ctx.save_dir}")
    lines += [f"  failed fold {f['fold']}: {f['reason']}" for f in failed]
    return "\n".join(lines)


def _subset_topk(ranks: np.ndarray, mask: np.ndarray, k: int) -> float:
    return ranking.topk_accuracy(ranks[mask], (k,))[k] if mask.any() else float("nan")


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")


# --------------------------------------------------------------------------- the stage


def run_landmark_matching(landmarks_dir: str | Path, save_dir: str | Path,
                          options: MatchingOptions | None = None, *,
                          run: RunSettings | None = None) -> StageResult:
    """The matching stage: read LM/fold{k}/landmarks_*.npz, write distances, top-k, CMC.

    Exit code 0, or 1 when a fold could not be scored (missing, unreadable or
    wrong-shaped landmark files): that fold is a failed manifest row with the reason
    and is left out of the means; the other folds are scored and written. A missing
    landmarks folder or unreadable distractors raise InputError (exit 2).
    """
    options = options or MatchingOptions()
    run = run or RunSettings()
    folds = fold_folders(Path(landmarks_dir), options.n_folds)
    distractor_sets = (read_distractors(options.distractors, variant=options.gallery_variant)
                       if options.distractors else None)
    with StageRun("landmark_matching", save_dir, run, options=options) as stage:
        ctx = _Context(stage.save_dir, options, options.probe_variant or default_probe_variant(folds),
                       distractor_sets, run.overwrite, run.progress)
        stage.extra.update(probe_variant=ctx.probe_variant, landmarks_dir=str(landmarks_dir))
        results = [_run_fold(stage, ctx, k, folder) for k, folder in folds]
        outcomes = [r for r in results if isinstance(r, FoldOutcome)]
        failed = [r for r in results if not isinstance(r, FoldOutcome)]
        rows = write_results(ctx, outcomes, failed)
        return stage.finish(keep_ids=[f"fold{k}" for k, _ in folds],
                            summary=_summary_text(ctx, rows, len(folds), failed),
                            details={"probe_variant": ctx.probe_variant, "topk": rows,
                                     "folds": [o.info for o in outcomes], "failed_folds": failed})
