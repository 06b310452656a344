"""The reconstruction stage end to end on tiny studies, broken inputs included."""

import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import head_phantom, load_script
from faceaudit.core.runner import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OptionsError,
    RunSettings,
)
from faceaudit.petct.reconstruction import (
    ReconstructionOptions,
    reconstruct_volume,
    run_reconstruction,
)

SPACING_XYZ = (4.0, 4.0, 4.0)


def _write(path, array_zyx):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(image, str(path))


def _good_study(root, patient, study):
    _write(root / patient / study / "CTres.nii.gz", head_phantom("ct"))
    _write(root / patient / study / "SUV.nii.gz", head_phantom("pet"))


def _run(root, out, options=None, **settings) -> int:
    settings.setdefault("progress", False)
    return run_reconstruction(root, out, options, run=RunSettings(**settings)).exit_code


def _read_manifest(save_dir):
    with open(save_dir / "manifest.csv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def test_reconstruct_volume_numbers_and_render():
    result = reconstruct_volume(head_phantom("pet"), (4.0, 4.0, 4.0), modality="pet",
                                options=ReconstructionOptions(head_height_mm=100.0))
    assert result.render.image.shape == (512, 512)
    assert result.numbers["n_vertices"] == len(result.mesh.vertices) > 100
    assert 0.4 < result.numbers["threshold"] < 0.6          # half the body's SUV of 1.0
    assert result.numbers["head_height_mm"] == pytest.approx(100.0, abs=8.0)
    assert set(result.timings) >= {"threshold", "components", "surface", "render"}


@pytest.fixture()
def cohort_with_broken_studies(tmp_path):
    root = tmp_path / "petct"
    _good_study(root, "PETCT_good", "s1")
    _good_study(root, "PETCT_good", "s2")
    # truncated CT (the PET is fine and must still be rendered)
    _good_study(root, "PETCT_trunc", "s1")
    ct = root / "PETCT_trunc" / "s1" / "CTres.nii.gz"
    ct.write_bytes(ct.read_bytes()[:300])
    # empty (constant) PET
    _write(root / "PETCT_empty" / "s1" / "CTres.nii.gz", head_phantom("ct"))
    _write(root / "PETCT_empty" / "s1" / "SUV.nii.gz", np.zeros((40, 36, 36), np.float32))
    # CT without PET
    _write(root / "PETCT_nopet" / "s1" / "CTres.nii.gz", head_phantom("ct"))
    # NaNs in the PET
    pet = head_phantom("pet")
    pet[5, 5, 5] = np.nan
    _write(root / "PETCT_nan" / "s1" / "CTres.nii.gz", head_phantom("ct"))
    _write(root / "PETCT_nan" / "s1" / "SUV.nii.gz", pet)
    # a 2-D image as CT
    _write(root / "PETCT_flat" / "s1" / "CTres.nii.gz", head_phantom("ct")[20])
    _write(root / "PETCT_flat" / "s1" / "SUV.nii.gz", head_phantom("pet"))
    return root


def test_broken_studies_fail_with_reasons_while_the_others_finish(tmp_path, cohort_with_broken_studies):
    root, out = cohort_with_broken_studies, tmp_path / "out"
    options = ReconstructionOptions(head_height_mm=120.0)
    code = _run(root, out, options, jobs=2)                # two worker processes
    assert code == EXIT_ITEMS_FAILED
    rows = _read_manifest(out)
    assert set(rows) == {"PETCT_good_s1", "PETCT_good_s2", "PETCT_trunc_s1", "PETCT_empty_s1",
                         "PETCT_nopet_s1", "PETCT_nan_s1", "PETCT_flat_s1"}
    for sid in ("PETCT_good_s1", "PETCT_good_s2"):
        assert rows[sid]["status"] == "ok" and rows[sid]["subject"] == "PETCT_good"
        for folder in ("cts", "pets"):
            image = np.asarray(Image.open(out / folder / f"{sid}.png"))
            assert image.shape == (512, 512) and image.dtype == np.uint8 and image.max() > 100
        assert (out / "meshes" / f"{sid}_ct.ply").is_file()
        depth = np.load(out / "depth" / f"{sid}_pet.npz")["depth_mm"]
        assert depth.shape == (512, 512) and np.isfinite(depth).any()
    expected = {"PETCT_trunc_s1": ("ct", "truncated"), "PETCT_empty_s1": ("pet", "empty"),
                "PETCT_nopet_s1": ("pet", "no PET volume"), "PETCT_nan_s1": ("pet", "NaN"),
                "PETCT_flat_s1": ("ct", "2-D")}
    for sid, (modality, words) in expected.items():
        row = rows[sid]
        assert row["status"] == "failed", sid
        assert row[f"{modality}_status"] == "failed"
        assert words in row["reason"] and row["reason"].startswith(modality), row["reason"]
        other = "pet" if modality == "ct" else "ct"
        assert row[f"{other}_status"] == "ok"            # the other modality is still rendered
        assert (out / {"ct": "cts", "pet": "pets"}[other] / f"{sid}.png").is_file()
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["counts"] == {"ok": 2, "failed": 5, "skipped": 0}
    assert (out / "qa_montage.png").is_file()
    assert oct(os.stat(out).st_mode & 0o777) == "0o700"
    assert oct(os.stat(out / "cts" / "PETCT_good_s1.png").st_mode & 0o777) == "0o600"


def test_rerun_produces_the_missing_pet_and_skips_finished_work(tmp_path):
    root, out = tmp_path / "petct", tmp_path / "out"
    _write(root / "PETCT_a" / "s1" / "CTres.nii.gz", head_phantom("ct"))
    options = ReconstructionOptions(head_height_mm=120.0)
    assert _run(root, out, options) == EXIT_ITEMS_FAILED
    ct_png = out / "cts" / "PETCT_a_s1.png"
    first_mtime = ct_png.stat().st_mtime_ns
    # the PET arrives: a re-run renders it (the upstream resume skipped it forever)
    _write(root / "PETCT_a" / "s1" / "SUV.nii.gz", head_phantom("pet"))
    assert _run(root, out, options) == EXIT_OK
    row = _read_manifest(out)["PETCT_a_s1"]
    assert row["status"] == "ok" and row["pet_status"] == "ok" and row["ct_status"] == "ok"
    assert row["ct_n_vertices"] != ""                      # the first run's CT numbers are kept
    assert (out / "pets" / "PETCT_a_s1.png").is_file()
    assert ct_png.stat().st_mtime_ns == first_mtime        # finished CT not redone
    assert _run(root, out, options, overwrite=True) == EXIT_OK
    assert ct_png.stat().st_mtime_ns != first_mtime


def test_a_first_run_hashes_each_volume_once_in_the_worker_and_a_rerun_once_to_skip(tmp_path, monkeypatch):
    """The planner hashes a volume only when an earlier ok row could make it fresh; on a
    first run the worker hashes it while reading it, and the row keeps that fingerprint."""
    from faceaudit.petct import reconstruction

    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    options = ReconstructionOptions(head_height_mm=120.0)
    hashed = []
    real = reconstruction.modality_fingerprint

    def counting(study, modality, options):
        hashed.append(modality)
        return real(study, modality, options)

    monkeypatch.setattr(reconstruction, "modality_fingerprint", counting)
    assert _run(root, out, options) == EXIT_OK
    assert sorted(hashed) == ["ct", "pet"]
    row = _read_manifest(out)["PETCT_a_s1"]
    study = reconstruction.discover_studies(root)[0]
    for modality in ("ct", "pet"):
        assert row[f"{modality}_fingerprint"] == real(study, modality, options)
    hashed.clear()
    assert _run(root, out, options) == EXIT_OK
    assert sorted(hashed) == ["ct", "pet"]
    assert _read_manifest(out)["PETCT_a_s1"]["status"] == "skipped"


def test_script_exit_codes(tmp_path, cohort_with_broken_studies):
    module = load_script("perform_morphological_reconstruction")
    out = tmp_path / "out"
    argv = ["--petct_path", str(cohort_with_broken_studies), "--save_dir", str(out), "--quiet",
            "--head-height-mm", "120", "--ct-threshold", "-300", "--pet-threshold", "percentile",
            "--shading", "lambert"]
    assert module.main(argv) == EXIT_ITEMS_FAILED
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["options"]["ct_threshold"] == -300.0 and run["options"]["shading"] == "lambert"
    assert module.main(["--petct_path", str(tmp_path / "missing"), "--save_dir", str(out)]) == EXIT_USAGE


def test_flat_layout_ids_and_subjects(tmp_path):
    root, out = tmp_path / "flat", tmp_path / "out"
    _write(root / "p1_ct.nii.gz", head_phantom("ct"))
    _write(root / "p1_pet.nii.gz", head_phantom("pet"))
    options = ReconstructionOptions(head_height_mm=120.0, projection="pinhole")
    assert _run(root, out, options) == EXIT_OK
    row = _read_manifest(out)["p1"]
    assert row["subject"] == "p1" and row["status"] == "ok"
    assert (out / "cts" / "p1.png").is_file() and (out / "pets" / "p1.png").is_file()


def test_a_volume_that_fails_on_overwrite_is_not_reported_ok_by_the_next_run(tmp_path):
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    options = ReconstructionOptions(head_height_mm=120.0)
    assert _run(root, out, options) == EXIT_OK
    # the PET is replaced by a broken one and the study redone: the old PET render must go
    _write(root / "PETCT_a" / "s1" / "SUV.nii.gz", np.zeros((40, 36, 36), np.float32))
    assert _run(root, out, options, overwrite=True) == EXIT_ITEMS_FAILED
    assert not (out / "pets" / "PETCT_a_s1.png").exists()
    assert not (out / "meshes" / "PETCT_a_s1_pet.ply").exists()
    assert (out / "cts" / "PETCT_a_s1.png").is_file()
    # a plain re-run retries the PET and still fails; it does not skip it as finished
    assert _run(root, out, options) == EXIT_ITEMS_FAILED
    row = _read_manifest(out)["PETCT_a_s1"]
    assert row["pet_status"] == "failed" and "empty" in row["reason"]
    assert row["ct_status"] == "ok"


def test_qa_montage_shows_missing_and_unreadable_renders_as_black(tmp_path):
    from faceaudit.core.files import write_png
    from faceaudit.petct.reconstruction import qa_montage

    write_png(tmp_path / "cts" / "a.png", np.full((512, 512), 200, np.uint8))
    (tmp_path / "pets").mkdir()
    (tmp_path / "pets" / "a.png").write_bytes(b"\x89PNG broken")
    sheet = qa_montage(tmp_path, ["a", "b"])
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[1] == 2 * 160                      # two studies: two columns
    ct_a, pet_a = sheet[80, 80], sheet[160 + 14 + 80, 80]  # cell centres (label rows 14 px)
    assert tuple(ct_a) == (200, 200, 200) and tuple(pet_a) == (0, 0, 0)
    assert qa_montage(tmp_path, []) is None


def test_missing_side_names_the_file_expected_in_each_layout(tmp_path):
    out = tmp_path / "out"
    _write(tmp_path / "flat" / "p2_ct.nii.gz", head_phantom("ct"))
    _write(tmp_path / "auto" / "PETCT_b" / "s1" / "SUV.nii.gz", head_phantom("pet"))
    options = ReconstructionOptions(head_height_mm=120.0)
    for root, sid, expected in ((tmp_path / "flat", "p2", "expected p2_pet.nii.gz"),
                                (tmp_path / "auto", "PETCT_b_s1", "expected CTres.nii.gz")):
        assert _run(root, out, options) == EXIT_ITEMS_FAILED
        row = _read_manifest(out)[sid]
        assert expected in row["reason"], row["reason"]


@pytest.mark.parametrize("field, value", [("head_height_mm", -5.0), ("head_height_mm", float("nan")),
                                          ("pet_body_fraction", 0.0), ("pet_body_fraction", 1.5),
                                          ("pet_percentile", 120.0), ("shading", "phong"),
                                          ("projection", "fisheye"), ("pet_threshold", "max"),
                                          ("ct_threshold", "bone"), ("smoothing_iterations", -1),
                                          ("opening_radius_mm", -1.0), ("head_px", 1000)])
def test_options_that_no_run_could_use_are_refused_on_creation(field, value):
    flag = "--" + field.replace("_", "-")                 # named as the script's flag
    with pytest.raises(OptionsError, match=f"expected {flag} to be .*, found"):
        ReconstructionOptions(**{field: value})
    with pytest.raises(OptionsError, match="expected core_radius_mm to be a number in \\(0, inf\\)"):
        ReconstructionOptions(core_radius_mm=0.0)


def test_options_normalise_a_numeric_ct_threshold():
    assert ReconstructionOptions(ct_threshold="-300").ct_threshold == -300.0
    assert ReconstructionOptions(ct_threshold=-300).ct_threshold == -300.0


def test_script_refuses_bad_options_with_exit_2_before_any_work(tmp_path, capsys):
    module = load_script("perform_morphological_reconstruction")
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    for flag, value in (("--head-height-mm", "-5"), ("--pet-body-fraction", "2"),
                        ("--ct-threshold", "bone")):
        assert module.main(["--petct_path", str(root), "--save_dir", str(out), "--quiet",
                            flag, value]) == EXIT_USAGE
        assert "expected" in capsys.readouterr().err
    assert not out.exists()


def _mtimes(out, sid):
    return {m: (out / f / f"{sid}.png").stat().st_mtime_ns for m, f in (("ct", "cts"), ("pet", "pets"))}


def test_a_ct_replaced_by_another_patients_is_redone_and_the_pet_kept(tmp_path, capsys):
    """Issue 12 point 2: the upstream resume (and this stage until now) skipped by output
    existence, so the replaced CT's old render stayed and the row said ok."""
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    options = ReconstructionOptions(head_height_mm=120.0)
    result = run_reconstruction(root, out, options, run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK and result.counts == {"ok": 1, "failed": 0, "skipped": 0}
    assert "1 studies: 1 ok, 0 failed, 0 skipped" in result.summary
    assert capsys.readouterr().out == ""                     # the library prints nothing
    first = _read_manifest(out)["PETCT_a_s1"]
    assert "fingerprint" not in first        # the study-wide column nobody read; ct_/pet_ are used
    old_png = (out / "cts" / "PETCT_a_s1.png").read_bytes()
    before = _mtimes(out, "PETCT_a_s1")

    # the same bytes written again (new mtime, same content): nothing is redone
    ct = root / "PETCT_a" / "s1" / "CTres.nii.gz"
    ct.write_bytes(ct.read_bytes())
    result = run_reconstruction(root, out, options, run=RunSettings(progress=False))
    assert result.counts["skipped"] == 1 and _mtimes(out, "PETCT_a_s1") == before
    assert _read_manifest(out)["PETCT_a_s1"]["ct_n_vertices"] == first["ct_n_vertices"]

    # another patient's CT under the same name: the CT is redone, the PET is not
    _write(ct, head_phantom("ct", half_width=6.0))
    assert _run(root, out, options) == EXIT_OK
    row = _read_manifest(out)["PETCT_a_s1"]
    after = _mtimes(out, "PETCT_a_s1")
    assert after["ct"] != before["ct"] and after["pet"] == before["pet"]
    assert (out / "cts" / "PETCT_a_s1.png").read_bytes() != old_png
    assert row["status"] == "ok" and row["ct_fingerprint"] != first["ct_fingerprint"]
    assert row["pet_fingerprint"] == first["pet_fingerprint"]
    assert float(row["ct_head_width_mm"]) < float(first["ct_head_width_mm"]) - 10.0
    assert row["pet_n_vertices"] == first["pet_n_vertices"]


def test_an_option_that_shapes_only_the_pet_redoes_only_the_pet(tmp_path):
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    assert _run(root, out, ReconstructionOptions(head_height_mm=120.0)) == EXIT_OK
    before = _mtimes(out, "PETCT_a_s1")
    assert _run(root, out, ReconstructionOptions(head_height_mm=120.0, pet_body_fraction=0.4)) == EXIT_OK
    after = _mtimes(out, "PETCT_a_s1")
    assert after["ct"] == before["ct"] and after["pet"] != before["pet"]
    # an option that shapes both renders redoes both
    assert _run(root, out, ReconstructionOptions(head_height_mm=120.0, pet_body_fraction=0.4,
                                                 shading="lambert")) == EXIT_OK
    final = _mtimes(out, "PETCT_a_s1")
    assert final["ct"] != after["ct"] and final["pet"] != after["pet"]


def test_two_candidate_files_for_one_side_are_a_failed_row_naming_both(tmp_path):
    root, out = tmp_path / "flat", tmp_path / "out"
    _write(root / "x_ct.nii.gz", head_phantom("ct"))
    _write(root / "x_ct.nii", head_phantom("ct", half_width=6.0))     # which one is the patient's?
    _write(root / "x_pet.nii.gz", head_phantom("pet"))
    assert _run(root, out, ReconstructionOptions(head_height_mm=120.0)) == EXIT_ITEMS_FAILED
    row = _read_manifest(out)["x"]
    assert row["status"] == "failed" and row["ct_status"] == "failed" and row["pet_status"] == "ok"
    assert "x_ct.nii," in row["reason"] and "x_ct.nii.gz" in row["reason"]
    assert not (out / "cts" / "x.png").exists() and (out / "pets" / "x.png").is_file()


def test_study_seconds_stay_coherent_with_the_modality_seconds_after_reruns(tmp_path):
    """Issue 10 point 7: a re-run that skipped both modalities wrote study_seconds 0 beside
    the earlier per-modality seconds."""
    root, out = tmp_path / "petct", tmp_path / "out"
    _write(root / "PETCT_a" / "s1" / "CTres.nii.gz", head_phantom("ct"))
    options = ReconstructionOptions(head_height_mm=120.0)
    assert _run(root, out, options) == EXIT_ITEMS_FAILED             # no PET yet
    _write(root / "PETCT_a" / "s1" / "SUV.nii.gz", head_phantom("pet"))
    assert _run(root, out, options) == EXIT_OK                       # CT kept, PET made
    partial = _read_manifest(out)["PETCT_a_s1"]
    assert _run(root, out, options) == EXIT_OK                       # both kept
    skipped = _read_manifest(out)["PETCT_a_s1"]
    assert skipped["status"] == "skipped"
    for row in (partial, skipped):
        ct, pet, study = (float(row[k]) for k in ("ct_seconds", "pet_seconds", "study_seconds"))
        assert ct > 0 and pet > 0
        assert study == pytest.approx(ct + pet, abs=2e-3)
    assert skipped["study_seconds"] == partial["study_seconds"]


def test_qa_labels_tell_two_studies_of_one_patient_apart():
    from faceaudit.petct.reconstruction import LABEL_CHARS, qa_labels

    same_tail = ["PETCT_0af7ffe12a_08-12-2005-NA-PET-CT-10853",
                 "PETCT_0af7ffe12a_03-17-2006-NA-PET-CT-10853"]
    same_head = ["PETCT_0af7ffe12a_08-12-2005-NA-PET-CT-10853",
                 "PETCT_0af7ffe12a_08-12-2005-NA-PET-CT-27462"]
    # the labels used until now: "CT 0af7ffe1..10853" for both studies of the first pair
    assert len({f"CT {i.removeprefix('PETCT_')[:8]}..{i[-5:]}" for i in same_tail}) == 1
    for ids in (same_tail, same_head, [same_tail[0], same_tail[0][:-1] + "4", "p1", "p2"]):
        labels = qa_labels(ids, width=LABEL_CHARS - 4)
        assert len(set(labels)) == len(ids), labels
        assert all(len(label) <= LABEL_CHARS - 4 for label in labels)
    assert qa_labels(["p1", "p2"], width=22) == ["p1", "p2"]
    # the patient's id stays readable at the start
    assert all(label.startswith("0af7ffe1") for label in qa_labels(same_tail, width=22))


def test_flat_layout_dicom_series_folders_render_as_their_nifti_twins(tmp_path):
    from test_volumes import _write_dicom_series

    root, out = tmp_path / "flat", tmp_path / "out"
    ct = sitk.GetImageFromArray(head_phantom("ct").astype(np.int16))
    ct.SetSpacing(SPACING_XYZ)
    root.mkdir()
    _write_dicom_series(ct, root / "dcm_ct")
    _write(root / "dcm_pet.nii.gz", head_phantom("pet"))
    _write(root / "nii_ct.nii.gz", head_phantom("ct"))
    _write(root / "nii_pet.nii.gz", head_phantom("pet"))
    assert _run(root, out, ReconstructionOptions(head_height_mm=120.0)) == EXIT_OK
    rows = _read_manifest(out)
    assert rows["dcm"]["status"] == "ok" and rows["dcm"]["ct_source"].endswith("dcm_ct")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "cts" / "dcm.png")),
                                  np.asarray(Image.open(out / "cts" / "nii.png")))


def test_every_render_gets_a_face_verdict_and_the_summary_counts_faceless_renders(tmp_path,
                                                                                  headsq_ct_path):
    """Issue 10 point 6: a render with status ok could show no face and nothing said so."""
    root, out = tmp_path / "studies", tmp_path / "out"
    z, y, x = np.mgrid[:40, :36, :36]
    box = (abs(z - 20) < 12) & (abs(y - 18) < 10) & (abs(x - 18) < 9)     # no face on a box
    _write(root / "PETCT_blob" / "s1" / "CTres.nii.gz", np.where(box, 40.0, -1000.0).astype(np.float32))
    _write(root / "PETCT_blob" / "s1" / "SUV.nii.gz", np.where(box, 1.0, 0.02).astype(np.float32))
    real = root / "PETCT_real" / "s1"
    real.mkdir(parents=True)
    head = sitk.ReadImage(str(headsq_ct_path))
    sitk.WriteImage(sitk.Cast(head, sitk.sitkFloat32) - 1024.0, str(real / "CTres.nii.gz"))
    _write(real / "SUV.nii.gz", head_phantom("pet"))
    result = run_reconstruction(root, out, ReconstructionOptions(head_height_mm=140.0),
                                run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK
    rows = _read_manifest(out)
    assert rows["PETCT_real_s1"]["ct_face_qa"] == "face"
    assert rows["PETCT_blob_s1"]["ct_face_qa"] == "no_face"
    assert rows["PETCT_blob_s1"]["pet_face_qa"] == "no_face"
    assert all(row["status"] == "ok" for row in rows.values())      # counted, not failed
    assert "1 CT renders without a face" in result.summary and "PETCT_blob_s1" in result.summary
    assert "1 PET renders without a face" in result.summary     # the other PET is the face-like phantom
    sheet = np.asarray(Image.open(out / "qa_montage.png")).astype(int)
    assert ((sheet[..., 0] > 200) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)).sum() > 1000
    # a re-run skips both studies and keeps their verdicts and the count
    again = run_reconstruction(root, out, ReconstructionOptions(head_height_mm=140.0),
                               run=RunSettings(progress=False))
    assert _read_manifest(out)["PETCT_real_s1"]["ct_face_qa"] == "face"
    assert "1 CT renders without a face" in again.summary


