"""PET -> CT identification by face recognizers: the embedding attack of stage 4.

Beside the landmark distances, each recognizer (``dlib``, ``mobilefacenet``, ``mobileface``)
embeds the fold's PET renders (the probes) and the CT renders of the gallery and ranks the
gallery by cosine distance (1 - cosine similarity). The probes are the landmark attack's
probes (the fold's PET test ids) and the gallery is the landmark attack's gallery, item for
item (the fold's CTs with landmarks plus the distractor CTs), so both attacks face the same
people, gallery size and chance.

Images: the reconstruction's renders ``<renders_dir>/pets/<id>.png`` (probe variant ``pet``)
and ``<renders_dir>/cts/<id>.png`` (gallery), and with a denoised folder the U-Net PET
renders ``<denoised_dir>/fold{k}/<id>.png`` (probe variant ``pet_unet``); each is read as
grey, centre-cropped to ``RENDER_CROP`` as the landmark stage does, and given to the
recognizer as RGB (grey in all three channels). A render in which the recognizer finds no
face is kept with no features: as a probe it is a miss, as a gallery item it never matches.

Embeddings are cached by the SHA-256 of the render file per recognizer configuration in
``<save_dir>/embeddings/<name>.npz`` (``faceaudit.mask.embedding_cache.EmbeddingCache``),
so a re-run embeds only renders it has not seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import (
    CT_RENDERS,
    PET_RENDERS,
    RENDER_CROP,
    denoised_fold_dir,
)
from faceaudit.core.files import InputError, file_digest_once, read_npz, write_npz
from faceaudit.core.images import center_crop, read_grey
from faceaudit.core.runner import OptionsError
from faceaudit.faces.embedding import EmbeddingResult, cosine_distances
from faceaudit.faces.facemesh import as_rgb_uint8
from faceaudit.petct.landmarks import DISTRACTOR_PREFIX, LandmarkSet

#: Recognizers that need no model folder from the user (dlib ships in a wheel; the
#: converted ones live in the model cache that `make models` fills).
EMBEDDING_BACKENDS = ("dlib", "mobilefacenet", "mobileface")
#: How a render is prepared for a recognizer; part of every cache key.
RENDER_INPUT = f"grey render, centre crop {RENDER_CROP} px (smaller renders whole), grey -> RGB uint8"
EMBEDDINGS_DIR = "embeddings"


def check_options(embedders, renders_dir, denoised_dir) -> tuple[str, ...]:
    """The recognizer names, deduplicated; OptionsError (exit 2) for an unknown name, for
    recognizers without --renders_dir, or for render folders without a recognizer."""
    names = tuple(dict.fromkeys(str(n).strip() for n in embedders if str(n).strip()))
    unknown = [n for n in names if n not in EMBEDDING_BACKENDS]
    if unknown:
        raise OptionsError(f"expected --embedder to be a comma-separated list of {list(EMBEDDING_BACKENDS)}, "
                           f"found {unknown}")
    if names and not renders_dir:
        raise OptionsError("expected --renders_dir (the reconstruction's output, with cts/ and pets/) "
                           f"with --embedder {','.join(names)}, found none")
    if not names and (renders_dir or denoised_dir):
        raise OptionsError("expected --embedder NAME (e.g. dlib,mobilefacenet) with --renders_dir or "
                           "--denoised_dir, found none")
    return names


# --------------------------------------------------------------------------- renders


@dataclass(frozen=True)
class RenderFolders:
    """Where the renders of every attacked image variant are."""

    renders_dir: Path
    denoised_dir: Path | None = None

    @property
    def probe_variants(self) -> tuple[str, ...]:
        return ("pet", "pet_unet") if self.denoised_dir is not None else ("pet",)

    def ct(self, image_id: str) -> Path:
        return self.renders_dir / CT_RENDERS / f"{image_id}.png"

    def probe(self, variant: str, fold: int, image_id: str) -> Path:
        if variant == "pet_unet":
            return denoised_fold_dir(self.denoised_dir, fold) / f"{image_id}.png"
        return self.renders_dir / PET_RENDERS / f"{image_id}.png"

    def check(self) -> None:
        """InputError (exit 2) when a render folder is missing."""
        folders = [("--renders_dir", self.renders_dir / CT_RENDERS), ("--renders_dir", self.renders_dir / PET_RENDERS)]
        folders += [("--denoised_dir", self.denoised_dir)] if self.denoised_dir is not None else []
        for flag, folder in folders:
            if not folder.is_dir():
                raise InputError(f"expected a folder of <id>.png renders at {flag} {folder}, found no such folder")


def render_id(gallery_id: str) -> str:
    """The render id of a gallery item: distractors are ``distractor:<file>:<id>``."""
    if gallery_id.startswith(DISTRACTOR_PREFIX):
        return gallery_id[len(DISTRACTOR_PREFIX):].split(":", 1)[1]
    return gallery_id


def check_distractor_renders(folders: RenderFolders, distractors: list[LandmarkSet] | None) -> None:
    """Every distractor CT must have a render to embed: InputError (exit 2) naming the first
    missing ones, before any work."""
    ids = [render_id(i) for part in distractors or [] for i in part.ids.tolist()]
    missing = [i for i in dict.fromkeys(ids) if not folders.ct(i).is_file()]
    if missing:
        raise InputError(f"expected a CT render of every distractor in {folders.renders_dir / CT_RENDERS}, "
                         f"found none for {len(missing)} (e.g. {missing[:3]}): the embedding attack needs "
                         f"--distractors from the same reconstruction as --renders_dir")


def render_for_recognizer(path: Path) -> np.ndarray:
    """(S, S, 3) RGB uint8: the render's grey centre crop, as the landmark stage crops it."""
    grey = read_grey(path)
    return as_rgb_uint8(center_crop(grey, min(RENDER_CROP, *grey.shape[:2])))


