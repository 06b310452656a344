"""One report a person can read, built from the stage folders under a run directory.

``python -m faceaudit.report RUN_DIR`` finds the stage outputs below RUN_DIR by the
files each stage writes (not by folder names), so it works on a user's own runs:

=====================  =========================================
stage                  recognised by
=====================  =========================================
reconstruction         ``cts/`` and ``pets/`` beside a manifest
cross-validation       ``splits.json`` and ``metrics.csv``
landmark placement     ``detection.csv``
landmark matching      ``topk.csv``
digital mask           ``selection.csv``
face recognition       ``results.csv``
=====================  =========================================

It writes ``report.html`` and ``report.md`` into RUN_DIR (mode 0600: the figures
show faces). Tables hold the numbers read from the stage outputs; the papers'
numbers stand beside them, labelled as the papers' on their data.
"""

from __future__ import annotations

import argparse
import csv
import html
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from faceaudit.report import paper_numbers as paper
from faceaudit.core.files import atomic_write_text, InputError, read_json_file
from faceaudit.core.runner import EXIT_OK, EXIT_USAGE

STAGE_SIGNATURES = {
    "reconstruction": lambda d: (d / "cts").is_dir() and (d / "pets").is_dir()
    and (d / "manifest.csv").is_file(),
    "crossval": lambda d: (d / "splits.json").is_file() and (d / "metrics.csv").is_file(),
    "placement": lambda d: (d / "detection.csv").is_file(),
    "matching": lambda d: (d / "topk.csv").is_file(),
    "digital_mask": lambda d: (d / "selection.csv").is_file(),
    "recognition": lambda d: (d / "results.csv").is_file(),
}
STAGE_TITLES = {
    "reconstruction": "Morphological reconstruction",
    "crossval": "PET-to-CT denoiser (cross-validation)",
    "placement": "Landmark placement",
    "matching": "PET-to-CT landmark matching",
    "digital_mask": "Digital mask",
    "recognition": "Face recognition attack",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
MAX_TABLE_ROWS = 60


def find_stage_dirs(run_dir: Path, *, max_depth: int = 3) -> dict[str, list[Path]]:
    """Stage name -> folders below ``run_dir`` holding that stage's outputs, sorted."""
    found: dict[str, list[Path]] = {name: [] for name in STAGE_SIGNATURES}
    run_dir = Path(run_dir)
    stack = [(run_dir, 0)]
    while stack:
        folder, depth = stack.pop()
        for name, matches in STAGE_SIGNATURES.items():
            if matches(folder):
                found[name].append(folder)
        if depth < max_depth:
            stack.extend((p, depth + 1) for p in sorted(folder.iterdir())
                         if p.is_dir() and not p.name.startswith("."))
    return {name: sorted(dirs) for name, dirs in found.items() if dirs}


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> dict:
    """A stage's JSON record, or {} when it is absent or unreadable (the report goes on)."""
    try:
        return read_json_file(path)
    except InputError:
        return {}


def _fmt(value) -> str:
    if value is None:
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "n/a"
    if number.is_integer() and abs(number) < 1e9 and "." not in str(value):
        return str(int(number))
    return f"{number:.3g}" if abs(number) < 1000 else f"{number:.0f}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    key: str
    title: str
    folder: Path
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)


def csv_table(path: Path, title: str, *, note: str = "", columns: list[str] | None = None) -> Table:
    rows = read_csv_rows(path)
    cols = columns or (list(rows[0].keys()) if rows else [])
    body = [[_fmt(r.get(c, "")) for c in cols] for r in rows[:MAX_TABLE_ROWS]]
    if len(rows) > MAX_TABLE_ROWS:
        note = (note + " " if note else "") + f"First {MAX_TABLE_ROWS} of {len(rows)} rows; all in {path.name}."
    return Table(title, cols, body, note)


