"""PET -> CT identification from face-mesh landmarks (the matching stage).

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

Outputs (``save_dir``): distances_fold{k}_{align}.npz (probe_ids, gallery_ids,
probe_subjects, gallery_subjects, probe_valid, distances), topk.csv, cmc.png,
summary.json, manifest.csv (one row per fold x probe), run.json.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.geometry import align_to, procrustes_mean
from faceaudit.petct.alignment import ALIGN_MODES, icp_distance_matrix, pairwise_distances
from faceaudit.core.figures import figure_png, new_axes
from faceaudit.core.files import (
    atomic_write_bytes,
    InputError,
    make_private_dir,
    read_npz,
    write_csv,
    write_json,
    write_npz,
)
from faceaudit.core.manifest import ItemResult, Manifest, STATUS_FAILED, STATUS_OK
from faceaudit.core.runner import write_run_json

DEFAULT_KS = (1, 3, 5, 10, 15)
DEFAULT_ALIGNS = ("none", "similarity")
DISTRACTOR_PREFIX = "distractor:"


@dataclass
class LandmarkSet:
    """Landmarks of n images: ids (n,), subjects (n,), landmarks (n, m, 3) NaN if absent, detected (n,)."""

    ids: np.ndarray
    subjects: np.ndarray
    landmarks: np.ndarray
    detected: np.ndarray
    source: str = ""

    def subset(self, mask: np.ndarray) -> "LandmarkSet":
        return LandmarkSet(self.ids[mask], self.subjects[mask], self.landmarks[mask],
                           self.detected[mask], self.source)


def read_landmark_set(path: str | Path) -> LandmarkSet:
    """Read a ``landmarks_<variant>.npz``; a missing, corrupt or malformed file is an InputError."""
    path = Path(path)
    data = read_npz(path, required=("ids", "landmarks"))
    ids = data["ids"].astype(str)
    lm = np.asarray(data["landmarks"], dtype=np.float64)
    if lm.ndim != 3 or lm.shape[-1] != 3 or lm.shape[0] != len(ids):
        raise InputError(f"{path}: expected landmarks of shape ({len(ids)}, n_points, 3) for "
                         f"{len(ids)} ids, found {lm.shape}")
    subjects = data["subjects"].astype(str) if "subjects" in data else ids.copy()
    if len(subjects) != len(ids):
        raise InputError(f"{path}: {len(subjects)} subjects for {len(ids)} ids")
    finite = np.isfinite(lm).all(axis=(1, 2))
    detected = data["detected"].astype(bool) if "detected" in data else finite
    if len(detected) != len(ids):
        raise InputError(f"{path}: {len(detected)} detected flags for {len(ids)} ids")
    if np.any(detected & ~finite):
        raise InputError(f"{path}: {int(np.sum(detected & ~finite))} items flagged detected hold NaN landmarks")
    lm[~detected] = np.nan
    if len(set(ids.tolist())) != len(ids):
        raise InputError(f"{path}: duplicate ids")
    return LandmarkSet(ids, subjects, lm, detected, str(path))


def read_distractors(path: str | Path, *, variant: str = "ct") -> list[LandmarkSet]:
    """Landmarks of other people, one set per file: a single .npz, or a folder of them.

    In a folder, the ``landmarks_<variant>.npz`` files are used when there are any
    (so another placement output contributes its CT faces, not its PET ones), else
    every ``*.npz``. Only detected faces are kept. Ids and subjects get a
    ``distractor:<file>:`` prefix so a distractor never counts as a true match.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob(f"landmarks_{variant}.npz")) or sorted(path.rglob("*.npz"))
        if not files:
            raise InputError(f"--distractors {path}: no .npz landmark files found in that folder")
    else:
        raise InputError(f"--distractors {path}: no such file or folder")
    parts = []
    for f in files:
        s = read_landmark_set(f)
        s = s.subset(s.detected)
        tag = f"{DISTRACTOR_PREFIX}{f.relative_to(path) if path.is_dir() else f.name}:"
        parts.append(LandmarkSet(np.char.add(tag, s.ids), np.char.add(tag, s.subjects),
                                 s.landmarks, s.detected, str(f)))
    n_points = {p.landmarks.shape[1] for p in parts}
    if len(n_points) > 1:
        raise InputError(f"--distractors {path}: files hold different landmark counts {sorted(n_points)}")
    return parts


