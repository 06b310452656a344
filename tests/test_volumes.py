"""Volume input: canonical orientation, NIfTI vs DICOM, study discovery, broken files."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from faceaudit.core.files import InputError
from faceaudit.petct.volumes import discover_studies, load_volume


def _canonical_image(array_zyx: np.ndarray, spacing_xyz=(2.0, 1.5, 3.0), origin=(-10.0, 5.0, 20.0)):
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    return image


def _asymmetric_volume(shape=(12, 10, 8)) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(-1000, 1000, shape).astype(np.int16)


def test_flipped_and_permuted_storage_reads_back_to_the_same_canonical_array(tmp_path):
    array = _asymmetric_volume()
    image = _canonical_image(array)
    sitk.WriteImage(image, str(tmp_path / "lps.nii.gz"))
    # same voxels, other storage: axes permuted and flipped, direction cosines updated to match
    other = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    assert sitk.GetArrayFromImage(other).shape != array.shape
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))

    ref, moved = load_volume(tmp_path / "lps.nii.gz"), load_volume(tmp_path / "other.nii.gz")
    np.testing.assert_array_equal(moved.array, ref.array)
    np.testing.assert_allclose(moved.spacing, ref.spacing)
    np.testing.assert_allclose(moved.origin, ref.origin, atol=1e-4)
    assert ref.spacing == (3.0, 1.5, 2.0)           # (sz, sy, sx): array-axis order
    np.testing.assert_array_equal(ref.array, array.astype(np.float32))


def _write_dicom_series(image: sitk.Image, folder) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99"
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        slice_k.SetMetaData("0008|0060", "CT")
        slice_k.SetMetaData("0020|000e", series_uid)
        slice_k.SetMetaData("0020|0013", str(k + 1))
        slice_k.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in
                                                  (direction[0], direction[3], direction[6],
                                                   direction[1], direction[4], direction[7])))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in
                                                  image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_k.SetMetaData("0018|0050", str(image.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_nifti_and_dicom_series_give_the_same_volume_and_mesh(tmp_path):
    from faceaudit.petct.surface import extract_head_surface

    z, y, x = np.mgrid[:24, :20, :20]
    head = (((z - 11) / 9.0) ** 2 + ((y - 9.5) / 7.0) ** 2 + ((x - 9.5) / 6.0) ** 2) <= 1.0
    array = np.where(head, 40, -1000).astype(np.int16)
    image = _canonical_image(array, spacing_xyz=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    _write_dicom_series(image, tmp_path / "dicom")

    from_nifti, from_dicom = load_volume(tmp_path / "head.nii.gz"), load_volume(tmp_path / "dicom")
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, rtol=1e-5)
    mesh_n = extract_head_surface(from_nifti.array, from_nifti.spacing, modality="ct",
                                  origin=from_nifti.origin).mesh
    mesh_d = extract_head_surface(from_dicom.array, from_dicom.spacing, modality="ct",
                                  origin=from_dicom.origin).mesh
    assert len(mesh_n.vertices) == len(mesh_d.vertices) > 100
    np.testing.assert_allclose(mesh_d.vertices, mesh_n.vertices, atol=1e-3)


def test_truncated_gzip_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "CTres.nii.gz"
    sitk.WriteImage(_canonical_image(_asymmetric_volume((30, 30, 30))), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="CTres.nii.gz"):
        load_volume(path)


def test_two_d_image_is_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16), np.float32)), str(path))
    with pytest.raises(InputError, match=r"3-D.*2-D"):
        load_volume(path)


def test_single_slice_volume_is_rejected(tmp_path):
    path = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(256, dtype=np.float32).reshape(1, 16, 16)), str(path))
    with pytest.raises(InputError, match="2-D slice"):
        load_volume(path)


def test_nan_voxels_are_rejected(tmp_path):
    array = np.ones((8, 8, 8), np.float32)
    array[2, 3, 4] = np.nan
    path = tmp_path / "SUV.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match=r"1 NaN/inf"):
        load_volume(path)


def test_constant_volume_is_empty(tmp_path):
    path = tmp_path / "SUV.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32)), str(path))
    with pytest.raises(InputError, match="empty"):
        load_volume(path)


def test_missing_file_and_empty_dicom_folder(tmp_path):
    with pytest.raises(InputError, match="found nothing"):
        load_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM"):
        load_volume(tmp_path / "empty")


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(b"x")


def test_discovery_autopet_and_flat_layouts(tmp_path):
    _touch(tmp_path / "PETCT_aa" / "s1" / "CTres.nii.gz")
    _touch(tmp_path / "PETCT_aa" / "s1" / "CT.nii.gz")          # CTres is preferred
    _touch(tmp_path / "PETCT_aa" / "s1" / "SUV.nii.gz")
    _touch(tmp_path / "PETCT_aa" / "s1" / "PET.nii.gz")         # SUV is preferred
    _touch(tmp_path / "PETCT_aa" / "s2" / "CT.nii.gz")
    _touch(tmp_path / "PETCT_aa" / "s2" / "PET.nii.gz")
    _touch(tmp_path / "PETCT_bb" / "s1" / "CTres.nii.gz")      # PET missing: kept, reported later
    _touch(tmp_path / "p7_ct.nii.gz")
    _touch(tmp_path / "p7_pet.nii.gz")
    _touch(tmp_path / "p8_pet.nii.gz")                          # CT missing
    studies = {s.id: s for s in discover_studies(tmp_path)}
    assert sorted(studies) == ["PETCT_aa_s1", "PETCT_aa_s2", "PETCT_bb_s1", "p7", "p8"]
    assert studies["PETCT_aa_s1"].ct.name == "CTres.nii.gz"
    assert studies["PETCT_aa_s1"].pet.name == "SUV.nii.gz"
    assert studies["PETCT_aa_s2"].ct.name == "CT.nii.gz" and studies["PETCT_aa_s2"].pet.name == "PET.nii.gz"
    assert studies["PETCT_aa_s2"].subject == "PETCT_aa"
    assert studies["PETCT_bb_s1"].pet is None
    assert studies["p7"].subject == "p7" and studies["p7"].ct.name == "p7_ct.nii.gz"
    assert studies["p8"].ct is None


def test_discovery_of_a_folder_without_studies_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="PETCT_<patient>"):
        discover_studies(tmp_path)


def test_canonical_view_matches_simpleitk_dicomorient_for_all_48_axis_orders():
    import itertools

    from faceaudit.petct.volumes import _Raw, _to_canonical

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32))
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetOrigin((4.0, -5.0, 6.0))
    for perm in itertools.permutations([0, 1, 2]):
        for flip in itertools.product([False, True], repeat=3):
            stored = sitk.Flip(sitk.PermuteAxes(image, list(perm)), list(flip))
            reference = sitk.DICOMOrient(stored, "LPS")
            raw = _Raw(sitk.GetArrayFromImage(stored), stored.GetSpacing(), stored.GetOrigin(),
                       np.asarray(stored.GetDirection()).reshape(3, 3))
            array, spacing, origin = _to_canonical(raw)
            np.testing.assert_array_equal(array, sitk.GetArrayFromImage(reference))
            np.testing.assert_allclose(spacing, reference.GetSpacing()[::-1])
            np.testing.assert_allclose(origin, reference.GetOrigin(), atol=1e-9)


def test_nifti_scaling_slope_and_intercept_are_applied(tmp_path):
    array = (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60)
    path = tmp_path / "scaled.nii"
    sitk.WriteImage(_canonical_image(array), str(path))
    data = bytearray(path.read_bytes())
    data[112:120] = np.array([2.0, -1024.0], "<f4").tobytes()        # scl_slope, scl_inter
    path.write_bytes(bytes(data))
    volume = load_volume(path)
    np.testing.assert_allclose(volume.array, array * 2.0 - 1024.0)
    assert volume.array.dtype == np.float32


def test_simpleitk_fast_path_is_used_only_when_the_gzip_crc_matches(tmp_path):
    from faceaudit.petct.volumes import _read_nifti_gz_fast

    clean = np.random.default_rng(4).normal(size=(6, 7, 8)).astype(np.float32)
    with_nan = clean.copy()
    with_nan[1, 2, 3] = np.nan
    for name, array in (("clean.nii.gz", clean), ("nan.nii.gz", with_nan)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    info = sitk.ImageFileReader()
    info.SetFileName(str(tmp_path / "clean.nii.gz"))
    info.ReadImageInformation()
    fast = _read_nifti_gz_fast(tmp_path / "clean.nii.gz", info)
    assert fast is not None
    np.testing.assert_array_equal(fast.array, clean)
    # SimpleITK turns the NaN into 0: the CRC no longer matches, the careful decoder takes over
    info.SetFileName(str(tmp_path / "nan.nii.gz"))
    info.ReadImageInformation()
    assert _read_nifti_gz_fast(tmp_path / "nan.nii.gz", info) is None
    np.testing.assert_array_equal(load_volume(tmp_path / "clean.nii.gz").array, clean)


def _owner(array: np.ndarray):
    """The object at the end of ``array``'s chain of bases (the memory's owner)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