# --------------------------------------------------------------------------- recognizers


class Recognizer:
    """One recognizer and its cache of render embeddings (key: SHA-256 of the file)."""

    def __init__(self, name: str, embedder: Any, cache_dir: Path | None, *, overwrite: bool = False) -> None:
        from faceaudit.mask.embedding_cache import EmbeddingCache

        self.name = name
        self.embedder = embedder
        self.description = {**embedder.describe(), "render_input": RENDER_INPUT}
        tag = json.dumps(self.description, sort_keys=True, default=str)
        self.cache = None if cache_dir is None else EmbeddingCache(Path(cache_dir) / f"{name}.npz", tag,
                                                                   int(getattr(embedder, "dim", 0)))
        if self.cache is not None and not overwrite:
            self.cache.load()
        self.n_embedded = self.n_from_cache = 0
        self._unsaved = False

    def embed(self, path: Path) -> tuple[EmbeddingResult, str]:
        """(result, file SHA-256) of one render; a missing or unreadable file is an InputError."""
        try:
            # every fold and every recognizer embeds the same gallery CTs: hash each once
            digest = file_digest_once(path)
        except FileNotFoundError:
            raise InputError(f"expected a render at {path}, found nothing") from None
        hit = self.cache.get(digest) if self.cache is not None else None
        if hit is not None:
            self.n_from_cache += 1
            return hit, digest
        result = self.embedder.embed(render_for_recognizer(path))
        self.n_embedded += 1
        if self.cache is not None:
            self.cache.put(digest, result)
            self._unsaved = True
        return result, digest

    def save(self) -> None:
        if self.cache is not None and self._unsaved:
            self.cache.save()
            self._unsaved = False


def prepare(names: tuple[str, ...], renders_dir: str | None, denoised_dir: str | None,
            distractors: list[LandmarkSet] | None, make: Callable[[str], Any] | None = None
            ) -> tuple[RenderFolders | None, dict[str, Any]]:
    """(render folders, name -> embedder), checked and loaded before any work: a missing
    render folder, a distractor without a CT render, or a model missing from the cache (the
    InputError of ``faceaudit.models.cached_model``, naming `make models`) is exit 2.
    ``make`` (name -> embedder) defaults to ``faceaudit.faces.embedding.make_embedder``."""
    if not names:
        return None, {}
    folders = RenderFolders(Path(renders_dir), None if denoised_dir is None else Path(denoised_dir))
    folders.check()
    check_distractor_renders(folders, distractors)
    if make is None:
        from faceaudit.faces.embedding import make_embedder as make
    return folders, {name: make(name) for name in names}


def open_recognizers(embedders: dict[str, Any], save_dir: Path, *, overwrite: bool) -> dict[str, Recognizer]:
    """The recognizers with their caches in ``save_dir/embeddings`` (ignored with overwrite)."""
    return {n: Recognizer(n, e, Path(save_dir) / EMBEDDINGS_DIR, overwrite=overwrite) for n, e in embedders.items()}


# --------------------------------------------------------------------------- one fold


@dataclass
class EmbeddedFold:
    """One recognizer x one probe variant on one fold.

    distances : (P, G) cosine distances, NaN in rows/columns without a face.
    probe_found, gallery_found : (P,), (G,) whether the recognizer found a face.
    own_ct_found : fraction of the fold's own CT renders (all of them, with landmarks or
        not) in which it found a face.
    """

    key: str
    attack: str
    probe_variant: str
    distances: np.ndarray
    probe_found: np.ndarray
    gallery_found: np.ndarray
    own_ct_found: float
    recomputed: bool = False

    def match_fields(self) -> dict:
        """The FoldMatch fields this result sets (faceaudit.petct.matching)."""
        return {"probe_valid": self.probe_found, "gallery_valid": self.gallery_found, "attack": self.attack,
                "probe_variant": self.probe_variant, "own_gallery_detected": self.own_ct_found}


