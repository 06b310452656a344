"""Ranking the queries of one scenario against its database, and the numbers reported.

Closed set (``faceaudit.core.ranking``): ranks are 1-based, ties pessimistic; rank-1/5/10,
CMC, mean rank of the found matches; every number comes with the gallery size and the
chance level. A query or gallery image without a face is a miss, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.manifest import STATUS_OK
from faceaudit.core.stats import (
    bootstrap_ci,
    paired_difference_interval,
    wilson_interval,
)
from faceaudit.faces.embedding import cosine_distances
from faceaudit.mask.digital_mask import VARIANTS
from faceaudit.mask.embedding_cache import EmbeddingRecord
from faceaudit.mask.scenarios import ImageRef, Scenario

KS = (1, 5, 10)


@dataclass
class ScenarioResult:
    """One scenario's ranking: ids, distances (Q, G) with NaN for missing faces, ranks."""

    name: str
    protocol: str
    query: str
    database: str
    cross: bool
    query_ids: list[str]
    query_subjects: list[str]
    gallery_ids: list[str]
    gallery_subjects: list[str]
    distances: np.ndarray
    ranks: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    cmc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: the mask run's row id of each query (``query/<identity>/<stem>``), to pair scenarios
    query_items: list[str] = field(default_factory=list)


def chance_topk_multi(gallery_subjects: Sequence[str], query_subjects: Sequence[str],
                      k: int) -> float:
    """Top-k accuracy of a random gallery order, averaged over queries.

    With m of the G gallery items belonging to the query's subject, a random order
    puts at least one of them in the first k with probability 1 - C(G-m, k)/C(G, k)
    (= k/G when m = 1), matching ``true_match_ranks`` (rank = 1 + impostors ahead).
    """
    g = len(gallery_subjects)
    if g == 0 or len(query_subjects) == 0:
        return float("nan")
    counts: dict[str, int] = {}
    for s in gallery_subjects:
        counts[s] = counts.get(s, 0) + 1
    k = min(int(k), g)
    probs = []
    for s in query_subjects:
        m = counts.get(s, 0)
        probs.append(1.0 - math.comb(g - m, k) / math.comb(g, k))
    return float(np.mean(probs))


