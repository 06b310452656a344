"""Volume input: canonical orientation, NIfTI vs DICOM, study discovery, broken files."""

import gzip
import mmap

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
    with pytest.raises(InputError, match="CTres.nii.gz: truncated or corrupt file"):
        load_volume(path)


def test_corrupt_gzip_stream_is_an_input_error_naming_the_file(tmp_path):
    """A flipped byte inside the deflate stream, or a wrong CRC, is refused, never decoded."""
    path = tmp_path / "CTres.nii.gz"
    sitk.WriteImage(_canonical_image(_asymmetric_volume((30, 30, 30))), str(path))
    data = bytearray(path.read_bytes())
    crc_broken = bytes(data[:-8]) + bytes(b ^ 0xFF for b in data[-8:-4]) + bytes(data[-4:])
    data[len(data) // 2] ^= 0xFF
    for broken in (bytes(data), crc_broken):
        path.write_bytes(broken)
        with pytest.raises(InputError, match="CTres.nii.gz: truncated or corrupt file"):
            load_volume(path)


def test_a_complete_gzip_of_a_cut_nifti_is_an_input_error_saying_how_short(tmp_path):
    """The gzip stream is whole (CRC fine) but the NIfTI inside it stops mid-voxels."""
    path = tmp_path / "SUV.nii.gz"
    sitk.WriteImage(_canonical_image(_asymmetric_volume((30, 30, 30))), str(path))
    nifti = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(nifti[:-100]))
    with pytest.raises(InputError, match=rf"SUV.nii.gz: truncated or corrupt file \(expected {len(nifti)} "
                                         rf"bytes of header and voxels, found {len(nifti) - 100}\)"):
        load_volume(path)


def test_a_multi_member_gzip_reads_whole(tmp_path):
    """bgzip and concatenated files hold several gzip members; every one of them is voxels."""
    array = _asymmetric_volume((30, 30, 30))
    single = tmp_path / "one.nii.gz"
    sitk.WriteImage(_canonical_image(array), str(single))
    nifti = gzip.decompress(single.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(b"".join(gzip.compress(nifti[i: i + 10_000]) for i in range(0, len(nifti), 10_000)))
    np.testing.assert_array_equal(load_volume(multi).array, load_volume(single).array)


def test_big_endian_nifti_reads_to_the_same_values(tmp_path):
    import nibabel as nib

    array = _asymmetric_volume((9, 8, 7)).astype(np.float32)       # (k, j, i)
    little = nib.Nifti1Image(np.ascontiguousarray(array.T), np.diag([-2.0, -1.5, 3.0, 1.0]))
    big_header = little.header.copy().as_byteswapped(">")
    big = nib.Nifti1Image(np.ascontiguousarray(array.T).astype(">f4"), None, header=big_header)
    nib.save(little, tmp_path / "little.nii.gz")
    nib.save(big, tmp_path / "big.nii.gz")
    assert nib.load(tmp_path / "big.nii.gz").header.endianness == ">"
    np.testing.assert_array_equal(load_volume(tmp_path / "big.nii.gz").array,
                                  load_volume(tmp_path / "little.nii.gz").array)


def test_a_loaded_volume_is_read_only(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_canonical_image(_asymmetric_volume()), str(path))
    volume = load_volume(path)
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 1.0


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


def test_nifti_files_in_all_48_axis_orders_read_as_simpleitk_reads_them(tmp_path):
    """nibabel's voxels and the qform/sform rule give what SimpleITK (the reader before) gave,
    for every axis order and flip a file may be stored in."""
    import itertools

    image = _canonical_image(np.random.default_rng(6).normal(size=(5, 6, 7)).astype(np.float32),
                             spacing_xyz=(1.0, 2.0, 3.0), origin=(4.0, -5.0, 6.0))
    for n, (perm, flip) in enumerate(itertools.product(itertools.permutations([0, 1, 2]),
                                                       itertools.product([False, True], repeat=3))):
        path = tmp_path / f"o{n}.nii.gz"
        sitk.WriteImage(sitk.Flip(sitk.PermuteAxes(image, list(perm)), list(flip)), str(path))
        reference = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
        volume = load_volume(path)
        np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
        np.testing.assert_allclose(volume.spacing, reference.GetSpacing()[::-1])
        np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)


def _nifti_with_two_frames(path, *, sform_code: int, shear: bool = False, qform_code: int = 1):
    """A (6, 5, 4) int16 image (nibabel order i, j, k) whose qform and sform disagree: both
    run i to the patient's left (RAS -x) and k superior, the qform runs j posterior (RAS -y),
    the sform anterior."""
    import nibabel as nib

    data = (np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4) * 7 % 251 - 100).astype(np.int16)
    qform = np.diag([-2.0, -3.0, 4.0, 1.0])
    qform[:3, 3] = [10.0, 20.0, 30.0]
    sform = np.diag([-2.0, 3.0, 4.0, 1.0])
    sform[:3, 3] = [-10.0, -20.0, 30.0]
    if shear:
        sform[0, 1] = 1.5
    image = nib.Nifti1Image(data, None)
    image.set_qform(qform if qform_code else None, code=qform_code)
    image.set_sform(sform, code=sform_code)
    image.header.set_zooms((2.0, 3.0, 4.0))
    nib.save(image, str(path))
    return data


