"""What the face-recognition stage writes and prints: results.csv/json, distances, CMC, table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from faceaudit.core import ranking
from faceaudit.core.figures import figure_png, new_axes
from faceaudit.core.files import atomic_write_bytes, write_csv, write_json, write_npz
from faceaudit.core.stats import LEVEL
from faceaudit.faces.embedding import BACKENDS
from faceaudit.mask.evaluation import ScenarioResult, far_key
from faceaudit.mask.scenarios import MaskRun

RESULT_COLUMNS = ("scenario", "protocol", "rank1", "rank1_ci_lo", "rank1_ci_hi", "rank5",
                  "rank10", "mean_rank", "n_queries", "gallery_size", "chance", "n_no_face")
EXTRA_RESULT_COLUMNS = ("rank5_ci_lo", "rank5_ci_hi", "rank10_ci_lo", "rank10_ci_hi",
                        "chance5", "chance10", "median_rank", "n_gallery_subjects",
                        "n_no_face_gallery", "n_failed", "n_unpaired_queries", "query",
                        "database", "cross_mask", "backend", "rank_ci_method", "mean_rank_ci_lo",
                        "mean_rank_ci_hi", "reference", "rank1_diff_vs_ref", "rank1_diff_ci_lo",
                        "rank1_diff_ci_hi", "n_paired_ref", "tar_at_far_1pct", "tar_at_far_0.1pct",
                        "threshold_at_far_1pct", "threshold_at_far_0.1pct", "n_genuine_pairs",
                        "n_impostor_pairs", "open_set_note")
ROC_COLUMNS = ("scenario", "far", "tar", "threshold")
#: What the threshold columns mean. One rule everywhere: a pair is accepted when its cosine
#: distance is strictly below the threshold (faceaudit.core.ranking.tar_at_far, roc_points).
CSV_COLUMN_DOCS = {
    "results.csv tar_at_far_1pct, tar_at_far_0.1pct":
        "share of genuine pairs (same identity) whose distance < threshold_at_far_*",
    "results.csv threshold_at_far_1pct, threshold_at_far_0.1pct":
        "the (floor(FAR x impostor pairs) + 1)-th smallest impostor distance: pairs with a "
        "distance < it are accepted, so at most that share of impostor pairs is",
    "roc.csv far, tar, threshold":
        "shares of impostor and genuine pairs with distance < threshold; one row per distinct "
        "distance, then threshold inf (every pair with a face accepted)",
}
#: How the rank-k intervals (rank{k}_ci_lo/hi) are computed, as results.csv states it.
RANK_CI_METHOD = f"wilson score {100 * LEVEL:g}%"


class RecognizerRun(Protocol):
    """One recognizer's results as the writers need them (``recognition.BackendRun``)."""

    backend: str
    results: list[ScenarioResult]
    detection: dict[str, Any]