def rank_queries(query_subjects: Sequence[str], query_vectors: Sequence[np.ndarray | None],
                 gallery_subjects: Sequence[str],
                 gallery_vectors: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-distance matrix (Q, G) and 1-based ranks; a missing vector is a miss.

    A query without a vector gets rank MISS; a gallery item without one is
    infinitely far from every query (it cannot be found).
    """
    nq, ng = len(query_subjects), len(gallery_subjects)
    dist = np.full((nq, ng), np.nan)
    q_ok = np.array([v is not None for v in query_vectors], dtype=bool)
    g_ok = np.array([v is not None for v in gallery_vectors], dtype=bool)
    if q_ok.any() and g_ok.any():
        q = np.stack([v for v in query_vectors if v is not None])
        g = np.stack([v for v in gallery_vectors if v is not None])
        dist[np.ix_(q_ok, g_ok)] = cosine_distances(q, g)
    ranks = ranking.true_match_ranks(dist, list(query_subjects), list(gallery_subjects),
                                     probe_valid=q_ok)
    return dist, ranks


def summarise_ranks(ranks: np.ndarray, *, query_subjects: Sequence[str],
                    gallery_subjects: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """rank-1/5/10 with Wilson 95 % intervals, mean rank with a bootstrap interval, chance
    levels, median rank, gallery size.

    A rank-k accuracy is a proportion (hits of n queries): its interval is Wilson's
    (``faceaudit.core.stats``); a percentile bootstrap of it collapses to [1, 1] at 100 %
    with a few queries. The mean rank has no closed form: percentile bootstrap over the
    queries whose match was found.
    """
    ranks = np.asarray(ranks)
    topk = ranking.topk_accuracy(ranks, KS)
    out: dict[str, Any] = {}
    for k in KS:
        hits = int(np.sum((ranks != ranking.MISS) & (ranks <= k)))
        out[f"rank{k}"] = topk[k]
        out[f"rank{k}_ci_lo"], out[f"rank{k}_ci_hi"] = wilson_interval(hits, int(ranks.size))
    found = ranks[ranks != ranking.MISS]
    out["mean_rank"] = ranking.mean_rank(ranks)
    out["mean_rank_ci_lo"], out["mean_rank_ci_hi"] = bootstrap_ci(found, n_boot=n_boot, seed=seed)
    out["median_rank"] = float(np.median(found)) if found.size else float("nan")
    out["n_queries"] = int(ranks.size)
    out["gallery_size"] = len(gallery_subjects)
    out["n_gallery_subjects"] = len(set(gallery_subjects))
    out["chance"] = chance_topk_multi(gallery_subjects, query_subjects, 1)
    out["chance5"] = chance_topk_multi(gallery_subjects, query_subjects, 5)
    out["chance10"] = chance_topk_multi(gallery_subjects, query_subjects, 10)
    return out


def compare_to_reference(results: Sequence[ScenarioResult], *,
                         reference: str = "Face2Face") -> None:
    """Add to each scenario's metrics its rank-1 minus the reference scenario's, on the
    queries both share (the same query photo, paired by the mask run's row id), with
    Newcombe's paired score 95 % interval: how much identity the mask removed.

    Sets ``rank1_diff_vs_ref``, ``rank1_diff_ci_lo``, ``rank1_diff_ci_hi``, ``n_paired_ref``
    and ``reference``; NaN when the reference is not among ``results``.
    """
    ref = next((r for r in results if r.name == reference), None)
    ref_hits = {} if ref is None else dict(zip(ref.query_items, _hits(ref.ranks, 1)))
    for r in results:
        if r is ref:
            continue
        pairs = [(h, ref_hits[i]) for i, h in zip(r.query_items, _hits(r.ranks, 1))
                 if i in ref_hits]
        a = np.array([p[0] for p in pairs], dtype=np.float64)
        b = np.array([p[1] for p in pairs], dtype=np.float64)
        diff, lo, hi = paired_difference_interval(a, b)
        r.metrics.update(reference=reference if ref is not None else "", rank1_diff_vs_ref=diff,
                         rank1_diff_ci_lo=lo, rank1_diff_ci_hi=hi, n_paired_ref=len(pairs))


def open_set_rates(result: ScenarioResult, fars: Sequence[float] = ranking.OPEN_SET_FARS
                   ) -> dict[str, Any]:
    """The open-set view of one scenario: would an attacker who accepts a match below a
    distance threshold be right? Genuine pairs: a query and a database image of the same
    identity; impostor pairs: of different identities. For each false-accept rate in
    ``fars`` the true-accept rate at the threshold that accepts at most that share of
    impostor pairs (``tar_at_far_1pct``, ``tar_at_far_0.1pct``); NaN, with a note, when
    there are too few impostor pairs to measure it. A fixed threshold (dlib's usual 0.6)
    is meaningless here: on mask-to-mask pairs every distance falls under it.
    """
    genuine, impostor = ranking.genuine_impostor_distances(
        result.distances, result.query_subjects, result.gallery_subjects)
    out: dict[str, Any] = {"n_genuine_pairs": int(genuine.size),
                           "n_impostor_pairs": int(impostor.size)}
    notes = []
    for far in fars:
        tar, threshold = ranking.tar_at_far(genuine, impostor, far)
        key = far_key(far)
        out[f"tar_at_far_{key}"] = tar
        out[f"threshold_at_far_{key}"] = threshold
        if not np.isfinite(tar) and genuine.size:
            notes.append(f"FAR {100 * far:g}% needs >= {round(1 / far)} impostor pairs, "
                         f"found {impostor.size}")
    out["open_set_note"] = "; ".join(notes)
    return out


def far_key(far: float) -> str:
    """0.01 -> '1pct', 0.001 -> '0.1pct' (the results.csv column suffix)."""
    return f"{100 * far:g}pct"


def _hits(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    return ((ranks != ranking.MISS) & (ranks <= k)).astype(np.float64)


def evaluate_scenario(scenario: Scenario, queries: Sequence[ImageRef],
                      gallery: Sequence[ImageRef], records: Mapping[str, EmbeddingRecord], *,
                      protocol: str, n_boot: int = 2000, seed: int = 0) -> ScenarioResult:
    """Rank ``queries`` against ``gallery`` for one scenario.

    Queries whose subject has no database image at all (the mask stage failed for
    it) are left out and counted (``n_unpaired_queries``); queries or gallery images
    without a face or unreadable stay in and count as misses.
    """
    gallery = sorted(gallery, key=lambda r: r.id)
    gallery_subjects = {r.subject for r in gallery}
    paired = sorted((q for q in queries if q.subject in gallery_subjects), key=lambda r: r.id)
    q_vec = [records[q.id].vector for q in paired]
    g_vec = [records[g.id].vector for g in gallery]
    dist, ranks = rank_queries([q.subject for q in paired], q_vec,
                               [g.subject for g in gallery], g_vec)
    metrics = summarise_ranks(ranks, query_subjects=[q.subject for q in paired],
                              gallery_subjects=[g.subject for g in gallery],
                              n_boot=n_boot, seed=seed)
    metrics.update(
        n_no_face=sum(1 for q in paired if records[q.id].status == STATUS_OK
                      and not records[q.id].found),
        n_no_face_gallery=sum(1 for g in gallery if records[g.id].status == STATUS_OK
                              and not records[g.id].found),
        n_failed=sum(1 for r in list(paired) + list(gallery) if records[r.id].status != STATUS_OK),
        n_unpaired_queries=len(queries) - len(paired))
    result = ScenarioResult(
        name=scenario.name, protocol=protocol, query=scenario.query, database=scenario.database,
        cross=scenario.cross, query_ids=[q.id for q in paired],
        query_items=[q.item_id for q in paired],
        query_subjects=[q.subject for q in paired], gallery_ids=[g.id for g in gallery],
        gallery_subjects=[g.subject for g in gallery], distances=dist, ranks=ranks,
        metrics=metrics, cmc=ranking.cmc_curve(ranks, max(len(gallery), 1)))
    result.metrics.update(open_set_rates(result))
    return result


def detection_rates(refs: Iterable[ImageRef], records: Mapping[str, EmbeddingRecord]
                    ) -> dict[str, dict[str, Any]]:
    """Per image variant (and mask run): images, faces found, unreadable, detection rate."""
    out: dict[str, dict[str, Any]] = {}
    for ref in sorted(refs, key=lambda r: (r.run, VARIANTS.index(r.variant)
                                           if r.variant in VARIANTS else 99)):
        key = ref.variant if ref.run == "masks" else f"{ref.run}:{ref.variant}"
        d = out.setdefault(key, {"n_images": 0, "n_found": 0, "n_failed": 0})
        rec = records[ref.id]
        d["n_images"] += 1
        d["n_found"] += int(rec.found)
        d["n_failed"] += int(rec.status != STATUS_OK)
    for d in out.values():
        d["rate"] = d["n_found"] / d["n_images"] if d["n_images"] else float("nan")
    return out

