"""What every report section uses: tables and sections, reading stage files, number formats."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from faceaudit.core.files import InputError, read_json_file

MAX_TABLE_ROWS = 60
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


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


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> dict:
    """A stage's JSON record, or {} when it is absent or unreadable (the report goes on)."""
    try:
        return read_json_file(path)
    except InputError:
        return {}


def figures_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted: the figures a stage wrote."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def rows_by(path: Path, key: str) -> dict[str, dict[str, str]]:
    return {row.get(key, ""): row for row in read_csv_rows(path)} if path.is_file() else {}


def fmt(value) -> str:
    """A number as the tables print it: integers whole, others to 3 significant digits."""
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


def pct(value, std=None) -> str:
    """A fraction as a percentage, with its std when given; "" when not a number."""
    try:
        v = 100.0 * float(value)
    except (TypeError, ValueError):
        return ""
    if math.isnan(v):
        return "n/a"
    if std in (None, ""):
        return f"{v:.1f}"
    return f"{v:.1f} ± {100.0 * float(std):.1f}"


def paper_cell(value: tuple[float, float] | None) -> str:
    return "" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"


def csv_table(path: Path, title: str, *, note: str = "", columns: list[str] | None = None) -> Table:
    rows = read_csv_rows(path)
    cols = columns or (list(rows[0].keys()) if rows else [])
    body = [[fmt(r.get(c, "")) for c in cols] for r in rows[:MAX_TABLE_ROWS]]
    if len(rows) > MAX_TABLE_ROWS:
        note = (note + " " if note else "") + f"First {MAX_TABLE_ROWS} of {len(rows)} rows; all in {path.name}."
    return Table(title, cols, body, note)
