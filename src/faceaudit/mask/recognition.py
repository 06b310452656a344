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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from faceaudit.faces.arcface import checked_normalisation
from faceaudit.faces.embedding import BACKENDS, TFJS_BACKENDS, model_file_digest
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
from faceaudit.mask.recognition_output import (
    format_side_by_side,
    format_table,
    write_results,
)
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
#: Backends that read --model_dir as their model (the converted ones read it as the cache).
MODEL_DIR_BACKENDS = ("insightface", "arcface-onnx")


def parse_backends(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"dlib,mobilefacenet"`` (or a sequence of names) -> ``("dlib", "mobilefacenet")``.

    Raises OptionsError for an unknown or empty name and for a name given twice (each
    recognizer's outputs are kept apart by its name).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or not all(isinstance(n, str) for n in items):
        raise OptionsError(f"expected --backend to be one of {list(BACKENDS)} or a comma-separated "
                           f"list of them, found {value!r}")
    names = tuple(n.strip() for n in items)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise OptionsError(f"expected --backend to be one of {list(BACKENDS)} or a comma-separated "
                           f"list of them, found {', '.join(repr(n) for n in unknown)}"
                           + (f" in {value!r}" if len(names) > 1 else ""))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionsError(f"expected --backend to name each recognizer once, found "
                           f"{', '.join(repr(n) for n in twice)} more than once in {value!r}")
    return names


@dataclass(frozen=True)
class RecognitionOptions:
    """What shapes the stage's numbers. Validated on creation: a value no run could use
    raises OptionsError (exit 2) before any image is embedded."""

    backend: str = "dlib"                       # BACKENDS names, comma-separated: "dlib,mobilefacenet"
    model_dir: str | None = None                # insightface / arcface-onnx: the model files
    scenarios: tuple[str, ...] | None = None    # None: all within-mask (+ cross-mask) ones
    upstream_black_bug: bool = False            # upstream: every channel value 255 -> 0
    upstream_scenario_bug: bool = False         # upstream: MaskOnlyBlack2Face black on both sides
    rgb_to_insightface: bool = False            # upstream: RGB to insightface (we give BGR)
    n_boot: int = 2000                          # bootstrap resamples (mean rank interval)
    input_mean: float | None = None             # insightface / arcface-onnx: (x - mean) / std,
    input_std: float | None = None              # None: faces.arcface's documented order

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", ",".join(parse_backends(self.backend)))
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
        self._check_normalisation()

    def _check_normalisation(self) -> None:
        try:
            values = checked_normalisation(self.input_mean, self.input_std,
                                           where="--input_mean / --input_std")
        except InputError as exc:
            raise OptionsError(str(exc)) from None
        if values is not None and not set(self.backends) & set(MODEL_DIR_BACKENDS):
            raise OptionsError(f"expected --input_mean / --input_std only with "
                               f"{' or '.join(MODEL_DIR_BACKENDS)} in --backend, found "
                               f"{self.backend!r} (the other recognizers carry their own)")
        if values is not None:
            object.__setattr__(self, "input_mean", values[0])
            object.__setattr__(self, "input_std", values[1])

    @property
    def backends(self) -> tuple[str, ...]:
        """The recognizers to run, in the order given."""
        return tuple(self.backend.split(","))

    def model_dir_for(self, backend: str) -> str | None:
        """--model_dir is the model of insightface / arcface-onnx; mobilefacenet and mobileface
        read it as their model cache folder only when neither of those is in the list (else
        the cache: $FACEAUDIT_MODELS or ~/.cache/faceaudit/models); dlib never reads it."""
        if backend in MODEL_DIR_BACKENDS:
            return self.model_dir
        if backend in TFJS_BACKENDS and not set(self.backends) & set(MODEL_DIR_BACKENDS):
            return self.model_dir
        return None

    def embed_config(self, backend: str) -> EmbedConfig:
        explicit = backend in MODEL_DIR_BACKENDS
        return EmbedConfig(backend, self.model_dir_for(backend), self.rgb_to_insightface,
                           self.upstream_black_bug,
                           input_mean=self.input_mean if explicit else None,
                           input_std=self.input_std if explicit else None)


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
    #: SHA-256 of each model file the embedder reads ({} when it names none)
    model_sha256: dict[str, str] = field(default_factory=dict)


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
                      detection_rates(plan.refs.values(), records),
                      model_digests(_embedder_for(config)))


def model_digests(embedder: Any) -> dict[str, str]:
    """{file name: SHA-256} of the model files an embedder reads (``model_files`` and/or
    ``model_path``), so run.json pins the exact weights behind each recognizer's numbers."""
    paths = [Path(p) for p in getattr(embedder, "model_files", None) or []]
    if getattr(embedder, "model_path", None):
        paths.append(Path(embedder.model_path))
    return {p.name: model_file_digest(p) for p in paths if p.is_file()}


@contextmanager
def _injected(embedders: Mapping[EmbedConfig, Any]) -> Iterator[None]:
    """Use the given embedder objects for these configs during the run only (tests), so a
    fake never outlives the call in the process-wide registry."""
    saved = {c: _EMBEDDERS[c] for c in embedders if c in _EMBEDDERS}
    _EMBEDDERS.update(embedders)
    try:
        yield
    finally:
        for config in embedders:
            _EMBEDDERS.pop(config, None)
        _EMBEDDERS.update(saved)


def run_face_recognition(masks_dir: str | os.PathLike, save_dir: str | os.PathLike,
                         options: RecognitionOptions | None = None, *,
                         run: RunSettings | None = None,
                         cross_masks_dir: str | os.PathLike | None = None,
                         embedder: Any = None) -> StageResult:
    """The stage: embed the mask run's images with each recognizer, rank every scenario, write FR/.

    Parameters
    ----------
    masks_dir : a run_digital_mask.py output folder (manifest.csv + 224x224 PNGs).
    save_dir : output folder (created 0700, locked while the stage runs).
    options : what shapes the numbers (backends, scenarios, n_boot ...).
    run : jobs, overwrite, seed (of the bootstrap), progress.
    cross_masks_dir : a second mask run, the database of the cross-mask scenarios.
    embedder : an embedder object to use instead of building one, for every backend, or a
        mapping {backend name: embedder} (tests).

    Writes results.csv/json (one row per recognizer x scenario, ``backend`` column),
    embeddings/<backend>.npz (the content-keyed cache), manifest.csv (one row per image, per
    recognizer) and run.json; per recognizer distances/<scenario>.npz, cmc.png, roc.csv and
    roc.png: in save_dir with one recognizer, in save_dir/<backend>/ with several. The
    StageResult's summary is the results table (one column group per recognizer); its exit
    code is 1 when an image could not be read. A missing or unusable model raises
    InputError before anything is written.
    """
    options = options or RecognitionOptions()
    run = run or RunSettings()
    plan = plan_attack(masks_dir, cross_masks_dir, options)
    given = {}
    if embedder is not None:
        given = {options.embed_config(b): (embedder[b] if isinstance(embedder, Mapping) else embedder)
                 for b in options.backends
                 if not isinstance(embedder, Mapping) or b in embedder}
    with _injected(given):
        for backend in options.backends:      # a missing model stops here, before any output
            _embedder_for(options.embed_config(backend))
        with StageRun(STAGE, save_dir, run, options=options) as stage:
            attacks = [attack_with(b, plan, options, save_dir=stage.save_dir, run=run)
                       for b in options.backends]
            several = len(attacks) > 1
            keep = []
            for attack in attacks:
                keep += _record_rows(stage, plan, attack, prefix=f"{attack.backend}/" if several else "")
            write_results(stage.save_dir, attacks,
                          [backend_record(a, several=several) for a in attacks])
            stage.extra.update(_run_facts(plan, attacks, options))
            return stage.finish(keep_ids=keep, summary=_summary(plan, attacks, n_boot=options.n_boot),
                                details={"results": {a.backend: {r.name: r.metrics for r in a.results}
                                                     for a in attacks} if several else
                                         {r.name: r.metrics for r in attacks[0].results}})


def _record_rows(stage: StageRun, plan: Plan, attack: BackendRun, *, prefix: str = "") -> list[str]:
    """One manifest row per image (and recognizer: ids ``<backend>/...`` when there are
    several): skipped when ``stage.is_fresh`` finds the earlier row made from the same image
    bytes and embedder description (model digests, normalisation, ...) and the embedding came
    from the cache; ok when it was embedded now or its cached embedding serves a row with no
    such earlier row; failed when unreadable. Returns the row ids."""
    model = json.dumps(attack.embed_info["embedder"], sort_keys=True)
    cache = attack.embed_info.get("cache")
    outputs = [Path(cache)] if cache else []
    ids = []
    for ref_id, ref in sorted(plan.refs.items()):
        rec, item_id = attack.records[ref_id], prefix + ref_id
        values = {"role": ref.role, "variant": ref.variant, "run": ref.run,
                  "item_id": ref.item_id, "path": ref.rel or str(ref.path), "sha256": rec.sha256,
                  "face_found": int(rec.found), "det_score": rec.det_score,
                  "detector": rec.detector, "backend": attack.backend}
        ids.append(item_id)
        if rec.status == STATUS_FAILED:
            stage.record(ItemResult(item_id, ref.subject, STATUS_FAILED, rec.reason, values=values))
            continue
        item_fp = fingerprint(rec.sha256, model, attack.config.upstream_black_bug)
        if rec.from_cache and stage.is_fresh(item_id, item_fp, outputs):
            status, note = STATUS_SKIPPED, "inputs and options unchanged"
        else:
            status = STATUS_OK
            note = "embedding reused from the cache (same image bytes and model)" if rec.from_cache else ""
        reason = "; ".join(filter(None, [note, rec.reason]))
        stage.record(ItemResult(item_id, ref.subject, status, reason, values=values), item_fp)
    return ids


def _summary(plan: Plan, attacks: Sequence[BackendRun], *, n_boot: int) -> str:
    if len(attacks) == 1:
        attack = attacks[0]
        lines = [format_table(attack.results, backend=attack.backend, masks=plan.masks,
                              n_boot=n_boot),
                 "faces found: " + _found(attack)]
    else:
        lines = [format_side_by_side({a.backend: a.results for a in attacks}, masks=plan.masks,
                                     n_boot=n_boot)]
        lines += [f"faces found ({a.backend}): " + _found(a) for a in attacks]
    failed = [(i, r) for a in attacks for i, r in sorted(a.records.items())
              if r.status == STATUS_FAILED]
    failed = list({i: (i, r) for i, r in failed}.values())   # an unreadable file fails for all
    if failed:
        lines.append(f"{len(failed)} image(s) could not be read (misses; see manifest.csv):")
        lines += [f"  {i}: {r.reason}" for i, r in failed[:10]]
        if len(failed) > 10:
            lines.append(f"  ... and {len(failed) - 10} more")
    return "\n".join(lines)


def _found(attack: BackendRun) -> str:
    return ", ".join(f"{key} {d['n_found']}/{d['n_images']}" for key, d in attack.detection.items())


def _run_facts(plan: Plan, attacks: Sequence[BackendRun], options: RecognitionOptions
               ) -> dict[str, Any]:
    """run.json: the inputs, and per recognizer its embedder (normalisation, model SHA-256),
    cache use and detection rates."""
    masks, cross = plan.masks, plan.cross
    facts = {"masks_dir": str(masks.folder), "mask_backend": masks.backend,
             "protocol": masks.protocol, "cross_masks_dir": str(cross.folder) if cross else None,
             "cross_mask_backend": cross.backend if cross else None,
             "cross_database_same_photos": same_database_photos(masks, cross) if cross else None,
             "n_mask_rows_not_ok": masks.n_not_ok,
             "backends": [backend_record(a, several=len(attacks) > 1) for a in attacks],
             "scenarios": [{"name": s.name, "query": s.query, "database": s.database,
                            "cross": s.cross} for s in plan.scenarios],
             "deviations_from_upstream": _deviations(attacks, options.upstream_scenario_bug)}
    if len(attacks) == 1:    # one recognizer: the keys of the one-backend layout
        facts.update(embedding=attacks[0].embed_info, detection=attacks[0].detection)
    return facts


def backend_record(attack: BackendRun, *, several: bool) -> dict[str, Any]:
    """What results.json and run.json say of one recognizer."""
    return {"name": attack.backend, "embedder": attack.embed_info["embedder"],
            "model_sha256": attack.model_sha256, "model_dir": attack.config.model_dir,
            "outputs": attack.backend if several else ".",
            "embedding": {k: v for k, v in attack.embed_info.items() if k != "embedder"},
            "detection": attack.detection}


def _deviations(attacks: Sequence[BackendRun], upstream_scenario_bug: bool) -> list[str]:
    config = attacks[0].config
    notes = ["no-face images are misses, not dropped",
             "highest-scoring face, not faces[0]"]
    notes.append("MaskOnlyBlack2Face database = mask_only_black (upstream bug reproduced)"
                 if upstream_scenario_bug else "MaskOnlyBlack2Face database = prep (fixed)")
    notes.append("255->0 per channel on every image (upstream bug reproduced)"
                 if config.upstream_black_bug else "no 255->0 rewrite (mask stage writes black masks)")
    for attack in attacks:
        if attack.backend in MODEL_DIR_BACKENDS:
            notes.append(f"RGB given to {attack.backend} (upstream)" if attack.config.rgb_to_model
                         else f"BGR given to {attack.backend} (as cv2 reads)")
    return notes


__all__ = ["SCENARIOS", "BackendRun", "MaskRun", "Plan", "RecognitionOptions", "attack_with",
           "parse_backends", "plan_attack", "run_face_recognition"]
