import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import load_script
from faceaudit.core.files import InputError, write_png
from faceaudit.core.images import to_uint8
from faceaudit.core.runner import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE
from faceaudit.petct.denoise_metrics import image_metrics, msssim_window, summarise_metrics
from faceaudit.petct.denoiser import load_denoiser, save_model, train_denoiser
from faceaudit.petct.render_pairs import load_renders, pair_renders
from faceaudit.petct.splits import kfold_patient_splits, load_splits, split_leakage, upstream_random_splits

perform_crossval = load_script("perform_crossval")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here, and the module's fixtures, run torch on one thread."""


SIZE = 72   # rendered side (px); tests crop the central 64 px
CROP = 64


def _face(rng, size=SIZE):
    """A smooth face-like grey render: shaded ellipsoid with eye dips and a nose, black outside."""
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    a, b = rng.uniform(0.3, 0.4), rng.uniform(0.38, 0.46)
    r2 = (x / a) ** 2 + (y / b) ** 2
    z = np.sqrt(np.clip(1 - r2, 0, None))
    for cx, cy, s, h in ((-0.12, -0.08, 0.05, -0.25), (0.12, -0.08, 0.05, -0.25),
                         (0.0, rng.uniform(0.0, 0.06), 0.05, rng.uniform(0.2, 0.4))):
        z += h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s ** 2))
    gy, gx = np.gradient(z * 4)
    shade = (0.7 * np.abs(gy) + 0.2 * np.abs(gx) + 0.1) / np.sqrt(gx ** 2 + gy ** 2 + 1)
    return np.where(r2 < 1, np.clip(shade * 1.5, 0, 1), 0.0)


def _pet_from_ct(ct, rng):
    """PET-like version: blurred, noisy where the face is."""
    pet = ndimage.gaussian_filter(ct, 1.5) + rng.normal(0, 0.08, ct.shape) * (ct > 0)
    return np.clip(pet, 0, 1)


