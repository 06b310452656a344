"""The query/database scenarios of the face-recognition attack and the mask run they read.

A digital-mask run folder (``DM/manifest.csv``: one row per selected photo with role
``database|query`` and the relative paths of its ``prep``, ``overlay``, ``mask_only`` and
``mask_only_black`` 224x224 PNGs) is read into a :class:`MaskRun`; a :class:`Scenario`
names which image variant is the query and which the database, and
:meth:`MaskRun.refs` lists the images one side of a scenario needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from faceaudit.core.files import InputError, read_json_file
from faceaudit.core.manifest import STATUS_OK, STATUS_SKIPPED, read_manifest
from faceaudit.mask.digital_mask import VARIANTS

ROLES = ("database", "query")
DM_COLUMNS = ("role", *VARIANTS)


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
    # a mask a re-run of stage 5 kept unchanged is "skipped": its files are as good as new
    ok = [r for r in rows if r["status"] in (STATUS_OK, STATUS_SKIPPED)]
    bad_roles = sorted({r["role"] for r in ok} - set(ROLES))
    if bad_roles:
        raise InputError(f"{folder / 'manifest.csv'}: role must be database or query, "
                         f"found {bad_roles}")
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


def same_database_photos(masks: MaskRun, cross: MaskRun) -> dict[str, int]:
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

