"""Pairing and loading the stage-1 renders the denoiser learns from.

Two folders of grey PNG renders (the reconstruction stage's ``cts/`` and ``pets/``) are
paired by file stem (the study id); subjects (patients) come from ``manifest.csv`` in the
folders' parent when present, else subject = id. Every pair is centre-cropped
(512 -> RENDER_CROP = 208 px upstream) and kept in memory as uint8.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from faceaudit.core.contracts import MANIFEST_FILE
from faceaudit.core.files import InputError
from faceaudit.core.images import center_crop, read_grey, to_uint8
from faceaudit.core.manifest import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    ItemResult,
    describe_exception,
    read_manifest,
)
from faceaudit.core.runner import map_items


@dataclass(frozen=True)
class RenderPair:
    """One study: its id, patient, and the CT and PET render files."""

    id: str
    subject: str
    ct_path: Path
    pet_path: Path


def pair_renders(ct_files: str | os.PathLike, pet_files: str | os.PathLike, *,
                 manifest_path: str | os.PathLike | None = None
                 ) -> tuple[list[RenderPair], list[ItemResult]]:
    """Pair ``<id>.png`` in the CT and PET folders by id.

    Returns (pairs sorted by id, problems). A study whose renders are missing is never
    dropped silently: it becomes a ``failed`` row (a side missing unexpectedly) or a
    ``skipped`` row (the reconstruction manifest already says it failed/was skipped).
    ``manifest_path`` defaults to ``Path(ct_files).parent / "manifest.csv"`` (optional file).
    """
    ct_dir, pet_dir = Path(ct_files), Path(pet_files)
    for name, folder in (("CT", ct_dir), ("PET", pet_dir)):
        if not folder.is_dir():
            raise InputError(f"expected a folder of {name} renders (*.png) at {folder}, found "
                             f"{'a file' if folder.exists() else 'nothing'}")
    if manifest_path is None:
        manifest_path = ct_dir.parent / MANIFEST_FILE
    manifest_path = Path(manifest_path)
    upstream_rows = {row["id"]: row for row in read_manifest(manifest_path)} \
        if manifest_path.is_file() else {}
    cts = {p.stem: p for p in ct_dir.glob("*.png")}
    pets = {p.stem: p for p in pet_dir.glob("*.png")}
    pairs, problems = [], []
    for item_id in sorted(set(cts) | set(pets) | set(upstream_rows)):
        row = upstream_rows.get(item_id)
        subject = (row.get("subject") or item_id) if row else item_id
        missing = [f"{name} render {folder / (item_id + '.png')}"
                   for name, folder, found in (("CT", ct_dir, cts), ("PET", pet_dir, pets))
                   if item_id not in found]
        if not missing:
            pairs.append(RenderPair(item_id, subject, cts[item_id], pets[item_id]))
            continue
        if row is not None and row.get("status") != STATUS_OK:
            reason = (f"reconstruction {row.get('status')}: {row.get('reason', '')}".strip()
                      + f"; missing {', '.join(missing)}")
            problems.append(ItemResult(item_id, subject, STATUS_SKIPPED, reason))
        else:
            problems.append(ItemResult(item_id, subject, STATUS_FAILED,
                                       f"unpaired: missing {' and '.join(missing)}"))
    return pairs, problems


def load_pair(pair: RenderPair, *, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair and centre-crop it: (ct, pet), each (crop, crop) uint8.

    Raises InputError for an unreadable file, CT/PET of different sizes, or renders
    smaller than the crop.
    """
    ct, pet = read_grey(pair.ct_path), read_grey(pair.pet_path)
    if ct.shape != pet.shape:
        raise InputError(f"size mismatch: CT {pair.ct_path} is {ct.shape[1]}x{ct.shape[0]} px, "
                         f"PET {pair.pet_path} is {pet.shape[1]}x{pet.shape[0]} px")
    if min(ct.shape) < crop:
        raise InputError(f"renders of {pair.id} are {ct.shape[1]}x{ct.shape[0]} px, smaller "
                         f"than the {crop} px crop")
    return to_uint8(center_crop(ct, crop)), to_uint8(center_crop(pet, crop))


@dataclass
class RenderSet:
    """Cropped renders in memory, indexed by id."""

    ids: list[str]
    subjects: dict[str, str]
    ct: dict[str, np.ndarray]
    pet: dict[str, np.ndarray]

    def stack(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pet, ct) uint8 arrays of shape (len(ids), crop, crop)."""
        return (np.stack([self.pet[i] for i in ids]), np.stack([self.ct[i] for i in ids]))


def load_renders(pairs: Sequence[RenderPair], *, crop: int, progress: bool = True
                 ) -> tuple[RenderSet, list[ItemResult]]:
    """Load every pair; one bad file becomes a ``failed`` row, the rest load."""
    data = RenderSet([], {}, {}, {})
    problems = []
    for pair, result, error in map_items(partial(load_pair, crop=crop), pairs,
                                         desc="load renders", progress=progress):
        if error is not None:
            problems.append(ItemResult(pair.id, pair.subject, STATUS_FAILED,
                                       describe_exception(error)))
            continue
        data.ids.append(pair.id)
        data.subjects[pair.id] = pair.subject
        data.ct[pair.id], data.pet[pair.id] = result
    data.ids.sort()
    return data, problems