def result_rows(results: Sequence[ScenarioResult], *, backend: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = {"scenario": r.name, "protocol": r.protocol, **r.metrics, "query": r.query,
               "database": r.database, "cross_mask": int(r.cross), "backend": backend,
               "rank_ci_method": RANK_CI_METHOD}
        rows.append({c: row.get(c, "") for c in RESULT_COLUMNS + EXTRA_RESULT_COLUMNS})
    return rows


def _json_row(row: Mapping[str, Any], result: ScenarioResult) -> dict[str, Any]:
    return {**row, "cmc": result.cmc.tolist(),
            "queries": [{"id": i, "subject": s, "rank": int(k)} for i, s, k in
                        zip(result.query_ids, result.query_subjects, result.ranks)]}


def backend_dir(save_dir: Path, backend: str, *, several: bool) -> Path:
    """Where one recognizer's distances, CMC and ROC go: save_dir itself with one recognizer
    (the one-backend layout), save_dir/<backend> with several."""
    return Path(save_dir) / backend if several else Path(save_dir)


#: What write_backend_files writes into a recognizer's folder.
BACKEND_FILES = ("cmc.png", "roc.csv", "roc.png")


def write_results(save_dir: Path, runs: Sequence[RecognizerRun],
                  records: Sequence[Mapping[str, Any]] = ()) -> None:
    """results.csv / results.json (one row per recognizer x scenario) in ``save_dir``, and
    per recognizer distances/<scenario>.npz, cmc.png, roc.csv and roc.png in
    :func:`backend_dir`. ``records``: what results.json says of each recognizer (its
    embedder description, model SHA-256, ...), in the order of ``runs``."""
    save_dir = Path(save_dir)
    several = len(runs) > 1
    rows, scenarios = [], []
    for run in runs:
        these = result_rows(run.results, backend=run.backend)
        rows += these
        scenarios += [_json_row(row, r) for row, r in zip(these, run.results)]
    write_csv(save_dir / "results.csv", rows, RESULT_COLUMNS + EXTRA_RESULT_COLUMNS)
    record: dict[str, Any] = {"backends": [dict(rec) for rec in records]
                              or [{"name": run.backend, "detection": dict(run.detection)}
                                  for run in runs]}
    if not several:     # the one-backend layout's keys, kept
        record.update(backend=runs[0].backend, detection=dict(runs[0].detection or {}))
    record["scenarios"] = scenarios
    write_json(save_dir / "results.json", record)
    remove_stale_outputs(save_dir, runs)
    for run in runs:
        write_backend_files(backend_dir(save_dir, run.backend, several=several), run.results,
                            backend=run.backend)


def remove_stale_outputs(save_dir: Path, runs: Sequence[RecognizerRun]) -> None:
    """Remove what an earlier run into ``save_dir`` wrote and this run does not: the files of
    a recognizer layout not used now (the one-backend files in save_dir when there are
    several, ``<recognizer>/`` folders of recognizers not in this run, all of them when
    there is one) and ``distances/<scenario>.npz`` of scenarios not in this run. Only the
    stage's own file names inside save_dir go; a folder left holding anything else stays.
    The embedding caches (``embeddings/``) stay: they are keyed by content and model."""
    save_dir = Path(save_dir)
    several = len(runs) > 1
    now = {run.backend for run in runs} if several else set()
    if several:     # a one-backend run's files left here would read as this run's
        _remove_backend_files(save_dir)
    for name in BACKENDS:
        folder = save_dir / name
        if name not in now and folder.is_dir() and not folder.is_symlink():
            _remove_backend_files(folder)
            _remove_if_empty(folder)
    for run in runs:
        keep = {f"{r.name}.npz" for r in run.results}
        distances = backend_dir(save_dir, run.backend, several=several) / "distances"
        if distances.is_dir() and not distances.is_symlink():
            for path in distances.glob("*.npz"):
                if path.name not in keep:
                    path.unlink()


def write_backend_files(folder: Path, results: Sequence[ScenarioResult], *,
                        backend: str = "") -> None:
    """One recognizer's distances/<scenario>.npz, cmc.png, roc.csv and roc.png."""
    for r in results:
        write_npz(folder / "distances" / f"{r.name}.npz",
                  query_ids=np.array(r.query_ids, dtype=str),
                  query_subjects=np.array(r.query_subjects, dtype=str),
                  gallery_ids=np.array(r.gallery_ids, dtype=str),
                  gallery_subjects=np.array(r.gallery_subjects, dtype=str),
                  distances=r.distances, ranks=r.ranks)
    atomic_write_bytes(folder / "cmc.png", plot_cmc(results, backend=backend))
    write_csv(folder / "roc.csv", roc_rows(results), ROC_COLUMNS)
    atomic_write_bytes(folder / "roc.png", plot_roc(results, backend=backend))


def _remove_backend_files(folder: Path) -> None:
    for name in BACKEND_FILES:
        (folder / name).unlink(missing_ok=True)
    distances = folder / "distances"
    if distances.is_dir() and not distances.is_symlink():
        for path in distances.glob("*.npz"):
            path.unlink()
        _remove_if_empty(distances)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:     # holds something the stage did not write: left alone
        pass


def roc_rows(results: Sequence[ScenarioResult]) -> list[dict[str, Any]]:
    """roc.csv: per scenario, the ROC of "accept when the distance < threshold" over the
    query/database pairs (genuine: same identity, impostor: different identities); see
    CSV_COLUMN_DOCS."""
    rows = []
    for r in results:
        genuine, impostor = ranking.genuine_impostor_distances(r.distances, r.query_subjects,
                                                               r.gallery_subjects)
        for far, tar, threshold in zip(*ranking.roc_points(genuine, impostor)):
            rows.append({"scenario": r.name, "far": float(far), "tar": float(tar),
                         "threshold": float(threshold)})
    return rows


def plot_roc(results: Sequence[ScenarioResult], *, backend: str = "") -> bytes:
    """ROC curves (true-accept vs false-accept rate, log FAR axis), one per scenario; PNG."""
    fig, ax = new_axes(figsize=(9.5, 4.8), dpi=120)
    floor = 1e-4
    for r in results:
        genuine, impostor = ranking.genuine_impostor_distances(r.distances, r.query_subjects,
                                                               r.gallery_subjects)
        if not genuine.size or not impostor.size:
            continue
        far, tar, _ = ranking.roc_points(genuine, impostor)
        floor = min(floor, 0.5 / impostor.size)
        ax.step(np.maximum(far, floor), 100 * tar, where="post", ls="--" if r.cross else "-",
                label=f"{r.name} ({genuine.size} genuine / {impostor.size} impostor pairs)")
    for far in ranking.OPEN_SET_FARS:
        ax.axvline(far, color="grey", ls=":", lw=0.8)
    chance = np.logspace(np.log10(floor), 0, 50)
    ax.plot(chance, 100 * chance, ":", color="grey", label="chance (TAR = FAR)")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 101)
    ax.set_xlabel("false-accept rate (impostor pairs accepted)")
    ax.set_ylabel("true-accept rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Face recognition on masked photos: open-set ROC"
                 + (f" ({backend})" if backend else ""))
    return figure_png(fig)


