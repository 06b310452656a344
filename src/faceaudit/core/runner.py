"""The stage runner: what every stage must do the same way.

A stage opens a :class:`StageRun` on its output folder. The run

- creates the folder (0700) and holds a lock on it, so a second run into the same
  folder stops at once (exit 2) naming the holder's pid;
- loads the rows of earlier runs (``manifest.csv`` and its journal) and decides, per
  item, whether the item's outputs are fresh: the row is ``ok``, the fingerprint of the
  item's inputs and of the options that shape its outputs is the one stored, and every
  output file is there (``--overwrite`` redoes all);
- journals each finished row at once (see :mod:`faceaudit.core.manifest`);
- writes ``manifest.csv`` and ``run.json`` when it ends, also when the stage raised.

:func:`map_items` runs the items, in ``jobs`` worker processes when asked; a worker that
dies (killed by the out-of-memory killer, say) fails only the item it was running, and
a fresh worker takes its place. Exit codes: 0 all ok, 1 some items failed, 2 unusable
arguments or input/output location, 3 an unexpected error.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import platform
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceaudit.core.files import InputError, file_digest, make_private_dir, remove_partial_files, write_json
from faceaudit.core.manifest import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ItemResult, Manifest, describe_exception

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_CRASH = 3

LOCK_NAME = ".faceaudit.lock"

#: Errors of the output location itself: no item can succeed after one, so a stage stops
#: (exit 2) instead of failing every remaining item with the same reason.
LOCATION_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def is_location_error(exc: BaseException) -> bool:
    """A full, read-only or over-quota output location (see LOCATION_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in LOCATION_ERRNOS

#: Packages whose versions go into every run.json.
TRACKED_PACKAGES = (
    "faceaudit", "numpy", "scipy", "scikit-image", "SimpleITK", "nibabel", "torch", "mediapipe",
    "opencv-python-headless", "trimesh", "embreex", "pyrender", "onnxruntime",
    "dlib-bin", "insightface", "connected-components-3d", "pytorch-msssim",
)


class OptionsError(InputError):
    """An option value no run could use (a negative yaw limit, zero bootstrap samples)."""


class OutputLocationError(InputError):
    """The output folder cannot be created, written or locked."""


class WorkerDied(RuntimeError):
    """The worker process running an item ended without a result."""


@dataclass(frozen=True)
class RunSettings:
    """How a stage runs, as opposed to what it computes (the stage's own options)."""

    jobs: int = 1
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    #: the command line as parsed, recorded in run.json
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise OptionsError(f"expected --jobs to be a whole number >= 1, found {self.jobs!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise OptionsError(f"expected --seed to be a whole number >= 0, found {self.seed!r}")


@dataclass
class StageResult:
    """What a stage returns: counts per status, the exit code, and text for the script to print."""

    stage: str
    save_dir: Path
    counts: dict[str, int]
    exit_code: int
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- fingerprints

def fingerprint(*parts: Any) -> str:
    """SHA-256 over the content of files and folders (``Path`` parts) and the JSON form of
    everything else (options dataclasses, numbers, strings). Names and times of files do
    not count, so a file replaced by another with the same name changes the fingerprint,
    and a copy with the same bytes does not."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            if part.is_dir():
                for sub in sorted(p for p in part.rglob("*") if p.is_file()):
                    digest.update(str(sub.relative_to(part)).encode())
                    digest.update(file_digest(sub).encode())
            else:
                digest.update(file_digest(part).encode() if part.exists() else b"<missing>")
        else:
            if dataclasses.is_dataclass(part) and not isinstance(part, type):
                part = dataclasses.asdict(part)
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------- lock

class OutputLock:
    """An exclusive ``flock`` on ``<folder>/.faceaudit.lock`` holding the owner's pid.

    The kernel drops the lock when its process ends, however it ends, so a killed run
    never leaves a stale lock behind.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocationError(
                f"expected no other run writing to {self.path.parent}, found one "
                f"(pid {holder} holds {self.path}); wait for it or choose another --save_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder (0700); a location that cannot be written is an
    OutputLocationError naming the path and the errno."""
    path = Path(path)
    try:
        make_private_dir(path)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputLocationError(describe_os_error(exc, path)) from exc
    return path


def describe_os_error(exc: OSError, path: Path | str | None = None) -> str:
    """One line: what could not be written, where, and the errno name."""
    where = exc.filename or path
    name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
    return (f"cannot write to {where}: [Errno {exc.errno} {name}] {exc.strerror or exc}"
            if name else f"cannot write to {where}: {exc}")


# --------------------------------------------------------------------------- the run

class StageRun:
    """One stage's run over one output folder (a context manager).

    ``with StageRun("reconstruction", save_dir, run, options=opts) as stage:`` creates and
    locks the folder and loads the earlier rows; ``stage.is_fresh`` decides skips,
    ``stage.record`` journals rows, ``stage.finish`` writes the manifest and returns the
    StageResult. Leaving the block by an exception still writes ``manifest.csv`` (every
    row that finished) and ``run.json`` (with the error), then releases the lock.
    """

    def __init__(self, stage: str, save_dir: str | os.PathLike, run: RunSettings, *,
                 options: Any = None, manifest_name: str = "manifest.csv") -> None:
        self.stage = stage
        self.save_dir = Path(save_dir)
        self.run = run
        self.options = options
        self.manifest_name = manifest_name
        self.manifest: Manifest | None = None
        self.started = time.time()
        self.extra: dict[str, Any] = {}
        self._lock: OutputLock | None = None
        self._finished = False

    def __enter__(self) -> StageRun:
        open_output_dir(self.save_dir)
        self._lock = OutputLock(self.save_dir)
        self._lock.acquire()
        try:
            remove_partial_files(self.save_dir)
            self.manifest = Manifest(self.save_dir / self.manifest_name)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._finished and self.manifest is not None:
                error = describe_exception(exc) if exc is not None else None
                try:
                    self.manifest.write()
                finally:
                    self.write_run_json(error=error)
        finally:
            if self._lock is not None:
                self._lock.release()

    # -- decisions and rows
    def previous(self, item_id: str) -> dict[str, Any] | None:
        return self.manifest.get(item_id) if self.manifest is not None else None

    def is_fresh(self, item_id: str, item_fingerprint: str | Callable[[], str | None],
                 outputs: Iterable[Path] = (), *, column: str = "fingerprint",
                 status_column: str = "status") -> bool:
        """True when the item finished ok earlier from the same inputs and options and all its
        outputs are still there; never with --overwrite. ``column`` and ``status_column`` name
        where a row keeps the fingerprint and status of one part of an item (a study's CT).

        ``item_fingerprint`` may be a function that computes it: it is called only when the
        earlier row and the outputs could make the item fresh, so a first run hashes no
        input here (a stage can hash it where it reads it anyway)."""
        if self.run.overwrite:
            return False
        row = self.previous(item_id)
        if not row or row.get(status_column) not in (STATUS_OK, STATUS_SKIPPED) or not row.get(column):
            return False
        if not all(Path(p).is_file() for p in outputs):
            return False
        if callable(item_fingerprint):
            item_fingerprint = item_fingerprint()
        return item_fingerprint is not None and row.get(column) == item_fingerprint

    def record(self, result: ItemResult, item_fingerprint: str | None = None) -> None:
        """Journal one finished row (with the fingerprint that produced it, when ok)."""
        if item_fingerprint is not None and result.status != STATUS_FAILED:
            result.values["fingerprint"] = item_fingerprint
        self.manifest.add(result)

    def skipped(self, item_id: str) -> ItemResult:
        """The row of an item left as it was: the earlier numbers, status skipped."""
        row = dict(self.previous(item_id))
        values = {k: v for k, v in row.items() if k not in ("id", "subject", "status", "reason")}
        return ItemResult(id=item_id, subject=row.get("subject", ""), status=STATUS_SKIPPED,
                          reason="inputs and options unchanged", values=values)

    # -- the end
    def write_run_json(self, *, error: str | None = None) -> Path:
        extra = dict(self.extra)
        if self.options is not None and dataclasses.is_dataclass(self.options):
            extra.setdefault("options", dataclasses.asdict(self.options))
        if self.manifest is not None:
            extra["counts"] = self.manifest.counts()
        if error:
            extra["error"] = error
        return write_run_json(self.save_dir, stage=self.stage, args=self.run.args, seed=self.run.seed,
                              started=self.started, extra=extra)

    def finish(self, *, keep_ids: Iterable[str] | None = None, summary: str = "",
               details: Mapping[str, Any] | None = None) -> StageResult:
        """Write ``manifest.csv`` (only rows of ``keep_ids`` when given) and ``run.json``."""
        if keep_ids is not None:
            self.manifest.keep_only(keep_ids)
        self.manifest.write()
        self.write_run_json()
        self._finished = True
        counts = self.manifest.counts()
        return StageResult(stage=self.stage, save_dir=self.save_dir, counts=counts,
                           exit_code=self.manifest.exit_code(), summary=summary,
                           details=dict(details or {}))


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    from importlib import metadata  # 0.03 s of imports, needed only at the end of a run

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
        "args": dict(args),
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


# --------------------------------------------------------------------------- running items

#: One thread per worker: N workers each starting N BLAS/OpenMP threads would oversubscribe
#: the machine and make --jobs slower than one job.
_WORKER_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                      "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def map_items(fn: Callable[[Any], Any], items: Iterable[Any], *, jobs: int = 1,
              desc: str = "", progress: bool = True) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Apply ``fn`` to every item, in ``jobs`` processes, with a progress bar.

    Yields ``(item, result, error)``: in order with one job, in completion order with
    several. An exception raised by ``fn`` is returned as ``error`` so one bad item never
    stops a run; a worker process that dies yields :class:`WorkerDied` for the item it was
    running only. ``fn`` and the items must be picklable when ``jobs > 1``.
    """
    from tqdm import tqdm  # tqdm.auto costs 0.1 s of imports looking for a notebook

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
        for index, result, error in _map_in_workers(fn, items, min(jobs, len(items))):
            bar.update(1)
            yield items[index], result, error
    finally:
        bar.close()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(describe_exception(exc))


def _worker_loop(conn, fn) -> None:
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, item = task
        try:
            message = (index, fn(item), None)
        except Exception as exc:
            message = (index, None, _portable(exc))
        try:
            conn.send(message)
        except Exception as exc:  # an unpicklable result
            conn.send((index, None, RuntimeError(f"the result could not be sent back: "
                                                 f"{describe_exception(exc)}")))


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        cause = " (SIGKILL: the out-of-memory killer or a kill -9)" if name == "SIGKILL" else ""
        return f"the worker process running this item was killed by {name}{cause}"
    return f"the worker process running this item exited with code {exitcode} before finishing it"


class _WorkerPool:
    """``jobs`` spawned worker processes, each fed one item at a time through its own pipe.

    The parent always knows which item each worker holds, so a worker that dies without a
    result (its pipe closes, its sentinel fires) fails that item alone and is replaced.
    """

    def __init__(self, fn, items: list, jobs: int) -> None:
        import multiprocessing as mp

        self.fn, self.items = fn, items
        self.ctx = mp.get_context("spawn")
        self.pending = deque(range(len(items)))
        self.workers: dict[int, dict[str, Any]] = {}     # slot -> process, conn, held item index
        for slot in range(jobs):
            self._start(slot)
            self._feed(slot)

    def _start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        saved = {k: os.environ.get(k) for k in _WORKER_THREAD_ENV}
        os.environ.update({k: "1" for k in _WORKER_THREAD_ENV})
        try:
            proc = self.ctx.Process(target=_worker_loop, args=(child, self.fn), daemon=True)
            proc.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()
        self.workers[slot] = {"proc": proc, "conn": parent, "index": None}

    def _feed(self, slot: int) -> None:
        worker = self.workers[slot]
        worker["index"] = self.pending.popleft() if self.pending else None
        if worker["index"] is None:
            return
        try:
            worker["conn"].send((worker["index"], self.items[worker["index"]]))
        except OSError:
            # the worker died after its last result: the item never reached it, so it goes
            # back to the queue and a fresh worker takes the slot
            self.pending.appendleft(worker["index"])
            worker["proc"].join()
            worker["conn"].close()
            self._start(slot)
            self._feed(slot)

    def results(self) -> Iterator[tuple[int, Any, BaseException | None]]:
        from multiprocessing.connection import wait

        while True:
            busy = {slot: w for slot, w in self.workers.items() if w["index"] is not None}
            if not busy:
                return
            ready = wait([w["conn"] for w in busy.values()] + [w["proc"].sentinel for w in busy.values()])
            for slot, worker in busy.items():
                outcome = self._collect(slot, worker, ready)
                if outcome is not None:
                    yield outcome
                    self._feed(slot)

    def _collect(self, slot: int, worker: dict[str, Any], ready: list) -> tuple | None:
        """The worker's result, a WorkerDied for its item when it died, or None (still busy)."""
        if worker["conn"] in ready:
            try:
                return worker["conn"].recv()
            except (EOFError, OSError):
                pass                    # died: its sentinel says so below
        if worker["proc"].sentinel in ready or not worker["proc"].is_alive():
            worker["proc"].join()
            outcome = (worker["index"], None, WorkerDied(_death_reason(worker["proc"].exitcode)))
            worker["conn"].close()
            self._start(slot)
            return outcome
        return None

    def close(self) -> None:
        for worker in self.workers.values():
            try:
                worker["conn"].send(None)
            except (OSError, ValueError):
                pass
        for worker in self.workers.values():
            worker["proc"].join(timeout=5)
            if worker["proc"].is_alive():
                worker["proc"].terminate()
                worker["proc"].join()
            worker["conn"].close()


def _map_in_workers(fn, items: list, jobs: int) -> Iterator[tuple[int, Any, BaseException | None]]:
    pool = _WorkerPool(fn, items, jobs)
    try:
        yield from pool.results()
    finally:
        pool.close()


__all__ = [
    "EXIT_CRASH", "EXIT_ITEMS_FAILED", "EXIT_OK", "EXIT_USAGE", "STATUS_FAILED", "STATUS_OK",
    "STATUS_SKIPPED", "LOCATION_ERRNOS", "OptionsError", "OutputLocationError", "OutputLock", "RunSettings",
    "StageResult", "StageRun", "WorkerDied", "describe_os_error", "fingerprint", "is_location_error", "map_items",
    "open_output_dir", "package_versions", "write_run_json",
]