def _write_cohort(root, n_patients=8, two_studies=(0, 1), seed=0, size=SIZE):
    """cts/ pets/ manifest.csv like the reconstruction stage; returns (ct_dir, pet_dir, rows)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    for p in range(n_patients):
        for s in range(2 if p in two_studies else 1):
            item_id = f"PETCT_p{p:02d}_s{s}"
            ct = _face(rng, size)
            write_png(root / "cts" / f"{item_id}.png", to_uint8(ct))
            write_png(root / "pets" / f"{item_id}.png", to_uint8(_pet_from_ct(ct, rng)))
            rows.append({"id": item_id, "subject": f"PETCT_p{p:02d}", "status": "ok", "reason": ""})
    _write_manifest(root, rows)
    return root / "cts", root / "pets", rows


def _write_manifest(root, rows):
    with open(Path(root) / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "subject", "status", "reason"])
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- splits

def test_kfold_splits_are_disjoint_by_patient_and_test_every_study_once():
    subjects = {f"s{i}": f"p{i // 3 if i < 9 else i}" for i in range(20)}  # 3 patients x 3 studies
    folds = kfold_patient_splits(list(subjects), subjects, n_folds=5, seed=3)
    assert len(folds) == 5
    tested = sorted(i for f in folds for i in f["test"])
    assert tested == sorted(subjects)  # every study tested exactly once
    for fold in folds:
        parts = [{subjects[i] for i in fold[p]} for p in ("train", "val", "test")]
        assert fold["train"] and fold["val"] and fold["test"]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == sorted(subjects)
    assert all(row["test_subjects_also_in_train_or_val"] == 0
               for row in split_leakage({"folds": folds}, subjects))
    # Seeded: same seed, same folds; another seed, other folds.
    assert kfold_patient_splits(list(subjects), subjects, n_folds=5, seed=3) == folds
    assert kfold_patient_splits(list(subjects), subjects, n_folds=5, seed=4) != folds
    # Balanced by study count: 20 studies over 5 folds -> 4 each.
    assert [len(f["test"]) for f in folds] == [4, 4, 4, 4, 4]


def test_kfold_needs_enough_patients():
    subjects = {"a": "p0", "b": "p0", "c": "p1"}
    with pytest.raises(InputError, match="needs at least 4 patients"):
        kfold_patient_splits(list(subjects), subjects, n_folds=3, seed=0)


def test_upstream_scheme_is_repeated_random_70_15_15():
    ids = [f"s{i:03d}" for i in range(853)]
    folds = upstream_random_splits(ids, n_folds=5, seed=0)
    assert [(len(f["train"]), len(f["val"]), len(f["test"])) for f in folds] == [(597, 128, 128)] * 5
    tests = [set(f["test"]) for f in folds]
    assert tests[0] & tests[1]  # not K-fold: test sets overlap (the upstream weakness)
    assert upstream_random_splits(ids, n_folds=5, seed=0) == folds


def test_load_splits_checks_ids(tmp_path):
    good = {"scheme": "kfold", "folds": [{"fold": 0, "train": ["a", "b"], "val": ["c"],
                                          "test": ["d", "bad"]}]}
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(good))
    # An id reported failed in this run is dropped; the rest is kept.
    loaded = load_splits(path, usable_ids=["a", "b", "c", "d"], failed_ids=["bad"])
    assert loaded["folds"][0]["test"] == ["d"]
    with pytest.raises(InputError, match=r"no CT/PET pair in the input folders: \['bad'\]"):
        load_splits(path, usable_ids=["a", "b", "c", "d"])
    good["folds"][0]["val"] = ["a"]
    path.write_text(json.dumps(good))
    with pytest.raises(InputError, match="ids in both train and val"):
        load_splits(path, usable_ids=["a", "b", "c", "d", "bad"])
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read .*splits.json as JSON"):
        load_splits(path, usable_ids=["a"])


# ---------------------------------------------------------------- pairing and loading

def test_missing_side_and_broken_files_are_reported_not_dropped(tmp_path):
    ct_dir, pet_dir, rows = _write_cohort(tmp_path, n_patients=5)
    (pet_dir / "PETCT_p02_s0.png").unlink()                     # unexpected: failed
    (ct_dir / "PETCT_p03_s0.png").unlink()                      # reconstruction said failed:
    (pet_dir / "PETCT_p03_s0.png").unlink()                     # skipped with its reason
    next(r for r in rows if r["id"] == "PETCT_p03_s0").update(status="failed",
                                                              reason="no skin surface")
    _write_manifest(tmp_path, rows)
    write_png(pet_dir / "PETCT_p04_s0.png", np.zeros((SIZE, SIZE + 8), np.uint8))  # size mismatch
    truncated = (ct_dir / "PETCT_p00_s1.png").read_bytes()
    (ct_dir / "PETCT_p00_s1.png").write_bytes(truncated[:60])   # corrupt PNG

    pairs, problems = pair_renders(ct_dir, pet_dir)
    by_id = {p.id: p for p in problems}
    assert by_id["PETCT_p02_s0"].status == "failed"
    assert "missing PET render" in by_id["PETCT_p02_s0"].reason
    assert str(pet_dir / "PETCT_p02_s0.png") in by_id["PETCT_p02_s0"].reason
    assert by_id["PETCT_p03_s0"].status == "skipped"
    assert "reconstruction failed: no skin surface" in by_id["PETCT_p03_s0"].reason
    assert {p.subject for p in pairs} <= {f"PETCT_p{i:02d}" for i in range(5)}

    data, load_problems = load_renders(pairs, crop=CROP, progress=False)
    reasons = {p.id: p.reason for p in load_problems}
    assert "size mismatch" in reasons["PETCT_p04_s0"] and "80x72" in reasons["PETCT_p04_s0"]
    assert "cannot read" in reasons["PETCT_p00_s1"] and "PETCT_p00_s1.png" in reasons["PETCT_p00_s1"]
    assert data.ids == ["PETCT_p00_s0", "PETCT_p01_s0", "PETCT_p01_s1"]
    assert data.ct["PETCT_p00_s0"].shape == (CROP, CROP)


def test_subjects_default_to_ids_without_manifest(tmp_path):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path, n_patients=2, two_studies=())
    (tmp_path / "manifest.csv").unlink()
    pairs, problems = pair_renders(ct_dir, pet_dir)
    assert not problems and [p.subject for p in pairs] == [p.id for p in pairs]
    with pytest.raises(InputError, match="expected a folder of PET renders"):
        pair_renders(ct_dir, tmp_path / "nothing")


# ---------------------------------------------------------------- metrics

def test_msssim_window_fits_the_image_size():
    assert msssim_window(208) == 11
    assert msssim_window(64) == 3
    assert msssim_window(128) == 7
    with pytest.raises(ValueError, match="too small"):
        msssim_window(32)


def test_image_metrics_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.random((2, 64, 64), dtype=np.float32)
    noisy = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)
    ms, psnr = image_metrics(np.stack([ref[0], noisy[1]]), ref)
    assert ms[0] == pytest.approx(1.0, abs=1e-5) and psnr[0] == np.inf
    mse = float(((noisy[1].astype(np.float64) - ref[1]) ** 2).mean())
    assert psnr[1] == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)
    assert ms[1] < 0.99


def test_summarise_metrics_per_fold():
    rows = [{"fold": 0, "msssim_before": 0.5, "msssim_after": 0.7, "psnr_before": 20.0,
             "psnr_after": 22.0},
            {"fold": 0, "msssim_before": 0.6, "msssim_after": 0.5, "psnr_before": 21.0,
             "psnr_after": 25.0},
            {"fold": 1, "msssim_before": 0.4, "msssim_after": 0.8, "psnr_before": 10.0,
             "psnr_after": float("inf")}]
    summary = summarise_metrics(rows)
    assert summary[0]["n_test"] == 2 and summary[0]["n_improved"] == 1
    assert summary[0]["msssim_before"] == pytest.approx(0.55)
    assert summary[0]["msssim_gain"] == pytest.approx(0.05)
    assert summary[1]["psnr_after"] != summary[1]["psnr_after"]  # only inf -> NaN mean


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short training run on synthetic pairs, shared by the tests below."""
    root = tmp_path_factory.mktemp("train")
    ct_dir, pet_dir, _ = _write_cohort(root, n_patients=14, two_studies=(), seed=1)
    pairs, _ = pair_renders(ct_dir, pet_dir)
    data, _ = load_renders(pairs, crop=CROP, progress=False)
    train_pet, train_ct = data.stack(data.ids[:10])
    val_pet, val_ct = data.stack(data.ids[10:])
    model, result = train_denoiser(train_pet, train_ct, val_pet, val_ct, arch="unet",
                                   n_epochs=6, batch_size=4, lr=1e-2, seed=0, progress=False,
                                   model_options={"base_channels": 8})
    return root, model, result, (train_pet, train_ct, val_pet, val_ct)


