"""Top-k tables and CMC curves of matched folds (stage 4's results).

A fold's matches come as ``FoldMatch`` records (one per attack: an alignment of the
landmarks, or a recognizer's embeddings); the rows are means and standard deviations
over the scored folds, beside the gallery size and the chance of a random guess, and the
proportion pooled over every probe of every scored fold with its Wilson 95 % interval.

Gallery growth (:func:`gallery_growth_rows`) re-reads the same distance matrices with each
probe's gallery cut down to G items (its true match(es) and randomly drawn others), to
show how identification falls as the gallery grows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from faceaudit.core import ranking, stats
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
    hits = int(sum(int(np.count_nonzero((fm.ranks != ranking.MISS) & (fm.ranks <= kk))) for fm in fms))
    n = int(sum(len(fm.ranks) for fm in fms))
    ci_lo, ci_hi = stats.wilson_interval(hits, n)
    # a fold without probes (all its placements failed) has no accuracy: left out
    return {"attack": fms[0].attack, "probe": fms[0].probe_variant, "align": align, "k": kk,
            "mean": _nanmean(accs), "std": _nanstd(accs), **{f"fold{f}": float(a) for f, a in zip(fold_ids, accs)},
            "pooled_hits": hits, "pooled_n": n, "pooled_topk": hits / n if n else float("nan"),
            "ci_lo": ci_lo, "ci_hi": ci_hi,
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
    """The upstream-style table: one line per (attack, k), mean ± std over folds, gallery, chance,
    then the proportion pooled over all probes with its Wilson 95 % interval (embedding rows are
    labelled embedding-<name>_<probe variant>)."""
    w = max([11] + [len(str(r["align"])) + 2 for r in rows])
    lines = [f"top-k identification, {probe_variant} probes vs {gallery_variant} gallery (mean ± std over folds, %)",
             ("  all: every test image is a probe (no landmarks = miss); probe lm: only probes with landmarks "
              "(upstream's denominator); both lm: probe and its CT have landmarks (for a recognizer: a face); "
              "pooled: hits / probes over all folds [Wilson 95 % interval]"),
             f"{'align':<{w}}{'k':>4}{'all':>15}{'probe lm':>15}{'both lm':>9}{'gallery':>9}{'chance':>8}"
             f"  {'pooled [95 % CI]':<28}"]
    for r in rows:
        lines.append(f"{r['align']:<{w}}{r['k']:>4}{100 * r['mean']:>9.1f} ± {100 * r['std']:<4.1f}"
                     f"{100 * r['mean_probe_detected']:>9.1f} ± {100 * r['std_probe_detected']:<4.1f}"
                     f"{100 * r['mean_both_detected']:>9.1f}{r['gallery_size']:>9.1f}{100 * r['chance']:>8.1f}"
                     f"  {_pooled_cell(r)}")
    return "\n".join(lines)


def _pooled_cell(row: dict) -> str:
    if not row.get("pooled_n"):
        return "no probes"
    return (f"{100 * row['pooled_topk']:.1f} [{100 * row['ci_lo']:.1f}, {100 * row['ci_hi']:.1f}] "
            f"({row['pooled_hits']}/{row['pooled_n']})")


# --------------------------------------------------------------------------- gallery growth

#: Gallery sizes of the growth table (each kept when no fold's full gallery is smaller),
#: the ranks it shows, and how many random galleries each probe is scored in.
GROWTH_SIZES = (10, 20, 40)
GROWTH_KS = (1, 5)
GROWTH_DRAWS = 50


def probe_hit_rates(distances: np.ndarray, probe_subjects, gallery_subjects, probe_valid: np.ndarray,
                    size: int | None, *, ks: tuple[int, ...] = GROWTH_KS, n_draws: int = GROWTH_DRAWS,
                    rng: np.random.Generator) -> np.ndarray:
    """Each probe's top-k hit rate in galleries of ``size`` items: its true match(es) plus
    ``size - n_true`` other gallery items drawn at random (``n_draws`` draws).

    Parameters
    ----------
    distances : (P, G) float array, smaller is more alike; NaN = no features (infinitely far).
    probe_subjects, gallery_subjects : (P,), (G,) labels.
    probe_valid : (P,) bool; False (no features) is a miss, as is a probe whose subject is
        absent from the gallery or whose true matches are all at NaN.
    size : gallery size; None = the full gallery (no draw). Must not exceed G.
    ks : ranks k.
    rng : the draws' generator; probes are drawn in order, so two attacks on the same
        gallery with a generator of the same seed see the same galleries.

    Returns
    -------
    (P, len(ks)) float array of hit rates in [0, 1] (the mean over draws).
    Ties are pessimistic, as in :func:`faceaudit.core.ranking.true_match_ranks`.
    """
    d = np.where(np.isnan(np.asarray(distances, dtype=np.float64)), np.inf, distances)
    gallery_subjects = np.asarray(gallery_subjects).astype(str)
    ks_arr = np.asarray(ks)
    out = np.zeros((d.shape[0], len(ks)))
    for i, subject in enumerate(np.asarray(probe_subjects).astype(str)):
        own = gallery_subjects == subject
        n_others = int((~own).sum())
        n_drawn = n_others if size is None else min(n_others, max(0, size - int(own.sum())))
        # draws are taken for every probe (also a miss) so the stream stays aligned across attacks
        keys = rng.random((n_draws, n_others)) if size is not None else None
        if not probe_valid[i] or not own.any() or not np.isfinite(d[i, own].min()):
            continue
        ahead = d[i, ~own] <= d[i, own].min()
        if keys is None:
            counts = np.array([np.count_nonzero(ahead)])
        else:
            drawn = np.argsort(keys, axis=1)[:, :n_drawn]
            counts = ahead[drawn].sum(axis=1)
        out[i] = np.mean((counts[:, None] + 1) <= ks_arr[None, :], axis=0)
    return out


def gallery_growth_rows(outcomes: list[FoldOutcome], *, seed: int, sizes: tuple[int, ...] = GROWTH_SIZES,
                        ks: tuple[int, ...] = GROWTH_KS, n_draws: int = GROWTH_DRAWS) -> list[dict]:
    """One row per (attack, gallery size): top-k over all probes of all scored folds when each
    probe's gallery holds ``size`` items, and chance k/size. The sizes are those of ``sizes``
    that no fold's full gallery (distractors included) is smaller than, then the full gallery
    (``gallery`` = "full", its size the mean over folds)."""
    if not outcomes:
        return []
    smallest = min(o.info["gallery_size"] for o in outcomes)
    plan = [(str(g), g) for g in sizes if g <= smallest] + [("full", None)]
    rows = []
    for key in outcomes[0].matches:
        fms = [o.matches[key] for o in outcomes]
        for label, size in plan:
            rates = [probe_hit_rates(fm.distances, fm.probe_subjects, fm.gallery_subjects, fm.probe_valid, size,
                                     ks=ks, n_draws=n_draws, rng=np.random.default_rng([seed, o.fold, size or 0]))
                     for o, fm in zip(outcomes, fms)]
            rates = np.concatenate(rates) if rates else np.zeros((0, len(ks)))
            n = len(rates)
            gsize = [size or fm.gallery_size for fm in fms for _ in range(len(fm.ranks))]
            row = {"attack": fms[0].attack, "probe": fms[0].probe_variant, "align": key, "gallery": label,
                   "gallery_size": float(np.mean(gsize)) if gsize else float(size or smallest),
                   "n_probes": n, "n_draws": n_draws if size is not None else 1}
            for j, k in enumerate(ks):
                row[f"top{k}"] = float(rates[:, j].mean()) if n else float("nan")
                row[f"chance_top{k}"] = (float(np.mean([ranking.chance_topk(g, k) for g in gsize])) if gsize
                                         else ranking.chance_topk(size or smallest, k))
            rows.append(row)
    return rows


def format_gallery_growth(rows: list[dict], ks: tuple[int, ...] = GROWTH_KS) -> str:
    """How identification falls as the gallery grows: one line per (attack, gallery size), %."""
    if not rows:
        return ""
    w = max([11] + [len(str(r["align"])) + 2 for r in rows])
    head = "".join(f"{f'top-{k}':>8}{'chance':>8}" for k in ks)
    lines = ["identification as the gallery grows (each probe: its true match + random others, "
             f"{max(r['n_draws'] for r in rows)} draws; all probes of all folds, %)",
             f"{'align':<{w}}{'gallery':>9}{head}"]
    for r in rows:
        cells = "".join(f"{100 * r[f'top{k}']:>8.1f}{100 * r[f'chance_top{k}']:>8.1f}" for k in ks)
        size = r["gallery"] if r["gallery"] != "full" else f"full {r['gallery_size']:.0f}"
        lines.append(f"{r['align']:<{w}}{size:>9}{cells}")
    return "\n".join(lines)


def _subset_topk(ranks: np.ndarray, mask: np.ndarray, k: int) -> float:
    return ranking.topk_accuracy(ranks[mask], (k,))[k] if mask.any() else float("nan")


def _nanmean(values, stat=np.nanmean) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(stat(values)) if np.isfinite(values).any() else float("nan")


def _nanstd(values) -> float:
    return _nanmean(values, np.nanstd)
