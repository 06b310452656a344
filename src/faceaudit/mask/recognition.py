"""Face-recognition attack on digitally masked photos: query/database scenarios, rank-k.

Reads a digital-mask run folder (``DM/manifest.csv``: one row per selected photo with
role ``database|query`` and the relative paths of its ``prep``, ``overlay``,
``mask_only`` and ``mask_only_black`` 224x224 PNGs), embeds every image once
(cached by file-content SHA-256), and ranks, for each scenario, every query
against the whole database by cosine distance (1 - cos).

Differences from the upstream scripts (reference B4/B7), each deliberate:

* an image in which no face is found is a **miss**, counted and reported
  (``n_no_face``), never dropped;
* ``MaskOnlyBlack2Face`` uses the original photo as database (upstream used black
  masks on both sides; ``upstream_scenario_bug=True`` restores that);
* the 255 -> 0 "black background" rewrite is not applied (the mask stage writes
  ``mask_only_black`` itself); ``upstream_black_bug=True`` applies it per channel
  to every image, as upstream's hard-coded ``black_background=True`` did;
* insightface models get BGR, as ``cv2.imread`` gives (``rgb_to_model=True``: RGB,
  as upstream passed);
* the highest-scoring face is used, not ``faces[0]``.

Metrics (``faceaudit.core.ranking``): ranks are 1-based, ties pessimistic; rank-1/5/10
with percentile-bootstrap 95 % intervals over queries, CMC, mean rank of the found
matches; every number comes with the gallery size and the chance level.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core import ranking
from faceaudit.mask.digital_mask import VARIANTS
from faceaudit.faces.embedding import (EmbeddingResult, cosine_distances,
                                 make_embedder)
from faceaudit.core.images import read_rgb
from faceaudit.core.figures import figure_png, new_axes
from faceaudit.mask.selection import IMAGE_EXTENSIONS
from faceaudit.core.files import (
    atomic_write_bytes,
    file_digest,
    InputError,
    make_private_dir,
    read_json_file,
    read_npz,
    write_csv,
    write_json,
    write_npz,
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

ROLES = ("database", "query")
DM_COLUMNS = ("role", *VARIANTS)
KS = (1, 5, 10)

RESULT_COLUMNS = ("scenario", "protocol", "rank1", "rank1_ci_lo", "rank1_ci_hi", "rank5",
                  "rank10", "mean_rank", "n_queries", "gallery_size", "chance", "n_no_face")
EXTRA_RESULT_COLUMNS = ("rank5_ci_lo", "rank5_ci_hi", "rank10_ci_lo", "rank10_ci_hi",
                        "chance5", "chance10", "median_rank", "n_gallery_subjects",
                        "n_no_face_gallery", "n_failed", "n_unpaired_queries", "query",
                        "database", "cross_mask", "backend")


@dataclass(frozen=True)
class Scenario:
    """Which image variant is the query and which the database.

    ``cross``: the database comes from another mask run (a different face model:
    the cross-mask attack of the DM authors' reply); the query from ``masks_dir``.
    """

    name: str
    query: str
    database: str
    cross: bool = False


WITHIN_SCENARIOS = (
    Scenario("Face2Face", "prep", "prep"),
    Scenario("Overlay2Face", "overlay", "prep"),
    Scenario("Overlay2Overlay", "overlay", "overlay"),
    Scenario("MaskOnly2Face", "mask_only", "prep"),
    Scenario("MaskOnly2MaskOnly", "mask_only", "mask_only"),
    Scenario("MaskOnlyBlack2Face", "mask_only_black", "prep"),
    Scenario("MaskOnlyBlack2MaskOnlyBlack", "mask_only_black", "mask_only_black"),
)
CROSS_SCENARIOS = (
    Scenario("CrossOverlay2Overlay", "overlay", "overlay", cross=True),
    Scenario("CrossMaskOnly2MaskOnly", "mask_only", "mask_only", cross=True),
    Scenario("CrossMaskOnlyBlack2MaskOnlyBlack", "mask_only_black", "mask_only_black", cross=True),
)
SCENARIOS = {s.name: s for s in WITHIN_SCENARIOS + CROSS_SCENARIOS}


def resolve_scenarios(names: Sequence[str] | None, *, cross_available: bool,
                      upstream_scenario_bug: bool = False) -> list[Scenario]:
    """Scenario objects for ``names`` (default: all within-mask ones, plus the cross-mask
    ones when a second mask run is given)."""
    if not names:
        chosen = list(WITHIN_SCENARIOS) + (list(CROSS_SCENARIOS) if cross_available else [])
    else:
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            raise InputError(f"unknown scenarios {unknown}; expected some of {list(SCENARIOS)}")
        chosen = [SCENARIOS[n] for n in dict.fromkeys(names)]
        cross = [s.name for s in chosen if s.cross]
        if cross and not cross_available:
            raise InputError(f"scenarios {cross} need --cross_masks_dir (a second mask run)")
    if upstream_scenario_bug:
        # upstream matching_scenarios.py: MaskOnlyBlack2Face used black masks on both sides
        chosen = [Scenario(s.name, s.query, "mask_only_black") if s.name == "MaskOnlyBlack2Face"
                  else s for s in chosen]
    return chosen


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageRef:
    """One image to embed: ``id`` is unique across variants and mask runs."""

    id: str
    subject: str
    role: str
    variant: str
    path: Path
    item_id: str  # the mask run's row id, <role>/<identity>/<stem>
    run: str  # "masks" or "cross"
    rel: str = ""  # path as the mask run's manifest gives it (relative to its folder)


@dataclass
class MaskRun:
    """A digital-mask run folder as this stage sees it."""

    folder: Path
    rows: list[dict[str, str]]
    protocol: str
    backend: str
    n_not_ok: int

    def refs(self, variant: str, role: str, *, run: str) -> list[ImageRef]:
        out = []
        for row in self.rows:
            rel = (row.get(variant) or "").strip()
            if row["role"] != role or not rel:
                continue
            prefix = f"{run}:" if run != "masks" else ""
            out.append(ImageRef(id=f"{prefix}{variant}/{row['id']}", subject=row["subject"],
                                role=role, variant=variant, path=self.folder / rel,
                                item_id=row["id"], run=run, rel=rel))
        return out


def read_mask_run(folder: str | os.PathLike) -> MaskRun:
    """Rows with status ok of ``folder/manifest.csv``, the protocol and the mask backend.

    The protocol comes from ``run.json`` (``args.protocol``) when present, else from
    the ``video`` column: "same-video" when each identity's query and database
    share a video, "across-video" when none do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"expected a digital-mask run folder at {folder}, found nothing")
    rows = read_manifest(folder / "manifest.csv")
    missing = [c for c in DM_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise InputError(f"{folder / 'manifest.csv'} lacks columns {missing} "
                         f"(run_digital_mask.py writes {list(DM_COLUMNS)}); found {list(rows[0])}")
    bad_roles = sorted({r["role"] for r in rows if r["status"] == STATUS_OK} - set(ROLES))
    if bad_roles:
        raise InputError(f"{folder / 'manifest.csv'}: role must be database or query, "
                         f"found {bad_roles}")
    ok = [r for r in rows if r["status"] == STATUS_OK]
    run_json = folder / "run.json"
    run_info = read_json_file(run_json) if run_json.is_file() else {}
    args = run_info.get("args", {}) if isinstance(run_info.get("args"), dict) else {}
    protocol = str(args.get("protocol") or run_info.get("protocol") or _infer_protocol(ok))
    backends = sorted({r.get("backend", "") for r in ok if r.get("backend")})
    backend = str(args.get("backend") or ",".join(backends) or "unknown")
    return MaskRun(folder, ok, protocol, backend, len(rows) - len(ok))


def _infer_protocol(rows: Sequence[Mapping[str, str]]) -> str:
    videos: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        video = (row.get("video") or "").strip()
        if video:
            videos.setdefault(row["subject"], {}).setdefault(row["role"], set()).add(video)
    shared = [bool(v.get("query", set()) & v.get("database", set()))
              for v in videos.values() if "query" in v and "database" in v]
    if not shared:
        return "unknown"
    if all(shared):
        return "same-video"
    if not any(shared):
        return "across-video"
    return "mixed"


def upstream_black_background(rgb: np.ndarray) -> np.ndarray:
    """Upstream's ``black_background=True``: every channel value 255 becomes 0, per
    channel (so a white pixel turns black and a saturated skin channel is zeroed too)."""
    out = np.array(rgb, copy=True)
    out[out == 255] = 0
    return out


# --------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that decides an embedding besides the image bytes."""

    backend: str = "dlib"
    model_dir: str | None = None
    rgb_to_model: bool = False
    upstream_black_bug: bool = False

    def cache_name(self) -> str:
        tags = [self.backend]
        if self.rgb_to_model and self.backend != "dlib":
            tags.append("rgb")
        if self.upstream_black_bug:
            tags.append("blackbug")
        return "_".join(tags) + ".npz"


_EMBEDDERS: dict[EmbedConfig, Any] = {}


def _embedder_for(config: EmbedConfig):
    """One embedder per process and config (models load once per --jobs worker)."""
    if config not in _EMBEDDERS:
        _EMBEDDERS[config] = make_embedder(config.backend, model_dir=config.model_dir,
                                           rgb_to_model=config.rgb_to_model)
    return _EMBEDDERS[config]


def embed_file(path: str | os.PathLike, config: EmbedConfig) -> EmbeddingResult:
    """Read one image and embed it; unreadable files raise InputError."""
    rgb = read_rgb(path)
    if config.upstream_black_bug:
        rgb = upstream_black_background(rgb)
    return _embedder_for(config).embed(rgb)


@dataclass
class EmbeddingRecord:
    """What the stage knows about one image after embedding."""

    status: str
    reason: str = ""
    sha256: str = ""
    vector: np.ndarray | None = None
    det_score: float = float("nan")
    detector: str = ""

    @property
    def found(self) -> bool:
        return self.vector is not None


class EmbeddingCache:
    """Embeddings keyed by SHA-256 of the image file, one ``.npz`` per backend config.

    Arrays: keys (n,) str, vectors (n, D) float32 with NaN rows for "no face",
    det_score (n,), reason (n,) str, detector (n,) str, model (0-d str: the
    embedder's description, so a different model never reuses stale vectors).
    """

    def __init__(self, path: Path, model_tag: str, dim: int) -> None:
        self.path = Path(path)
        self.model_tag = model_tag
        self.dim = dim
        self.entries: dict[str, EmbeddingResult] = {}
        self.discarded_reason = ""

    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = read_npz(self.path, required=("keys", "vectors", "det_score", "reason",
                                                 "detector", "model"))
        except InputError as exc:
            self.discarded_reason = f"unreadable cache ignored: {exc}"
            return
        if str(data["model"]) != self.model_tag:
            self.discarded_reason = f"cache {self.path.name} made with another model; recomputed"
            return
        for key, vec, score, reason, det in zip(data["keys"], data["vectors"], data["det_score"],
                                                data["reason"], data["detector"]):
            vector = None if np.isnan(vec).any() else np.asarray(vec, dtype=np.float32)
            self.entries[str(key)] = EmbeddingResult(vector, float(score), str(reason), str(det))

    def get(self, key: str) -> EmbeddingResult | None:
        return self.entries.get(key)

    def put(self, key: str, result: EmbeddingResult) -> None:
        self.entries[key] = result

    def save(self) -> None:
        keys = sorted(self.entries)
        results = [self.entries[k] for k in keys]
        dims = {len(r.vector) for r in results if r.found}
        dim = dims.pop() if len(dims) == 1 else self.dim
        vectors = np.full((len(keys), max(dim, 1)), np.nan, dtype=np.float32)
        for i, r in enumerate(results):
            if r.found:
                vectors[i] = r.vector
        write_npz(self.path, keys=np.array(keys, dtype=str), vectors=vectors,
                  det_score=np.array([r.det_score for r in results], dtype=np.float64),
                  reason=np.array([r.reason for r in results], dtype=str),
                  detector=np.array([r.detector for r in results], dtype=str),
                  model=np.array(self.model_tag))


def embed_images(refs: Iterable[ImageRef], config: EmbedConfig, *, cache_dir: Path | None,
                 overwrite: bool = False, jobs: int = 1, progress: bool = True,
                 embedder: Any = None) -> tuple[dict[str, EmbeddingRecord], dict[str, Any]]:
    """Embed every image once (by content hash), reusing ``cache_dir`` unless ``overwrite``.

    Returns ({ref id: EmbeddingRecord}, info) where info says how many came from the cache.
    """
    refs = list({r.id: r for r in refs}.values())
    if embedder is not None:
        _EMBEDDERS[config] = embedder
    embedder = _embedder_for(config)
    description = embedder.describe()
    cache = None
    if cache_dir is not None:
        cache = EmbeddingCache(Path(cache_dir) / config.cache_name(),
                               json.dumps(description, sort_keys=True), embedder.dim)
        if not overwrite:
            cache.load()
    records: dict[str, EmbeddingRecord] = {}
    by_hash: dict[str, list[ImageRef]] = {}
    for ref in refs:
        try:
            if not ref.path.is_file():
                raise InputError(f"expected an image file at {ref.path}, found nothing")
            digest = file_digest(ref.path)
        except (OSError, InputError) as exc:
            records[ref.id] = EmbeddingRecord(STATUS_FAILED, describe_exception(exc))
            continue
        by_hash.setdefault(digest, []).append(ref)
    todo = []
    computed: dict[str, EmbeddingResult | BaseException] = {}
    for digest, group in by_hash.items():
        hit = cache.get(digest) if cache is not None else None
        if hit is not None:
            computed[digest] = hit
        else:
            todo.append((digest, str(group[0].path)))
    n_cached = len(computed)
    if todo:
        fn = partial(_embed_pair, config=config)
        for (digest, _), result, error in map_items(fn, todo, jobs=jobs, desc="embed",
                                                    progress=progress):
            computed[digest] = error if error is not None else result
            if error is None and cache is not None:
                cache.put(digest, result)
        if cache is not None:
            cache.save()
    for digest, group in by_hash.items():
        outcome = computed[digest]
        for ref in group:
            if isinstance(outcome, BaseException):
                records[ref.id] = EmbeddingRecord(STATUS_FAILED, describe_exception(outcome),
                                                  digest)
            else:
                records[ref.id] = EmbeddingRecord(
                    STATUS_OK, outcome.reason, digest, outcome.vector, outcome.det_score,
                    outcome.detector)
    info = {"embedder": description, "n_images": len(refs), "n_unique": len(by_hash),
            "n_from_cache": n_cached, "n_embedded": len(todo),
            "cache": str(cache.path) if cache else None,
            "cache_note": cache.discarded_reason if cache else ""}
    return records, info


def _embed_pair(task: tuple[str, str], config: EmbedConfig) -> EmbeddingResult:
    return embed_file(task[1], config)


# --------------------------------------------------------------------------- ranking


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
    """rank-1/5/10 with bootstrap CIs, chance levels, mean/median rank, gallery size."""
    ranks = np.asarray(ranks)
    topk = ranking.topk_accuracy(ranks, KS)
    out: dict[str, Any] = {}
    for k in KS:
        lo, hi = ranking.bootstrap_ci(ranks, k, n_boot=n_boot, seed=seed)
        out[f"rank{k}"] = topk[k]
        out[f"rank{k}_ci_lo"], out[f"rank{k}_ci_hi"] = lo, hi
    # the percentile bootstrap collapses to [1, 1] at 100 %; Wilson's interval does not
    out["rank1_wilson_lo"], out["rank1_wilson_hi"] = wilson_interval(
        int(np.sum((ranks != ranking.MISS) & (ranks <= 1))), int(ranks.size))
    found = ranks[ranks != ranking.MISS]
    out["mean_rank"] = ranking.mean_rank(ranks)
    out["median_rank"] = float(np.median(found)) if found.size else float("nan")
    out["n_queries"] = int(ranks.size)
    out["gallery_size"] = len(gallery_subjects)
    out["n_gallery_subjects"] = len(set(gallery_subjects))
    out["chance"] = chance_topk_multi(gallery_subjects, query_subjects, 1)
    out["chance5"] = chance_topk_multi(gallery_subjects, query_subjects, 5)
    out["chance10"] = chance_topk_multi(gallery_subjects, query_subjects, 10)
    return out


def wilson_interval(hits: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion hits/n (NaN, NaN when n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    return ScenarioResult(
        name=scenario.name, protocol=protocol, query=scenario.query, database=scenario.database,
        cross=scenario.cross, query_ids=[q.id for q in paired],
        query_subjects=[q.subject for q in paired], gallery_ids=[g.id for g in gallery],
        gallery_subjects=[g.subject for g in gallery], distances=dist, ranks=ranks,
        metrics=metrics, cmc=ranking.cmc_curve(ranks, max(len(gallery), 1)))


# --------------------------------------------------------------------------- stage


def run_face_recognition(masks_dir: str | os.PathLike, save_dir: str | os.PathLike, *,
                         backend: str = "dlib", model_dir: str | os.PathLike | None = None,
                         cross_masks_dir: str | os.PathLike | None = None,
                         scenarios: Sequence[str] | None = None,
                         upstream_black_bug: bool = False, upstream_scenario_bug: bool = False,
                         rgb_to_insightface: bool = False, n_boot: int = 2000, seed: int = 0,
                         overwrite: bool = False, jobs: int = 1, progress: bool = True,
                         args_record: Mapping[str, Any] | None = None,
                         embedder: Any = None) -> int:
    """The stage: embed the mask run's images, rank every scenario, write FR/.

    Writes results.csv/json, cmc.png, distances/<scenario>.npz, embeddings/<backend>.npz
    (cache), manifest.csv (one row per embedded image) and run.json into ``save_dir``;
    prints a table. Returns 0, or 1 when an image could not be read.
    """
    started = time.time()
    masks = read_mask_run(masks_dir)
    cross = read_mask_run(cross_masks_dir) if cross_masks_dir else None
    if cross is not None and Path(cross.folder).resolve() == Path(masks.folder).resolve():
        raise InputError(f"--cross_masks_dir {cross.folder} is --masks_dir itself; a cross-mask "
                         "attack needs a run made with another mask backend")
    chosen = resolve_scenarios(scenarios, cross_available=cross is not None,
                               upstream_scenario_bug=upstream_scenario_bug)
    if not masks.rows:
        raise InputError(f"{masks.folder / 'manifest.csv'} has no row with status ok")
    config = EmbedConfig(backend, str(model_dir) if model_dir else None,
                         bool(rgb_to_insightface), bool(upstream_black_bug))
    if embedder is not None:
        _EMBEDDERS[config] = embedder
    embedder = _embedder_for(config)  # a missing model stops here, before any output
    save_dir = make_private_dir(save_dir)

    plan = []
    for sc in chosen:
        queries = masks.refs(sc.query, "query", run="masks")
        db_run, db_tag = (cross, "cross") if sc.cross else (masks, "masks")
        gallery = db_run.refs(sc.database, "database", run=db_tag)
        protocol = masks.protocol if not sc.cross else f"{masks.protocol} (cross: {db_run.backend})"
        plan.append((sc, queries, gallery, protocol))
    all_refs = {r.id: r for _, q, g, _ in plan for r in list(q) + list(g)}
    records, embed_info = embed_images(all_refs.values(), config,
                                       cache_dir=save_dir / "embeddings", overwrite=overwrite,
                                       jobs=jobs, progress=progress, embedder=embedder)

    manifest = Manifest(save_dir / "manifest.csv")
    manifest.rows.clear()  # scenario-independent and cheap: rebuilt from the records each run
    for ref_id, ref in sorted(all_refs.items()):
        rec = records[ref_id]
        manifest.add(ItemResult(ref_id, ref.subject, rec.status, rec.reason, values={
            "role": ref.role, "variant": ref.variant, "run": ref.run, "item_id": ref.item_id,
            "path": ref.rel or str(ref.path), "sha256": rec.sha256, "face_found": int(rec.found),
            "det_score": rec.det_score, "detector": rec.detector, "backend": backend}))
    manifest.write()

    results = [evaluate_scenario(sc, q, g, records, protocol=p, n_boot=n_boot, seed=seed)
               for sc, q, g, p in plan]
    detection = detection_rates(all_refs.values(), records)
    write_results(save_dir, results, backend=backend, detection=detection)
    print(format_table(results, backend=backend, masks=masks))
    print("faces found: " + ", ".join(
        f"{key} {d['n_found']}/{d['n_images']}" for key, d in detection.items()))
    extra = {"masks_dir": str(masks.folder), "mask_backend": masks.backend,
             "protocol": masks.protocol, "cross_masks_dir": str(cross.folder) if cross else None,
             "cross_mask_backend": cross.backend if cross else None,
             "cross_database_same_photos": _same_database_photos(masks, cross) if cross else None,
             "n_mask_rows_not_ok": masks.n_not_ok, "embedding": embed_info,
             "detection": detection,
             "scenarios": [{"name": s.name, "query": s.query, "database": s.database,
                            "cross": s.cross} for s in chosen],
             "deviations_from_upstream": _deviations(config, upstream_scenario_bug)}
    write_run_json(save_dir, stage="run_face_recognition", args=dict(args_record or {
        "masks_dir": str(masks_dir), "save_dir": str(save_dir), "backend": backend,
        "model_dir": str(model_dir) if model_dir else None, "n_boot": n_boot}),
        seed=seed, extra=extra, started=started)
    return manifest.exit_code()


def _same_database_photos(masks: MaskRun, cross: MaskRun) -> dict[str, int]:
    """How many identities' database photos are the same source files in both mask runs
    (same --seed and input -> all of them), so a cross-mask gap is the face model's doing."""
    def sources(run: MaskRun) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for row in run.rows:
            if row["role"] == "database":
                out.setdefault(row["subject"], set()).add(row.get("source", ""))
        return out

    a, b = sources(masks), sources(cross)
    shared = sorted(set(a) & set(b))
    return {"n_identities_both": len(shared),
            "n_same_photos": sum(1 for s in shared if a[s] == b[s])}


def _deviations(config: EmbedConfig, upstream_scenario_bug: bool) -> list[str]:
    notes = ["no-face images are misses, not dropped",
             "highest-scoring face, not faces[0]"]
    notes.append("MaskOnlyBlack2Face database = mask_only_black (upstream bug reproduced)"
                 if upstream_scenario_bug else "MaskOnlyBlack2Face database = prep (fixed)")
    notes.append("255->0 per channel on every image (upstream bug reproduced)"
                 if config.upstream_black_bug else "no 255->0 rewrite (mask stage writes black masks)")
    if config.backend != "dlib":
        notes.append("RGB given to insightface (upstream)" if config.rgb_to_model
                     else "BGR given to insightface (as cv2 reads)")
    return notes


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


def result_rows(results: Sequence[ScenarioResult], *, backend: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = {"scenario": r.name, "protocol": r.protocol, **r.metrics, "query": r.query,
               "database": r.database, "cross_mask": int(r.cross), "backend": backend}
        rows.append({c: row.get(c, "") for c in RESULT_COLUMNS + EXTRA_RESULT_COLUMNS})
    return rows


def _json_row(row: Mapping[str, Any], result: ScenarioResult) -> dict[str, Any]:
    return {**row, "rank1_wilson_lo": result.metrics["rank1_wilson_lo"],
            "rank1_wilson_hi": result.metrics["rank1_wilson_hi"], "cmc": result.cmc.tolist(),
            "queries": [{"id": i, "subject": s, "rank": int(k)} for i, s, k in
                        zip(result.query_ids, result.query_subjects, result.ranks)]}


def write_results(save_dir: Path, results: Sequence[ScenarioResult], *, backend: str,
                  detection: Mapping[str, Any] | None = None) -> None:
    """results.csv / results.json, distances/<scenario>.npz and cmc.png."""
    rows = result_rows(results, backend=backend)
    write_csv(save_dir / "results.csv", rows, RESULT_COLUMNS + EXTRA_RESULT_COLUMNS)
    write_json(save_dir / "results.json", {
        "backend": backend, "detection": dict(detection or {}),
        "scenarios": [_json_row(row, r) for row, r in zip(rows, results)]})
    for r in results:
        write_npz(save_dir / "distances" / f"{r.name}.npz",
                  query_ids=np.array(r.query_ids, dtype=str),
                  query_subjects=np.array(r.query_subjects, dtype=str),
                  gallery_ids=np.array(r.gallery_ids, dtype=str),
                  gallery_subjects=np.array(r.gallery_subjects, dtype=str),
                  distances=r.distances, ranks=r.ranks)
    atomic_write_bytes(save_dir / "cmc.png", plot_cmc(results))


def plot_cmc(results: Sequence[ScenarioResult], *, max_rank: int = 20) -> bytes:
    """CMC curves (top-k accuracy vs k), one line per scenario, chance dashed; PNG bytes."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(figsize=(9.5, 4.8), dpi=120)
    shown = 1
    for r in results:
        n = min(max_rank, len(r.cmc))
        if n == 0:
            continue
        shown = max(shown, n)
        style = "--" if r.cross else "-"
        ax.plot(np.arange(1, n + 1), 100 * r.cmc[:n], style, marker="o", ms=3,
                label=f"{r.name} (n={len(r.ranks)})")
    if results:
        g = max(r.metrics["gallery_size"] for r in results) or 1
        ks = np.arange(1, shown + 1)
        ax.plot(ks, 100 * np.minimum(ks, g) / g, ":", color="grey", label=f"chance (G={g})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("top-k identification (%)")
    ax.set_ylim(0, 101)
    ax.set_xlim(0.5, shown + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Face recognition on masked photos: CMC")
    return figure_png(fig)


def format_table(results: Sequence[ScenarioResult], *, backend: str,
                 masks: MaskRun | None = None) -> str:
    """A plain-text table: scenario, rank-1 [95 % CI], rank-5, rank-10, mean rank, n, G, chance."""
    head = (f"{'scenario':<34} {'rank-1 [95% CI]':>24} {'rank-5':>7} {'rank-10':>7} "
            f"{'mean rk':>7} {'n':>5} {'G':>5} {'chance':>7} {'no face':>7}")
    lines = []
    if masks is not None:
        lines.append(f"face recognition ({backend}) on {masks.folder} "
                     f"(mask backend {masks.backend}, protocol {masks.protocol})")
    lines += [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        ci = f"{_pct(m['rank1'])} [{_pct(m['rank1_ci_lo'])}, {_pct(m['rank1_ci_hi'])}]"
        lines.append(f"{r.name:<34} {ci:>24} {_pct(m['rank5']):>7} {_pct(m['rank10']):>7} "
                     f"{m['mean_rank']:>7.2f} {m['n_queries']:>5d} {m['gallery_size']:>5d} "
                     f"{_pct(m['chance']):>7} {m['n_no_face']:>7d}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------- plain folder


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.stem)]


def identify_folder(photos_dir: str | os.PathLike, *, backend: str = "dlib",
                    model_dir: str | os.PathLike | None = None, n_database: int = 1,
                    n_query: int = 1, identities: Sequence[str] | None = None,
                    n_boot: int = 2000, seed: int = 0, embedder: Any = None,
                    progress: bool = False) -> ScenarioResult:
    """Face2Face identification over a plain ``<Identity>/<image>`` folder (no mask run).

    Per identity, images sorted in natural order (``1, 2, ..., 10``): the first
    ``n_database`` form the database, the next ``n_query`` the queries.
    """
    root = Path(photos_dir)
    if not root.is_dir():
        raise InputError(f"expected a folder of <Identity>/<image> photos at {root}, found nothing")
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=_natural_key)
    if identities is not None:
        wanted = set(identities)
        folders = [p for p in folders if p.name in wanted]
    queries, gallery = [], []
    for folder in folders:
        images = sorted((p for p in folder.iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
        for role, chunk in (("database", images[:n_database]),
                            ("query", images[n_database:n_database + n_query])):
            for p in chunk:
                ref = ImageRef(f"prep/{role}/{folder.name}/{p.stem}", folder.name, role, "prep",
                               p, f"{role}/{folder.name}/{p.stem}", "masks")
                (gallery if role == "database" else queries).append(ref)
    if not gallery or not queries:
        raise InputError(f"{root}: found {len(gallery)} database and {len(queries)} query images; "
                         f"expected identity folders with >= {n_database + 1} images")
    config = EmbedConfig(backend, str(model_dir) if model_dir else None)
    records, _ = embed_images(queries + gallery, config, cache_dir=None, progress=progress,
                              embedder=embedder)
    return evaluate_scenario(SCENARIOS["Face2Face"], queries, gallery, records,
                             protocol="folder", n_boot=n_boot, seed=seed)
