"""Files a stage writes: private folders, atomic writes, JSON, CSV, PNG and ``.npz``.

Outputs hold identifiable faces, so folders are created 0700 and files 0600.
Every file is written under a temporary name in its final folder and renamed, so
an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DIR_MODE = 0o700
FILE_MODE = 0o600
#: In the name of every file still being written; a process killed mid-write leaves one
#: behind, and the next run into the folder removes it (it may hold a whole face).
PARTIAL_MARK = ".partial-"


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
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, "expected a folder, found a file", str(folder))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename:   # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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


#: file_digest's read size. Each read and each update gives up the GIL and takes it back, and
#: taking it back from a thread running Python can wait a switch interval (5 ms): stage 1
#: hashes a 170 MB volume while the other volume is processed, in 20 blocks, not 170.
DIGEST_BLOCK = 8 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in ``DIGEST_BLOCK`` blocks (FileNotFoundError if
    absent): caches and re-run checks key on content, not on names or times."""
    digest = hashlib.new(algorithm)
    buffer = bytearray(min(DIGEST_BLOCK, max(1 << 16, os.stat(path).st_size)))
    view = memoryview(buffer)
    with open(path, "rb") as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def file_digest_once(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """``file_digest``, computed once per file version in a process (keyed by path, size and
    modification time): a stage that meets the same file again (a gallery CT in every fold,
    a photo for every recognizer) does not read it again."""
    stat = os.stat(path)
    return _digest_of_version(os.fspath(path), stat.st_mtime_ns, stat.st_size, algorithm)


@functools.lru_cache(maxsize=None)
def _digest_of_version(path: str, mtime_ns: int, size: int, algorithm: str) -> str:
    return file_digest(path, algorithm)


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


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the half-written files (``.<name>.partial-*``) that killed writers left below
    ``folder``; only safe while no other process writes there (the runner holds the lock)."""
    removed = []
    for path in Path(folder).rglob(f".*{PARTIAL_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def read_journal(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a journal written by ``append_line_durably``, in order; a torn last
    line (its writer was killed mid-write) is skipped and JSON nulls read as empty cells."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def append_line_durably(path: str | os.PathLike, line: str) -> None:
    """Append one text line to a journal (mode 0600) and fsync it before returning, so the
    line survives a kill or a power cut right after; a failure names the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:     # os.write names no file: say which one (full disk ...)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc

