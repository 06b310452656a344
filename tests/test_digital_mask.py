import csv
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ORL, load_script
from faceaudit.core.files import InputError, write_npz
from faceaudit.core.manifest import read_manifest
from faceaudit.core.runner import OptionsError, RunSettings, StageRun
from faceaudit.mask import backends, digital_mask, selection, topology
from faceaudit.mask.digital_mask import DigitalMaskOptions
from flame_fixtures import synthetic_flame_model

CONTRACT = ["id", "subject", "status", "reason", "role", "video", "source", "backend", "det_score",
            "yaw", "pitch", "roll", "prep", "overlay", "mask_only", "mask_only_black"]


def _run(src, out, seed=0, **options):
    return digital_mask.run_digital_mask(src, out, DigitalMaskOptions(**options),
                                         run=RunSettings(progress=False, seed=seed))


def _photos(tmp_path, ids=("s1", "s2", "s3"), n=4, bad=True):
    src = tmp_path / "photos"
    for ident in ids:
        (src / ident).mkdir(parents=True)
        for k in range(1, n + 1):
            shutil.copy(ORL / ident / f"{k}.pgm", src / ident / f"{k}.pgm")
    if not bad:
        return src
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
    result = _run(src, out, seed=3)
    assert result.exit_code == 1  # the corrupt photo is a failed row
    rows = read_manifest(out / "manifest.csv")
    with open(out / "manifest.csv") as fh:
        header = fh.readline().strip().split(",")
    assert header[:len(CONTRACT)] == CONTRACT
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["id"], r["subject"]) for r in failed] == [("zz_bad/corrupt", "zz_bad")]
    assert failed[0]["reason"].startswith("unreadable: cannot read image")
    rows = [r for r in rows if r["status"] == "ok"]
    assert len(rows) == 6 and {r["role"] for r in rows} == {"database", "query"}
    for row in rows:
        assert row["backend"] == "mediapipe"
        assert row["id"] == f"{row['role']}/{row['subject']}/{Path(row['source']).stem}"
        for variant in digital_mask.VARIANTS:
            path = out / row[variant]
            assert not Path(row[variant]).is_absolute() and path.is_file()
            assert np.asarray(Image.open(path)).shape == (224, 224, 3)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (out / row["mesh"]).is_file() and json.loads((out / row["params"]).read_text(encoding="utf-8"))
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
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["n_images"] == 15 and run["n_pairs"] == 3 and run["unpaired_identities"] == {
        "zz_bad": "no video with 2 accepted frames"}
    assert run["protocol"] == "same-video" and run["backend"] == "mediapipe"
    assert result.summary.splitlines() == [
        ("digital mask (mediapipe): 15 images of 4 identities; accepted 11; rejected 3 "
         "(more than one face 1, no face 1, yaw 1); unreadable 1"),
        (f"masks: 6 built, 0 unchanged from an earlier run, 0 failed; 3 pairs, 1 identities "
         f"unpaired; outputs in {out}")]
    # a re-run skips finished items and leaves them untouched
    before = {r["id"]: os.stat(out / r["overlay"]).st_mtime_ns for r in rows}
    again = _run(src, out, seed=3)
    assert again.exit_code == 1 and again.counts == {"ok": 0, "failed": 1, "skipped": 6}
    assert {r["id"]: os.stat(out / r["overlay"]).st_mtime_ns
            for r in read_manifest(out / "manifest.csv") if r["status"] == "skipped"} == before
    assert "masks: 0 built, 6 unchanged from an earlier run" in again.summary
    from faceaudit.mask.scenarios import read_mask_run

    kept = read_mask_run(out)  # stage 6 reads the kept masks as usable, the unreadable as not
    assert len(kept.rows) == 6 and kept.n_not_ok == 1 and kept.protocol == "same-video"
    # ... and the inputs were never modified
    assert (src / "s1" / "1.pgm").read_bytes() == (ORL / "s1" / "1.pgm").read_bytes()


@pytest.mark.slow
def test_every_backend_masks_the_same_selection(tmp_path):
    src = _photos(tmp_path, ids=("s6", "s7"), n=3)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    mean = backends.bundled_mean_shape()
    write_npz(model_dir / "flame_model.npz", **synthetic_flame_model(mean))
    write_npz(model_dir / "meanshape.npz", mean_shape=mean)
    ids = {}
    for backend in backends.BACKENDS:
        out = tmp_path / f"DM_{backend}"
        result = _run(src, out, seed=5, backend=backend, model_dir=model_dir, protocol="across-video")
        rows = [r for r in read_manifest(out / "manifest.csv") if r["role"]]
        assert result.exit_code == 1  # zz_bad/corrupt.jpg
        assert all(r["status"] == "ok" and r["backend"] == backend for r in rows)
        ids[backend] = sorted(r["id"] for r in rows)
    assert ids["mediapipe"] == ids["meanshape"] == ids["flame"] and len(ids["flame"]) == 4
    assert (tmp_path / "DM_meanshape" / "meanshape.npz").is_file()