def test_short_training_lowers_the_validation_loss(trained):
    _, _, result, _ = trained
    initial = result.history[0]["val_loss"]
    assert result.best_epoch > 0
    assert result.best_val_loss < 0.8 * initial
    assert [row["epoch"] for row in result.history] == list(range(7))


def test_training_is_deterministic_with_a_seed(trained):
    _, _, result, (train_pet, train_ct, val_pet, val_ct) = trained
    _, again = train_denoiser(train_pet, train_ct, val_pet, val_ct, arch="unet", n_epochs=6,
                              batch_size=4, lr=1e-2, seed=0, progress=False,
                              model_options={"base_channels": 8})
    assert [(r["epoch"], r["val_loss"]) for r in again.history] == \
        [(r["epoch"], r["val_loss"]) for r in result.history]
    assert [r["train_loss"] for r in again.history[1:]] == \
        [r["train_loss"] for r in result.history[1:]]
    assert all(torch.equal(again.state_dict[k], result.state_dict[k]) for k in result.state_dict)


def test_saved_model_reloads_and_reproduces_outputs_bit_for_bit(trained):
    root, model, _, (_, _, val_pet, _) = trained
    pt = save_model(model, root / "models" / "best_model_fold0.pt", info={"fold": 0, "crop": CROP})
    assert stat.S_IMODE(os.stat(pt).st_mode) == 0o600
    state = torch.load(pt, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert json.loads(pt.with_suffix(".json").read_text(encoding="utf-8"))["arch"] == "unet"
    images = val_pet.astype(np.float32) / 255.0
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images)[:, None])[:, 0].numpy()
    denoiser = load_denoiser(pt, device="cpu")
    out = denoiser(images)
    assert out.shape == images.shape and out.dtype == np.float32
    assert np.array_equal(out, expected)
    # A single (H, W) image works too (the eval-mode output does not depend on the batch).
    np.testing.assert_allclose(denoiser(images[0]), out[0], rtol=0, atol=1e-5)


