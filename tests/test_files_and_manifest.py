import os
import stat

import numpy as np
import pytest

from faceaudit.core.files import (
    InputError,
    atomic_write_text,
    make_private_dir,
    read_npz,
    write_npz,
    write_png,
)
from faceaudit.core.manifest import ItemResult, Manifest, read_manifest
from faceaudit.core.runner import EXIT_ITEMS_FAILED, EXIT_OK, map_items, write_run_json


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_are_private(tmp_path):
    out = make_private_dir(tmp_path / "a" / "b")
    png = write_png(out / "x.png", np.zeros((4, 4), np.uint8))
    assert _mode(out) == 0o700
    assert _mode(png) == 0o600
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_every_folder_created_is_private_and_existing_parents_are_left_alone(tmp_path):
    os.chmod(tmp_path, 0o755)
    make_private_dir(tmp_path / "a" / "b" / "c")
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert _mode(tmp_path) == 0o755
    with pytest.raises(NotADirectoryError, match="expected a folder, found a file"):
        make_private_dir(atomic_write_text(tmp_path / "file", "x") / "sub")


def test_manifest_round_trip_keeps_rows_of_earlier_runs(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    m.add(ItemResult("b", "p2", values={"n_vertices": 10}))
    m.add(ItemResult("a", "p1", status="failed", reason="EOFError: truncated"))
    m.write()
    again = Manifest(tmp_path / "manifest.csv")
    assert list(again.rows) == ["a", "b"]
    assert again.get("a")["reason"] == "EOFError: truncated"
    assert again.exit_code() == EXIT_ITEMS_FAILED
    again.add(ItemResult("a", "p1"))
    assert again.exit_code() == EXIT_OK
    rows = read_manifest(again.write())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["n_vertices"] == "10"


def test_item_status_is_checked():
    with pytest.raises(ValueError, match="status must be one of"):
        ItemResult("a", "p", status="done")


def test_read_manifest_names_missing_columns(tmp_path):
    bad = atomic_write_text(tmp_path / "manifest.csv", "name,status\nx,ok\n")
    with pytest.raises(InputError, match=r"lacks manifest columns \['id', 'subject', 'reason'\]"):
        read_manifest(bad)


def test_npz_round_trip_and_corrupt_file(tmp_path):
    path = write_npz(tmp_path / "l.npz", ids=np.array(["a", "b"]), x=np.eye(2))
    data = read_npz(path, required=["ids", "x"])
    assert data["ids"].tolist() == ["a", "b"]
    with pytest.raises(InputError, match="lacks arrays"):
        read_npz(path, required=["landmarks"])
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="cannot read .*broken.npz"):
        read_npz(broken)
    with pytest.raises(TypeError, match="dtype object"):
        write_npz(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))


def test_run_json_records_args_seed_and_versions(tmp_path):
    import json

    write_run_json(tmp_path, stage="demo", args={"jobs": 2}, seed=7)
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["stage"] == "demo" and record["seed"] == 7 and record["args"] == {"jobs": 2}
    assert "numpy" in record["versions"]


def _inverse(x):
    if x == 0:
        raise ZeroDivisionError("no inverse of 0")
    return 1 / x


@pytest.mark.parametrize("jobs", [1, 2])
def test_map_items_records_errors_and_goes_on(jobs):
    out = {item: (res, err) for item, res, err in map_items(_inverse, [0, 1, 2, 4], jobs=jobs,
                                                           progress=False)}
    assert out[4] == (0.25, None)
    assert isinstance(out[0][1], ZeroDivisionError)
    assert len(out) == 4


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_file_digest_is_the_digest_of_the_bytes_whatever_the_blocks(tmp_path, monkeypatch, size):
    import hashlib

    from faceaudit.core import files

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "volume.bin"
    path.write_bytes(data)
    monkeypatch.setattr(files, "DIGEST_BLOCK", 4096)          # several blocks and a short last one
    assert files.file_digest(path) == hashlib.sha256(data).hexdigest()
    assert files.file_digest(path, "md5") == hashlib.md5(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        files.file_digest(tmp_path / "missing.bin")


def test_file_digest_once_follows_a_rewritten_file(tmp_path):
    from faceaudit.core.files import file_digest, file_digest_once

    path = tmp_path / "render.png"
    path.write_bytes(b"patient 1")
    first = file_digest_once(path)
    assert first == file_digest(path) == file_digest_once(path)
    path.write_bytes(b"patient 22")          # another size: another version of the file
    assert file_digest_once(path) == file_digest(path) != first
