"""TCIA FDG-PET-CT-Lesions layout: DICOM series picked by Modality, PET Bq/ml -> SUV (issue 10
point 5, second half)."""

import csv
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import head_phantom
from faceaudit.core.runner import EXIT_ITEMS_FAILED, EXIT_OK, RunSettings
from faceaudit.petct.dicom_study import _scan_value, pick_series, suv_factor
from faceaudit.petct.reconstruction import ReconstructionOptions, run_reconstruction

SPACING_XYZ = (4.0, 4.0, 4.0)
WEIGHT_KG, DOSE_BQ, HALF_LIFE_S = 72.5, 3.4e8, 6586.2          # F-18
#: injected 09:58:30, series at 11:02:00: 3810 s of decay
INJECTION, SERIES = "095830.00", "110200"
SUV_FACTOR = WEIGHT_KG * 1000.0 / (DOSE_BQ * 2.0 ** (-3810.0 / HALF_LIFE_S))


def _write_series(folder, array_zyx, tags: dict, *, uid: str, n_slices: int | None = None) -> None:
    """A DICOM series of ``array_zyx`` (int16, canonical LPS, 4 mm) with ``tags`` on every slice."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.asarray(array_zyx, dtype=np.int16))
    image.SetSpacing(SPACING_XYZ)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n_slices or image.GetDepth()):
        slice_k = image[:, :, k]
        for key, value in {**tags, "0020|000e": uid, "0020|0013": str(k + 1),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "4",
                           "0020|0032": f"0\\0\\{4.0 * k}"}.items():
            slice_k.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"1-{k + 1:03d}.dcm"))
        writer.Execute(slice_k)


PET_TAGS = {"0008|0060": "PT", "0054|1001": "BQML", "0010|1030": str(WEIGHT_KG),
            "0018|1074": str(DOSE_BQ), "0018|1075": str(HALF_LIFE_S), "0018|1072": INJECTION,
            "0008|0031": SERIES, "0008|0008": "ORIGINAL\\PRIMARY", "0054|1102": "START"}


def _tcia_study(root, *, pet_tags=PET_TAGS, second_pet: bool = False):
    """PETCT_tcia/<study>/ with a CT, a PET in Bq/ml, a SEG, a 2-slice CT localiser."""
    study = root / "PETCT_tcia" / "08-12-2005-NA-PET-CT Ganzkoerper-10445"
    ct = head_phantom("ct")
    _write_series(study / "2.000000-CT IMAGES-31337", ct, {"0008|0060": "CT"}, uid="1.2.3.1")
    bqml = np.rint(head_phantom("pet") / SUV_FACTOR)                # SUV 1 = ~3.4 kBq/ml
    _write_series(study / "3.000000-PET corr-98765", bqml, pet_tags, uid="1.2.3.2")
    _write_series(study / "1.000000-Topogram-111", ct, {"0008|0060": "CT",
                                                        "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"},
                  uid="1.2.3.3", n_slices=2)
    _write_series(study / "400.000000-Segmentation-222", ct > 0, {"0008|0060": "SEG"}, uid="1.2.3.4")
    if second_pet:
        _write_series(study / "4.000000-PET NAC-55555", bqml, pet_tags, uid="1.2.3.5")
    return study


def _rows(out):
    with open(out / "manifest.csv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def test_tcia_study_ct_and_pet_picked_by_modality_and_pet_turned_into_suv(tmp_path):
    study = _tcia_study(tmp_path / "in")
    chosen, problems = pick_series(study)
    assert chosen["ct"].name.startswith("2.000000-CT") and chosen["pet"].name.startswith("3.0")
    assert problems == {}
    factor, note = suv_factor(chosen["pet"])
    assert factor == pytest.approx(SUV_FACTOR, rel=1e-9) and note == ""
    out = tmp_path / "out"
    # before: 'no PET/CT studies' (exit 2): the study folder holds no CTres/SUV volume
    result = run_reconstruction(tmp_path / "in", out, ReconstructionOptions(head_height_mm=120.0),
                                run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK
    row = _rows(out)["PETCT_tcia_08-12-2005-NA-PET-CT Ganzkoerper-10445"]
    assert row["ct_source"].endswith("2.000000-CT IMAGES-31337")
    assert row["pet_units"] == "suv"
    assert float(row["pet_suv_factor"]) == pytest.approx(SUV_FACTOR, rel=1e-5)    # 6 digits in the CSV
    # the skin level in SUV: half the body's uptake of 1.0 (int16 Bq/ml rounding: < 0.1 %)
    assert float(row["pet_threshold"]) == pytest.approx(0.5, abs=0.03)


def test_pet_without_dose_or_weight_stays_relative_and_still_renders(tmp_path):
    tags = {k: v for k, v in PET_TAGS.items() if k != "0010|1030"}
    _tcia_study(tmp_path / "in", pet_tags=tags)
    result = run_reconstruction(tmp_path / "in", tmp_path / "out",
                                ReconstructionOptions(head_height_mm=120.0), run=RunSettings(progress=False))
    assert result.exit_code == EXIT_OK
    row = next(iter(_rows(tmp_path / "out").values()))
    assert row["pet_units"] == "relative" and "weight" in row["pet_units_note"]
    assert row.get("pet_suv_factor", "") == ""
    assert float(row["pet_threshold"]) == pytest.approx(0.5 / SUV_FACTOR, rel=0.06)


def test_two_pet_series_are_a_failed_side_naming_both(tmp_path):
    _tcia_study(tmp_path / "in", second_pet=True)
    result = run_reconstruction(tmp_path / "in", tmp_path / "out",
                                ReconstructionOptions(head_height_mm=120.0), run=RunSettings(progress=False))
    assert result.exit_code == EXIT_ITEMS_FAILED
    row = next(iter(_rows(tmp_path / "out").values()))
    assert row["status"] == "failed" and row["ct_status"] == "ok"
    assert "3.000000-PET corr-98765/" in row["reason"] and "4.000000-PET NAC-55555/" in row["reason"]


def test_radiopharmaceutical_values_are_found_inside_their_sequence(tmp_path):
    """SimpleITK's header dictionary skips sequences; real PET files nest the dose there."""
    def element(group, elem, vr, value: bytes) -> bytes:
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    item = element(0x0018, 0x1072, b"TM", b"095830.00 ") + element(0x0018, 0x1074, b"DS", b"340000000 ")
    sequence = (struct.pack("<HH", 0x0054, 0x0016) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / "pet.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + element(0x0008, 0x0060, b"CS", b"PT") + sequence
                     + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", 4)
                     + struct.pack("<HH", 0x0018, 0x1075))           # not before the pixel data
    assert _scan_value(path, "0018|1074") == "340000000"
    assert _scan_value(path, "0018|1072") == "095830.00"
    assert _scan_value(path, "0018|1075") is None


