"""The stage runner's fault behaviours, each with a real killed process or a real broken
location: journaled rows survive a kill, a dead worker fails only its item, a second run
into a locked folder stops, a location that cannot be written is exit 2."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from faceaudit.core.files import write_png
from faceaudit.core.manifest import JOURNAL_NAME, ItemResult, Manifest, read_manifest
from faceaudit.core.runner import (
    EXIT_CRASH,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OptionsError,
    OutputLocationError,
    RunSettings,
    StageRun,
    WorkerDied,
    fingerprint,
    map_items,
)


def _suicide(x):
    """Kill the worker process itself at item 'die' (SIGKILL, as the OOM killer does)."""
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return x.upper()


def test_a_dead_worker_fails_only_its_item_and_a_fresh_worker_finishes_the_rest():
    items = ["a", "b", "die", "c", "d", "e", "f", "g", "h"]
    out = {item: (res, err) for item, res, err in map_items(_suicide, items, jobs=2, progress=False)}
    assert sorted(out) == sorted(items)
    assert isinstance(out["die"][1], WorkerDied)
    assert "SIGKILL" in str(out["die"][1])
    assert {k: v[0] for k, v in out.items() if k != "die"} == {k: k.upper() for k in items if k != "die"}
    assert all(err is None for k, (_, err) in out.items() if k != "die")


def test_one_job_keeps_input_order():
    assert [r for _, r, _ in map_items(str.upper, ["b", "a", "c"], progress=False)] == ["B", "A", "C"]


def _run_python(code: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_rows_finished_before_a_kill_are_kept(tmp_path):
    """The process is SIGKILLed after three items: their rows (with numbers) come back."""
    code = """
        import os, signal, sys
        from faceaudit.core.manifest import ItemResult
        from faceaudit.core.runner import RunSettings, StageRun
        with StageRun("t", sys.argv[1], RunSettings()) as stage:
            for k in range(5):
                if k == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                stage.record(ItemResult(f"item{k}", "p", values={"score": k / 2}), f"fp{k}")
    """
    proc = _run_python(code, str(tmp_path))
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "manifest.csv").exists()
    assert (tmp_path / JOURNAL_NAME).is_file()
    manifest = Manifest(tmp_path / "manifest.csv")
    assert sorted(manifest.rows) == ["item0", "item1", "item2"]
    assert manifest.get("item2")["score"] == 1.0 and manifest.get("item2")["fingerprint"] == "fp2"
    # the next run rebuilds manifest.csv from the journal and drops it
    with StageRun("t", tmp_path, RunSettings()) as stage:
        assert stage.is_fresh("item1", "fp1")
        assert not stage.is_fresh("item1", "another input")
        result = stage.finish()
    assert [r["id"] for r in read_manifest(tmp_path / "manifest.csv")] == ["item0", "item1", "item2"]
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert result.exit_code == EXIT_OK


def test_a_torn_last_journal_line_is_ignored(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    m.add(ItemResult("a", "p"))
    with open(tmp_path / JOURNAL_NAME, "a") as fh:
        fh.write('{"id": "b", "subj')          # the process died while writing this line
    assert list(Manifest(tmp_path / "manifest.csv").rows) == ["a"]


def test_a_second_run_into_a_locked_folder_stops_naming_the_holder(tmp_path):
    code = """
        import sys, time
        from faceaudit.core.runner import RunSettings, StageRun
        with StageRun("t", sys.argv[1], RunSettings()):
            print("locked", flush=True)
            time.sleep(60)
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocationError, match=rf"pid {holder.pid} holds"):
            with StageRun("t", tmp_path, RunSettings()):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: no stale lock
    with StageRun("t", tmp_path, RunSettings()) as stage:
        stage.finish()


def test_run_json_is_written_even_when_the_stage_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with StageRun("t", tmp_path, RunSettings(seed=3)) as stage:
            stage.record(ItemResult("a", "p"), "fp")
            raise RuntimeError("montage writer broke")
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["error"] == "RuntimeError: montage writer broke" and record["seed"] == 3
    assert [r["id"] for r in read_manifest(tmp_path / "manifest.csv")] == ["a"]


def test_skip_needs_ok_row_same_fingerprint_and_outputs(tmp_path):
    out = write_png(tmp_path / "x.png", __import__("numpy").zeros((2, 2), "uint8"))
    with StageRun("t", tmp_path, RunSettings()) as stage:
        stage.record(ItemResult("a", "p"), "fp-a")
        stage.record(ItemResult("b", "p", status="failed", reason="x"), "fp-b")
        stage.finish()
    with StageRun("t", tmp_path, RunSettings()) as stage:
        assert stage.is_fresh("a", "fp-a", [out])
        assert not stage.is_fresh("a", "fp-a", [out, tmp_path / "gone.png"])
        assert not stage.is_fresh("b", "fp-b")            # failed earlier: redone
        assert not stage.is_fresh("new", "fp")
        row = stage.skipped("a")
        assert row.status == "skipped" and row.values["fingerprint"] == "fp-a"
    with StageRun("t", tmp_path, RunSettings(overwrite=True)) as stage:
        assert not stage.is_fresh("a", "fp-a", [out])


