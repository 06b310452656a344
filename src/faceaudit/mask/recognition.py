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

Metrics (``faceaudit.core.ranking``, ``faceaudit.core.stats``): ranks are 1-based, ties
pessimistic; rank-1/5/10 with Wilson 95 % intervals (a proportion of the queries), CMC,
mean rank of the found matches (percentile bootstrap interval), each scenario's rank-1
minus Face2Face's on the same query photos (Newcombe's paired interval); every number
comes with the gallery size and the chance level.
"""


from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceaudit.core.files import InputError
from faceaudit.core.manifest import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ItemResult
from faceaudit.core.runner import (
    OptionsError,
    RunSettings,
    StageResult,
    StageRun,
    fingerprint,
)
from faceaudit.faces.embedding import BACKENDS
from faceaudit.mask.embedding_cache import (
    _EMBEDDERS,
    EmbedConfig,
    EmbeddingRecord,
    _embedder_for,
    embed_images,
)
from faceaudit.mask.evaluation import (
    ScenarioResult,
    compare_to_reference,
    detection_rates,
    evaluate_scenario,
)
from faceaudit.mask.recognition_output import format_table, write_results
from faceaudit.mask.scenarios import (
    SCENARIOS,
    ImageRef,
    MaskRun,
    Scenario,
    read_mask_run,
    resolve_scenarios,
    same_database_photos,
)

STAGE = "face_recognition"
#: Fewer resamples cannot place a 2.5 % tail: with 40, each tail holds one resample.
MIN_BOOT = 40


@dataclass(frozen=True)
class RecognitionOptions:
    """What shapes the stage's numbers. Validated on creation: a value no run could use
    raises OptionsError (exit 2) before any image is embedded."""

    backend: str = "dlib"                       # a name of faceaudit.faces.embedding.BACKENDS
    model_dir: str | None = None                # insightface / arcface-onnx: the model files
    scenarios: tuple[str, ...] | None = None    # None: all within-mask (+ cross-mask) ones
    upstream_black_bug: bool = False            # upstream: every channel value 255 -> 0
    upstream_scenario_bug: bool = False         # upstream: MaskOnlyBlack2Face black on both sides
    rgb_to_insightface: bool = False            # upstream: RGB to insightface (we give BGR)
    n_boot: int = 2000                          # bootstrap resamples (mean rank interval)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise OptionsError(f"expected --backend to be one of {list(BACKENDS)}, "
                               f"found {self.backend!r}")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) \
                or self.n_boot < MIN_BOOT:
            raise OptionsError(f"expected --n_boot to be a whole number >= {MIN_BOOT} (bootstrap "
                               f"resamples), found {self.n_boot!r}")
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", str(self.model_dir) or None)
        if self.scenarios is not None:
            names = tuple(self.scenarios)
            unknown = [n for n in names if n not in SCENARIOS]
            if unknown or not names:
                raise OptionsError(f"expected --scenarios among {list(SCENARIOS)}, "
                                   f"found {unknown or 'none'}")
            object.__setattr__(self, "scenarios", tuple(dict.fromkeys(names)))
        for name in ("upstream_black_bug", "upstream_scenario_bug", "rgb_to_insightface"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"expected {name} to be True or False, "
                                   f"found {getattr(self, name)!r}")

    @property
    def backends(self) -> tuple[str, ...]:
        """The recognizers to run, in order (one today; a list is the plan of issue 14.3)."""
        return (self.backend,)

    def embed_config(self, backend: str) -> EmbedConfig:
        return EmbedConfig(backend, self.model_dir, self.rgb_to_insightface,
                           self.upstream_black_bug)


@dataclass
class Plan:
    """The stage's inputs: the mask runs, the chosen scenarios and the images each needs."""

    masks: MaskRun
    cross: MaskRun | None
    scenarios: list[Scenario]
    sides: list[tuple[Scenario, list[ImageRef], list[ImageRef], str]]   # scenario, queries, gallery, protocol
    refs: dict[str, ImageRef] = field(default_factory=dict)


@dataclass
class BackendRun:
    """One recognizer's attack: its embeddings and every scenario's results."""

    backend: str
    config: EmbedConfig
    records: dict[str, EmbeddingRecord]
    embed_info: dict[str, Any]
    results: list[ScenarioResult]
    detection: dict[str, dict[str, Any]]


def plan_attack(masks_dir, cross_masks_dir, options: RecognitionOptions) -> Plan:
    """Read the mask run(s) and list, per scenario, its queries and database images."""
    masks = read_mask_run(masks_dir)
    cross = read_mask_run(cross_masks_dir) if cross_masks_dir else None
    if cross is not None and Path(cross.folder).resolve() == Path(masks.folder).resolve():
        raise InputError(f"--cross_masks_dir {cross.folder} is --masks_dir itself; a cross-mask "
                         "attack needs a run made with another mask backend")
    chosen = resolve_scenarios(options.scenarios, cross_available=cross is not None,
                               upstream_scenario_bug=options.upstream_scenario_bug)
    if not masks.rows:
        raise InputError(f"{masks.folder / 'manifest.csv'} has no row with status ok")
    sides = []
    for sc in chosen:
        queries = masks.refs(sc.query, "query", run="masks")
        db_run, db_tag = (cross, "cross") if sc.cross else (masks, "masks")
        gallery = db_run.refs(sc.database, "database", run=db_tag)
        protocol = masks.protocol if not sc.cross else f"{masks.protocol} (cross: {db_run.backend})"
        sides.append((sc, queries, gallery, protocol))
    refs = {r.id: r for _, q, g, _ in sides for r in list(q) + list(g)}
    return Plan(masks, cross, chosen, sides, refs)