def test_load_denoiser_names_missing_or_broken_files(tmp_path, trained):
    root, model, _, _ = trained
    with pytest.raises(InputError, match="expected a denoiser file at .*nothing.pt"):
        load_denoiser(tmp_path / "nothing.pt")
    pt = save_model(model, tmp_path / "m.pt", info={})
    pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(InputError, match="cannot load a unet state_dict from .*m.pt"):
        load_denoiser(pt)


# ---------------------------------------------------------------- the stage end to end

def _run(ct_dir, pet_dir, out, *extra):
    return perform_crossval.main([
        "--ct_files", str(ct_dir), "--pet_files", str(pet_dir), "--save_perfs_dir", str(out),
        "--n_epochs", "2", "--n_folds", "3", "--batch_size", "4", "--crop", str(CROP),
        "--device", "cpu", "--quiet", *extra])


def test_stage_writes_contract_outputs_resumes_and_reuses_splits(tmp_path, capsys, caplog):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=7, two_studies=(0, 3))
    (pet_dir / "PETCT_p05_s0.png").unlink()
    out = tmp_path / "cv"
    assert _run(ct_dir, pet_dir, out) == EXIT_ITEMS_FAILED
    assert "PETCT_p05_s0: failed: unpaired: missing PET render" in caplog.text
    printed = capsys.readouterr().out  # the summary, printed by the script, not the library
    assert "3 folds (3 trained, 0 unchanged); studies: 1 failed (PETCT_p05_s0)" in printed
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700

    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["scheme"] == "kfold" and splits["n_folds"] == 3 and splits["crop"] == CROP
    tested = sorted(i for f in splits["folds"] for i in f["test"])
    assert len(tested) == len(set(tested)) == 8 and "PETCT_p05_s0" not in tested
    for fold in splits["folds"]:
        k = fold["fold"]
        assert sorted(p.stem for p in (out / "denoised" / f"fold{k}").glob("*.png")) == fold["test"]
        assert (out / "models" / f"best_model_fold{k}.pt").is_file()
        assert (out / "models" / f"best_model_fold{k}.json").is_file()
        assert len(_read_csv(out / f"loss_fold{k}.csv")) == 3  # epoch 0 (untrained) + 2
    metrics = _read_csv(out / "metrics.csv")
    assert sorted(r["id"] for r in metrics) == tested
    assert set(metrics[0]) == {"fold", "id", "subject", "msssim_before", "msssim_after",
                               "psnr_before", "psnr_after"}
    manifest = {r["id"]: r for r in _read_csv(out / "manifest.csv")}
    assert manifest["PETCT_p05_s0"]["status"] == "failed"
    assert manifest["PETCT_p00_s1"]["subject"] == "PETCT_p00"
    assert all(manifest[i]["status"] == "ok" and manifest[i]["test_folds"] for i in tested)
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "qa_montage.png").read_bytes()[:4] == b"\x89PNG"
    summary = _read_csv(out / "summary.csv")
    assert [int(r["n_test"]) for r in summary] == [len(f["test"]) for f in splits["folds"]]
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["device_used"] == "cpu" and not any(f["reused"] for f in run["folds"])

    # Re-run: finished folds are reused, not retrained.
    models_before = (out / "models" / "best_model_fold0.pt").stat().st_mtime_ns
    trained = run["folds"]
    assert _run(ct_dir, pet_dir, out) == EXIT_ITEMS_FAILED
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert all(f["reused"] for f in run["folds"])
    # the reused folds report the best epoch and loss their models were saved with
    assert [(f["best_epoch"], f["best_val_loss"]) for f in run["folds"]] == \
        [(f["best_epoch"], f["best_val_loss"]) for f in trained]
    assert (out / "models" / "best_model_fold0.pt").stat().st_mtime_ns == models_before
    assert _read_csv(out / "metrics.csv") == metrics

    # The saved splits drive a new run (here the wavelet baseline) to the same folds.
    other = tmp_path / "wavelet"
    assert _run(ct_dir, pet_dir, other, "--splits_file", str(out / "splits.json"),
                "--denoiser", "wavelet") == EXIT_ITEMS_FAILED
    assert [f["test"] for f in json.loads((other / "splits.json").read_text(encoding="utf-8"))["folds"]] == \
        [f["test"] for f in splits["folds"]]
    assert sorted(r["id"] for r in _read_csv(other / "metrics.csv")) == tested
    assert not (other / "models").exists()


