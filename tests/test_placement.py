"""Landmark placement stage end to end on a tiny fixture (astronaut face as "CT",
blurred noisy copy as "PET"), with the cross-validation's contracts written by hand."""

import json
import os
import shutil
import stat

import numpy as np
import pytest

from conftest import load_script
from faceaudit.core.files import InputError, read_npz, write_npz, write_png
from faceaudit.core.images import to_uint8
from faceaudit.core.manifest import read_manifest
from faceaudit.core.runner import OptionsError, RunSettings
from faceaudit.petct.landmarks import Framing
from faceaudit.petct.placement import PlacementOptions, run_landmark_placement

IDS = ["PETCT_a_s1", "PETCT_a_s2", "PETCT_b_s1", "PETCT_c_s1"]
SUBJECTS = {"PETCT_a_s1": "PETCT_a", "PETCT_a_s2": "PETCT_a", "PETCT_b_s1": "PETCT_b", "PETCT_c_s1": "PETCT_c"}


def _face(shift):
    from skimage import color, data, transform

    g = color.rgb2gray(data.astronaut())
    dy, dx = shift
    return transform.resize(g[10 + dy:310 + dy, 80 + dx:380 + dx], (256, 256), anti_aliasing=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from skimage import filters

    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows = ["id,subject,status,reason"]
    for n, iid in enumerate(IDS):
        ct = _face((3 * n, -4 * n))
        pet = np.clip(filters.gaussian(ct, 1.5) + rng.normal(0, 0.04, ct.shape), 0, 1)
        write_png(root / "recon" / "cts" / f"{iid}.png", to_uint8(ct))
        write_png(root / "recon" / "pets" / f"{iid}.png", to_uint8(pet))
        # the "U-Net" output of the cross-validation: a 208 crop, smoothed PET
        write_png(root / "cv" / "denoised" / f"fold{n // 2}" / f"{iid}.png",
                  to_uint8(filters.gaussian(pet, 1.0)[24:232, 24:232]))
        rows.append(f"{iid},{SUBJECTS[iid]},ok,")
    (root / "recon" / "manifest.csv").write_text("\n".join(rows) + "\n")
    splits = {"scheme": "kfold", "n_folds": 2, "seed": 0, "crop": 208,
              "folds": [{"fold": 0, "train": IDS[2:], "val": [], "test": IDS[:2]},
                        {"fold": 1, "train": IDS[:2], "val": [], "test": IDS[2:]}]}
    (root / "cv" / "splits.json").write_text(json.dumps(splits))
    return root


def _run(cohort, out, *, load_denoiser=None, framing=None, models_path=None, recon=None, **options):
    """Run the stage on ``cohort`` with PlacementOptions(**options), no progress bars; the exit code."""
    if framing is not None:
        options.update(upscale=framing.upscale, pad=framing.pad)
    recon = recon or cohort / "recon"
    result = run_landmark_placement(recon / "cts", recon / "pets", cohort / "cv" / "splits.json", out,
                                    PlacementOptions(models_dir=models_path, **options),
                                    run=RunSettings(progress=False), load_denoiser=load_denoiser)
    return result.exit_code


def test_placement_end_to_end_with_denoised_dir(cohort, tmp_path):
    out = tmp_path / "LM"
    assert _run(cohort, out, denoised_dir=cohort / "cv" / "denoised") == 0
    for k, ids in ((0, IDS[:2]), (1, IDS[2:])):
        for variant in ("ct", "pet", "pet_wavelet", "pet_unet"):
            data = read_npz(out / f"fold{k}" / f"landmarks_{variant}.npz")
            assert data["ids"].tolist() == ids  # split order, by id
            assert data["subjects"].tolist() == [SUBJECTS[i] for i in ids]
            assert data["landmarks"].shape == (2, 478, 3)
            assert data["detected"].dtype == bool
            assert data["detected"].all(), variant  # the astronaut is found in every variant
    import csv

    det = {r["variant"]: r for r in csv.DictReader(open(out / "detection.csv"))}
    assert set(det) == {"ct", "pet", "pet_wavelet", "pet_unet"}
    assert float(det["ct"]["mean"]) == 1.0 and float(det["ct"]["std"]) == 0.0 and det["ct"]["n"] == "4"
    place = {r["variant"]: r for r in csv.DictReader(open(out / "placement.csv"))}
    assert set(place) == {"pet", "pet_wavelet", "pet_unet"}
    for row in place.values():
        assert 0 < float(row["median_mad_mean"]) < 15
        assert float(row["well_placed_mean"]) == 1.0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["variants_scored"] == ["ct", "pet", "pet_wavelet", "pet_unet"]
    rows = read_manifest(out / "manifest.csv")
    assert sorted(r["id"] for r in rows) == sorted(f"fold{i // 2}/{x}" for i, x in enumerate(IDS))
    assert (out / "qa_landmarks.png").is_file() and (out / "run.json").is_file()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "fold0" / "landmarks_ct.npz").st_mode) == 0o600

    # a re-run skips finished folds (files untouched) ...
    before = os.stat(out / "fold0" / "landmarks_pet.npz").st_mtime_ns
    assert _run(cohort, out, denoised_dir=cohort / "cv" / "denoised") == 0
    assert os.stat(out / "fold0" / "landmarks_pet.npz").st_mtime_ns == before
    rows = read_manifest(out / "manifest.csv")
    assert {r["status"] for r in rows} == {"skipped"} and rows[0]["mad_pet"] != ""  # numbers kept
    assert len({r["fingerprint"] for r in rows}) == 4
    # ... unless the framing changed
    assert _run(cohort, out, denoised_dir=cohort / "cv" / "denoised", framing=Framing(pad=8), n_qa=0) == 0
    assert os.stat(out / "fold0" / "landmarks_pet.npz").st_mtime_ns != before
    assert '"pad": 8' in str(read_npz(out / "fold0" / "landmarks_pet.npz")["settings"])
    # ... and the upstream MAD divisor scales the MAD by 478 / 468
    up = tmp_path / "LM_up"
    assert _run(cohort, up, denoised_dir=cohort / "cv" / "denoised", upstream_mad=True, n_qa=0) == 0
    place_up = {r["variant"]: r for r in csv.DictReader(open(up / "placement.csv"))}
    assert float(place_up["pet"]["median_mad_mean"]) == pytest.approx(
        float(place["pet"]["median_mad_mean"]) * 478 / 468, rel=1e-4)