def plot_cmc(results: Sequence[ScenarioResult], *, max_rank: int = 20, backend: str = "") -> bytes:
    """CMC curves (top-k accuracy vs k), one line per scenario, chance dashed; PNG bytes."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(figsize=(9.5, 4.8), dpi=120)
    shown = 1
    for r in results:
        n = min(max_rank, len(r.cmc))
        if n == 0:
            continue
        shown = max(shown, n)
        style = "--" if r.cross else "-"
        ax.plot(np.arange(1, n + 1), 100 * r.cmc[:n], style, marker="o", ms=3,
                label=f"{r.name} (n={len(r.ranks)})")
    if results:
        g = max(r.metrics["gallery_size"] for r in results) or 1
        ks = np.arange(1, shown + 1)
        ax.plot(ks, 100 * np.minimum(ks, g) / g, ":", color="grey", label=f"chance (G={g})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("top-k identification (%)")
    ax.set_ylim(0, 101)
    ax.set_xlim(0.5, shown + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Face recognition on masked photos: CMC" + (f" ({backend})" if backend else ""))
    return figure_png(fig)


def format_table(results: Sequence[ScenarioResult], *, backend: str,
                 masks: MaskRun | None = None, n_boot: int | None = None) -> str:
    """A plain-text table: scenario, rank-1 [Wilson 95 % CI], rank-5, rank-10, mean rank,
    n, G, chance, no face, and rank-1 minus the reference scenario's [Newcombe 95 % CI]."""
    ref = next((r.metrics.get("reference") for r in results if r.metrics.get("reference")), "")
    head = (f"{'scenario':<34} {'rank-1 [95% CI]':>24} {'rank-5':>7} {'rank-10':>7} "
            f"{'mean rk':>7} {'n':>5} {'G':>5} {'chance':>7} {'no face':>7}"
            + (f" {'rank-1 - ' + ref + ' [95% CI]':>34}" if ref else ""))
    lines = []
    if masks is not None:
        lines.append(f"face recognition ({backend}) on {masks.folder} "
                     f"(mask backend {masks.backend}, protocol {masks.protocol})")
    lines += [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        ci = f"{_pct(m['rank1'])} [{_pct(m['rank1_ci_lo'])}, {_pct(m['rank1_ci_hi'])}]"
        line = (f"{r.name:<34} {ci:>24} {_pct(m['rank5']):>7} {_pct(m['rank10']):>7} "
                f"{m['mean_rank']:>7.2f} {m['n_queries']:>5d} {m['gallery_size']:>5d} "
                f"{_pct(m['chance']):>7} {m['n_no_face']:>7d}")
        if ref and r.name == ref:
            line += f" {'(reference)':>34}"
        elif ref:
            diff = (f"{_pts(m.get('rank1_diff_vs_ref'))} [{_pts(m.get('rank1_diff_ci_lo'))}, "
                    f"{_pts(m.get('rank1_diff_ci_hi'))}]")
            line += f" {diff:>34}"
        lines.append(line)
    lines += ["", open_set_table(results)]
    boot = f" ({n_boot} resamples)" if n_boot else ""
    lines.append(f"intervals: rank-k {RANK_CI_METHOD} (binomial); difference to "
                 f"{ref or 'the reference scenario'}: Newcombe paired score (same query photos); "
                 f"mean rank (in results.csv): percentile bootstrap{boot}")
    return "\n".join(lines)


def format_side_by_side(by_backend: Mapping[str, Sequence[ScenarioResult]], *,
                        masks: MaskRun | None = None, n_boot: int | None = None) -> str:
    """Several recognizers on the same scenarios: one line per scenario, its n, G and chance,
    then one column group per recognizer (rank-1 [Wilson 95 % CI], rank-5, TAR at FAR 1 %
    and 0.1 %, no face), so the strongest attacker shows at a glance."""
    names = list(by_backend)
    metrics = {b: {r.name: r.metrics for r in rs} for b, rs in by_backend.items()}
    scenarios = list(dict.fromkeys(r.name for rs in by_backend.values() for r in rs))
    cells = (f"{'rank-1 [95% CI]':>24} {'rank-5':>7} "
             + " ".join(f"{'TAR@' + f'{100 * f:g}%':>9}" for f in ranking.OPEN_SET_FARS)
             + f" {'no face':>7}")
    width = len(cells)
    lead = f"{'':<34} {'':>5} {'':>5} {'':>7}"
    groups = lead + "".join(f" | {name:^{width}}" for name in names)
    head = (f"{'scenario':<34} {'n':>5} {'G':>5} {'chance':>7}"
            + "".join(f" | {cells}" for _ in names))
    lines = []
    if masks is not None:
        lines.append(f"face recognition ({', '.join(names)}) on {masks.folder} "
                     f"(mask backend {masks.backend}, protocol {masks.protocol})")
    lines += [groups, head, "-" * len(head)]
    for name in scenarios:
        first = next(metrics[b][name] for b in names if name in metrics[b])
        line = (f"{name:<34} {first['n_queries']:>5d} {first['gallery_size']:>5d} "
                f"{_pct(first['chance']):>7}")
        for b in names:
            m = metrics[b].get(name)
            if m is None:
                line += f" | {'':>{width}}"
                continue
            ci = f"{_pct(m['rank1'])} [{_pct(m['rank1_ci_lo'])}, {_pct(m['rank1_ci_hi'])}]"
            tars = " ".join(f"{_pct(m.get(f'tar_at_far_{far_key(f)}')):>9}"
                            for f in ranking.OPEN_SET_FARS)
            line += f" | {ci:>24} {_pct(m['rank5']):>7} {tars} {m['n_no_face']:>7d}"
        lines.append(line)
    pairs = {(m.get("n_genuine_pairs", 0), m.get("n_impostor_pairs", 0))
             for b in names for m in metrics[b].values()}
    lines.append("open set: TAR@FAR = true-accept rate at a false-accept rate of "
                 + " / ".join(f"{100 * f:g}%" for f in ranking.OPEN_SET_FARS)
                 + " on impostor pairs; pairs (genuine, impostor) per scenario: "
                 + ", ".join(f"{g}/{i}" for g, i in sorted(pairs)))
    notes = sorted({m["open_set_note"] for b in names for m in metrics[b].values()
                    if m.get("open_set_note")})
    lines += [f"  note: {n}" for n in notes]
    boot = f" ({n_boot} resamples)" if n_boot else ""
    lines.append(f"intervals: rank-k {RANK_CI_METHOD} (binomial); every column of each "
                 f"recognizer (rank-10, mean rank with its percentile bootstrap interval{boot}, "
                 "rank-1 minus Face2Face with Newcombe's paired interval) in results.csv")
    return "\n".join(lines)


def open_set_table(results: Sequence[ScenarioResult]) -> str:
    """Open set: true-accept rate at false-accept rates 1 % and 0.1 %, with the pair counts."""
    fars = ranking.OPEN_SET_FARS
    head = (f"{'open set (pairs: genuine, impostor)':<34} "
            + " ".join(f"{'TAR@FAR ' + f'{100 * f:g}%':>14}" for f in fars)
            + f" {'genuine':>8} {'impostor':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        cells = " ".join(f"{_pct(m.get(f'tar_at_far_{far_key(f)}')):>14}" for f in fars)
        note = f"  ({m['open_set_note']})" if m.get("open_set_note") else ""
        lines.append(f"{r.name:<34} {cells} {m.get('n_genuine_pairs', 0):>8d} "
                     f"{m.get('n_impostor_pairs', 0):>9d}{note}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def _pts(value: float | None) -> str:
    """A difference of proportions in percentage points, signed."""
    return "nan" if value is None or not np.isfinite(value) else f"{100 * value:+.1f}"