def test_rerun_redoes_only_folds_whose_settings_or_outputs_changed(tmp_path):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    out = tmp_path / "cv"

    def reused(*extra):
        assert _run(ct_dir, pet_dir, out, "--denoiser", "wavelet", *extra) == EXIT_OK
        return [f["reused"] for f in json.loads((out / "run.json").read_text(encoding="utf-8"))["folds"]]

    assert reused() == [False, False, False]
    assert reused() == [True, True, True]
    assert reused("--overwrite") == [False, False, False]
    test_id = json.loads((out / "splits.json").read_text(encoding="utf-8"))["folds"][1]["test"][0]
    (out / "denoised" / "fold1" / f"{test_id}.png").unlink()
    assert reused() == [True, False, True]  # a lost output redoes its fold only
    assert reused("--crop", "56") == [False, False, False]  # another crop: new outputs


def test_stage_rejects_bad_inputs_with_a_message(tmp_path, capsys):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=2, two_studies=())
    assert _run(ct_dir, pet_dir, tmp_path / "cv") == EXIT_USAGE  # 2 patients, 3 folds
    assert "needs at least 4 patients" in capsys.readouterr().err
    assert _run(tmp_path / "none", pet_dir, tmp_path / "cv2") == EXIT_USAGE
    assert "expected a folder of CT renders" in capsys.readouterr().err


def test_upstream_arch_and_scheme_run(tmp_path):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=8, two_studies=())
    out = tmp_path / "cv"
    assert _run(ct_dir, pet_dir, out, "--arch", "upstream", "--split_scheme", "upstream",
                "--n_epochs", "1") == EXIT_OK
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["scheme"] == "upstream" and len(splits["folds"]) == 3
    assert [len(f["train"]) for f in splits["folds"]] == [5, 5, 5]
    config = json.loads((out / "models" / "best_model_fold0.json").read_text(encoding="utf-8"))
    assert config["arch"] == "upstream"
    denoiser = load_denoiser(out / "models" / "best_model_fold0.pt")
    assert denoiser(np.full((2, CROP, CROP), 0.5, np.float32)).shape == (2, CROP, CROP)


def test_stage_refuses_a_splits_file_with_repeated_fold_numbers(tmp_path, capsys):
    """Issue 12.7: folds 0, 0, 2 used to train a fold-0 model on the other fold 0's test set."""
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    out = tmp_path / "cv"
    assert _run(ct_dir, pet_dir, out, "--denoiser", "wavelet") == EXIT_OK
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    splits["folds"][1]["fold"] = 0
    bad = tmp_path / "splits_00.json"
    bad.write_text(json.dumps(splits))
    assert _run(ct_dir, pet_dir, tmp_path / "cv2", "--splits_file", str(bad),
                "--denoiser", "wavelet") == EXIT_USAGE
    assert "fold entry #1 (fold 0): fold number 0 is already used" in capsys.readouterr().err
    assert not (tmp_path / "cv2" / "metrics.csv").exists()


