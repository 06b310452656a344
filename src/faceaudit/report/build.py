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
import html
import os
import re
import sys
from pathlib import Path

from faceaudit.core.cli import run_guarded
from faceaudit.core.contracts import (
    CT_RENDERS,
    DENOISE_SUMMARY_FILE,
    DETECTION_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PET_RENDERS,
    PLACEMENT_FILE,
    RUN_FILE,
    SELECTION_FILE,
    SPLITS_FILE,
    TOPK_FILE,
)
from faceaudit.core.files import InputError, atomic_write_text
from faceaudit.core.runner import EXIT_OK, StageResult
from faceaudit.report.common import Section, Table, csv_table, figures_in, read_csv_rows, read_json
from faceaudit.report.sections_mask import (
    recognition_facts,
    recognition_figures,
    recognition_tables,
    selection_table,
)
from faceaudit.report.sections_petct import (
    gallery_growth_table,
    matching_table,
    placement_table,
    simulated_notice,
)

STAGE_SIGNATURES = {
    "reconstruction": lambda d: (d / CT_RENDERS).is_dir() and (d / PET_RENDERS).is_dir()
    and (d / MANIFEST_FILE).is_file(),
    "crossval": lambda d: (d / SPLITS_FILE).is_file() and (d / METRICS_FILE).is_file(),
    "placement": lambda d: (d / DETECTION_FILE).is_file(),
    "matching": lambda d: (d / TOPK_FILE).is_file(),
    "digital_mask": lambda d: (d / SELECTION_FILE).is_file(),
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
#: Figures the report draws itself (from the stages' CSV files), below the run folder.
FIGURE_DIR = "report_figures"


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


#: What one manifest row is, per stage (rows of other kinds are told apart by ROW_KINDS).
ROW_NOUNS = {"reconstruction": "studies", "crossval": "studies", "placement": "study placements "
             "(fold x study)", "matching": "folds", "digital_mask": "photos",
             "recognition": "images"}
#: Rows whose id says they are something else than the stage's usual item.
ROW_KINDS = ((re.compile(r"^fold\d+$"), "folds"), (re.compile(r"^fold\d+/denoiser$"), "fold denoisers"))


def row_kind(stage: str, row: dict[str, str], *, backends: int = 1) -> str:
    """What a manifest row counts: a fold, a study, an image embedded by one recognizer ..."""
    for pattern, noun in ROW_KINDS:
        if pattern.match(row.get("id", "")):
            return noun
    if stage == "recognition" and backends > 1:
        return f"images embedded by {row.get('backend') or '?'}"
    return ROW_NOUNS.get(stage, "items")


def manifest_facts(folder: Path, stage: str = "") -> list[str]:
    """Counts per status, per kind of row (a crossval manifest holds fold rows and study
    rows; a recognition manifest one row per image and recognizer), and the failed rows."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return []
    rows = read_csv_rows(path)
    backends = len({r.get("backend", "") for r in rows})
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per_status = counts.setdefault(row_kind(stage, row, backends=backends), {})
        status = row.get("status", "?")
        per_status[status] = per_status.get(status, 0) + 1
    facts = ["; ".join(f"{sum(c.values())} {kind}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
                       for kind, c in counts.items())]
    failed = [r for r in rows if r.get("status") == "failed"]
    for row in failed[:5]:
        facts.append(f"failed {row.get('id')}: {row.get('reason')}")
    if len(failed) > 5:
        facts.append(f"... and {len(failed) - 5} more failed items (see manifest.csv)")
    return facts


def run_facts(folder: Path) -> list[str]:
    record = read_json(folder / RUN_FILE)
    if not record:
        return []
    facts = []
    if record.get("seed") is not None:
        facts.append(f"seed {record['seed']}")
    if record.get("seconds") is not None:
        facts.append(f"{float(record['seconds']):.1f} s")
    return [", ".join(facts)] if facts else []


def headline_tables(stages: dict[str, list[Path]]) -> list[Table]:
    """The upstream-style tables: our numbers beside the papers', one row per variant,
    attack or scenario (one column group per recognizer)."""
    tables = [placement_table(folder) for folder in stages.get("placement", [])]
    tables += [matching_table(folder) for folder in stages.get("matching", [])]
    tables += [t for folder in stages.get("matching", [])
               for t in [gallery_growth_table(folder, stages.get("reconstruction", []))] if t]
    for folder in stages.get("recognition", []):
        tables += recognition_tables(folder)
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
            sec = Section(key, title, folder, facts=manifest_facts(folder, key) + run_facts(folder))
            if key == "crossval":
                summary = folder / DENOISE_SUMMARY_FILE
                sec.tables.append(csv_table(summary if summary.is_file() else folder / METRICS_FILE,
                                            "MS-SSIM and PSNR of PET against CT, before and after denoising",
                                            note="Per test image: metrics.csv."))
            elif key == "placement":
                sec.tables.append(csv_table(folder / DETECTION_FILE, "Faces detected (%)"))
                if (folder / PLACEMENT_FILE).is_file():
                    sec.tables.append(csv_table(folder / PLACEMENT_FILE, "Landmark error"))
            elif key == "matching":
                sec.tables.append(csv_table(folder / TOPK_FILE, "PET-to-CT identification, top-k"))
            elif key == "digital_mask":
                sec.tables.append(selection_table(folder / SELECTION_FILE))
            if key == "recognition":
                sec.facts += recognition_facts(folder)
                slug = re.sub(r"[^A-Za-z0-9]+", "_", str(rel)).strip("_") or "run"
                sec.figures = recognition_figures(folder, run_dir / FIGURE_DIR / f"roc_{slug}.png")
            else:
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
        record = read_json(sec.folder / RUN_FILE)
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


def render_html(run_dir: Path, sections: list[Section], *, simulated: str = "") -> str:
    """The report as one HTML page; ``simulated``: the sentence saying the cohort is simulated."""
    esc = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>faceaudit report</title>",
           f"<style>{CSS}</style></head><body>", "<h1>faceaudit report</h1>",
           f"<p>Run folder: <code>{esc(str(run_dir.resolve()))}</code></p>",
           ("<p class='warn'>This report shows faces rebuilt from scans and photos: treat it as "
           "identifiable data. Open-source recognisers give a lower bound on re-identification risk, "
           "not an upper one.</p>")]
    if simulated:
        out.append(f"<p class='warn'>{esc(simulated).replace('SIMULATED', '<b>SIMULATED</b>', 1)}</p>")
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


def render_markdown(run_dir: Path, sections: list[Section], *, simulated: str = "") -> str:
    out = ["# faceaudit report", "", f"Run folder: `{run_dir.resolve()}`", "",
           "> Shows faces rebuilt from scans and photos: identifiable data.", ""]
    if simulated:
        out += [f"> **{simulated}**", ""]
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
        raise InputError(f"expected a run folder at {run_dir}, found "
                         f"{'a file' if run_dir.exists() else 'nothing'}")
    sections = build_sections(run_dir)
    if not sections:
        raise InputError(f"no stage outputs found below {run_dir} (looked for {CT_RENDERS}/+{PET_RENDERS}/, "
                         f"{SPLITS_FILE}, detection.csv, topk.csv, {SELECTION_FILE}, results.csv)")
    stages = {sec.key: [] for sec in sections}
    for sec in sections:
        stages[sec.key].append(sec.folder)
    simulated = simulated_notice(run_dir, stages.get("reconstruction", []))
    html_path = atomic_write_text(run_dir / "report.html",
                                  render_html(run_dir, sections, simulated=simulated))
    md_path = atomic_write_text(run_dir / "report.md",
                                render_markdown(run_dir, sections, simulated=simulated))
    return html_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceaudit.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="folder holding the stage output folders")
    args = parser.parse_args(argv)
    return run_guarded(report_result, args.run_dir)


def report_result(run_dir: str | os.PathLike) -> StageResult:
    """:func:`write_report` as a command's result: what was written, exit 0. A folder without
    stage outputs, or one the report cannot be written into, raises (exit 2 in run_guarded)."""
    html_path, md_path = write_report(run_dir)
    return StageResult("report", Path(run_dir), {}, EXIT_OK, summary=f"wrote {html_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