def test_outputs_of_a_study_removed_from_the_input_are_deleted(tmp_path):
    """Review of stage 1: the manifest dropped a removed study's row but its renders stayed,
    and later stages take every *.png of cts/ and pets/ (trained on a study no longer there)."""
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    _good_study(root, "PETCT_b", "s1")
    options = ReconstructionOptions(head_height_mm=120.0)
    assert _run(root, out, options) == EXIT_OK
    (out / "cts" / "notes.txt").write_text("not a render")        # not an output name: kept
    import shutil
    shutil.rmtree(root / "PETCT_b")
    result = run_reconstruction(root, out, options, run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK and set(_read_manifest(out)) == {"PETCT_a_s1"}
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                  and p.parent.name in ("cts", "pets", "meshes", "depth"))
    assert left == ["cts/PETCT_a_s1.png", "cts/notes.txt", "depth/PETCT_a_s1_ct.npz", "depth/PETCT_a_s1_pet.npz",
                    "meshes/PETCT_a_s1_ct.ply", "meshes/PETCT_a_s1_pet.ply", "pets/PETCT_a_s1.png"]
    assert "removed 6 render, mesh and depth files" in result.summary
    assert result.details["n_stale_files_removed"] == 6


def test_a_full_disk_stops_the_stage_with_exit_2_instead_of_failing_every_study(tmp_path, monkeypatch, capsys):
    """Review of stage 1: ENOSPC while writing a render became a failed row per study."""
    import errno

    from faceaudit.petct import reconstruction

    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    _good_study(root, "PETCT_b", "s1")
    attempts = []

    def full_disk(path, image):
        attempts.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(reconstruction, "write_png", full_disk)
    with pytest.raises(OSError) as caught:
        _run(root, out, ReconstructionOptions(head_height_mm=120.0))
    assert caught.value.errno == errno.ENOSPC
    # the stage stopped in the first study (its CT and PET are written from two threads)
    assert 1 <= len(attempts) <= 2 and {os.path.basename(a) for a in attempts} == {"PETCT_a_s1.png"}
    assert _read_manifest(out) == {}                       # no study is recorded as failed
    assert "No space left on device" in json.loads((out / "run.json").read_text(encoding="utf-8"))["error"]
    assert not any((out / "meshes").iterdir()) and not any((out / "cts").iterdir())
    module = load_script("perform_morphological_reconstruction")
    code = module.main(["--petct_path", str(root), "--save_dir", str(out), "--quiet", "--head-height-mm", "120"])
    assert code == EXIT_USAGE and "No space left on device" in capsys.readouterr().err


