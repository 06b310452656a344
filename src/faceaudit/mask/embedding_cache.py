"""Embedding the attack's images once: the embedder per configuration and a content-keyed cache.

Every image is embedded once per backend configuration, keyed by the SHA-256 of its
file's bytes (two variants with identical bytes, or a re-run on unchanged images, reuse
the vector). The cache is one ``.npz`` per configuration in ``<save_dir>/embeddings``;
it records the embedder's description, so a different model never reuses stale vectors.
An image in which no face is found is cached as such (a miss, never dropped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.files import InputError, file_digest_once, read_npz, write_npz
from faceaudit.core.images import read_rgb
from faceaudit.core.manifest import STATUS_FAILED, STATUS_OK, describe_exception
from faceaudit.core.runner import map_items
from faceaudit.faces.embedding import EmbeddingResult, make_embedder
from faceaudit.mask.scenarios import ImageRef


def upstream_black_background(rgb: np.ndarray) -> np.ndarray:
    """Upstream's ``black_background=True``: every channel value 255 becomes 0, per
    channel (so a white pixel turns black and a saturated skin channel is zeroed too)."""
    out = np.array(rgb, copy=True)
    out[out == 255] = 0
    return out


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that decides an embedding besides the image bytes."""

    backend: str = "dlib"
    model_dir: str | None = None
    rgb_to_model: bool = False
    upstream_black_bug: bool = False
    #: insightface / arcface-onnx input normalisation; None: faces.arcface's documented order
    input_mean: float | None = None
    input_std: float | None = None

    def cache_name(self) -> str:
        tags = [self.backend]
        if self.rgb_to_model and self.backend != "dlib":
            tags.append("rgb")
        if self.input_mean is not None:
            tags.append(f"mean{self.input_mean:g}std{self.input_std:g}")
        if self.upstream_black_bug:
            tags.append("blackbug")
        return "_".join(tags) + ".npz"


_EMBEDDERS: dict[EmbedConfig, Any] = {}


def _embedder_for(config: EmbedConfig):
    """One embedder per process and config (models load once per --jobs worker)."""
    if config not in _EMBEDDERS:
        _EMBEDDERS[config] = make_embedder(config.backend, model_dir=config.model_dir,
                                           rgb_to_model=config.rgb_to_model,
                                           input_mean=config.input_mean,
                                           input_std=config.input_std)
    return _EMBEDDERS[config]


def embed_file(path: str | os.PathLike, config: EmbedConfig, embedder: Any = None) -> EmbeddingResult:
    """Read one image and embed it (with ``embedder``, else the process's embedder for
    ``config``); unreadable files raise InputError."""
    rgb = read_rgb(path)
    if config.upstream_black_bug:
        rgb = upstream_black_background(rgb)
    return (embedder if embedder is not None else _embedder_for(config)).embed(rgb)


@dataclass
class EmbeddingRecord:
    """What the stage knows about one image after embedding."""

    status: str
    reason: str = ""
    sha256: str = ""
    vector: np.ndarray | None = None
    det_score: float = float("nan")
    detector: str = ""
    #: True when the vector came from the cache (same image bytes, same embedder)
    from_cache: bool = False

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

    ``embedder``: an embedder object to use for this call only (it never enters the
    process-wide registry, and runs in this process: ``jobs`` is then 1).
    Returns ({ref id: EmbeddingRecord}, info) where info says how many came from the cache.
    """
    refs = list({r.id: r for r in refs}.values())
    given = embedder
    if given is not None:
        jobs = 1
    embedder = given if given is not None else _embedder_for(config)
    description = embedder.describe()
    cache = None
    if cache_dir is not None:
        cache = EmbeddingCache(Path(cache_dir) / config.cache_name(),
                               json.dumps(description, sort_keys=True), embedder.dim)
        if not overwrite:
            cache.load()
    records, by_hash = _group_by_content(refs)
    todo = []
    computed: dict[str, EmbeddingResult | BaseException] = {}
    for digest, group in by_hash.items():
        hit = cache.get(digest) if cache is not None else None
        if hit is not None:
            computed[digest] = hit
        else:
            todo.append((digest, str(group[0].path)))
    cached = set(computed)
    if todo:
        fn = partial(_embed_pair, config=config, embedder=given)
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
                    outcome.detector, from_cache=digest in cached)
    info = {"embedder": description, "n_images": len(refs), "n_unique": len(by_hash),
            "n_from_cache": len(cached), "n_embedded": len(todo),
            "cache": str(cache.path) if cache else None,
            "cache_note": cache.discarded_reason if cache else ""}
    return records, info


def _group_by_content(refs: Iterable[ImageRef]
                      ) -> tuple[dict[str, EmbeddingRecord], dict[str, list[ImageRef]]]:
    """({ref id: failed record} for unreadable files, {SHA-256 of the bytes: refs})."""
    failed: dict[str, EmbeddingRecord] = {}
    by_hash: dict[str, list[ImageRef]] = {}
    for ref in refs:
        try:
            if not ref.path.is_file():
                raise InputError(f"expected an image file at {ref.path}, found nothing")
            digest = file_digest_once(ref.path)   # once per photo, not once per recognizer
        except (OSError, InputError) as exc:
            failed[ref.id] = EmbeddingRecord(STATUS_FAILED, describe_exception(exc))
            continue
        by_hash.setdefault(digest, []).append(ref)
    return failed, by_hash


def _embed_pair(task: tuple[str, str], config: EmbedConfig, embedder: Any = None) -> EmbeddingResult:
    return embed_file(task[1], config, embedder)
