"""The PET/CT part of the report: landmark tables beside the paper, the attacks of stage 4,
and whether the cohort is simulated."""

from __future__ import annotations

import re
from pathlib import Path

from faceaudit.core.contracts import (
    DETECTION_FILE,
    GALLERY_GROWTH_FILE,
    PLACEMENT_FILE,
    RUN_FILE,
    TOPK_FILE,
)
from faceaudit.report import paper_numbers as paper
from faceaudit.report.common import (
    Table,
    fmt,
    paper_cell,
    pct,
    read_csv_rows,
    read_json,
    rows_by,
)

SIMULATED_MARKER = "SIMULATED.txt"
#: The cohort README's wording when the faces come from real face shapes (demo.cohort).
FACE_SHAPES = re.compile(r"simulated from (\d+) real face shapes", re.IGNORECASE)
#: The two top-k columns the headline shows per attack (every k is in the stage's table).
HEADLINE_KS = (1, 5)


def placement_table(folder: Path) -> Table:
    """Detection and well-placed rates per image variant, beside the paper's."""
    det = rows_by(folder / DETECTION_FILE, "variant")
    place = rows_by(folder / PLACEMENT_FILE, "variant")
    rows = []
    for variant in ("ct", "pet", "pet_wavelet", "pet_unet"):
        d, p = det.get(variant), place.get(variant)
        if d is None:
            continue
        rows.append([variant, pct(d.get("mean"), d.get("std")),
                     paper_cell(paper.PET_DETECTION.get(variant)),
                     pct(p.get("well_placed_mean"), p.get("well_placed_std")) if p else "",
                     paper_cell(paper.PET_WELL_PLACED.get(variant)),
                     fmt(p.get("median_mad_mean")) if p else ""])
    return Table("Landmarks detected and well placed, % (mean ± std over folds)",
                 ["variant", "detected (ours)", "detected (paper)", "well placed (ours)",
                  "well placed (paper)", "median MAD, % IOD (ours)"], rows,
                 note="Paper: " + paper.PET_SOURCE + ", not our data.")


def matching_table(folder: Path) -> Table:
    """PET-to-CT top-k: one row per attack (landmark distances per alignment, and each
    recognizer on the renders) when topk.csv has an ``attack`` column, else per alignment."""
    topk = read_csv_rows(folder / TOPK_FILE)
    if topk and "attack" in topk[0]:
        return _attack_table(topk)
    ks = sorted({int(r["k"]) for r in topk if r.get("k")})
    rows = []
    for align in dict.fromkeys(r.get("align", "") for r in topk):
        by_k = {int(r["k"]): r for r in topk if r.get("align") == align}
        first = by_k[ks[0]]
        rows.append([f"{align} (ours)"] + [pct(by_k[k].get("mean"), by_k[k].get("std")) for k in ks]
                    + [fmt(first.get("gallery_size")), pct(first.get("chance"))])
    for align, values in paper.PET_TOPK.items():
        rows.append([f"{align} (paper)"] + [paper_cell(values.get(k)) for k in ks]
                    + [paper.PET_GALLERY_SIZE, "~0.9"])
    return Table("PET-to-CT identification, top-k %, mean ± std over folds",
                 ["alignment"] + [f"top-{k}" for k in ks] + ["gallery", "chance top-1 %"], rows,
                 note="A probe without landmarks counts as a miss. Paper: " + paper.PET_SOURCE
                 + ", not our data; its aligned row used per-pair ICP.")


def _pooled(row: dict[str, str]) -> str:
    """Pooled top-k with its Wilson 95 % interval, e.g. "22.2 [10.6, 40.8]"."""
    if not row.get("pooled_n") or row.get("pooled_topk") in (None, "", "nan"):
        return ""
    return f"{pct(row.get('pooled_topk'))} [{pct(row.get('ci_lo'))}, {pct(row.get('ci_hi'))}]"