def test_placement_with_injected_denoiser_and_without_unet(cohort, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"not read by the fake loader")
    seen = []

    def fake_loader(pt_path):
        seen.append(pt_path.name)
        return lambda batch: np.clip(batch * 1.0, 0, 1)

    # the CV's denoised folder is incomplete for fold 1 (one image missing): the model fills in
    import shutil

    partial_cv = tmp_path / "denoised"
    shutil.copytree(cohort / "cv" / "denoised", partial_cv)
    (partial_cv / "fold1" / f"{IDS[3]}.png").unlink()
    out = tmp_path / "LM"
    assert _run(cohort, out, models_path=models, denoised_dir=partial_cv, load_denoiser=fake_loader, n_qa=0) == 0
    assert seen == ["best_model_fold1.pt"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["pet_unet_source"] == {"0": str(partial_cv / "fold0"), "1": str(models / "best_model_fold1.pt")}
    assert (out / "denoised" / "fold1" / f"{IDS[3]}.png").is_file()
    assert read_npz(out / "fold1" / "landmarks_pet_unet.npz")["detected"].all()
    seen.clear()
    out_models = tmp_path / "LM_models"
    assert _run(cohort, out_models, models_path=models, load_denoiser=fake_loader, n_qa=0) == 0
    assert seen == ["best_model_fold0.pt", "best_model_fold1.pt"]

    plain = tmp_path / "LM_plain"
    assert _run(cohort, plain, n_qa=0) == 0
    summary = json.loads((plain / "summary.json").read_text(encoding="utf-8"))
    assert summary["variants_scored"] == ["ct", "pet", "pet_wavelet"]
    assert "pet_unet" in summary["variants_not_scored"]
    assert not (plain / "fold0" / "landmarks_pet_unet.npz").exists()


def test_a_broken_model_costs_only_its_folds_unet_variant(cohort, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"x")

    def loader(pt_path):
        if pt_path.name == "best_model_fold1.pt":
            raise InputError(f"cannot load a unet state_dict from {pt_path}: truncated")
        return lambda batch: batch

    out = tmp_path / "LM"
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 1
    assert (out / "fold0" / "landmarks_pet_unet.npz").is_file()
    assert not (out / "fold1" / "landmarks_pet_unet.npz").exists()
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["fold1/denoiser"]["status"] == "failed" and "truncated" in rows["fold1/denoiser"]["reason"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    unet = next(r for r in summary["detection"] if r["variant"] == "pet_unet")
    assert unet["folds_scored"] == 1 and unet["n"] == 2
    # the CV's own images mend fold 1 in a re-run: its old failure does not linger
    assert _run(cohort, out, denoised_dir=cohort / "cv" / "denoised", n_qa=0) == 0
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert "fold1/denoiser" not in rows and all(r["status"] == "ok" for r in rows.values())


def test_a_model_that_fails_when_run_costs_only_its_folds_unet_variant(cohort, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "best_model_fold0.pt").write_bytes(b"x")

    def loader(pt_path):
        def run(batch):
            raise RuntimeError("CUDA out of memory")
        return run

    out = tmp_path / "LM"
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 1
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["fold0/denoiser"]["status"] == "failed"
    assert "RuntimeError: CUDA out of memory" in rows["fold0/denoiser"]["reason"]
    assert rows[f"fold0/{IDS[0]}"]["status"] == "ok"  # the other variants were still scored
    assert (out / "fold0" / "landmarks_pet.npz").is_file()


def test_missing_and_truncated_renders_are_failed_rows(cohort, tmp_path):
    import shutil

    broken = tmp_path / "recon"
    shutil.copytree(cohort / "recon", broken)
    (broken / "pets" / f"{IDS[1]}.png").unlink()
    png = (broken / "cts" / f"{IDS[2]}.png").read_bytes()
    (broken / "cts" / f"{IDS[2]}.png").write_bytes(png[: len(png) // 3])
    out = tmp_path / "LM"
    code = _run(cohort, out, recon=broken, n_qa=0)
    assert code == 1
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows[f"fold0/{IDS[1]}"]["status"] == "failed"
    assert f"{IDS[1]}.png" in rows[f"fold0/{IDS[1]}"]["reason"] and "found nothing" in rows[f"fold0/{IDS[1]}"]["reason"]
    assert rows[f"fold1/{IDS[2]}"]["status"] == "failed"
    assert "cannot read" in rows[f"fold1/{IDS[2]}"]["reason"]
    assert rows[f"fold0/{IDS[0]}"]["status"] == "ok"
    assert read_npz(out / "fold0" / "landmarks_ct.npz")["ids"].tolist() == [IDS[0]]


def _npz_state(out):
    """(mtime, input_sha1) of every landmark file, keyed by fold/variant."""
    return {f"{f.parent.name}/{f.stem}": (os.stat(f).st_mtime_ns, str(read_npz(f)["input_sha1"]))
            for f in sorted(out.glob("fold*/landmarks_*.npz"))}


def test_rerun_recomputes_only_the_variants_whose_input_images_changed(cohort, tmp_path):
    import shutil

    shutil.copytree(cohort / "recon", tmp_path / "recon")
    shutil.copytree(cohort / "cv", tmp_path / "cv")
    denoised = tmp_path / "cv" / "denoised"
    out = tmp_path / "LM"
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 0
    first = _npz_state(out)
    assert len(first) == 8 and len({sha for _, sha in first.values()}) == 8
    unet_before = read_npz(out / "fold1" / "landmarks_pet_unet.npz")

    # the denoiser was re-trained: fold 1's U-Net image of IDS[3] is a different (shifted) face
    write_png(denoised / "fold1" / f"{IDS[3]}.png", to_uint8(_face((40, 30))[24:232, 24:232]))
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 0
    second = _npz_state(out)
    changed = {key for key in first if first[key] != second[key]}
    assert changed == {"fold1/landmarks_pet_unet"}
    assert second["fold1/landmarks_pet_unet"][1] != first["fold1/landmarks_pet_unet"][1]
    unet_after = read_npz(out / "fold1" / "landmarks_pet_unet.npz")
    assert unet_after["ids"].tolist() == IDS[2:] and unet_after["detected"].all()
    assert np.abs(unet_after["landmarks"][1] - unet_before["landmarks"][1]).max() > 0.02  # face moved
    np.testing.assert_array_equal(unet_after["landmarks"][0], unet_before["landmarks"][0])  # image unchanged

    # a new CT render of IDS[0]: fold 0's CT landmarks only
    write_png(tmp_path / "recon" / "cts" / f"{IDS[0]}.png", to_uint8(_face((40, 30))))
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 0
    third = _npz_state(out)
    assert {key for key in second if second[key] != third[key]} == {"fold0/landmarks_ct"}

    # a landmark file from before fingerprints existed is not trusted
    old = read_npz(out / "fold0" / "landmarks_pet.npz")
    del old["input_sha1"]
    write_npz(out / "fold0" / "landmarks_pet.npz", **old)
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 0
    fourth = _npz_state(out)
    assert {key for key in third if third[key] != fourth[key]} == {"fold0/landmarks_pet"}
    assert fourth["fold0/landmarks_pet"][1] == third["fold0/landmarks_pet"][1]

    # a changed image that can no longer be read fails its item, and the fold's reused
    # variants are rewritten without it (every variant of a fold holds the same ids) ...
    png = (denoised / "fold1" / f"{IDS[3]}.png").read_bytes()
    (denoised / "fold1" / f"{IDS[3]}.png").write_bytes(png[: len(png) // 3])
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 1
    for variant in ("ct", "pet", "pet_wavelet", "pet_unet"):
        assert read_npz(out / "fold1" / f"landmarks_{variant}.npz")["ids"].tolist() == [IDS[2]]
    assert read_npz(out / "fold0" / "landmarks_pet.npz")["ids"].tolist() == IDS[:2]
    # ... and mended by the next run once the image is good again
    (denoised / "fold1" / f"{IDS[3]}.png").write_bytes(png)
    assert _run(tmp_path, out, denoised_dir=denoised, n_qa=0) == 0
    for variant in ("ct", "pet", "pet_wavelet", "pet_unet"):
        assert read_npz(out / "fold1" / f"landmarks_{variant}.npz")["ids"].tolist() == IDS[2:]
    assert _npz_state(out)["fold1/landmarks_pet_unet"][1] == second["fold1/landmarks_pet_unet"][1]


def test_rerun_after_retraining_redenoises_and_replaces_only_that_folds_unet(cohort, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"1.0")
    seen = []

    def loader(pt_path):
        """A "denoiser" whose output depends on the model file's bytes (a gain)."""
        seen.append(pt_path.name)
        gain = float(pt_path.read_bytes())
        return lambda batch: np.clip(batch * gain, 0, 1)

    out = tmp_path / "LM"
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 0
    assert seen == ["best_model_fold0.pt", "best_model_fold1.pt"]
    first = _npz_state(out)
    png_fold0 = (out / "denoised" / "fold0" / f"{IDS[0]}.png").read_bytes()
    png_fold1 = (out / "denoised" / "fold1" / f"{IDS[2]}.png").read_bytes()

    seen.clear()  # nothing changed: no model is even loaded
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 0
    assert seen == [] and _npz_state(out) == first

    (models / "best_model_fold0.pt").write_bytes(b"0.6")  # fold 0 re-trained
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 0
    assert seen == ["best_model_fold0.pt"]
    assert (out / "denoised" / "fold0" / f"{IDS[0]}.png").read_bytes() != png_fold0
    assert (out / "denoised" / "fold1" / f"{IDS[2]}.png").read_bytes() == png_fold1
    second = _npz_state(out)
    assert {key for key in first if first[key] != second[key]} == {"fold0/landmarks_pet_unet"}
    assert second["fold0/landmarks_pet_unet"][1] != first["fold0/landmarks_pet_unet"][1]


def test_unusable_splits_files_stop_the_stage_before_any_work(cohort, tmp_path, capsys):
    """Issue 12 point 7: stage 3 reads splits.json through the one validator. A fold number
    used twice (its test images would be scored with a model trained on them), an id with
    no render, or a null fold number is exit 2 naming the entry; nothing is written."""
    good = json.loads((cohort / "cv" / "splits.json").read_text(encoding="utf-8"))
    script = load_script("perform_landmark_placement")
    cases = {"repeated": ({**good, "folds": [good["folds"][0], {**good["folds"][1], "fold": 0}]},
                          "fold number 0 is already used"),
             "unknown": ({**good, "folds": [{**good["folds"][0], "test": [*IDS[:2], "PETCT_zz_s9"]},
                                             good["folds"][1]]}, "PETCT_zz_s9"),
             "null fold": ({**good, "folds": [{**good["folds"][0], "fold": None}, good["folds"][1]]},
                           "expected 'fold' to be a whole number >= 0, found None")}
    for name, (splits, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(splits))
        out = tmp_path / f"LM_{name}"
        code = script.main(["--ct_files", str(cohort / "recon" / "cts"), "--pet_files", str(cohort / "recon" / "pets"),
                            "--splits_file", str(path), "--save_dir", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert message in err and str(path) in err, (name, err)
        assert not out.exists(), name


def test_script_main_exit_codes(cohort, tmp_path, capsys):
    script = load_script("perform_landmark_placement")
    out = tmp_path / "LM"
    code = script.main(["--ct_files", str(cohort / "recon" / "cts"), "--pet_files", str(cohort / "recon" / "pets"),
                        "--splits_file", str(cohort / "cv" / "splits.json"), "--save_dir", str(out),
                        "--upscale", "1.5", "--pad", "0.1", "--n_qa", "0", "--quiet"])
    assert code == 0 and (out / "fold1" / "landmarks_pet_wavelet.npz").is_file()
    code = script.main(["--ct_files", str(tmp_path / "nope"), "--pet_files", str(cohort / "recon" / "pets"),
                        "--splits_file", str(cohort / "cv" / "splits.json"), "--save_dir", str(out)])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_script_rejects_unusable_options_before_any_work(cohort, tmp_path, capsys):
    script = load_script("perform_landmark_placement")
    common = ["--ct_files", str(cohort / "recon" / "cts"), "--pet_files", str(cohort / "recon" / "pets"),
              "--splits_file", str(cohort / "cv" / "splits.json"), "--save_dir", str(tmp_path / "LM")]
    for extra, message in ((["--upscale", "0"], "expected --upscale to be a number in (0, inf), found 0.0"),
                           (["--pad", "-1"], "expected --pad to be a number in [0, inf), found -1.0"),
                           (["--min_detection_confidence", "1.5"], "expected --min_detection_confidence"),
                           (["--n_qa", "-1"], "expected --n_qa to be a whole number >= 0, found -1"),
                           (["--jobs", "0"], "expected --jobs to be a whole number >= 1")):
        assert script.main(common + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "LM").exists()
    with pytest.raises(OptionsError, match=r"expected --upscale to be a number in \(0, inf\), found nan"):
        PlacementOptions(upscale=float("nan"))


def test_a_failed_item_leaves_no_denoised_image_in_save_dir(cohort, tmp_path):
    """Issue 12 point 10: an item that fails (its PET or CT no longer readable) keeps no
    face image among the outputs; the other items are still scored."""
    import shutil

    recon = tmp_path / "recon"
    shutil.copytree(cohort / "recon", recon)
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"x")

    def loader(pt_path):
        return lambda batch: batch

    out = tmp_path / "LM"
    assert _run(cohort, out, recon=recon, models_path=models, load_denoiser=loader, n_qa=0) == 0
    denoised = out / "denoised"
    assert (denoised / "fold0" / f"{IDS[1]}.png").is_file() and (denoised / "fold1" / f"{IDS[2]}.png").is_file()
    png = (recon / "pets" / f"{IDS[1]}.png").read_bytes()
    (recon / "pets" / f"{IDS[1]}.png").write_bytes(png[: len(png) // 3])   # PET unreadable now
    png = (recon / "cts" / f"{IDS[2]}.png").read_bytes()
    (recon / "cts" / f"{IDS[2]}.png").write_bytes(png[: len(png) // 3])    # CT unreadable now
    assert _run(cohort, out, recon=recon, models_path=models, load_denoiser=loader, n_qa=0) == 1
    rows = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows[f"fold0/{IDS[1]}"]["status"] == "failed" and rows[f"fold1/{IDS[2]}"]["status"] == "failed"
    assert not (denoised / "fold0" / f"{IDS[1]}.png").exists()
    assert not (denoised / "fold1" / f"{IDS[2]}.png").exists()
    assert (denoised / "fold0" / f"{IDS[0]}.png").is_file() and rows[f"fold0/{IDS[0]}"]["status"] == "ok"
    assert read_npz(out / "fold1" / "landmarks_pet_unet.npz")["ids"].tolist() == [IDS[3]]


def _rows(out):
    return {r["id"]: r for r in read_manifest(out / "manifest.csv")}


def test_a_denoiser_failing_mid_fold_leaves_none_of_the_folds_images(cohort, tmp_path, monkeypatch):
    """The denoiser works on the first batch and fails on the second: the image of the first
    batch, sources.json and the fold's earlier U-Net landmarks all go before the failed
    fold0/denoiser row is recorded (they stayed beside it); fold 1 is untouched."""
    import faceaudit.petct.placement as placement

    monkeypatch.setattr(placement, "DENOISE_BATCH", 1)
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"1.0")

    def loader(pt_path):
        calls = []

        def run(batch):
            calls.append(len(batch))
            if pt_path.read_bytes() == b"broken" and len(calls) == 2:
                raise RuntimeError("CUDA out of memory")
            return batch
        return run

    out = tmp_path / "LM"
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 0
    fold0 = out / "denoised" / "fold0"
    assert sorted(p.name for p in fold0.iterdir()) == sorted([f"{i}.png" for i in IDS[:2]] + ["sources.json"])
    assert (out / "fold0" / "landmarks_pet_unet.npz").is_file()

    (models / "best_model_fold0.pt").write_bytes(b"broken")   # re-trained, and fails on batch 2
    assert _run(cohort, out, models_path=models, load_denoiser=loader, n_qa=0) == 1
    rows = _rows(out)
    assert rows["fold0/denoiser"]["status"] == "failed" and "CUDA out of memory" in rows["fold0/denoiser"]["reason"]
    assert list(fold0.iterdir()) == []
    assert not (out / "fold0" / "landmarks_pet_unet.npz").exists()
    assert rows[f"fold0/{IDS[0]}"]["status"] == "ok" and rows[f"fold0/{IDS[0]}"].get("mad_pet_unet") in ("", None)
    assert (out / "denoised" / "fold1" / f"{IDS[2]}.png").is_file()
    assert (out / "fold1" / "landmarks_pet_unet.npz").is_file()


def test_an_image_that_cannot_be_written_fails_only_its_folds_unet_variant(cohort, tmp_path):
    """A folder where a denoised image must go (IsADirectoryError, not a full or read-only
    disk) stopped the whole stage with exit 2; now it is the fold's failed denoiser row."""
    models = tmp_path / "models"
    models.mkdir()
    for k in (0, 1):
        (models / f"best_model_fold{k}.pt").write_bytes(b"x")
    out = tmp_path / "LM"
    blocker = out / "denoised" / "fold0" / f"{IDS[1]}.png"
    (blocker / "inside").mkdir(parents=True)
    assert _run(cohort, out, models_path=models, load_denoiser=lambda pt: (lambda batch: batch), n_qa=0) == 1
    rows = _rows(out)
    assert rows["fold0/denoiser"]["status"] == "failed" and "IsADirectoryError" in rows["fold0/denoiser"]["reason"]
    assert not (out / "denoised" / "fold0" / f"{IDS[0]}.png").exists() and blocker.is_dir()
    assert read_npz(out / "fold1" / "landmarks_pet_unet.npz")["detected"].all()
    assert rows[f"fold0/{IDS[0]}"]["status"] == "ok"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a read-only file system needs root and unshare")
def test_a_read_only_denoised_folder_stops_the_stage_with_exit_2(cohort, tmp_path):
    """A real read-only mount where the U-Net images go is the location's fault: exit 2, one
    line, no failed fold row."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "LM"
    models = tmp_path / "models"
    models.mkdir()
    (models / "best_model_fold0.pt").write_bytes(b"x")
    code = textwrap.dedent(f"""
        import sys
        from faceaudit.core.cli import run_guarded
        from faceaudit.core.runner import RunSettings
        from faceaudit.petct.placement import PlacementOptions, run_landmark_placement
        recon = "{cohort / 'recon'}"
        sys.exit(run_guarded(run_landmark_placement, recon + "/cts", recon + "/pets",
                             "{cohort / 'cv' / 'splits.json'}", "{out}",
                             PlacementOptions(models_dir="{models}", n_qa=0), run=RunSettings(progress=False),
                             load_denoiser=lambda pt: (lambda batch: batch)))
    """)
    ro = out / "denoised" / "fold0"
    ro.mkdir(parents=True)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && "
                           f"exec {sys.executable} -c '{code}'"], capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "EROFS" in proc.stderr and "Traceback" not in proc.stderr
    assert "fold0/denoiser" not in _rows(out)


def test_a_changed_mad_divisor_redoes_the_rows_and_an_unchanged_one_skips_them(cohort, tmp_path):
    """--upstream-mad changes every mad_* value: the rows are ok with the new values (they were
    'skipped: inputs and options unchanged'); a run with the same options skips them."""
    out = tmp_path / "LM"
    denoised = cohort / "cv" / "denoised"
    assert _run(cohort, out, denoised_dir=denoised, n_qa=0) == 0
    first = _rows(out)
    assert _run(cohort, out, denoised_dir=denoised, n_qa=0, upstream_mad=True) == 0
    second = _rows(out)
    for item_id, row in second.items():
        assert row["status"] == "ok", item_id
        assert row["fingerprint"] != first[item_id]["fingerprint"]
        for v in ("pet", "pet_wavelet", "pet_unet"):
            assert float(row[f"mad_{v}"]) == pytest.approx(float(first[item_id][f"mad_{v}"]) * 478 / 468, rel=1e-5)
    assert _run(cohort, out, denoised_dir=denoised, n_qa=0, upstream_mad=True) == 0
    third = _rows(out)
    assert {r["status"] for r in third.values()} == {"skipped"}
    assert all(third[i]["mad_pet"] == second[i]["mad_pet"] for i in third)