def test_unusable_splits_or_renders_exit_2_and_create_no_output_folder(tmp_path, capsys):
    """Inputs are read and checked before the output folder, its lock, manifest.csv and
    run.json are made (they were made first, then the stage stopped with exit 2)."""
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"folds": [{"fold": 0, "train"')
    repeated = tmp_path / "repeated.json"
    ids = sorted(p.stem for p in ct_dir.glob("*.png"))
    repeated.write_text(json.dumps({"folds": [{"fold": 0, "train": ids[2:], "val": [], "test": ids[:2]},
                                              {"fold": 0, "train": ids[:4], "val": [], "test": ids[4:]}]}))
    for name, splits_file, message in (("truncated", truncated, "as JSON"),
                                       ("repeated", repeated, "fold number 0 is already used"),
                                       ("missing", tmp_path / "absent.json", "found nothing")):
        out = tmp_path / f"cv_{name}"
        assert _run(ct_dir, pet_dir, out, "--splits_file", str(splits_file), "--denoiser", "wavelet") == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and str(splits_file) in err, (name, err)
        assert not out.exists(), name
    unreadable = tmp_path / "broken"
    for side in ("cts", "pets"):
        (unreadable / side).mkdir(parents=True)
        (unreadable / side / "PETCT_p00_s0.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "cv_unreadable"
    assert _run(unreadable / "cts", unreadable / "pets", out) == EXIT_USAGE
    assert "expected readable CT/PET render pairs" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a tiny file system needs root and unshare")
def test_a_full_models_location_stops_the_stage_with_exit_2(tmp_path):
    """A full disk (a real 64 KiB tmpfs as --models_path) is the location's fault, not the
    fold's: exit 2 with one line naming it, instead of every fold failing the same way."""
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    mnt, out = tmp_path / "mnt", tmp_path / "cv"
    mnt.mkdir()
    args = ["--ct_files", ct_dir, "--pet_files", pet_dir, "--save_perfs_dir", out, "--models_path", mnt,
            "--n_epochs", "1", "--n_folds", "3", "--batch_size", "4", "--crop", CROP, "--device", "cpu",
            "--threads", "1", "--quiet"]
    command = " ".join([sys.executable, str(Path(perform_crossval.__file__)), *map(str, args)])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt} && exec {command}"],
                          capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Errno 28 ENOSPC" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "denoised" / "fold0").exists()  # the fold's partial outputs are gone
    rows = _read_csv(out / "manifest.csv")
    assert not any(r["id"].startswith("fold") for r in rows)  # no fold row blamed for the disk


# ---------------------------------------------------------------- the stage API (issues 11, 12)

def _folds_reused(out):
    return [f["reused"] for f in json.loads((out / "run.json").read_text(encoding="utf-8"))["folds"]]


def test_a_replaced_render_retrains_exactly_the_folds_that_use_it(tmp_path):
    """Issue 12.2: skip by content, not by name: the old run reused every fold after a CT
    render was replaced by another study's."""
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    ids = sorted(p.stem for p in ct_dir.glob("*.png"))
    # three hand-made folds; the last one never sees ids[0]
    splits = {"scheme": "custom", "folds": [
        {"fold": 0, "train": ids[2:4], "val": [ids[4]], "test": ids[:2]},
        {"fold": 1, "train": ids[:2], "val": [ids[4]], "test": ids[2:4]},
        {"fold": 2, "train": [ids[1], ids[2]], "val": [ids[3]], "test": ids[4:]}]}
    path = tmp_path / "my_splits.json"
    path.write_text(json.dumps(splits))
    out = tmp_path / "cv"
    args = ("--splits_file", str(path), "--denoiser", "wavelet")
    assert _run(ct_dir, pet_dir, out, *args) == EXIT_OK
    assert _run(ct_dir, pet_dir, out, *args) == EXIT_OK
    assert _folds_reused(out) == [True, True, True]
    before = (out / "denoised" / "fold0" / f"{ids[0]}.png").read_bytes()
    (ct_dir / f"{ids[0]}.png").write_bytes((ct_dir / f"{ids[5]}.png").read_bytes())
    (pet_dir / f"{ids[0]}.png").write_bytes((pet_dir / f"{ids[5]}.png").read_bytes())
    assert _run(ct_dir, pet_dir, out, *args) == EXIT_OK
    assert _folds_reused(out) == [False, False, True]
    assert (out / "denoised" / "fold0" / f"{ids[0]}.png").read_bytes() != before
    rows = {r["id"]: r for r in _read_csv(out / "manifest.csv")}
    assert rows["fold2"]["status"] == "skipped" and rows["fold0"]["status"] == "ok"


def test_a_failed_fold_leaves_nothing_and_the_others_finish(tmp_path):
    """A fold that cannot write its model is a failed row (exit 1) instead of a traceback
    that lost every fold; its partial outputs go, and a re-run trains only that fold."""
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    out = tmp_path / "cv"
    (out / "models" / "best_model_fold1.pt").mkdir(parents=True)  # a folder where the model goes
    assert _run(ct_dir, pet_dir, out) == EXIT_ITEMS_FAILED
    rows = {r["id"]: r for r in _read_csv(out / "manifest.csv")}
    assert rows["fold1"]["status"] == "failed" and "best_model_fold1.pt" in rows["fold1"]["reason"]
    assert rows["fold0"]["status"] == rows["fold2"]["status"] == "ok"
    assert not (out / "loss_fold1.csv").exists() and not (out / "denoised" / "fold1").exists()
    assert not (out / "models" / "best_model_fold1.json").exists()
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    fold1_test = set(splits["folds"][1]["test"])
    assert not fold1_test & {r["id"] for r in _read_csv(out / "metrics.csv")}
    assert {rows[i]["status"] for i in fold1_test} == {"skipped"}
    assert all(rows[i]["reason"] == "its test fold failed: fold1" for i in fold1_test)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert [f["status"] for f in run["folds"]] == ["ok", "failed", "ok"]

    (out / "models" / "best_model_fold1.pt").rmdir()
    assert _run(ct_dir, pet_dir, out) == EXIT_OK
    assert _folds_reused(out) == [True, False, True]
    assert fold1_test <= {r["id"] for r in _read_csv(out / "metrics.csv")}


def test_fewer_folds_remove_the_outputs_of_the_dropped_ones(tmp_path):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    out = tmp_path / "cv"
    assert _run(ct_dir, pet_dir, out, "--denoiser", "wavelet") == EXIT_OK
    assert (out / "denoised" / "fold2").is_dir()
    assert _run(ct_dir, pet_dir, out, "--denoiser", "wavelet", "--n_folds", "2") == EXIT_OK
    assert sorted(p.name for p in (out / "denoised").iterdir()) == ["fold0", "fold1"]
    assert not any(r["id"] == "fold2" for r in _read_csv(out / "manifest.csv"))


@pytest.mark.parametrize("flag, value, message", [
    ("--n_epochs", "0", "expected --n_epochs to be a whole number >= 1, found 0"),
    ("--batch_size", "-4", "expected --batch_size to be a whole number >= 1, found -4"),
    ("--lr", "0", "expected --lr to be a number in (0, inf), found 0.0"),
    ("--lr", "nan", "expected --lr to be a number in (0, inf), found nan"),
    ("--n_folds", "1", "expected --n_folds to be a whole number >= 2, found 1"),
    ("--crop", "16", "expected --crop to be a whole number >= 33, found 16"),
    ("--crop", "60", "expected --crop to be a multiple of 8 above 32 px, found 60"),
    ("--threads", "-1", "expected --threads to be a whole number >= 0, found -1"),
])
def test_unusable_options_exit_2_before_any_work(tmp_path, capsys, flag, value, message):
    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=2, two_studies=())
    out = tmp_path / "cv"
    assert _run(ct_dir, pet_dir, out, flag, value) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_options_are_checked_when_built():
    from faceaudit.core.runner import OptionsError
    from faceaudit.petct.crossval import CrossvalOptions

    assert CrossvalOptions(split_scheme="upstream", n_folds=1).n_folds == 1  # one random split
    with pytest.raises(OptionsError, match="expected --arch to be one of unet, upstream"):
        CrossvalOptions(arch="resnet")
    with pytest.raises(OptionsError, match="expected --n_epochs to be a whole number >= 1, "
                                           "found True"):
        CrossvalOptions(n_epochs=True)
    with pytest.raises(OptionsError, match="validation fraction"):
        CrossvalOptions(val_fraction=1.0)


@pytest.mark.slow
def test_a_killed_run_keeps_the_folds_it_finished(tmp_path):
    """Issue 12.3: a run killed (SIGKILL) during fold 1 keeps fold 0: its row is journaled, so
    the re-run skips it instead of training it again."""
    import signal
    import subprocess
    import sys
    import time

    ct_dir, pet_dir, _ = _write_cohort(tmp_path / "recon", n_patients=6, two_studies=())
    out = tmp_path / "cv"
    args = ["--ct_files", str(ct_dir), "--pet_files", str(pet_dir), "--save_perfs_dir", str(out),
            "--n_epochs", "12", "--n_folds", "3", "--batch_size", "4", "--crop", str(CROP),
            "--device", "cpu", "--threads", "1", "--quiet"]
    script = Path(perform_crossval.__file__)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = out / "manifest.journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and '"id": "fold0"' in journal.read_text(encoding="utf-8"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.csv").exists()  # killed before the end
    model0 = (out / "models" / "best_model_fold0.pt").stat().st_mtime_ns

    assert perform_crossval.main(args) == EXIT_OK
    assert _folds_reused(out) == [True, False, False]
    assert (out / "models" / "best_model_fold0.pt").stat().st_mtime_ns == model0


def test_the_model_settings_file_is_the_contracts_one(tmp_path):
    """save_model and load_denoiser find the settings beside the weights where the contract
    (stage 3 reads it) puts them."""
    from faceaudit.core.contracts import model_info_for, model_info_path, model_path

    assert model_info_for(model_path(tmp_path, 3)) == model_info_path(tmp_path, 3) == \
        tmp_path / "best_model_fold3.json"