def _attack_table(topk: list[dict[str, str]]) -> Table:
    ks = [k for k in HEADLINE_KS if any(r.get("k") and int(r["k"]) == k for r in topk)]
    pooled = "ci_lo" in topk[0]     # topk.csv of an older run has no pooled interval
    rows = []
    for key in dict.fromkeys(r.get("align", "") for r in topk):
        by_k = {int(r["k"]): r for r in topk if r.get("align") == key and r.get("k")}
        if not by_k:
            continue
        first = next(iter(by_k.values()))
        cells = []
        for k in ks:
            r = by_k.get(k, {})
            cells += [pct(r.get("mean"), r.get("std"))] + ([_pooled(r)] if pooled else []) + [pct(r.get("chance"))]
        rows.append([first.get("attack", ""), first.get("probe", "")] + cells
                    + [fmt(first.get("gallery_size")), pct(first.get("probe_detection_rate"))])
    for align, values in paper.PET_TOPK.items():
        cells = []
        for k in ks:
            cells += [paper_cell(values.get(k))] + ([""] if pooled else []) + ["~0.9" if k == 1 else ""]
        rows.append([f"landmarks-{align} (paper)", "pet"] + cells + [paper.PET_GALLERY_SIZE, ""])
    columns = ["attack", "probe"]
    for k in ks:
        columns += [f"top-{k} %"] + ([f"top-{k} % pooled [Wilson 95 % CI]"] if pooled else []) + [f"chance top-{k} %"]
    return Table("PET-to-CT identification by attack (landmark distances per alignment; face "
                 "recognizers on the renders), top-k %, mean ± std over folds",
                 columns + ["gallery", "probes with features %"], rows,
                 note="Every attack faces the same probes and gallery per fold. A probe without "
                 "landmarks (for a recognizer: without a face) counts as a miss; 'probes with "
                 "features' is the share that had them. Pooled: hits over all probes of all folds, "
                 "with its Wilson 95 % interval. Every k and fold: topk.csv. Paper: "
                 + paper.PET_SOURCE + ", not our data; its aligned row used per-pair ICP.")


def gallery_growth_table(folder: Path, reconstruction_dirs: list[Path]) -> Table | None:
    """How identification falls as the gallery grows (gallery_growth.csv): top-1 and top-5
    with chance per attack and gallery size; None when the stage wrote no such table."""
    path = folder / GALLERY_GROWTH_FILE
    growth = read_csv_rows(path) if path.is_file() else []   # an older run wrote none
    if not growth:
        return None
    rows = [[r.get("attack", ""), r.get("probe", ""),
             fmt(r.get("gallery_size")) + (" (full)" if r.get("gallery") == "full" else ""),
             pct(r.get("top1")), pct(r.get("chance_top1")), pct(r.get("top5")), pct(r.get("chance_top5"))]
            for r in growth]
    simulated = simulated_cohorts(folder.parent, reconstruction_dirs)
    cohort = ("This run's PET/CT cohort is SIMULATED: these numbers show the method on simulated "
              "patients, not a clinical re-identification risk. " if simulated else "")
    return Table("How identification falls as the gallery grows: top-k % over all probes of all folds, "
                 "beside chance",
                 ["attack", "probe", "gallery", "top-1 %", "chance top-1 %", "top-5 %", "chance top-5 %"], rows,
                 note=cohort + "Each probe's gallery is its true match(es) plus randomly drawn other CTs "
                 "(distractors included) up to the size shown, averaged over random draws (seeded); "
                 "'full' is every gallery item. Chance is k / gallery. The paper's galleries: "
                 + paper.PET_GALLERY_SIZE + ". Per size: gallery_growth.csv.")


def simulated_cohorts(run_dir: Path, reconstruction_dirs: list[Path], *,
                      max_depth: int = 3) -> list[Path]:
    """Folders holding a simulated cohort's marker (``SIMULATED.txt``): below ``run_dir``,
    and the cohort each reconstruction run read (its run.json ``args.petct_path``)."""
    found = []
    stack = [(Path(run_dir), 0)]
    while stack:
        folder, depth = stack.pop()
        if (folder / SIMULATED_MARKER).is_file():
            found.append(folder)
        if depth < max_depth:
            stack.extend((p, depth + 1) for p in sorted(folder.iterdir())
                         if p.is_dir() and not p.name.startswith("."))
    for folder in reconstruction_dirs:
        args = read_json(folder / RUN_FILE).get("args") or {}
        source = Path(str(args.get("petct_path") or "")) if isinstance(args, dict) else None
        if source and str(source) not in ("", ".") and (source / SIMULATED_MARKER).is_file():
            found.append(source)
    return list(dict.fromkeys(p.resolve() for p in found))


def simulated_notice(run_dir: Path, reconstruction_dirs: list[Path]) -> str:
    """The sentence that says the PET/CT cohort is simulated (and from how many real face
    shapes, when its README says so); "" when no simulated cohort is found."""
    cohorts = simulated_cohorts(run_dir, reconstruction_dirs)
    if not cohorts:
        return ""
    where = ", ".join(_shown(p, run_dir) for p in cohorts)
    text = (f"The PET/CT cohort of this run is SIMULATED ({where}): no patient data; its numbers "
            "show the pipeline working, not a clinical result.")
    shapes = sorted({m.group(1) for p in cohorts for m in [FACE_SHAPES.search(_readme(p))] if m})
    if shapes:
        text += (f" Its faces are simulated from {' / '.join(shapes)} real face shapes, as the "
                 "cohort's README.md says.")
    return text


def _readme(folder: Path) -> str:
    for name in ("README.md", SIMULATED_MARKER):
        try:
            return (folder / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
    return ""


def _shown(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)
