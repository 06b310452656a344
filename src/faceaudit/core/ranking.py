"""Closed-set identification metrics shared by the PET->CT and the face-mask audits.

Conventions: a distance matrix is (n_probes, n_gallery), smaller is more alike;
ranks are 1-based (rank 1 = the true match is the nearest gallery item). A probe
whose true match is absent from the gallery, or that has no usable features
(no face, no landmarks), gets rank ``MISS`` (0) and counts as a miss at every k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MISS = 0


def true_match_ranks(distances: np.ndarray, probe_subjects: Sequence[str],
                     gallery_subjects: Sequence[str], *,
                     probe_valid: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each probe's own subject in the gallery.

    Parameters
    ----------
    distances : (P, G) float array
        Smaller is more similar. NaN rows or columns mean "no features" and are
        treated as infinitely far.
    probe_subjects : (P,) labels of the probes.
    gallery_subjects : (G,) labels of the gallery items; a subject may occur more
        than once (its best-ranked item counts).
    probe_valid : (P,) bool, optional
        False marks a probe that had no features: it is a miss.

    Returns
    -------
    ranks : (P,) int array, 1..G, or ``MISS`` (0) for a miss.

    Ties are broken pessimistically: a gallery item at exactly the true match's
    distance is counted as ranked before it, so constant distances never score.
    """
    d = np.asarray(distances, dtype=np.float64)
    probe_subjects = np.asarray(probe_subjects).astype(str)
    gallery_subjects = np.asarray(gallery_subjects).astype(str)
    if d.ndim != 2:
        raise ValueError(f"distances must be (n_probes, n_gallery), got shape {d.shape}")
    if d.shape != (len(probe_subjects), len(gallery_subjects)):
        raise ValueError(
            f"distances shape {d.shape} does not match {len(probe_subjects)} probes x "
            f"{len(gallery_subjects)} gallery items")
    d = np.where(np.isnan(d), np.inf, d)
    ranks = np.full(len(probe_subjects), MISS, dtype=np.int64)
    for i, subject in enumerate(probe_subjects):
        if probe_valid is not None and not probe_valid[i]:
            continue
        own = gallery_subjects == subject
        if not own.any():
            continue
        best = d[i, own].min()
        if not np.isfinite(best):
            continue
        # pessimistic ties: others at <= best distance rank ahead of the true match
        ranks[i] = 1 + int(np.count_nonzero(d[i, ~own] <= best))
    return ranks


def topk_accuracy(ranks: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10, 15)) -> dict[int, float]:
    """Fraction of probes whose rank is between 1 and k, for each k."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {int(k): float("nan") for k in ks}
    hit = ranks != MISS
    return {int(k): float(np.mean(hit & (ranks <= k))) for k in ks}


def cmc_curve(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """Cumulative match characteristic: entry r-1 is the top-r accuracy, r = 1..max_rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.full(max_rank, np.nan)
    hit = ranks != MISS
    return np.array([np.mean(hit & (ranks <= r)) for r in range(1, max_rank + 1)])


def mean_rank(ranks: np.ndarray) -> float:
    """Mean 1-based rank over the probes that were not misses (NaN if none)."""
    ranks = np.asarray(ranks)
    found = ranks[ranks != MISS]
    return float(found.mean()) if found.size else float("nan")


def chance_topk(gallery_size: int, k: int) -> float:
    """Top-k accuracy of a random ranking with one true match among ``gallery_size``."""
    if gallery_size <= 0:
        return float("nan")
    return min(k, gallery_size) / gallery_size