@pytest.mark.parametrize("decay, expected", [("START", SUV_FACTOR), ("ADMIN", WEIGHT_KG * 1000.0 / DOSE_BQ),
                                             ("NONE", None), (None, None)])
def test_suv_factor_follows_the_decay_correction_the_header_states(tmp_path, decay, expected):
    """Review of stage 1: DecayCorrection (0054,1102) was assumed START without being read;
    values corrected to the injection (ADMIN) were decayed a second time, and a PET with no
    decay correction was called SUV."""
    tags = {k: v for k, v in PET_TAGS.items() if k != "0054|1102"}
    if decay is not None:
        tags["0054|1102"] = decay
    _write_series(tmp_path / "pet", head_phantom("pet"), tags, uid="1.2.3.9", n_slices=1)
    factor, note = suv_factor(tmp_path / "pet")
    if expected is None:
        assert factor is None and "decay correction (0054,1102)" in note
        assert (decay or "not stated") in note
    else:
        assert factor == pytest.approx(expected, rel=1e-9) and note == ""


def test_values_of_vrs_with_a_4_byte_length_are_read_whole(tmp_path):
    """Explicit VR little endian: OB, OW, SQ, UN, UT ... carry two reserved bytes and a 4-byte
    length; the 2-byte length read before gave '' (the reserved zeros) for a UN-encoded dose."""
    def long_element(group, elem, vr, value: bytes) -> bytes:
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value

    path = tmp_path / "pet.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + long_element(0x0018, 0x1074, b"UN", b"340000000 ")
                     + long_element(0x0008, 0x103E, b"UT", b"PET corr " * 10)
                     + struct.pack("<HH", 0x0054, 0x0016) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF))
    assert _scan_value(path, "0018|1074") == "340000000"
    assert _scan_value(path, "0008|103e") == ("PET corr " * 10).strip()
    assert _scan_value(path, "0054|0016") is None          # a sequence of undefined length: no value


def test_a_series_with_an_unreadable_header_fails_its_study_only(tmp_path):
    """Review of stage 1: one unreadable series header anywhere raised out of the discovery
    of every study (the whole stage exit 2)."""
    root = tmp_path / "in"
    _tcia_study(root)
    broken = root / "PETCT_broken" / "01-01-2010-NA-PET-CT-1"
    (broken / "5.000000-broken-1").mkdir(parents=True)
    for k in range(8):                                     # a DICOM preamble, then garbage
        (broken / "5.000000-broken-1" / f"1-{k + 1:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"x" * 64)
    result = run_reconstruction(root, tmp_path / "out", ReconstructionOptions(head_height_mm=120.0),
                                run=RunSettings(progress=False))
    assert result.exit_code == EXIT_ITEMS_FAILED
    rows = _rows(tmp_path / "out")
    assert rows["PETCT_tcia_08-12-2005-NA-PET-CT Ganzkoerper-10445"]["status"] == "ok"
    row = rows["PETCT_broken_01-01-2010-NA-PET-CT-1"]
    assert row["status"] == "failed" and row["ct_status"] == "failed" and row["pet_status"] == "failed"
    assert "cannot read the DICOM header of" in row["reason"] and "5.000000-broken-1" in row["reason"]
