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

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from faceaudit.core.files import InputError, make_private_dir
from faceaudit.core.manifest import ItemResult, Manifest
from faceaudit.core.runner import write_run_json
from faceaudit.mask.embedding_cache import _EMBEDDERS, EmbedConfig, _embedder_for, embed_images
from faceaudit.mask.evaluation import detection_rates, evaluate_scenario
from faceaudit.mask.recognition_output import format_table, write_results
from faceaudit.mask.scenarios import (
    SCENARIOS,
    MaskRun,
    read_mask_run,
    resolve_scenarios,
    same_database_photos,
)


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
             "cross_database_same_photos": same_database_photos(masks, cross) if cross else None,
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


__all__ = ["SCENARIOS", "MaskRun", "run_face_recognition"]