def distractors_for(parts: list[LandmarkSet] | None, *exclude: str | Path) -> LandmarkSet | None:
    """All distractor sets except those read from ``exclude`` (the fold's own files), so
    ``--distractors LM`` pools the other folds' faces into each fold's gallery."""
    if not parts:
        return None
    skip = {Path(p).resolve() for p in exclude}
    keep = [p for p in parts if Path(p.source).resolve() not in skip]
    if not keep:
        return None
    return LandmarkSet(np.concatenate([p.ids for p in keep]), np.concatenate([p.subjects for p in keep]),
                       np.concatenate([p.landmarks for p in keep]), np.concatenate([p.detected for p in keep]),
                       ",".join(p.source for p in keep))


def concat_sets(a: LandmarkSet, b: LandmarkSet | None) -> LandmarkSet:
    if b is None or len(b.ids) == 0:
        return a
    if a.landmarks.shape[1:] != b.landmarks.shape[1:]:
        raise InputError(f"{b.source}: landmarks {b.landmarks.shape[1:]} do not match the gallery's "
                         f"{a.landmarks.shape[1:]}")
    return LandmarkSet(np.concatenate([a.ids, b.ids]), np.concatenate([a.subjects, b.subjects]),
                       np.concatenate([a.landmarks, b.landmarks]), np.concatenate([a.detected, b.detected]),
                       a.source)