def attack_with(backend: str, plan: Plan, options: RecognitionOptions, *, save_dir: Path,
                run: RunSettings) -> BackendRun:
    """Everything one recognizer does: embed every image once, rank every scenario."""
    config = options.embed_config(backend)
    records, embed_info = embed_images(plan.refs.values(), config,
                                       cache_dir=save_dir / "embeddings", overwrite=run.overwrite,
                                       jobs=run.jobs, progress=run.progress)
    results = [evaluate_scenario(sc, q, g, records, protocol=p, n_boot=options.n_boot,
                                 seed=run.seed) for sc, q, g, p in plan.sides]
    compare_to_reference(results)
    return BackendRun(backend, config, records, embed_info, results,
                      detection_rates(plan.refs.values(), records))


def run_face_recognition(masks_dir: str | os.PathLike, save_dir: str | os.PathLike,
                         options: RecognitionOptions | None = None, *,
                         run: RunSettings | None = None,
                         cross_masks_dir: str | os.PathLike | None = None,
                         embedder: Any = None) -> StageResult:
    """The stage: embed the mask run's images, rank every scenario, write FR/.

    Parameters
    ----------
    masks_dir : a run_digital_mask.py output folder (manifest.csv + 224x224 PNGs).
    save_dir : output folder (created 0700, locked while the stage runs).
    options : what shapes the numbers (backend, scenarios, n_boot ...).
    run : jobs, overwrite, seed (of the bootstrap), progress.
    cross_masks_dir : a second mask run, the database of the cross-mask scenarios.
    embedder : an embedder object to use instead of building one (tests).

    Writes results.csv/json, cmc.png, distances/<scenario>.npz, embeddings/<backend>.npz
    (the content-keyed cache), manifest.csv (one row per image) and run.json. The
    StageResult's summary is the results table; its exit code is 1 when an image could
    not be read. A missing or unusable model raises InputError before anything is written.
    """
    options = options or RecognitionOptions()
    run = run or RunSettings()
    plan = plan_attack(masks_dir, cross_masks_dir, options)
    for backend in options.backends:      # a missing model stops here, before any output
        config = options.embed_config(backend)
        if embedder is not None:
            _EMBEDDERS[config] = embedder
        _embedder_for(config)
    with StageRun(STAGE, save_dir, run, options=options) as stage:
        attacks = [attack_with(b, plan, options, save_dir=stage.save_dir, run=run)
                   for b in options.backends]
        for attack in attacks:
            _record_rows(stage, plan, attack)
        attack = attacks[0]
        write_results(stage.save_dir, attack.results, backend=attack.backend,
                      detection=attack.detection)
        stage.extra.update(_run_facts(plan, attack, options))
        return stage.finish(keep_ids=list(plan.refs), summary=_summary(plan, attack, n_boot=options.n_boot),
                            details={"results": {r.name: r.metrics for r in attack.results}})


def _record_rows(stage: StageRun, plan: Plan, attack: BackendRun) -> None:
    """One manifest row per image: ok (embedded now), skipped (embedding reused from the
    cache: same image bytes, same embedder) or failed (unreadable)."""
    model = json.dumps(attack.embed_info["embedder"], sort_keys=True)
    for ref_id, ref in sorted(plan.refs.items()):
        rec = attack.records[ref_id]
        status, reason = rec.status, rec.reason
        if rec.status == STATUS_OK and rec.from_cache:
            status = STATUS_SKIPPED
            reason = "; ".join(filter(None, ["embedding reused (same image bytes and model)",
                                             rec.reason]))
        values = {"role": ref.role, "variant": ref.variant, "run": ref.run,
                  "item_id": ref.item_id, "path": ref.rel or str(ref.path), "sha256": rec.sha256,
                  "face_found": int(rec.found), "det_score": rec.det_score,
                  "detector": rec.detector, "backend": attack.backend}
        item_fp = (fingerprint(rec.sha256, model, attack.config.upstream_black_bug)
                   if status != STATUS_FAILED else None)
        stage.record(ItemResult(ref_id, ref.subject, status, reason, values=values), item_fp)


def _summary(plan: Plan, attack: BackendRun, *, n_boot: int) -> str:
    lines = [format_table(attack.results, backend=attack.backend, masks=plan.masks,
                          n_boot=n_boot),
             "faces found: " + ", ".join(f"{key} {d['n_found']}/{d['n_images']}"
                                        for key, d in attack.detection.items())]
    failed = [(i, r) for i, r in sorted(attack.records.items()) if r.status == STATUS_FAILED]
    if failed:
        lines.append(f"{len(failed)} image(s) could not be read (misses; see manifest.csv):")
        lines += [f"  {i}: {r.reason}" for i, r in failed[:10]]
        if len(failed) > 10:
            lines.append(f"  ... and {len(failed) - 10} more")
    return "\n".join(lines)


def _run_facts(plan: Plan, attack: BackendRun, options: RecognitionOptions) -> dict[str, Any]:
    masks, cross = plan.masks, plan.cross
    return {"masks_dir": str(masks.folder), "mask_backend": masks.backend,
            "protocol": masks.protocol, "cross_masks_dir": str(cross.folder) if cross else None,
            "cross_mask_backend": cross.backend if cross else None,
            "cross_database_same_photos": same_database_photos(masks, cross) if cross else None,
            "n_mask_rows_not_ok": masks.n_not_ok, "embedding": attack.embed_info,
            "detection": attack.detection,
            "scenarios": [{"name": s.name, "query": s.query, "database": s.database,
                           "cross": s.cross} for s in plan.scenarios],
            "deviations_from_upstream": _deviations(attack.config, options.upstream_scenario_bug)}


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


__all__ = ["SCENARIOS", "BackendRun", "MaskRun", "Plan", "RecognitionOptions", "attack_with",
           "plan_attack", "run_face_recognition"]
