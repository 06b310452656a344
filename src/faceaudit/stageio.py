"""What every stage shares at its edges: private output folders, atomic writes,
``manifest.csv`` (one row per item) and ``run.json`` (arguments, versions, seed).

Outputs hold identifiable faces, so folders are created 0700 and files 0600.
Every file is written under a temporary name in its final folder and renamed, so
an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

DIR_MODE = 0o700
FILE_MODE = 0o600

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)

#: Exit codes shared by every stage script.
EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2

MANIFEST_COLUMNS = ("id", "subject", "status", "reason")

#: Packages whose versions go into every run.json.
TRACKED_PACKAGES = (
    "faceaudit", "numpy", "scipy", "scikit-image", "SimpleITK", "torch", "mediapipe",
    "opencv-python-headless", "trimesh", "embreex", "pyrender", "onnxruntime",
    "dlib-bin", "insightface", "connected-components-3d", "pytorch-msssim",
)


class InputError(ValueError):
    """An input file or folder is not what a stage expects; the message quotes it."""


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` with mode 0700 and return it. Every parent folder it has to create is
    0700 too (``mkdir(parents=True)`` would give those the umask's mode); folders that
    already exist, other than ``path`` itself, are left as they are."""
    path = Path(path)
    missing = []
    for folder in [path, *path.parents]:
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that wants a file name (SimpleITK,
    savefig ...); renamed to ``path`` (mode 0600) when the block ends without error.
    ``suffix`` lets writers that choose a format by extension (".nii.gz") see the right one.
    """
    path = Path(path)
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (mode 0600)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (FileNotFoundError if absent):
    caches and re-run checks key on content, not on names or times."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object; a missing or malformed file is an InputError quoting the path."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected a JSON file at {path}, found nothing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object in {path}, found {type(obj).__name__}")
    return obj


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 grey (H, W) or RGB (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8 pixels, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"write_png expects (H, W) or (H, W, 3|4), got shape {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write arrays to a compressed ``.npz`` atomically (no object arrays, no pickle)."""
    buf = io.BytesIO()
    clean = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"write_npz: array {key!r} has dtype object; store strings as str")
        clean[key] = arr
    np.savez_compressed(buf, **clean)
    return atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike, *, required: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without pickle; a missing or corrupt file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected an .npz file at {path}, found nothing")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {key: data[key] for key in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
        raise InputError(f"cannot read {path} as .npz: {exc}") from exc
    missing = [key for key in required if key not in out]
    if missing:
        raise InputError(f"{path} lacks arrays {missing}; it holds {sorted(out)}")
    return out


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


class Manifest:
    """``manifest.csv`` of a stage's output folder, keyed by item id.

    Rows of an earlier run are loaded, so a re-run that skips finished items keeps
    their rows; ``add`` replaces a row with the same id.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for row in read_manifest(self.path):
                self.rows[row["id"]] = row

    def add(self, result: ItemResult) -> None:
        self.rows[result.id] = result.row()

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self.rows.get(item_id)

    def write(self) -> Path:
        rows = [self.rows[item_id] for item_id in sorted(self.rows)]
        return write_csv(self.path, rows, column_union(rows, first=MANIFEST_COLUMNS))

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows.values() if row.get("status") == status)

    def exit_code(self) -> int:
        return EXIT_ITEMS_FAILED if self.count(STATUS_FAILED) else EXIT_OK


def column_union(rows: Iterable[Mapping[str, Any]], *, first: Iterable[str] = ()) -> list[str]:
    """``first``, then every other key of ``rows`` in the order it first appears."""
    columns = list(first)
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
              columns: Iterable[str] | None = None) -> Path:
    """A CSV table, atomically: floats with 6 significant digits; keys outside ``columns``
    are left out, missing ones left empty. ``columns`` defaults to every key in order."""
    rows = list(rows)
    columns = list(columns) if columns is not None else column_union(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


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


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_json(save_dir: str | os.PathLike, *, stage: str, args: Mapping[str, Any] | Any,
                   seed: int | None = None, extra: Mapping[str, Any] | None = None,
                   started: float | None = None) -> Path:
    """Write ``run.json``: stage name, arguments, seed, versions, timing."""
    if not isinstance(args, Mapping):
        args = vars(args)
    now = time.time()
    record = {
        "stage": stage,
        "argv": sys.argv,
        "args": {k: v for k, v in args.items()},
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }
    if started is not None:
        record["seconds"] = round(now - started, 3)
    if extra:
        record.update(extra)
    return write_json(Path(save_dir) / "run.json", record)


def describe_exception(exc: BaseException) -> str:
    """One line for a manifest's reason column: type and message."""
    text = str(exc).strip().replace("\n", " ") or repr(exc)
    return f"{type(exc).__name__}: {text}"


def map_items(fn: Callable[[Any], Any], items: Iterable[Any], *, jobs: int = 1,
              desc: str = "", progress: bool = True) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Apply ``fn`` to every item, in ``jobs`` processes, with a progress bar.

    Yields ``(item, result, error)`` in completion order; an exception raised by
    ``fn`` is caught and returned as ``error`` so one bad item never stops a run.
    ``fn`` must be picklable (a module-level function or a functools.partial of one)
    when ``jobs > 1``.
    """
    from tqdm.auto import tqdm

    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress or not items,
               file=sys.stderr, dynamic_ncols=True)
    try:
        if jobs <= 1 or len(items) <= 1:
            for item in items:
                try:
                    result, error = fn(item), None
                except Exception as exc:  # recorded per item, the run goes on
                    result, error = None, exc
                bar.update(1)
                yield item, result, error
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for fut in as_completed(futures):
                item = futures[fut]
                try:
                    result, error = fut.result(), None
                except Exception as exc:
                    result, error = None, exc
                bar.update(1)
                yield item, result, error
    finally:
        bar.close()