def test_a_mask_that_fails_is_recorded_and_nothing_is_written(tmp_path, monkeypatch):
    src = _photos(tmp_path, ids=("s8",), n=2, bad=False)
    real = digital_mask.build_mask

    def failing(prep, **kwargs):
        if prep.mean() >= 0:  # every image
            raise topology.MaskError("the rendered mask covers 10% of the face cut")
        return real(prep, **kwargs)

    monkeypatch.setattr(digital_mask, "build_mask", failing)
    out = tmp_path / "DM"
    result = _run(src, out)
    assert result.exit_code == 1
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    assert all("MaskError: the rendered mask covers 10%" in r["reason"] for r in rows)
    assert all(r[v] == "" for r in rows for v in digital_mask.VARIANTS)
    assert not list(out.rglob("*.png"))
    assert "0 built, 0 unchanged from an earlier run, 2 failed" in result.summary


def test_a_write_that_fails_midway_leaves_no_face_image(tmp_path):
    """The last file of an item cannot be written (a folder stands where it goes): the
    crop and overlays written before it are removed, the row is failed, exit 1."""
    src = _photos(tmp_path, ids=("s8",), n=2, bad=False)
    out = tmp_path / "DM"
    for role in ("database", "query"):
        (out / role / "s8" / "1_params.json").mkdir(parents=True)
    result = _run(src, out)
    rows = {Path(r["source"]).name: r for r in read_manifest(out / "manifest.csv")}
    assert result.exit_code == 1
    assert rows["1.pgm"]["status"] == "failed" and "1_params.json" in rows["1.pgm"]["reason"]
    assert rows["2.pgm"]["status"] == "ok"
    assert not list(out.rglob("1_*.png")) and not list(out.rglob("1_mesh.ply"))
    assert len(list(out.rglob("2_*.png"))) == 4
    assert (out / "run.json").is_file()


