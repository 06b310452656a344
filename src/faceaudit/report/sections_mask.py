"""The photo part of the report: frontal-face selection, and the face-recognition attack with
every scenario per recognizer side by side (closed set, open set, ROC)."""

from __future__ import annotations

import math
from pathlib import Path

from faceaudit.core.files import atomic_write_bytes
from faceaudit.core.ranking import OPEN_SET_FARS
from faceaudit.mask.evaluation import far_key
from faceaudit.mask.recognition_output import RANK_CI_METHOD
from faceaudit.mask.selection import ACCEPTED, reason_code
from faceaudit.report import paper_numbers as paper
from faceaudit.report.common import Table, figures_in, fmt, pct, read_csv_rows, read_json

#: The false-accept rates of the open-set columns and their results.csv suffix (tar_at_far_<key>).
FARS = tuple((far, far_key(far)) for far in OPEN_SET_FARS)


def selection_table(path: Path) -> Table:
    """Accepted images, and rejected ones grouped by the rule that rejected them (the
    reason's code: "no face", "face too small", "yaw" ...)."""
    counts: dict[str, int] = {}
    for row in read_csv_rows(path):
        decision = row.get("decision") or row.get("status") or "?"
        reason = (row.get("reason") or "").strip()
        rule = reason_code(reason) if reason else ""
        key = decision if decision == ACCEPTED or not rule else f"{decision}: {rule}"
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    rows = [[k, str(v), f"{100.0 * v / total:.1f}"] for k, v in sorted(counts.items())]
    return Table("Frontal-face selection", ["decision", "images", "%"], rows,
                 note="Every decision with its numbers: selection.csv.")