def test_a_fingerprint_function_is_called_only_when_the_item_could_be_fresh(tmp_path):
    """Hashing a 200 MB volume for an item that has no earlier ok row is wasted work."""
    out = tmp_path / "a.png"
    out.write_bytes(b"png")
    with StageRun("t", tmp_path, RunSettings()) as stage:
        stage.record(ItemResult("a", "p"), "fp-a")
        stage.record(ItemResult("b", "p", status="failed", reason="x"), "fp-b")
        stage.finish()
    calls = []

    def hashed(value):
        return lambda: calls.append(value) or value

    with StageRun("t", tmp_path, RunSettings()) as stage:
        assert not stage.is_fresh("new", hashed("fp"))                     # no earlier row
        assert not stage.is_fresh("b", hashed("fp-b"))                     # failed earlier
        assert not stage.is_fresh("a", hashed("fp-a"), [tmp_path / "gone.png"])   # an output is gone
        assert calls == []
        assert stage.is_fresh("a", hashed("fp-a"), [out])
        assert not stage.is_fresh("a", hashed("changed"), [out])
        assert not stage.is_fresh("a", hashed(None), [out])                # nothing to hash now
        assert calls == ["fp-a", "changed", None]


def test_fingerprint_follows_content_not_names(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"patient 1")
    b.write_bytes(b"patient 1")
    c.write_bytes(b"patient 2")
    assert fingerprint(a, {"k": 1}) == fingerprint(b, {"k": 1})
    assert fingerprint(a, {"k": 1}) != fingerprint(c, {"k": 1})
    assert fingerprint(a, {"k": 1}) != fingerprint(a, {"k": 2})
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"x")
    before = fingerprint(folder)
    (folder / "1.dcm").write_bytes(b"y")
    assert fingerprint(folder) != before


def test_jobs_must_be_positive():
    with pytest.raises(OptionsError, match="expected --jobs to be a whole number >= 1, found 0"):
        RunSettings(jobs=0)


def test_an_unwritable_output_location_names_path_and_errno(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expected = r"cannot write to .*/file: \[Errno 20 ENOTDIR\] expected a folder, found a file"
    with pytest.raises(OutputLocationError, match=expected):
        with StageRun("t", blocker / "out", RunSettings()):
            pass


def test_run_guarded_exit_codes(capsys):
    from faceaudit.core.cli import run_guarded
    from faceaudit.core.files import InputError

    def bad_input():
        raise InputError("expected a folder at /x, found nothing")

    def full_disk():
        raise OSError(28, "No space left on device", "/out/manifest.csv")

    def bug():
        raise KeyError("oops")

    assert run_guarded(bad_input) == EXIT_USAGE
    assert run_guarded(full_disk) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: expected a folder at /x" in err
    assert "cannot write to /out/manifest.csv: [Errno 28 ENOSPC] No space left on device" in err
    assert run_guarded(bug) == EXIT_CRASH
    assert "Traceback" in capsys.readouterr().err
    assert run_guarded(lambda: EXIT_ITEMS_FAILED) == EXIT_ITEMS_FAILED


def test_seed_must_be_a_whole_number_of_zero_or_more():
    with pytest.raises(OptionsError, match="expected --seed to be a whole number >= 0, found -1"):
        RunSettings(seed=-1)


def test_half_written_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    """A writer SIGKILLed inside atomic_path leaves its hidden partial file (a whole face,
    maybe); the next run into the folder removes it and keeps finished files."""
    code = """
        import os, signal, sys
        from faceaudit.core.files import atomic_path
        with atomic_path(sys.argv[1] + "/faces/p1.png") as tmp:
            tmp.write_bytes(b"half a face")
            os.kill(os.getpid(), signal.SIGKILL)
    """
    write_png(tmp_path / "faces" / "p0.png", __import__("numpy").zeros((2, 2), "uint8"))
    assert _run_python(code, str(tmp_path)).returncode == -signal.SIGKILL
    partial = [p for p in (tmp_path / "faces").iterdir() if p.name != "p0.png"]
    assert len(partial) == 1 and partial[0].name.startswith(".p1.png.partial-")
    with StageRun("t", tmp_path, RunSettings()) as stage:
        stage.finish()
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["p0.png"]


def test_a_part_of_an_item_keeps_its_own_fingerprint_column(tmp_path):
    with StageRun("t", tmp_path, RunSettings()) as stage:
        stage.record(ItemResult("s1", "p", values={"ct_status": "ok", "ct_fingerprint": "a",
                                                   "pet_status": "failed", "pet_fingerprint": "b"}))
        stage.finish()
    with StageRun("t", tmp_path, RunSettings()) as stage:
        assert stage.is_fresh("s1", "a", column="ct_fingerprint", status_column="ct_status")
        assert not stage.is_fresh("s1", "b", column="pet_fingerprint", status_column="pet_status")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a read-only or tiny file system needs root and unshare")
@pytest.mark.parametrize("mount, expected", [("ro", r"\[Errno 30 EROFS\]"), ("size=64k", r"\[Errno 28 ENOSPC\]")])
def test_a_read_only_or_full_location_is_exit_2_with_one_line(tmp_path, mount, expected):
    """A real read-only / full file system (tmpfs in a private mount namespace)."""
    code = """
        import sys
        from faceaudit.core.cli import run_guarded
        from faceaudit.core.manifest import ItemResult
        from faceaudit.core.runner import RunSettings, StageRun

        def stage():
            with StageRun("t", sys.argv[1] + "/out", RunSettings()) as run:
                for k in range(2000):          # rows with long reasons fill a 64 KiB disk
                    run.record(ItemResult(f"item{k}", "p", values={"note": "x" * 200}), "fp")
                return run.finish()

        sys.exit(run_guarded(stage))
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o {mount} tmpfs {mnt} && "
              f"exec {sys.executable} -c '{textwrap.dedent(code)}' {mnt}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount:" in proc.stderr and proc.returncode not in (0, 1, 2, 3):
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == EXIT_USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: cannot write to {mnt}")
    assert re.search(expected, lines[0])
