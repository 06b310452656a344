import csv
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ORL, load_script
from faceaudit.core.files import InputError, write_csv, write_npz
from faceaudit.core.manifest import read_manifest
from faceaudit.core.runner import OptionsError, RunSettings, fingerprint
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
    (["--max_yaw", "-1"], "expected --max_yaw to be an angle in (0, 90] degrees, found -1.0"),
    (["--max_pitch", "0"], "expected --max_pitch to be an angle in (0, 90] degrees, found 0.0"),
    (["--max_roll", "nan"], "expected --max_roll to be an angle in (0, 180] degrees"),
    (["--min_confidence", "1.5"], "expected --min_confidence to be a confidence in [0, 1)"),
    (["--min_side", "0"], "expected --min_side to be a whole number >= 1, found 0"),
    (["--jobs", "0"], "expected --jobs to be a whole number >= 1, found 0"),
])
def test_nonsense_options_exit_2_before_any_work(tmp_path, capsys, flags, message):
    script = load_script("run_digital_mask")
    code = script.main(["--input_dir", str(ORL), "--save_dir", str(tmp_path / "o"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_are_validated_on_creation():
    with pytest.raises(OptionsError, match="--backend to be one of"):
        DigitalMaskOptions(backend="dm")
    with pytest.raises(OptionsError, match="--protocol"):
        DigitalMaskOptions(protocol="random")
    assert DigitalMaskOptions(model_dir=Path("/x")).model_dir == "/x"
    assert DigitalMaskOptions(max_yaw=15).selection == selection.SelectionOptions(max_yaw=15)


def test_rerun_reuses_selection_decisions_by_content_and_retries_failures(tmp_path):
    options = selection.SelectionOptions()
    files = {}
    for name, data in (("a.png", b"a"), ("b.png", b"b"), ("c.jpg", b"c"), ("d.png", b"d")):
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    rows = [{"source": str(files["a.png"]), "status": "accepted", "reason": ""},
            {"source": str(files["b.png"]), "status": "rejected", "reason": "no face (none >= 0.1)"},
            {"source": str(files["c.jpg"]), "status": "rejected", "reason": "unreadable: c.jpg"},
            {"source": str(files["d.png"]), "status": "rejected", "reason": "error: RuntimeError"}]
    for row in rows:
        row["fingerprint"] = fingerprint(Path(row["source"]), options)
    write_csv(tmp_path / "selection.csv", rows)
    earlier = digital_mask._read_selection(tmp_path)
    assert sorted(Path(s).name for s in earlier) == ["a.png", "b.png"]  # failures: tried again
    # reused only while the photo's content and the options are those that decided it
    assert earlier[str(files["a.png"])]["fingerprint"] == fingerprint(files["a.png"], options)
    files["a.png"].write_bytes(b"another photo")
    assert earlier[str(files["a.png"])]["fingerprint"] != fingerprint(files["a.png"], options)
    assert earlier[str(files["b.png"])]["fingerprint"] != fingerprint(
        files["b.png"], selection.SelectionOptions(max_yaw=10.0))


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
