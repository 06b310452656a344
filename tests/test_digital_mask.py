import csv
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from flame_fixtures import synthetic_flame_model
from PIL import Image

from faceaudit.core.files import write_npz
from faceaudit.core.manifest import read_manifest
from faceaudit.mask import backends, digital_mask, topology

ROOT = Path(__file__).resolve().parents[1]
ORL = ROOT / "src" / "faceaudit" / "data" / "orl_faces"
CONTRACT = ["id", "subject", "status", "reason", "role", "video", "source", "backend", "det_score",
            "yaw", "pitch", "roll", "prep", "overlay", "mask_only", "mask_only_black"]


def _photos(tmp_path, ids=("s1", "s2", "s3"), n=4):
    src = tmp_path / "photos"
    for ident in ids:
        (src / ident).mkdir(parents=True)
        for k in range(1, n + 1):
            shutil.copy(ORL / ident / f"{k}.pgm", src / ident / f"{k}.pgm")
    bad = src / "zz_bad"
    bad.mkdir()
    pair = np.concatenate([np.asarray(Image.open(ORL / "s4" / "1.pgm")),
                           np.asarray(Image.open(ORL / "s5" / "1.pgm"))], axis=1)
    Image.fromarray(pair).save(bad / "two_faces.png")
    Image.fromarray(np.full((150, 150), 100, np.uint8)).save(bad / "blank.png")
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return src


