"""Top-k tables and CMC curves of matched folds (stage 4's results).

A fold's matches come as ``FoldMatch`` records (one per attack: an alignment of the
landmarks, or a recognizer's embeddings); the rows are means and standard deviations
over the scored folds, beside the gallery size and the chance of a random guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.figures import figure_png, new_axes
from faceaudit.core.files import atomic_write_bytes

if TYPE_CHECKING:
    from faceaudit.petct.matching import FoldMatch, FoldOutcome


def _topk_row(align: str, kk: int, fms: list[FoldMatch], fold_ids: list[int]) -> dict:
    accs = np.array([ranking.topk_accuracy(fm.ranks, (kk,))[kk] for fm in fms])
    # upstream's denominator: probes with features (their CT missing is still a miss)
    probe_det = [_subset_topk(fm.ranks, fm.probe_valid, kk) for fm in fms]
    # probe and its CT both with features: how well the features identify, detection aside
    both = [_subset_topk(fm.ranks, fm.usable(), kk) for fm in fms]
    chance = np.array([ranking.chance_topk(fm.gallery_size, kk) for fm in fms])
    # a fold without probes (all its placements failed) has no accuracy: left out
    return {"attack": fms[0].attack, "probe": fms[0].probe_variant, "align": align, "k": kk,
            "mean": _nanmean(accs), "std": _nanstd(accs), **{f"fold{f}": float(a) for f, a in zip(fold_ids, accs)},
            "gallery_size": float(np.mean([fm.gallery_size for fm in fms])), "chance": float(np.mean(chance)),
            "mean_probe_detected": _nanmean(probe_det), "std_probe_detected": _nanstd(probe_det),
            "mean_both_detected": _nanmean(both), "n_probes": int(sum(len(fm.probe_ids) for fm in fms)),
            "n_miss_no_landmarks": int(sum(int((~fm.usable()).sum()) for fm in fms)),
            # the share of the fold's probes and own CTs with features (landmarks, a face)
            "probe_detection_rate": _nanmean([np.mean(fm.probe_valid) if len(fm.probe_valid) else np.nan
                                              for fm in fms]),
            "gallery_detection_rate": _nanmean([fm.own_gallery_detected for fm in fms])}


def topk_rows(outcomes: list[FoldOutcome], ks: tuple[int, ...]) -> list[dict]:
    """One row per (attack, k): mean ± std over the scored folds, per fold, chance."""
    fold_ids = [o.fold for o in outcomes]
    if not outcomes:
        return []
    return [_topk_row(key, kk, [o.matches[key] for o in outcomes], fold_ids)
            for key in outcomes[0].matches for kk in ks]


def cmc_curves(outcomes: list[FoldOutcome]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Mean CMC over folds per attack, up to the smallest gallery (at most 50), and
    the matching chance curve."""
    if not outcomes:
        return {}, np.zeros(0)
    max_rank = max(1, min(50, min(o.info["gallery_size"] for o in outcomes) or 1))
    curves = {a: np.mean([ranking.cmc_curve(o.matches[a].ranks, max_rank) for o in outcomes], axis=0)
              for a in outcomes[0].matches}
    chance = np.array([np.mean([ranking.chance_topk(o.info["gallery_size"], r) for o in outcomes])
                       for r in range(1, max_rank + 1)])
    return curves, chance


def plot_cmc(curves: dict[str, np.ndarray], chance: np.ndarray, path: Path, *, title: str) -> None:
    """CMC curves (mean over folds) of every attack, with the chance line."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(figsize=(6, 4.2), dpi=120)
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), 100 * curve, marker="o", ms=3, label=label)
    ax.plot(np.arange(1, len(chance) + 1), 100 * chance, ls="--", color="grey", label="chance")
    ax.set(xlabel="rank k", ylabel="top-k accuracy (%)", ylim=(0, 102))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_bytes(path, figure_png(fig))


def format_topk_table(rows: list[dict], probe_variant: str, gallery_variant: str) -> str:
    """The upstream-style table: one line per (attack, k), mean ± std over folds, gallery, chance
    (embedding rows are labelled embedding-<name>_<probe variant>)."""
    w = max([11] + [len(str(r["align"])) + 2 for r in rows])
    lines = [f"top-k identification, {probe_variant} probes vs {gallery_variant} gallery (mean ± std over folds, %)",
             ("  all: every test image is a probe (no landmarks = miss); probe lm: only probes with landmarks "
              "(upstream's denominator); both lm: probe and its CT have landmarks (for a recognizer: a face)"),
             f"{'align':<{w}}{'k':>4}{'all':>15}{'probe lm':>15}{'both lm':>9}{'gallery':>9}{'chance':>8}"]
    for r in rows:
        lines.append(f"{r['align']:<{w}}{r['k']:>4}{100 * r['mean']:>9.1f} ± {100 * r['std']:<4.1f}"
                     f"{100 * r['mean_probe_detected']:>9.1f} ± {100 * r['std_probe_detected']:<4.1f}"
                     f"{100 * r['mean_both_detected']:>9.1f}{r['gallery_size']:>9.1f}{100 * r['chance']:>8.1f}")
    return "\n".join(lines)


def _subset_topk(ranks: np.ndarray, mask: np.ndarray, k: int) -> float:
    return ranking.topk_accuracy(ranks[mask], (k,))[k] if mask.any() else float("nan")


def _nanmean(values, stat=np.nanmean) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(stat(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values) -> float:
    return _nanmean(values, np.nanstd)