def distance_matrix(probes: np.ndarray, gallery: np.ndarray, *, align: str = "none",
                    reference: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """(P, m, 3) probes x (G, m, 3) gallery -> (P, G) distances, NaN where landmarks are missing.

    align: "none" (raw coordinates), "rigid" / "similarity" (each face Procrustes-
    aligned once to ``reference``, default the Procrustes mean of the gallery), or
    "icp" (upstream: per pair, gallery face ICP-registered onto the probe).
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    if align == "none":
        return pairwise_distances(probes, gallery)
    if align == "icp":
        return icp_distance_matrix(probes, gallery, progress=progress)
    scale = align == "similarity"
    if reference is None:
        reference = procrustes_mean(gallery, scale=scale)
    return pairwise_distances(align_to(probes, reference, scale=scale), align_to(gallery, reference, scale=scale))


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
        raise InputError(f"probe landmarks {probe.landmarks.shape[1:]} ({probe.source}) and gallery "
                         f"landmarks {gallery.landmarks.shape[1:]} ({gallery.source}) differ in shape")
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


def _fold_dirs(landmarks_dir: Path, n_folds: int | None) -> list[tuple[int, Path]]:
    if not landmarks_dir.is_dir():
        raise InputError(f"--landmarks_files {landmarks_dir}: expected a folder with fold<k>/ "
                         f"sub-folders, found no such folder")
    found = {}
    for p in landmarks_dir.iterdir():
        m = re.fullmatch(r"fold_?(\d+)", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    if n_folds is None:
        if not found:
            raise InputError(f"--landmarks_files {landmarks_dir}: no fold<k>/ sub-folders found")
        return sorted(found.items())
    return [(k, found.get(k, landmarks_dir / f"fold{k}")) for k in range(n_folds)]


def default_probe_variant(folds: list[tuple[int, Path]]) -> str:
    """pet_unet when every fold has it, else pet."""
    if folds and all((d / "landmarks_pet_unet.npz").is_file() for _, d in folds):
        return "pet_unet"
    return "pet"


def input_fingerprint(probe: LandmarkSet, gallery: LandmarkSet) -> str:
    """SHA-1 of the ids and landmark values a distance matrix was computed from."""
    import hashlib

    h = hashlib.sha1()
    for s in (probe, gallery):
        h.update("\0".join(s.ids.tolist()).encode())
        h.update("\0".join(s.subjects.tolist()).encode())
        h.update(np.ascontiguousarray(s.landmarks, dtype=np.float64).tobytes())
    return h.hexdigest()


def _load_cached(path: Path, fingerprint: str) -> np.ndarray | None:
    """Distances from an earlier run, if they were computed from exactly these inputs."""
    if not path.is_file():
        return None
    try:
        old = read_npz(path, required=("distances", "input_sha1"))
    except InputError:
        return None
    return old["distances"] if str(old["input_sha1"]) == fingerprint else None


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


def run_landmark_matching(landmarks_dir: str | Path, save_dir: str | Path, *, n_folds: int | None = None,
                          probe_variant: str | None = None, gallery_variant: str = "ct",
                          aligns: tuple[str, ...] = DEFAULT_ALIGNS, distractors: str | Path | None = None,
                          ks: tuple[int, ...] = DEFAULT_KS, overwrite: bool = False, seed: int = 0,
                          quiet: bool = False, args: dict | None = None) -> int:
    """The matching stage: read LM/fold{k}/landmarks_*.npz, write distances, top-k, CMC.

    Returns 0, or 1 when a fold's landmark files were missing or unreadable (those
    folds are recorded as failed in the manifest and left out of the means).
    """
    started = time.time()
    landmarks_dir, save_dir = Path(landmarks_dir), Path(save_dir)
    aligns = tuple(dict.fromkeys(aligns))
    bad = [a for a in aligns if a not in ALIGN_MODES]
    if bad or not aligns:
        raise InputError(f"--align: expected a comma-separated list of {ALIGN_MODES}, got {list(aligns)}")
    folds = _fold_dirs(landmarks_dir, n_folds)
    probe_variant = probe_variant or default_probe_variant(folds)
    distractor_sets = read_distractors(distractors, variant=gallery_variant) if distractors else None
    make_private_dir(save_dir)
    manifest = Manifest(save_dir / "manifest.csv")
    manifest.rows.clear()  # every fold is re-read each run: an old failure must not linger
    progress = not quiet

    per_fold: dict[str, list[FoldMatch]] = {a: [] for a in aligns}
    fold_info = []
    failed_folds = []
    for k, fdir in folds:
        try:
            probe = read_landmark_set(fdir / f"landmarks_{probe_variant}.npz")
            gallery = read_landmark_set(fdir / f"landmarks_{gallery_variant}.npz")
        except InputError as exc:
            failed_folds.append({"fold": k, "reason": str(exc)})
            manifest.add(ItemResult(f"fold{k}", "", STATUS_FAILED, str(exc)))
            continue
        extra = distractors_for(distractor_sets, probe.source, gallery.source)
        ct_detected = dict(zip(gallery.ids.tolist(), gallery.detected.tolist()))
        full_gallery = concat_sets(gallery.subset(gallery.detected), extra)
        fingerprint = input_fingerprint(probe, full_gallery)
        results = {}
        for align in aligns:
            out = save_dir / f"distances_fold{k}_{align}.npz"
            cached = None if overwrite else _load_cached(out, fingerprint)
            if cached is not None:
                fm = _ranked(align, probe, full_gallery, cached)
            else:
                fm = match_fold(probe, gallery, align=align, distractors=extra, progress=progress)
                write_npz(out, probe_ids=fm.probe_ids, gallery_ids=fm.gallery_ids,
                          probe_subjects=fm.probe_subjects, gallery_subjects=fm.gallery_subjects,
                          probe_valid=fm.probe_valid, distances=fm.distances,
                          input_sha1=np.array(fingerprint))
            per_fold[align].append(fm)
            results[align] = fm
        first = results[aligns[0]]
        gallery_subjects = set(first.gallery_subjects.tolist())
        n_ct_missing = 0
        for i, pid in enumerate(first.probe_ids.tolist()):
            subject = first.probe_subjects[i]
            has_probe = bool(first.probe_valid[i])
            has_ct = subject in gallery_subjects
            n_ct_missing += int(not has_ct)
            reason = "" if has_probe and has_ct else "miss: " + ", ".join(
                ([f"no landmarks on {probe_variant}"] if not has_probe else [])
                + ([f"no {gallery_variant} landmarks of this subject in the gallery"] if not has_ct else []))
            values = {"fold": k, "probe_landmarks": has_probe,
                      f"own_{gallery_variant}_landmarks": bool(ct_detected.get(pid, False)),
                      "gallery_has_subject": has_ct}
            values.update({f"rank_{a}": int(results[a].ranks[i]) for a in aligns})
            manifest.add(ItemResult(f"fold{k}/{pid}", str(subject), STATUS_OK, reason, values))
        fold_info.append({"fold": k, "n_probes": len(first.probe_ids),
                          "n_probe_no_landmarks": int((~first.probe_valid).sum()),
                          "n_subject_not_in_gallery": n_ct_missing,
                          "gallery_size": first.gallery_size,
                          "gallery_subjects": len(gallery_subjects),
                          "n_distractors": 0 if extra is None else len(extra.ids)})

    fold_ids = [f["fold"] for f in fold_info]
    rows = []
    summary_rows = {}
    curves = {}
    max_rank = 0
    if fold_info:
        max_rank = max(1, min(50, min(f["gallery_size"] for f in fold_info) or 1))
    for align in aligns:
        summary_rows[align] = {}
        fms = per_fold[align]
        if not fms:
            continue
        curves[align] = np.mean([ranking.cmc_curve(fm.ranks, max_rank) for fm in fms], axis=0)
        for kk in ks:
            accs = np.array([ranking.topk_accuracy(fm.ranks, (kk,))[kk] for fm in fms])
            # upstream's denominator: probes with landmarks (their CT missing is still a miss)
            probe_det = [_subset_topk(fm.ranks, fm.probe_valid, kk) for fm in fms]
            # both landmark sets present: how well the landmarks identify, detection aside
            both = [_subset_topk(fm.ranks, fm.probe_valid & np.isin(fm.probe_subjects, fm.gallery_subjects), kk)
                    for fm in fms]
            chance = np.array([ranking.chance_topk(fm.gallery_size, kk) for fm in fms])
            # a fold without probes (all its placements failed) has no accuracy: left out
            row = {"align": align, "k": kk, "mean": _nanmean(accs), "std": _nanstd(accs),
                   **{f"fold{f}": float(a) for f, a in zip(fold_ids, accs)},
                   "gallery_size": float(np.mean([fm.gallery_size for fm in fms])),
                   "chance": float(np.mean(chance)),
                   "mean_probe_detected": _nanmean(probe_det), "std_probe_detected": _nanstd(probe_det),
                   "mean_both_detected": _nanmean(both),
                   "n_probes": int(sum(len(fm.probe_ids) for fm in fms)),
                   "n_miss_no_landmarks": int(sum(
                       int((~fm.probe_valid | ~np.isin(fm.probe_subjects, fm.gallery_subjects)).sum())
                       for fm in fms))}
            rows.append(row)
            summary_rows[align][kk] = row
    columns = (["align", "k", "mean", "std"] + [f"fold{f}" for f in fold_ids]
               + ["gallery_size", "chance", "mean_probe_detected", "std_probe_detected", "mean_both_detected",
                  "n_probes", "n_miss_no_landmarks"])
    write_csv(save_dir / "topk.csv", rows, columns)
    if curves:
        chance_curve = np.array([np.mean([ranking.chance_topk(f["gallery_size"], r) for f in fold_info])
                                 for r in range(1, max_rank + 1)])
        gsize = np.mean([f["gallery_size"] for f in fold_info])
        plot_cmc(curves, chance_curve, save_dir / "cmc.png",
                 title=f"{probe_variant} probes vs {gallery_variant} gallery, {len(fold_info)} folds, "
                       f"mean gallery {gsize:.0f}")
    summary = {"probe_variant": probe_variant, "gallery_variant": gallery_variant, "aligns": list(aligns),
               "ks": list(ks), "folds": fold_info, "failed_folds": failed_folds,
               "distractors": None if not distractor_sets else {
                   "source": str(distractors), "files": [p.source for p in distractor_sets],
                   "n": int(sum(len(p.ids) for p in distractor_sets)),
                   "note": "a fold's own landmark files are never its distractors"},
               "identity": "subject (another study of the same patient counts as a correct match)",
               "distance": "Frobenius norm of the (n_points, 3) landmark difference",
               "reference_frame": "generalised Procrustes mean of each fold's gallery (rigid/similarity)",
               "topk": {a: {str(k): v for k, v in r.items()} for a, r in summary_rows.items()},
               "cmc_mean": {a: c.tolist() for a, c in curves.items()}}
    write_json(save_dir / "summary.json", summary)
    manifest.write()
    write_run_json(save_dir, stage="landmark_matching", args=args or {
        "landmarks_files": str(landmarks_dir), "save_dir": str(save_dir), "n_folds": n_folds,
        "probe_variant": probe_variant, "align": list(aligns), "distractors": distractors and str(distractors)},
        seed=seed, started=started)
    if not quiet:
        print(format_topk_table(rows, probe_variant, gallery_variant))
    return manifest.exit_code()


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


def _subset_topk(ranks: np.ndarray, mask: np.ndarray, k: int) -> float:
    return ranking.topk_accuracy(ranks[mask], (k,))[k] if mask.any() else float("nan")


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