def manifest_facts(folder: Path) -> list[str]:
    path = folder / "manifest.csv"
    if not path.is_file():
        return []
    rows = read_csv_rows(path)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    facts = [f"{len(rows)} items: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    failed = [r for r in rows if r.get("status") == "failed"]
    for row in failed[:5]:
        facts.append(f"failed {row.get('id')}: {row.get('reason')}")
    if len(failed) > 5:
        facts.append(f"... and {len(failed) - 5} more failed items (see manifest.csv)")
    return facts


def run_facts(folder: Path) -> list[str]:
    record = read_json(folder / "run.json")
    if not record:
        return []
    facts = []
    if record.get("seed") is not None:
        facts.append(f"seed {record['seed']}")
    if record.get("seconds") is not None:
        facts.append(f"{float(record['seconds']):.1f} s")
    return [", ".join(facts)] if facts else []


def figures_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _paper_cell(value: tuple[float, float] | None) -> str:
    return "" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"



def selection_table(path: Path) -> Table:
    """Accepted images, and rejected ones grouped by the rule that rejected them."""
    counts: dict[str, int] = {}
    for row in read_csv_rows(path):
        decision = row.get("decision") or row.get("status") or "?"
        reason = (row.get("reason") or "").strip()
        rule = reason.split()[0].rstrip(":") if reason else ""
        key = decision if decision == "accepted" or not rule else f"{decision}: {rule}"
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    rows = [[k, str(v), f"{100.0 * v / total:.1f}"] for k, v in sorted(counts.items())]
    return Table("Frontal-face selection", ["decision", "images", "%"], rows,
                 note="Every decision with its numbers: selection.csv.")


def _pct(value, std=None) -> str:
    """A fraction as a percentage, with its std when given."""
    try:
        v = 100.0 * float(value)
    except (TypeError, ValueError):
        return ""
    if math.isnan(v):
        return "n/a"
    if std in (None, ""):
        return f"{v:.1f}"
    return f"{v:.1f} ± {100.0 * float(std):.1f}"


def _rows_by(path: Path, key: str) -> dict[str, dict[str, str]]:
    return {row.get(key, ""): row for row in read_csv_rows(path)} if path.is_file() else {}


def headline_tables(stages: dict[str, list[Path]]) -> list[Table]:
    """The upstream-style tables: our numbers beside the papers', one row per variant or scenario."""
    tables = []
    for folder in stages.get("placement", []):
        det = _rows_by(folder / "detection.csv", "variant")
        place = _rows_by(folder / "placement.csv", "variant")
        rows = []
        for variant in ("ct", "pet", "pet_wavelet", "pet_unet"):
            d, p = det.get(variant), place.get(variant)
            if d is None:
                continue
            rows.append([variant, _pct(d.get("mean"), d.get("std")),
                         _paper_cell(paper.PET_DETECTION.get(variant)),
                         _pct(p.get("well_placed_mean"), p.get("well_placed_std")) if p else "",
                         _paper_cell(paper.PET_WELL_PLACED.get(variant)),
                         _fmt(p.get("median_mad_mean")) if p else ""])
        tables.append(Table("Landmarks detected and well placed, % (mean ± std over folds)",
                            ["variant", "detected (ours)", "detected (paper)", "well placed (ours)",
                             "well placed (paper)", "median MAD, % IOD (ours)"], rows,
                            note="Paper: " + paper.PET_SOURCE + ", not our data."))
    for folder in stages.get("matching", []):
        topk = read_csv_rows(folder / "topk.csv")
        ks = sorted({int(r["k"]) for r in topk if r.get("k")})
        rows = []
        for align in dict.fromkeys(r.get("align", "") for r in topk):
            by_k = {int(r["k"]): r for r in topk if r.get("align") == align}
            first = by_k[ks[0]]
            rows.append([f"{align} (ours)"] + [_pct(by_k[k].get("mean"), by_k[k].get("std")) for k in ks]
                        + [_fmt(first.get("gallery_size")), _pct(first.get("chance"))])
        for align, values in paper.PET_TOPK.items():
            rows.append([f"{align} (paper)"] + [_paper_cell(values.get(k)) for k in ks]
                        + [paper.PET_GALLERY_SIZE, "~0.9"])
        tables.append(Table("PET-to-CT identification, top-k %, mean ± std over folds",
                            ["alignment"] + [f"top-{k}" for k in ks] + ["gallery", "chance top-1 %"], rows,
                            note="A probe without landmarks counts as a miss. Paper: " + paper.PET_SOURCE
                            + ", not our data; its aligned row used per-pair ICP."))
    for folder in stages.get("recognition", []):
        rows = []
        for r in read_csv_rows(folder / "results.csv"):
            ci = f"[{_pct(r.get('rank1_ci_lo'))}, {_pct(r.get('rank1_ci_hi'))}]"
            value = paper.MASK_RANK1.get(r.get("scenario", ""))
            rows.append([r.get("scenario", ""), r.get("protocol", ""), f"{_pct(r.get('rank1'))} {ci}",
                         _pct(r.get("rank5")), _pct(r.get("rank10")), _fmt(r.get("gallery_size")),
                         _pct(r.get("chance")), _fmt(r.get("n_no_face")),
                         "" if value is None else f"{value[0]:.0f}"])
        tables.append(Table("Face recognition: rank-1 % [bootstrap 95 % CI]",
                            ["scenario", "protocol", "rank-1", "rank-5", "rank-10", "gallery", "chance %",
                             "no face found", "rank-1 (paper)"], rows,
                            note="Mask2Face = MaskOnly2Face, Mask2Mask = MaskOnly2MaskOnly; Cross* = query and "
                            "database masked by different face models. Paper: " + paper.MASK_SOURCE
                            + ", not our data. " + paper.MASK_NOTE))
    return tables


def build_sections(run_dir: Path) -> list[Section]:
    stages = find_stage_dirs(run_dir)
    sections: list[Section] = []
    headline = headline_tables(stages)
    if headline:
        sections.append(Section("headline", "Results beside the papers", run_dir, tables=headline))
    for key, folders in stages.items():
        for folder in folders:
            rel = folder.relative_to(run_dir) if folder != run_dir else Path(".")
            title = STAGE_TITLES[key] + (f" ({rel})" if len(folders) > 1 else "")
            sec = Section(key, title, folder, facts=manifest_facts(folder) + run_facts(folder))
            if key == "crossval":
                summary = folder / "summary.csv"
                sec.tables.append(csv_table(summary if summary.is_file() else folder / "metrics.csv",
                                            "MS-SSIM and PSNR of PET against CT, before and after denoising",
                                            note="Per test image: metrics.csv."))
            elif key == "placement":
                sec.tables.append(csv_table(folder / "detection.csv", "Faces detected (%)"))
                if (folder / "placement.csv").is_file():
                    sec.tables.append(csv_table(folder / "placement.csv", "Landmark error"))
            elif key == "matching":
                sec.tables.append(csv_table(folder / "topk.csv", "PET-to-CT identification, top-k"))
            elif key == "digital_mask":
                sec.tables.append(selection_table(folder / "selection.csv"))
            elif key == "recognition":
                sec.facts.append("Per-scenario numbers are in the table at the top; every column "
                                 "(rank-5/10 CIs, mean rank, failures) in results.csv.")
            sec.figures = figures_in(folder)
            sections.append(sec)
    return sections


def stage_times(run_dir: Path) -> list[tuple[str, float, float]]:
    """(stage, seconds of the run that did its work, seconds of the latest run) from the
    demo's timings.json; empty for runs made stage by stage."""
    record = read_json(run_dir / "timings.json")
    first, last = record.get("first_run", {}), record.get("last_run", {})
    return [(name, float(first.get(name, last.get(name, 0.0))), float(last.get(name, 0.0)))
            for name in dict.fromkeys(list(first) + list(last))]


def versions(run_dir: Path, sections: list[Section]) -> dict[str, str]:
    for sec in sections:
        record = read_json(sec.folder / "run.json")
        if record.get("versions"):
            return dict(record["versions"], python=record.get("python", ""))
    return {}


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:12px}img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:.5em 1em}
"""


def render_html(run_dir: Path, sections: list[Section]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>faceaudit report</title>",
           f"<style>{CSS}</style></head><body>", "<h1>faceaudit report</h1>",
           f"<p>Run folder: <code>{esc(str(run_dir.resolve()))}</code></p>",
           "<p class='warn'>This report shows faces rebuilt from scans and photos: treat it as "
           "identifiable data. Open-source recognisers give a lower bound on re-identification risk, "
           "not an upper one.</p>"]
    if (run_dir / "SIMULATED.txt").is_file() or any((s.folder / "SIMULATED.txt").is_file() for s in sections):
        out.append("<p class='warn'>The PET/CT cohort in this run is <b>simulated</b> (deformed copies of "
                   "one real head CT); its numbers show the pipeline working, not a clinical result.</p>")
    times = stage_times(run_dir)
    if times:
        out.append("<h2>Time per stage</h2><table><tr><th>stage</th><th>seconds, first run</th>"
                   "<th>seconds, latest run</th></tr>")
        out += [f"<tr><td>{esc(n)}</td><td>{f:.1f}</td><td>{s:.1f}</td></tr>" for n, f, s in times]
        out.append(f"<tr><th>total</th><th>{sum(t[1] for t in times):.1f}</th>"
                   f"<th>{sum(t[2] for t in times):.1f}</th></tr></table>"
                   "<p class='note'>A re-run skips finished work, so its times are short.</p>")
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        if sec.folder != run_dir:
            out.append(f"<p class='note'>{esc(str(sec.folder.relative_to(run_dir)))}"
                       + "".join(f"<br>{esc(f)}" for f in sec.facts) + "</p>")
        for table in sec.tables:
            out.append(f"<h3>{esc(table.title)}</h3><table><tr>"
                       + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows]
            out.append("</table>")
            if table.note:
                out.append(f"<p class='note'>{esc(table.note)}</p>")
        for fig in sec.figures:
            rel = os.path.relpath(fig, run_dir)
            out.append(f"<figure><img src='{esc(rel)}' alt='{esc(fig.name)}'>"
                       f"<figcaption class='note'>{esc(rel)}</figcaption></figure>")
    vers = versions(run_dir, sections)
    if vers:
        out.append("<h2>Versions</h2><p class='note'>"
                   + ", ".join(f"{esc(k)} {esc(v)}" for k, v in sorted(vers.items())) + "</p>")
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(run_dir: Path, sections: list[Section]) -> str:
    out = ["# faceaudit report", "", f"Run folder: `{run_dir.resolve()}`", "",
           "> Shows faces rebuilt from scans and photos: identifiable data.", ""]
    times = stage_times(run_dir)
    if times:
        out += ["## Time per stage", "", "| stage | seconds, first run | seconds, latest run |",
                "|---|---|---|"]
        out += [f"| {n} | {f:.1f} | {s:.1f} |" for n, f, s in times]
        out += [f"| total | {sum(t[1] for t in times):.1f} | {sum(t[2] for t in times):.1f} |", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""] + [f"- {f}" for f in sec.facts] + [""]
        for table in sec.tables:
            out += [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
                    "|" + "---|" * len(table.columns)]
            out += ["| " + " | ".join(row) + " |" for row in table.rows]
            out += (["", f"_{table.note}_"] if table.note else []) + [""]
        out += [f"![{fig.name}]({os.path.relpath(fig, run_dir)})" for fig in sec.figures] + [""]
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Build ``report.html`` and ``report.md`` in ``run_dir`` from the stage folders below it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"expected a run folder at {run_dir}, found nothing")
    sections = build_sections(run_dir)
    if not sections:
        raise ValueError(f"no stage outputs found below {run_dir} (looked for "
                         "cts/+pets/, splits.json, detection.csv, topk.csv, selection.csv, results.csv)")
    html_path = atomic_write_text(run_dir / "report.html", render_html(run_dir, sections))
    md_path = atomic_write_text(run_dir / "report.md", render_markdown(run_dir, sections))
    return html_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceaudit.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="folder holding the stage output folders")
    args = parser.parse_args(argv)
    try:
        html_path, md_path = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {html_path} and {md_path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