@pytest.mark.parametrize("name", ["fast.nii.gz", "scaled.nii.gz", "plain.nii", "image.mha"])
def test_loaded_voxels_outlive_simpleitk_and_are_read_only(tmp_path, name):
    """Every decoder (SimpleITK's .nii.gz fast path, the careful NIfTI decoder, other
    SimpleITK formats): the array must not view a SimpleITK buffer, which is freed with its
    image (a view once read freed memory), and must be read-only."""
    import gc

    array = np.random.default_rng(5).normal(size=(6, 7, 8)).astype(np.float32)
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    if name == "scaled.nii.gz":          # non-unit slope: CRC path refused, decoded here
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "x.nii"))
        data = bytearray((tmp_path / "x.nii").read_bytes())
        data[112:120] = np.array([2.0, 1.0], "<f4").tobytes()
        path.write_bytes(gzip.compress(bytes(data)))
        array = array * 2.0 + 1.0
    loaded = load_volume(path).array
    gc.collect()
    churn = [np.full(array.shape, 7.0, np.float32) for _ in range(8)]   # reuse freed memory
    np.testing.assert_array_equal(loaded, array)
    owner = _owner(loaded)
    assert isinstance(owner, (np.ndarray, bytes)), type(owner)
    assert not loaded.flags.writeable
    with pytest.raises(ValueError):
        loaded[0, 0, 0] = 1.0
    del churn


