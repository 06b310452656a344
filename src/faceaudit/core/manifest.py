"""``manifest.csv``: one row per item of a stage (id, subject, status, reason, numbers).

Every finished row is first appended to a journal beside the manifest
(``manifest.journal.jsonl``, one JSON object a line, flushed and fsynced), and
``manifest.csv`` is rebuilt from the rows when the run ends. A run killed half way
therefore loses no row it finished: the next run replays the journal.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceaudit.core.files import (
    InputError,
    _json_default,
    append_line_durably,
    column_union,
    read_journal,
    write_csv,
)

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)

MANIFEST_COLUMNS = ("id", "subject", "status", "reason")
JOURNAL_NAME = "manifest.journal.jsonl"


@dataclass
class ItemResult:
    """One manifest row: an item's id, its subject (patient or identity), what happened."""

    id: str
    subject: str
    status: str = STATUS_OK
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "status": self.status,
                "reason": self.reason, **self.values}


def describe_exception(exc: BaseException) -> str:
    """One line for a manifest's reason column: type and message."""
    text = str(exc).strip().replace("\n", " ") or repr(exc)
    return f"{type(exc).__name__}: {text}"


class Manifest:
    """``manifest.csv`` of a stage's output folder, keyed by item id.

    Rows of an earlier run are loaded (the CSV, then its journal), so a re-run that
    skips finished items keeps their rows; ``add`` replaces a row with the same id and
    journals it at once; ``write`` rebuilds the CSV and empties the journal.
    """

    def __init__(self, path: str | os.PathLike, *, journal: bool = True) -> None:
        self.path = Path(path)
        self.journal_path = self.path.with_name(JOURNAL_NAME) if journal else None
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for row in read_manifest(self.path):
                self.rows[row["id"]] = row
        for row in self._replay_journal():
            self.rows[row["id"]] = row

    def _replay_journal(self) -> list[dict[str, Any]]:
        if self.journal_path is None:
            return []
        return [row for row in read_journal(self.journal_path) if "id" in row]

    def add(self, result: ItemResult) -> None:
        row = result.row()
        self.rows[result.id] = row
        if self.journal_path is not None:
            append_line_durably(self.journal_path, json.dumps(row, default=_json_default) + "\n")

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self.rows.get(item_id)

    def keep_only(self, ids) -> None:
        """Drop rows of items that are no longer among the stage's inputs."""
        ids = set(ids)
        self.rows = {k: v for k, v in self.rows.items() if k in ids}

    def write(self) -> Path:
        rows = [self.rows[item_id] for item_id in sorted(self.rows)]
        path = write_csv(self.path, rows, column_union(rows, first=MANIFEST_COLUMNS))
        if self.journal_path is not None:
            self.journal_path.unlink(missing_ok=True)
        return path

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows.values() if row.get("status") == status)

    def counts(self) -> dict[str, int]:
        return {status: self.count(status) for status in STATUSES}

    def exit_code(self) -> int:
        from faceaudit.core.runner import EXIT_ITEMS_FAILED, EXIT_OK

        return EXIT_ITEMS_FAILED if self.count(STATUS_FAILED) else EXIT_OK


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a stage's ``manifest.csv``; it must have the columns id, subject, status, reason."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected a manifest.csv at {path}, found nothing")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path} lacks manifest columns {missing}; found {reader.fieldnames}")
        return list(reader)