def test_cli_errors_are_clear(tmp_path, capsys):
    script = load_script("run_digital_mask")
    src = _photos(tmp_path, ids=("s9",), n=2)
    code = script.main(["--input_dir", str(src), "--save_dir", str(tmp_path / "o"),
                        "--backend", "flame", "--model_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "flame_model.npz" in err and "flame.is.tue.mpg.de" in err
    assert not (tmp_path / "o").exists()  # failed before selection: nothing written
    code = script.main(["--input_dir", str(tmp_path / "nope"), "--save_dir", str(tmp_path / "o")])
    assert code == 2 and "nope" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max_yaw", "-1"], "expected --max_yaw to be a number in (0, 90], found -1.0"),
    (["--max_pitch", "0"], "expected --max_pitch to be a number in (0, 90], found 0.0"),
    (["--max_roll", "nan"], "expected --max_roll to be a number in (0, 180], found nan"),
    (["--min_confidence", "1.5"], "expected --min_confidence to be a number in [0, 1), found 1.5"),
    (["--min_side", "0"], "expected --min_side to be a whole number >= 1, found 0"),
    (["--jobs", "0"], "expected --jobs to be a whole number >= 1, found 0"),
])
def test_nonsense_options_exit_2_before_any_work(tmp_path, capsys, flags, message):
    script = load_script("run_digital_mask")
    code = script.main(["--input_dir", str(ORL), "--save_dir", str(tmp_path / "o"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_script_defaults_are_the_options_defaults(monkeypatch):
    from faceaudit.mask import digital_mask as dm

    seen = {}
    monkeypatch.setattr(dm, "run_digital_mask", lambda src, out, options, run: seen.setdefault("o", options) and 0)
    assert load_script("run_digital_mask").main(["--input_dir", "in", "--save_dir", "out"]) == 0
    assert seen["o"] == DigitalMaskOptions()
    defaults = selection.SelectionOptions()
    assert DigitalMaskOptions().selection == defaults and defaults.size == defaults.min_side == 224


def test_options_are_validated_on_creation():
    with pytest.raises(OptionsError, match="--backend to be one of"):
        DigitalMaskOptions(backend="dm")
    with pytest.raises(OptionsError, match="--protocol"):
        DigitalMaskOptions(protocol="random")
    assert DigitalMaskOptions(model_dir=Path("/x")).model_dir == "/x"
    assert DigitalMaskOptions(max_yaw=15).selection == selection.SelectionOptions(max_yaw=15)


def _fake_selection(monkeypatch, outcomes):
    """select_one answering from ``outcomes`` (file name -> row values, or "crash"); returns
    the list of file names it is asked about."""
    calls = []

    def fake(image, options):
        calls.append(Path(image.source).name)
        outcome = outcomes[Path(image.source).name]
        if outcome == "crash":
            raise RuntimeError("detector crashed")
        return {"identity": image.identity, "video": image.video, "name": image.name,
                "source": image.source, **outcome}

    monkeypatch.setattr(selection, "select_one", fake)
    return calls


def _select_twice_src(tmp_path):
    src = tmp_path / "photos" / "p1"
    src.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.jpg", "d.png"):
        (src / name).write_bytes(name.encode())
    return src.parent


def _select(out, src, options=selection.SelectionOptions()):
    with StageRun("digital_mask", out, RunSettings(progress=False)) as stage:
        rows, n_new = digital_mask.select_images(stage, selection.discover_images(src), options)
        digital_mask.write_selection(stage.save_dir, rows)
    return rows, n_new


def test_rerun_reuses_selection_decisions_by_content_and_retries_failures(tmp_path, monkeypatch):
    src = _select_twice_src(tmp_path)
    calls = _fake_selection(monkeypatch, {
        "a.png": {"status": "accepted", "reason": ""},
        "b.png": {"status": "rejected", "reason": "no face (none >= 0.1)"},
        "c.jpg": {"status": "rejected", "reason": "unreadable: c.jpg"},
        "d.png": "crash"})
    out = tmp_path / "DM"
    rows, n_new = _select(out, src)
    assert calls == ["a.png", "b.png", "c.jpg", "d.png"] and n_new == 4
    assert rows[3]["reason"] == "error: RuntimeError: detector crashed"
    calls.clear()
    assert _select(out, src)[1] == 2 and calls == ["c.jpg", "d.png"]  # failures: tried again
    calls.clear()
    (src / "p1" / "a.png").write_bytes(b"another photo")          # new content: decided anew
    assert _select(out, src)[1] == 3 and calls == ["a.png", "c.jpg", "d.png"]
    calls.clear()
    _select(out, src, selection.SelectionOptions(max_yaw=10.0))    # other rules: all anew
    assert calls == ["a.png", "b.png", "c.jpg", "d.png"]


def test_a_broken_selection_csv_is_named_in_a_warning_and_decided_again(tmp_path, monkeypatch, caplog):
    src = _select_twice_src(tmp_path)
    calls = _fake_selection(monkeypatch, dict.fromkeys(("a.png", "b.png", "c.jpg", "d.png"),
                                                       {"status": "rejected", "reason": "no face"}))
    out = tmp_path / "DM"
    _select(out, src)
    (out / "selection.csv").write_bytes(b"\xff\xfe not utf-8 \x00\x81")
    calls.clear()
    with caplog.at_level("WARNING", logger="faceaudit.mask.digital_mask"):
        _select(out, src)
    assert len(calls) == 4
    assert any(str(out / "selection.csv") in r.getMessage() for r in caplog.records)


def _killed_run(tmp_path, body, *args):
    """Run ``body`` (Python, after the stage imports) in a child process that kills itself with
    SIGKILL where the body says; returns the child's exit code."""
    code = textwrap.dedent("""
        import os, signal, sys
        from faceaudit.core.runner import RunSettings
        from faceaudit.mask import digital_mask, selection
        from faceaudit.mask.digital_mask import DigitalMaskOptions

        def die():
            os.kill(os.getpid(), signal.SIGKILL)
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_a_run_killed_during_selection_keeps_the_decisions_it_made(tmp_path, monkeypatch):
    src = _select_twice_src(tmp_path)
    out = tmp_path / "DM"
    code, err = _killed_run(tmp_path, """
        calls = []
        def fake(image, options):
            calls.append(image.source)
            if len(calls) == 3:
                die()
            return {"identity": image.identity, "video": image.video, "name": image.name,
                    "source": image.source, "status": "rejected", "reason": "no face"}
        selection.select_one = fake
        digital_mask.run_digital_mask(sys.argv[1], sys.argv[2], DigitalMaskOptions(),
                                      run=RunSettings(progress=False))
    """, src, out)
    assert code == -signal.SIGKILL, err
    assert not (out / "selection.csv").exists()
    calls = _fake_selection(monkeypatch, dict.fromkeys(("a.png", "b.png", "c.jpg", "d.png"),
                                                       {"status": "rejected", "reason": "no face"}))
    rows, n_new = _select(out, src)
    assert calls == ["c.jpg", "d.png"] and n_new == 2   # the first two decisions survived the kill
    assert not (out / digital_mask.SELECTION_JOURNAL).exists()


def _disjoint_seeds(n_photos=4):
    rows = [{"identity": "s1", "video": "", "name": str(k), "status": "accepted"} for k in range(1, n_photos + 1)]
    picks = {s: set(selection.choose_pairs(rows, protocol="same-video", seed=s)[0]) for s in range(20)}
    return 0, next(s for s in range(20) if not picks[s] & picks[0])


def test_a_run_killed_while_writing_a_mask_leaves_no_face_behind(tmp_path):
    """The run dies (SIGKILL) between two files of its second mask: that item has no row.
    The next run, picking other photos, removes the files no row records."""
    src = _photos(tmp_path, ids=("s1",), n=4, bad=False)
    out = tmp_path / "DM"
    seed_a, seed_b = _disjoint_seeds()
    code, err = _killed_run(tmp_path, """
        real = digital_mask.write_json
        written = []
        def dying(path, obj):
            written.append(path)
            if len(written) == 2:
                die()
            return real(path, obj)
        digital_mask.write_json = dying
        digital_mask.run_digital_mask(sys.argv[1], sys.argv[2], DigitalMaskOptions(),
                                      run=RunSettings(progress=False, seed=int(sys.argv[3])))
    """, src, out, seed_a)
    assert code == -signal.SIGKILL, err
    assert len(list(out.rglob("*_prep.png"))) == 2   # one finished mask, one half-written
    assert _run(src, out, seed=seed_b).exit_code == 0
    rows = read_manifest(out / "manifest.csv")
    named = {os.path.normpath(out / r[k]) for r in rows for k in digital_mask.OUTPUT_KEYS}
    left = {os.path.normpath(p) for p in out.rglob("*") if p.is_file() and p.parent != out}
    assert left == named and len(list(out.rglob("*_prep.png"))) == 2


def test_a_photo_that_cannot_be_read_is_a_failed_row_not_the_end_of_the_run(tmp_path, monkeypatch):
    """EACCES while fingerprinting one photo (root reads through chmod, so the fault is
    injected where the stage reads the file)."""
    from faceaudit.core import runner

    src = _photos(tmp_path, ids=("s8",), n=3, bad=False)
    locked = src / "s8" / "3.pgm"
    real = runner.file_digest

    def digest(path, *args):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(runner, "file_digest", digest)
    out = tmp_path / "DM"
    result = _run(src, out)
    assert result.exit_code == 1
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["s8/3"]["status"] == "failed"
    assert rows["s8/3"]["reason"] == f"unreadable: cannot read {locked}: [Errno 13 EACCES] Permission denied"
    assert sum(r["status"] == "ok" for r in rows.values()) == 2
    assert "unreadable 1" in result.summary and "masks: 2 built, 0 unchanged from an earlier run, 0 failed" \
        in result.summary


def test_selection_errors_are_counted_apart_from_unreadable_photos():
    rows = [{"identity": "p", "status": "rejected", "reason": r} for r in
            ("unreadable: cannot read image x", "error: RuntimeError: boom", "error: WorkerDied: killed",
             "no face (none)")]
    text, details = digital_mask._summary(DigitalMaskOptions(), rows, {"failed": 3}, 0, {}, 0, Path("DM"))
    assert details["n_unreadable"] == 1 and details["n_selection_errors"] == 2
    assert details["n_masks_failed"] == 0
    assert "unreadable 1; selection errors 2" in text


def test_a_run_without_masks_removes_the_earlier_montage(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "montage.png")
    digital_mask._write_montage(tmp_path, [])
    assert not (tmp_path / "montage.png").exists()


def test_a_replaced_photo_is_redone_and_another_seed_removes_the_old_picks(tmp_path):
    src = _photos(tmp_path, ids=("s1",), n=4, bad=False)
    out = tmp_path / "DM"
    rows = [{"identity": "s1", "video": "", "name": str(k), "status": "accepted"} for k in range(1, 5)]
    picks = {s: set(selection.choose_pairs(rows, protocol="same-video", seed=s)[0]) for s in range(20)}
    seed_a = 0
    seed_b = next(s for s in range(20) if not picks[s] & picks[seed_a])  # two other photos
    assert _run(src, out, seed=seed_a).exit_code == 0
    first = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    # replace one picked photo by another person's: its selection and mask are redone
    victim = next(iter(first.values()))
    shutil.copy(ORL / "s2" / "1.pgm", victim["source"])
    result = _run(src, out, seed=seed_a)
    assert result.counts == {"ok": 1, "failed": 0, "skipped": 1}
    again = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert again[victim["id"]]["status"] == "ok"
    prep_now = np.asarray(Image.open(out / again[victim["id"]]["prep"]))
    expected = selection.prep_from_row(_selection(out / "selection.csv")[victim["source"]],
                                       selection.SelectionOptions())
    assert np.array_equal(prep_now, expected)
    # another seed picks two other photos: the first picks' images are gone, not left beside
    assert _run(src, out, seed=seed_b).exit_code == 0
    last = read_manifest(out / "manifest.csv")
    assert {r["id"] for r in last}.isdisjoint(first)
    for row in first.values():
        assert not any((out / row[k]).exists() for k in digital_mask.OUTPUT_KEYS)
    assert len(list(out.rglob("*_prep.png"))) == 2


def test_unreadable_photos_are_failed_rows_and_exit_1(tmp_path):
    src = _photos(tmp_path, ids=("s2",), n=2, bad=False)
    broken = src / "s3"
    broken.mkdir()
    data = (ORL / "s3" / "1.pgm").read_bytes()
    (broken / "truncated.pgm").write_bytes(data[: len(data) // 3])
    (broken / "empty.png").write_bytes(b"")
    (broken / "text.jpg").write_text("not an image")
    result = _run(src, tmp_path / "DM")
    assert result.exit_code == 1 and result.counts["failed"] == 3 and result.counts["ok"] == 2
    rows = {r["id"]: r for r in read_manifest(tmp_path / "DM" / "manifest.csv")}
    for name in ("truncated", "empty", "text"):
        row = rows[f"s3/{name}"]
        assert row["status"] == "failed" and row["subject"] == "s3" and row["role"] == ""
        assert row["reason"].startswith("unreadable: cannot read image") and name in row["reason"]
    assert "unreadable 3" in result.summary and "masks: 2 built" in result.summary


def test_a_bad_mean_shape_stops_before_selection(tmp_path):
    src = _photos(tmp_path, ids=("s9",), n=2)
    write_npz(tmp_path / "meanshape.npz", mean_shape=np.zeros((468, 3)))
    with pytest.raises(InputError, match=r"meanshape\.npz: mean_shape must be \(478, 3\).*\(468, 3\)"):
        _run(src, tmp_path / "o", backend="meanshape", model_dir=tmp_path)
    assert not (tmp_path / "o").exists()


def test_a_mistyped_mean_shape_folder_is_an_error_not_the_bundled_mean(tmp_path, capsys):
    src = _photos(tmp_path, ids=("s9",), n=2)
    typo = tmp_path / "modles"
    with pytest.raises(InputError, match=rf"meanshape\.npz .* in --model_dir {typo}, found nothing"):
        _run(src, tmp_path / "o", backend="meanshape", model_dir=typo)
    typo.mkdir()
    code = load_script("run_digital_mask").main(
        ["--input_dir", str(src), "--save_dir", str(tmp_path / "o"), "--backend", "meanshape",
         "--model_dir", str(typo)])
    assert code == 2 and f"{typo}, found a folder without it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_montage_heads_each_line_with_the_whole_identity_name(tmp_path):
    from PIL import ImageDraw

    name = "Maria_Soledad_Alvear_Valenzuela_de_la_Fuente"  # 44 characters
    prep = np.full((224, 224, 3), 128, np.uint8)
    row = {"id": f"database/{name}/1", "subject": name, "role": "database"}
    for variant in digital_mask.VARIANTS:
        row[variant] = f"{variant}.png"
        Image.fromarray(prep).save(tmp_path / f"{variant}.png")
    digital_mask._write_montage(tmp_path, [row])
    sheet = np.asarray(Image.open(tmp_path / "montage.png").convert("L"))
    head = sheet[:16]
    dark_cols = np.flatnonzero((head < 128).any(axis=0))
    text = f"{name} (database)"
    width = ImageDraw.Draw(Image.new("RGB", (10, 10))).textlength(text)
    assert dark_cols.max() >= 2 + width - 8  # drawn to its end, not cut at 26 characters
    assert width > 26 * 7


def test_worker_tools_follow_the_mean_shape_they_are_given():
    mean = backends.bundled_mean_shape()
    _, _, first = digital_mask._mask_tools("meanshape", None, mean)
    _, _, second = digital_mask._mask_tools("meanshape", None, mean * 1.1)
    assert np.array_equal(first.mean_shape, mean) and np.array_equal(second.mean_shape, mean * 1.1)
    assert digital_mask._mask_tools("meanshape", None, mean.copy())[2] is first