def test_renders_whose_face_qa_could_not_run_are_framed_and_counted(tmp_path, monkeypatch):
    """Review of stage 1: an 'unchecked' render got a red frame on the QA sheet but the
    summary counted only no_face and implausible ones."""
    from faceaudit.petct import reconstruction

    monkeypatch.setattr(reconstruction, "render_face_qa", lambda image: "unchecked")
    root, out = tmp_path / "petct", tmp_path / "out"
    _good_study(root, "PETCT_a", "s1")
    result = run_reconstruction(root, out, ReconstructionOptions(head_height_mm=120.0),
                                run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK
    assert _read_manifest(out)["PETCT_a_s1"]["ct_face_qa"] == "unchecked"
    assert "1 CT renders not checked for a face" in result.summary
    assert "1 PET renders not checked for a face" in result.summary
    assert "without a face" not in result.summary
    sheet = np.asarray(Image.open(out / "qa_montage.png")).astype(int)
    assert ((sheet[..., 0] > 200) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)).sum() > 1000


def test_an_int16_ct_is_processed_as_stored_with_the_render_of_its_float32_copy(headsq_ct_path):
    """Stage 1 reads volumes as stored (load_volume(dtype=None)): the shipped int16 head CT
    is not copied to float32, and gives the same threshold, mesh and render as its float32 copy."""
    from faceaudit.petct.volumes import load_volume

    stored = load_volume(headsq_ct_path, dtype=None)
    converted = load_volume(headsq_ct_path)
    assert stored.array.dtype == np.int16 and converted.array.dtype == np.float32
    assert not stored.array.flags.writeable
    np.testing.assert_array_equal(stored.array, converted.array)
    options = ReconstructionOptions()
    results = [reconstruct_volume(v.array, v.spacing, modality="ct", origin=v.origin, options=options)
               for v in (stored, converted)]
    assert results[0].numbers["threshold"] == results[1].numbers["threshold"]
    np.testing.assert_array_equal(results[0].mesh.vertices, results[1].mesh.vertices)
    np.testing.assert_array_equal(results[0].render.image, results[1].render.image)