class RecognitionRun:
    """One face-recognition folder as the report reads it: results.csv rows per recognizer
    (``backend`` column; none in old runs) and where each recognizer's files are."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.rows = read_csv_rows(self.folder / "results.csv")
        self.backends = list(dict.fromkeys(r.get("backend", "") for r in self.rows))
        self.scenarios = list(dict.fromkeys(r.get("scenario", "") for r in self.rows))
        self.by_key = {(r.get("backend", ""), r.get("scenario", "")): r for r in self.rows}
        record = read_json(self.folder / "results.json")
        self.outputs = {b.get("name", ""): b.get("outputs", ".") for b in record.get("backends", [])
                        if isinstance(b, dict)}

    def backend_dir(self, backend: str) -> Path:
        """A recognizer's distances/CMC/ROC folder: results.json says; else the layout rule
        (the folder itself with one recognizer, <backend>/ with several)."""
        if backend in self.outputs:
            return self.folder / self.outputs[backend]
        return self.folder / backend if len(self.backends) > 1 and backend else self.folder

    def ci_label(self) -> str:
        methods = {r.get("rank_ci_method", "") for r in self.rows}
        return "Wilson 95 % CI" if methods == {RANK_CI_METHOD} else "95 % CI"

    def has_open_set(self) -> bool:
        return bool(self.rows) and "tar_at_far_1pct" in self.rows[0]


def _group(backend: str, label: str, several: bool) -> str:
    return f"{label}, {backend}" if several and backend else label


def recognition_tables(folder: Path) -> list[Table]:
    """Closed set (rank-k with the rank-1 interval) and open set (TAR at FAR 1 % and 0.1 %,
    with the pair counts): one row per scenario, one column group per recognizer."""
    fr = RecognitionRun(folder)
    if not fr.rows:
        return []
    several = len(fr.backends) > 1
    ci = fr.ci_label()
    columns = ["scenario", "protocol", "gallery", "chance %"]
    for b in fr.backends:
        columns += [_group(b, f"rank-1 % [{ci}]", several), _group(b, "rank-5 %", several),
                    _group(b, "rank-10 %", several), _group(b, "no face found", several)]
    rows = []
    for name in fr.scenarios:
        first = next(fr.by_key[b, name] for b in fr.backends if (b, name) in fr.by_key)
        row = [name, first.get("protocol", ""), fmt(first.get("gallery_size")),
               pct(first.get("chance"))]
        for b in fr.backends:
            r = fr.by_key.get((b, name), {})
            interval = f"[{pct(r.get('rank1_ci_lo'))}, {pct(r.get('rank1_ci_hi'))}]" if r else ""
            row += [f"{pct(r.get('rank1'))} {interval}".strip(), pct(r.get("rank5")),
                    pct(r.get("rank10")), fmt(r.get("n_no_face"))]
        value = paper.MASK_RANK1.get(name)
        rows.append(row + ["" if value is None else f"{value[0]:.0f}"])
    recognizers = ", ".join(b for b in fr.backends if b) or "recognizer not recorded"
    tables = [Table(f"Face recognition: rank-1 % [{ci}] and rank-k per recognizer ({recognizers}), "
                    "closed set", columns + ["rank-1 (paper)"], rows,
                    note="Mask2Face = MaskOnly2Face, Mask2Mask = MaskOnly2MaskOnly; Cross* = query "
                    "and database masked by different face models. gallery: database images; "
                    "chance: top-1 of a random order. Paper: " + paper.MASK_SOURCE
                    + ", not our data. " + paper.MASK_NOTE)]
    if fr.has_open_set():
        tables.append(_open_set_table(fr, several))
    return tables


def _open_set_table(fr: RecognitionRun, several: bool) -> Table:
    columns = ["scenario"]
    for b in fr.backends:
        columns += [_group(b, f"TAR % at FAR {100 * far:g} %", several) for far, _ in FARS]
    columns += ["genuine pairs", "impostor pairs"]
    rows, notes = [], []
    for name in fr.scenarios:
        found = [fr.by_key[b, name] for b in fr.backends if (b, name) in fr.by_key]
        row = [name]
        for b in fr.backends:
            r = fr.by_key.get((b, name), {})
            row += [pct(r.get(f"tar_at_far_{key}")) for _, key in FARS]
        row += [" / ".join(dict.fromkeys(fmt(r.get(c)) for r in found))
                for c in ("n_genuine_pairs", "n_impostor_pairs")]
        rows.append(row)
        notes += [f"{name}: {r['open_set_note']}" for r in found if r.get("open_set_note")]
    note = ("True-accept rate at the distance threshold that accepts at most 1 % (0.1 %) of the "
            "impostor pairs (query and database image of different people); genuine pairs: same "
            "person. A fixed threshold would mislead: on mask-to-mask pairs every distance falls "
            "under dlib's usual 0.6.")
    if notes:
        note += " n/a: " + "; ".join(dict.fromkeys(notes)) + "."
    return Table("Face recognition, open set: would an attacker be confident?", columns, rows,
                 note=note)


def recognition_figures(folder: Path, roc_path: Path) -> list[Path]:
    """The ROC of every recognizer side by side, drawn from their roc.csv into
    ``roc_path``, then each recognizer's CMC and the folder's other figures (the
    stage's own roc.png files are left out: the drawn figure shows the same curves)."""
    fr = RecognitionRun(folder)
    figures = []
    roc = draw_roc(fr, roc_path)
    if roc is not None:
        figures.append(roc)
    for b in fr.backends:
        cmc = fr.backend_dir(b) / "cmc.png"
        if cmc.is_file():
            figures.append(cmc)
    return figures + [p for p in figures_in(fr.folder) if p.name not in ("roc.png", "cmc.png")]


def draw_roc(fr: RecognitionRun, path: Path) -> Path | None:
    """One panel per recognizer: TAR vs FAR (log axis) per scenario from its roc.csv, the
    FARs of the open-set columns and the chance line; None when no roc.csv is there."""
    curves = {}
    for b in fr.backends:
        csv_path = fr.backend_dir(b) / "roc.csv"
        if csv_path.is_file():
            curves[b] = read_csv_rows(csv_path)
    if not curves:
        return None
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from faceaudit.core.figures import figure_png

    impostors = [float(r.get("n_impostor_pairs") or 0) for r in fr.rows]
    floor = min([1e-4] + [0.5 / n for n in impostors if n > 0])
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves) + 2.4, 4.4), dpi=110,
                             sharey=True, squeeze=False)
    for ax, (backend, rows) in zip(axes[0], curves.items()):
        for name in dict.fromkeys(r["scenario"] for r in rows):
            points = [(max(float(r["far"]), floor), 100 * float(r["tar"]))
                      for r in rows if r["scenario"] == name]
            if len(points) > 1:
                ax.step(*zip(*points), where="post", label=name,
                        ls="--" if name.startswith("Cross") else "-")
        for far, _ in FARS:
            ax.axvline(far, color="grey", ls=":", lw=0.8)
        chance = np.logspace(np.log10(floor), 0, 50)   # TAR = FAR bends on a log FAR axis
        ax.plot(chance, 100 * chance, ":", color="grey", label="chance (TAR = FAR)")
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(0, 101)
        ax.set_xlabel("false-accept rate (impostor pairs accepted)")
        ax.set_title(f"ROC, {backend or 'recognizer not recorded'}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("true-accept rate (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return atomic_write_bytes(path, figure_png(fig))


def recognition_facts(folder: Path) -> list[str]:
    fr = RecognitionRun(folder)
    named = [b for b in fr.backends if b]
    facts = [f"Recognizers: {', '.join(named)}; every scenario per recognizer in the tables at the "
             "top, every column (rank-5/10 intervals, mean rank, rank-1 minus Face2Face, "
             "thresholds) in results.csv." if named else
             "Per-scenario numbers are in the tables at the top; every column in results.csv."]
    for b in named:
        where = fr.backend_dir(b)
        if where != fr.folder:
            facts.append(f"{b}: distances, CMC and ROC in {where.name}/")
    if any(math.isnan(_num(r.get("tar_at_far_1pct"))) for r in fr.rows if fr.has_open_set()):
        facts.append("n/a in the open-set table: too few impostor pairs to measure that rate.")
    return facts


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