def test_discovery_reports_two_candidates_for_one_side_instead_of_picking_one(tmp_path):
    """Issue 12 point 11: directory order used to decide which of the two files was read."""
    _touch(tmp_path / "x_ct.nii.gz")
    _touch(tmp_path / "x_ct.nii")
    _touch(tmp_path / "x_pet.nii.gz")
    _touch(tmp_path / "y_CT.nii.gz")
    _touch(tmp_path / "y_ct.nii.gz")
    _touch(tmp_path / "y_pet.nii.gz")
    _touch(tmp_path / "PETCT_z" / "s1" / "CTres.nii.gz")
    _touch(tmp_path / "PETCT_z" / "s1" / "CTres.nii")
    _touch(tmp_path / "PETCT_z" / "s1" / "CT.nii.gz")           # a lower-ranked name: no ambiguity
    _touch(tmp_path / "PETCT_z" / "s1" / "SUV.nii.gz")
    studies = {s.id: s for s in discover_studies(tmp_path)}
    for sid, names in (("x", ("x_ct.nii ", "x_ct.nii.gz")), ("y", ("y_CT.nii.gz", "y_ct.nii.gz")),
                       ("PETCT_z_s1", ("CTres.nii,", "CTres.nii.gz"))):
        study = studies[sid]
        assert study.ct is None and study.pet is not None
        problem = study.problems["ct"]
        assert "found 2 candidates" in problem
        for name in names:
            assert name.strip(" ,") in problem
    assert studies["x"].problems.get("pet") is None
