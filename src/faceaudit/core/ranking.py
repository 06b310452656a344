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


# --------------------------------------------------------------------------- open set

#: False-accept rates at which the open-set view reports the true-accept rate.
OPEN_SET_FARS = (0.01, 0.001)


def genuine_impostor_distances(distances: np.ndarray, probe_subjects: Sequence[str],
                               gallery_subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split a (P, G) distance matrix into genuine pairs (same subject) and impostor pairs
    (different subjects), as flat arrays. NaN (no features) becomes +inf: such a pair is
    never accepted, at any threshold, so a missing face lowers the true-accept rate
    instead of leaving the figures."""
    d = np.asarray(distances, dtype=np.float64)
    probe = np.asarray(probe_subjects).astype(str)
    gallery = np.asarray(gallery_subjects).astype(str)
    if d.shape != (len(probe), len(gallery)):
        raise ValueError(f"distances shape {d.shape} does not match {len(probe)} probes x "
                         f"{len(gallery)} gallery items")
    d = np.where(np.isnan(d), np.inf, d)
    same = probe[:, None] == gallery[None, :]
    return d[same], d[~same]


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """True-accept rate at a false-accept rate of at most ``far``, and the threshold.

    A pair is accepted when its distance is below the threshold (strictly; the ROC of
    :func:`roc_points` uses the same rule). The threshold is the
    ``floor(far * n_impostor) + 1``-th smallest impostor distance, so at most
    ``floor(far * n_impostor)`` impostor pairs are accepted (ties are never split: a tie
    at the threshold is rejected). With fewer than ``1 / far`` impostor pairs no
    false accept is allowed and the rate cannot be measured: (NaN, NaN).

    Returns
    -------
    (tar, threshold) : the fraction of genuine pairs accepted, and the distance bound.
    """
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    allowed = int(np.floor(far * impostor.size + 1e-9))
    if allowed < 1 or genuine.size == 0:
        return float("nan"), float("nan")
    threshold = float(impostor[allowed]) if allowed < impostor.size else float("inf")
    return float(np.mean(genuine < threshold)), threshold


def roc_points(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """The ROC of "accept when distance < t" (the convention of :func:`tar_at_far`), one point
    per distinct finite distance t, then t = +inf.

    Returns
    -------
    far, tar, thresholds : (n,) arrays, non-decreasing, starting at (0, 0) (t = the smallest
        distance: nothing lies below it) and ending at t = +inf (every finite pair
        accepted); pairs at +inf (no features) are never accepted, so the curve may end
        below (1, 1). A :func:`tar_at_far` threshold is one of these t, with the same TAR.
    """
    genuine = np.sort(np.asarray(genuine, dtype=np.float64))
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    scores = np.concatenate([genuine, impostor])
    thresholds = np.r_[np.unique(scores[np.isfinite(scores)]), np.inf]
    far = np.searchsorted(impostor, thresholds, side="left") / max(impostor.size, 1)
    tar = np.searchsorted(genuine, thresholds, side="left") / max(genuine.size, 1)
    return far, tar, thresholds