def attack_key(name: str, variant: str) -> str:
    """``embedding-<name>_<variant>``: the row label, rank column and file-name part."""
    return f"embedding-{name}_{variant}"


def _vectors(results: list[EmbeddingResult]) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float64 with NaN rows where no face was found, and the found mask."""
    found = np.array([r.found for r in results], dtype=bool)
    dim = next((len(r.vector) for r in results if r.found), 1)
    out = np.full((len(results), dim), np.nan)
    for i, r in enumerate(results):
        if r.found:
            out[i] = r.vector
    return out, found


def embedding_distances(probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(P, D) x (G, D) -> (P, G) cosine distances; NaN wherever either side has no face."""
    if not np.isfinite(probe).any() or not np.isfinite(gallery).any():
        # a side without any face (or without any image) has nothing to compare: all NaN
        return np.full((len(probe), len(gallery)), np.nan)
    return cosine_distances(probe, gallery)


def _stored_distances(path: Path, input_sha1: str, distances: np.ndarray, **arrays) -> bool:
    """Write the distances file unless it already holds these inputs' distances; whether
    it was written."""
    if path.is_file():
        try:
            if str(read_npz(path, required=("input_sha1",))["input_sha1"]) == input_sha1:
                return False
        except InputError:
            pass
    write_npz(path, distances=distances, input_sha1=np.array(input_sha1), **arrays)
    return True


def attack_fold(recognizers: dict[str, Recognizer], folders: RenderFolders, fold: int, probe: LandmarkSet,
                own_ct: LandmarkSet, gallery: LandmarkSet, *,
                distances_path: Callable[[str], Path]) -> tuple[list[EmbeddedFold], str]:
    """Rank the fold's probes against ``gallery`` with every recognizer and probe variant.

    probe : the landmark attack's probes (ids, subjects). own_ct : the fold's CTs (all ids).
    gallery : the landmark attack's gallery (CTs with landmarks + distractors).
    distances_path : key -> where the (P, G) distances go (rewritten only when changed).
    Returns the results and a SHA-1 of everything they were computed from.
    """
    fp = hashlib.sha1()
    for part in (probe.ids, probe.subjects, gallery.ids, gallery.subjects):
        fp.update("\0".join(part.tolist()).encode() + b"\1")
    results = []
    for name, rec in recognizers.items():
        try:
            ct = {i: rec.embed(folders.ct(render_id(i))) for i in dict.fromkeys([*own_ct.ids, *gallery.ids])}
            own_found = [ct[i][0].found for i in own_ct.ids]
            g_vec, g_found = _vectors([ct[i][0] for i in gallery.ids])
            fp.update(json.dumps([rec.description, sorted(d for _, d in ct.values())], default=str).encode())
            for variant in folders.probe_variants:
                embedded = [rec.embed(folders.probe(variant, fold, i)) for i in probe.ids]
                fp.update("\0".join(d for _, d in embedded).encode())
                p_vec, p_found = _vectors([r for r, _ in embedded])
                results.append(EmbeddedFold(attack_key(name, variant), f"embedding-{name}", variant,
                                            embedding_distances(p_vec, g_vec), p_found, g_found,
                                            float(np.mean(own_found)) if own_found else float("nan")))
        finally:  # what was embedded before a missing render is kept for the next run
            rec.save()
    input_sha1 = fp.hexdigest()
    for r in results:
        r.recomputed = _stored_distances(
            distances_path(r.key), f"{input_sha1}:{r.key}", r.distances, probe_ids=probe.ids,
            gallery_ids=gallery.ids, probe_subjects=probe.subjects, gallery_subjects=gallery.subjects,
            probe_valid=r.probe_found, gallery_valid=r.gallery_found)
    return results, input_sha1


def describe(recognizers: dict[str, Recognizer], folders: RenderFolders) -> dict:
    """What the embedding attack did, for summary.json and run.json."""
    return {"recognizers": {n: r.description for n, r in recognizers.items()},
            "renders_dir": str(folders.renders_dir),
            "denoised_dir": None if folders.denoised_dir is None else str(folders.denoised_dir),
            "probe_variants": list(folders.probe_variants),
            "gallery": "the landmark attack's gallery, item for item (CTs with landmarks + distractors)",
            "distance": "cosine distance (1 - cosine similarity) of the embeddings",
            "no_face": "a probe without a face is a miss; a gallery CT without a face never matches",
            "embedded": {n: r.n_embedded for n, r in recognizers.items()},
            "from_cache": {n: r.n_from_cache for n, r in recognizers.items()}}


def detection_lines(rows: list[dict]) -> list[str]:
    """One summary line per embedding attack: how often its recognizer found a face."""
    return [f"{r['align']}: a face found on {100 * r['probe_detection_rate']:.1f} % of the {r['probe']} renders, "
            f"{100 * r['gallery_detection_rate']:.1f} % of the folds' own CT renders (mean over folds)"
            for r in rows if r["attack"].startswith("embedding-") and r["k"] == rows[0]["k"]]