def _selection(path):
    with open(path, newline="") as fh:
        return {r["source"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_end_to_end_on_orl_writes_every_variant(tmp_path):
    src = _photos(tmp_path)
    out = tmp_path / "DM"
    code = digital_mask.run_digital_mask(src, out, seed=3, progress=False)
    assert code == 0
    rows = read_manifest(out / "manifest.csv")
    with open(out / "manifest.csv") as fh:
        header = fh.readline().strip().split(",")
    assert header[:len(CONTRACT)] == CONTRACT
    assert len(rows) == 6 and {r["role"] for r in rows} == {"database", "query"}
    for row in rows:
        assert row["status"] == "ok" and row["backend"] == "mediapipe"
        assert row["id"] == f"{row['role']}/{row['subject']}/{Path(row['source']).stem}"
        for variant in digital_mask.VARIANTS:
            path = out / row[variant]
            assert not Path(row[variant]).is_absolute() and path.is_file()
            assert np.asarray(Image.open(path)).shape == (224, 224, 3)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (out / row["mesh"]).is_file() and json.loads((out / row["params"]).read_text())
        assert float(row["coverage"]) > 0.6
    for d in (out, out / "database", out / "query" / "s1"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    # each identity: a database and a query image, never the same photo
    by_subject = {}
    for row in rows:
        by_subject.setdefault(row["subject"], set()).add((row["role"], row["source"]))
    assert all(len({s for _, s in v}) == 2 for v in by_subject.values())
    sel = _selection(out / "selection.csv")
    assert len(sel) == 3 * 4 + 3
    reasons = {Path(s).name: r["reason"] for s, r in sel.items() if "zz_bad" in s}
    assert reasons["two_faces.png"].startswith("more than one face")
    assert reasons["blank.png"].startswith("no face")
    assert reasons["corrupt.jpg"].startswith("unreadable")
    assert (out / "montage.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["n_images"] == 15 and run["n_pairs"] == 3 and run["unpaired_identities"] == {
        "zz_bad": "no video with 2 accepted frames"}
    # a re-run skips finished items and leaves them untouched
    before = {r["id"]: os.stat(out / r["overlay"]).st_mtime_ns for r in rows}
    assert digital_mask.run_digital_mask(src, out, seed=3, progress=False) == 0
    assert {r["id"]: os.stat(out / r["overlay"]).st_mtime_ns
            for r in read_manifest(out / "manifest.csv")} == before
    # ... and the inputs were never modified
    assert (src / "s1" / "1.pgm").read_bytes() == (ORL / "s1" / "1.pgm").read_bytes()


@pytest.mark.slow
def test_every_backend_masks_the_same_selection(tmp_path):
    src = _photos(tmp_path, ids=("s6", "s7"), n=3)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    mean = backends.bundled_mean_shape()
    write_npz(model_dir / "flame_model.npz", **synthetic_flame_model(mean))
    ids = {}
    for backend in backends.BACKENDS:
        out = tmp_path / f"DM_{backend}"
        code = digital_mask.run_digital_mask(src, out, backend=backend, model_dir=model_dir,
                                             protocol="across-video", seed=5, progress=False)
        rows = read_manifest(out / "manifest.csv")
        assert code == 0 and all(r["status"] == "ok" and r["backend"] == backend for r in rows)
        ids[backend] = sorted(r["id"] for r in rows)
    assert ids["mediapipe"] == ids["meanshape"] == ids["flame"] and len(ids["flame"]) == 4
    assert (tmp_path / "DM_meanshape" / "meanshape.npz").is_file()


def test_a_mask_that_fails_is_recorded_and_nothing_is_written(tmp_path, monkeypatch):
    src = _photos(tmp_path, ids=("s8",), n=2)
    real = digital_mask.build_mask

    def failing(prep, **kwargs):
        if prep.mean() >= 0:  # every image
            raise topology.MaskError("the rendered mask covers 10% of the face cut")
        return real(prep, **kwargs)

    monkeypatch.setattr(digital_mask, "build_mask", failing)
    out = tmp_path / "DM"
    assert digital_mask.run_digital_mask(src, out, progress=False) == 1
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    assert all("MaskError: the rendered mask covers 10%" in r["reason"] for r in rows)
    assert all(r[v] == "" for r in rows for v in digital_mask.VARIANTS)
    assert not list(out.rglob("*.png")) or list(out.rglob("*.png")) == [out / "montage.png"]


def test_cli_errors_are_clear(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_digital_mask", ROOT / "run_digital_mask.py")
    run_digital_mask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_digital_mask)
    src = _photos(tmp_path, ids=("s9",), n=2)
    code = run_digital_mask.main(["--input_dir", str(src), "--save_dir", str(tmp_path / "o"),
                                  "--backend", "flame", "--model_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "flame_model.npz" in err and "flame.is.tue.mpg.de" in err
    assert not (tmp_path / "o").exists()  # failed before selection: nothing written
    code = run_digital_mask.main(["--input_dir", str(tmp_path / "nope"), "--save_dir",
                                  str(tmp_path / "o")])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_rerun_reuses_selection_decisions_but_retries_failures(tmp_path):
    from faceaudit.core.files import write_csv, write_json
    from faceaudit.mask import selection

    options = selection.SelectionOptions()
    rows = [{"source": "a.png", "status": "accepted", "reason": ""},
            {"source": "b.png", "status": "rejected", "reason": "no face (none >= 0.1)"},
            {"source": "c.jpg", "status": "rejected", "reason": "unreadable: cannot read image c.jpg"},
            {"source": "d.png", "status": "rejected", "reason": "error: RuntimeError: boom"}]
    write_csv(tmp_path / "selection.csv", rows)
    write_json(tmp_path / "selection.json", options.as_dict())
    assert sorted(digital_mask._read_selection(tmp_path, options)) == ["a.png", "b.png"]
    other = selection.SelectionOptions(max_yaw=10.0)
    assert digital_mask._read_selection(tmp_path, other) == {}  # other rules: decide again


def test_a_bad_mean_shape_stops_before_selection(tmp_path):
    from faceaudit.core.files import InputError

    src = _photos(tmp_path, ids=("s9",), n=2)
    write_npz(tmp_path / "meanshape.npz", mean_shape=np.zeros((468, 3)))
    with pytest.raises(InputError, match=r"meanshape\.npz: mean_shape must be \(478, 3\).*\(468, 3\)"):
        digital_mask.run_digital_mask(src, tmp_path / "o", backend="meanshape", model_dir=tmp_path)
    assert not (tmp_path / "o").exists()


def test_worker_tools_follow_the_mean_shape_they_are_given():
    mean = backends.bundled_mean_shape()
    _, _, first = digital_mask._mask_tools("meanshape", None, mean)
    _, _, second = digital_mask._mask_tools("meanshape", None, mean * 1.1)
    assert np.array_equal(first.mean_shape, mean) and np.array_equal(second.mean_shape, mean * 1.1)
    assert digital_mask._mask_tools("meanshape", None, mean.copy())[2] is first
