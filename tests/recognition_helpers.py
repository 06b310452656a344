"""Test-only helpers of the face-recognition stage: Face2Face over a plain photo folder."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faceaudit.core.files import InputError
from faceaudit.mask.embedding_cache import EmbedConfig, embed_images
from faceaudit.mask.evaluation import ScenarioResult, evaluate_scenario
from faceaudit.mask.scenarios import SCENARIOS, ImageRef
from faceaudit.mask.selection import IMAGE_EXTENSIONS


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