@pytest.mark.parametrize("sform_code, shear, qform_code, winner", [
    (1, False, 1, "sform"),     # both scanner frames: the sform (full precision) wins
    (2, False, 1, "qform"),     # an aligned (registered) sform is another space: the qform wins
    (4, False, 1, "qform"),     # MNI template space: the qform wins
    (1, True, 1, "qform"),      # a sheared sform is no patient frame: the qform wins
    (2, False, 0, "sform"),     # no qform: the sform is all there is
])
def test_which_of_qform_and_sform_places_the_patient(tmp_path, sform_code, shear, qform_code, winner):
    path = tmp_path / "two_frames.nii"
    data = _nifti_with_two_frames(path, sform_code=sform_code, shear=shear, qform_code=qform_code)
    volume = load_volume(path)
    # canonical axis 1 runs posterior: the qform stores j posterior already, the sform anterior
    expected = data.transpose(2, 1, 0)
    if winner == "sform":
        expected = expected[:, ::-1, :]
    np.testing.assert_array_equal(volume.array, expected)
    # the same rule as SimpleITK's reader (ITK), which this module used before nibabel
    reference = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)


def test_truncated_uncompressed_nifti_is_an_input_error(tmp_path):
    path = tmp_path / "CTres.nii"
    sitk.WriteImage(_canonical_image(_asymmetric_volume((30, 30, 30))), str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"CTres.nii.*truncated"):
        load_volume(path)


def test_nan_survives_the_nifti_reader_and_is_reported(tmp_path):
    """SimpleITK's NIfTI reader turns NaN into 0 without a word (a PET with a hole would pass)."""
    array = np.ones((8, 8, 8), np.float32)
    array[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "SUV.nii.gz"))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "SUV.nii.gz")))).all()
    with pytest.raises(InputError, match=r"1 NaN/inf"):
        load_volume(tmp_path / "SUV.nii.gz")


def test_scaled_int16_volume_is_read_without_a_float64_copy(tmp_path):
    """A scaled int16 CT of n voxels: the file's int16 buffer (2n bytes) and one float32 copy
    (4n) at most; a float64 copy alone would be 8n."""
    import tracemalloc

    import nibabel as nib

    data = np.random.default_rng(7).integers(-1000, 2000, (64, 64, 64)).astype(np.int16)
    image = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))        # stored in LPS order
    image.header.set_slope_inter(0.5, -1024.0)
    nib.save(image, str(tmp_path / "scaled.nii"))
    load_volume(tmp_path / "scaled.nii")            # imports and caches outside the measurement
    tracemalloc.start()
    volume = load_volume(tmp_path / "scaled.nii")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(volume.array, (data * np.float32(0.5) - np.float32(1024.0)).transpose(2, 1, 0))
    assert peak < 7 * data.size, peak / data.size


def _owner(array: np.ndarray):
    """The object at the end of ``array``'s chain of bases (the memory's owner)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


@pytest.mark.parametrize("name", ["fast.nii.gz", "scaled.nii.gz", "plain.nii", "image.mha"])
def test_loaded_voxels_outlive_simpleitk_and_are_read_only(tmp_path, name):
    """Every decoder (nibabel for NIfTI, SimpleITK for other formats): the array must not
    view a SimpleITK buffer, which is freed with its image (a view once read freed memory),
    and must be read-only. A NIfTI is inflated into memory Python owns (an anonymous mmap)."""
    import gc

    array = np.random.default_rng(5).normal(size=(6, 7, 8)).astype(np.float32)
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    if name == "scaled.nii.gz":          # non-unit slope: a float32 copy
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
    assert isinstance(owner, (np.ndarray, bytes, bytearray, mmap.mmap)), type(owner)
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


def test_discovery_of_dicom_series_folders_in_the_flat_layout(tmp_path):
    """Issue 10 point 5: ``<id>_ct/`` and ``<id>_pet/`` series folders were not found (exit 2,
    "no PET/CT studies"), though a DICOM folder may stand in for any NIfTI file."""
    image = _canonical_image(_asymmetric_volume((4, 5, 6)))
    _write_dicom_series(image, tmp_path / "d1_ct")
    _write_dicom_series(image, tmp_path / "d1_pet")
    _write_dicom_series(image, tmp_path / "d2_CT")
    _touch(tmp_path / "d2_ct.nii.gz")                           # and a NIfTI of the same side
    (tmp_path / "d3_ct").mkdir()                                # an empty folder is no series
    studies = {s.id: s for s in discover_studies(tmp_path)}
    assert sorted(studies) == ["d1", "d2"]
    assert studies["d1"].ct == tmp_path / "d1_ct" and studies["d1"].pet == tmp_path / "d1_pet"
    assert studies["d2"].ct is None and "d2_CT/" in studies["d2"].problems["ct"]
    np.testing.assert_array_equal(load_volume(studies["d1"].ct).array,
                                  load_volume(studies["d1"].pet).array)


@pytest.mark.parametrize("slope, expected", [(1.0, np.int16), (2.0, np.float32)])
def test_dtype_none_keeps_the_stored_type_unless_the_file_scales_it(tmp_path, slope, expected):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "x.nii"))
    data = bytearray((tmp_path / "x.nii").read_bytes())
    data[112:120] = np.array([slope, 0.0], "<f4").tobytes()
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    volume = load_volume(path, dtype=None)
    assert volume.array.dtype == expected
    assert load_volume(path).array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, load_volume(path).array)
    np.testing.assert_array_equal(np.sort(volume.array.ravel()), np.sort(array.ravel() * slope))
