"""Volume input: NIfTI files through nibabel, DICOM series (and NRRD, MHA) through
SimpleITK, one canonical orientation, and discovery of PET/CT studies in the AutoPET and flat folder layouts.

Canonical frame. Every volume is reoriented from its direction cosines to LPS (as
``sitk.DICOMOrient(image, "LPS")`` would, by a transpose and flips): voxel index i grows
towards the patient's Left, j towards Posterior, k towards Superior. The numpy array is
therefore indexed ``array[k, j, i]``:

    axis 0 -> superior (head at high index)
    axis 1 -> posterior (face at low index)
    axis 2 -> patient's left

whatever the array order or axis flips stored in the file. World coordinates (mm)
are LPS ``(x, y, z)`` = ``origin + (i, j, k) * spacing``. An axis-aligned file becomes a
view (transpose and flips, no copy); an oblique one (direction cosines tilted by more than
about 0.06 degrees: gantry tilt, an oblique acquisition) is resampled onto an upright grid,
so the same physical head gives the same render however it was stored.
"""

from __future__ import annotations

import io
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Accepted names inside an AutoPET study folder, best first (CTres is CT on the PET grid).
CT_NAMES = ("CTres", "CT")
PET_NAMES = ("SUV", "PET")


@dataclass
class Volume:
    """A 3-D scalar volume in the canonical LPS frame.

    array: (nz, ny, nx), axis 0 superior, axis 1 posterior, axis 2 patient's left; float32,
        or the stored voxel type when read with ``load_volume(..., dtype=None)``.
        From ``load_volume`` it is read-only and often a strided view of the decoded voxels
        (reorienting by transpose and flips costs no copy); copy it before writing to it.
        It never views memory SimpleITK owns, so it outlives every SimpleITK image.
    spacing: (sz, sy, sx) voxel size in mm, in array-axis order.
    origin: LPS world position (x, y, z) in mm of voxel [0, 0, 0].
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


@dataclass
class _Raw:
    """Voxels in file order (k, j, i) and their geometry in LPS (as SimpleITK states it)."""

    array: np.ndarray
    spacing_xyz: tuple
    origin: tuple
    direction: np.ndarray          # (3, 3), column a = world direction of index axis a


#: NIfTI xform codes
_XFORM_UNKNOWN, _XFORM_SCANNER_ANAT = 0, 1
#: RAS (NIfTI world) -> LPS (DICOM/ITK world)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _nifti_affine(header) -> np.ndarray | None:
    """The voxel -> RAS mm affine (4, 4) that places the patient, or None when the file has none.

    When qform and sform disagree, the sform wins only if it is a scanner frame
    (sform_code 1, NIFTI_XFORM_SCANNER_ANAT) or the qform is unset, and it has no shear.
    Why: the render needs where the patient lay in the scanner (which way is superior,
    anterior, left). The qform can only hold that (a rotation, voxel sizes and a shift),
    and it is what converters write from the DICOM geometry. A scanner-frame sform says the
    same thing at full float precision (dcm2niix and ITK write both), but an "aligned",
    Talairach or MNI sform is the result of a registration to another image or a template,
    and a sheared sform is no patient frame at all. This is also the rule of ITK (and so of
    SimpleITK, this module's reader before nibabel), so no stored study changes its
    geometry. nibabel's own ``image.affine`` would take any sform with a code > 0.
    """
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code != _XFORM_UNKNOWN and (sform_code == _XFORM_SCANNER_ANAT or qform_code == _XFORM_UNKNOWN):
        sform = np.asarray(header.get_sform(), dtype=np.float64)
        linear = sform[:3, :3]
        gram = linear.T @ linear
        off_diagonal = np.abs(gram - np.diag(np.diag(gram))).max()
        if off_diagonal <= 1e-4 * np.diag(gram).max() or qform_code == _XFORM_UNKNOWN:
            return sform
    if qform_code != _XFORM_UNKNOWN:
        return np.asarray(header.get_qform(), dtype=np.float64)
    return None


def _nifti_geometry(header) -> tuple[tuple, tuple, np.ndarray]:
    """(spacing (sx, sy, sz) mm, LPS origin of voxel [0, 0, 0], LPS direction (3, 3)).

    Spacing is pixdim (as ITK reads it); a file without qform and sform is taken as stored
    in LPS order with its origin at 0 (ITK's reading as well: nothing says otherwise)."""
    spacing = tuple(float(v) for v in header.get_zooms()[:3])
    affine = _nifti_affine(header)
    if affine is None:
        return spacing, (0.0, 0.0, 0.0), np.eye(3)
    lps = _RAS_TO_LPS @ affine[:3]
    linear = lps[:, :3]
    norms = np.linalg.norm(linear, axis=0)
    norms[norms == 0] = 1.0
    return spacing, tuple(float(v) for v in lps[:, 3]), linear / norms


def _open_nifti(path: Path):
    """A binary stream of the NIfTI bytes: a ``.nii.gz`` inflated on the fly by ISA-L's igzip
    (Python's gzip without ``isal``), a ``.nii`` as it is.

    Measured on a 208 MB AutoPET CT (benchmarks/bench_reconstruction.py prints the table):
    Python's zlib 1.5 s, SimpleITK 1.45 s, zlib-ng 1.0 s, igzip 0.86 s, libdeflate 0.85 s.
    libdeflate is not used: its gzip call trusts the size in the last four bytes, so a
    multi-member file (bgzip, concatenated members) comes back as its last member's length
    and zero padding after the stream as an empty buffer, without an error. igzip reads every
    member, checks each CRC and raises EOFError on a truncated stream, like Python's gzip.
    """
    if not path.name.lower().endswith(".gz"):
        return open(path, "rb")
    try:
        from isal import igzip as gzip_module
    except ImportError:
        import gzip as gzip_module
    return gzip_module.open(path, "rb")


_READ_BLOCK = 8 << 20        # 4-8 MiB measured fastest: 32 MiB reads were 0.15 s slower per CT


def _fill(stream, buffer) -> int:
    """Read ``stream`` into ``buffer`` until it is full or the stream ends; the bytes read."""
    view, filled = memoryview(buffer), 0
    while filled < len(view):
        # in blocks: a gzip reader asked for 200 MB at once inflates them into a temporary first
        got = stream.readinto(view[filled: filled + _READ_BLOCK])
        if not got:
            break
        filled += got
    return filled


def _zeroed_buffer(size: int):
    """A writable buffer of ``size`` zero bytes for the voxels.

    Anonymous memory mapped with MAP_POPULATE: the kernel maps and zeroes every page in the
    one mmap call, which releases the GIL. ``bytearray(size)`` zero-fills the same 200 MB
    holding the GIL (0.08 s per AutoPET CT, while the other volume's thread waits)."""
    if size > 0 and hasattr(mmap, "MAP_POPULATE"):
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        except OSError:          # no memory to map at once: let bytearray raise MemoryError
            pass
    return bytearray(size)


def _corrupt_stream_errors() -> tuple[type[BaseException], ...]:
    """What the gzip readers raise for a truncated or corrupt stream (a bad CRC included)."""
    import gzip
    import zlib

    errors: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
    try:
        from isal import isal_zlib
    except ImportError:
        return errors
    return (*errors, isal_zlib.error)


def _nifti_header_and_voxels(path: Path):
    """(nibabel header, voxels as stored: file type and byte order, header shape, unscaled).

    The file is streamed once: the header is parsed from its first bytes, then the voxels
    are inflated straight into one buffer of their size, so neither the compressed file nor a
    second copy of the voxels is ever held. The rest of the stream is read to its end, where
    gzip checks the CRC and the length."""
    import nibabel as nib

    with _open_nifti(path) as stream:
        first = stream.read(540)
        sizeof_hdr = int.from_bytes(first[:4], "little")
        if sizeof_hdr not in (348, 540):
            sizeof_hdr = int.from_bytes(first[:4], "big")
        header_class = nib.Nifti2Header if sizeof_hdr == 540 else nib.Nifti1Header
        if sizeof_hdr not in (348, 540) or len(first) < sizeof_hdr:
            raise InputError(f"cannot read volume {path}: expected a NIfTI-1 or NIfTI-2 header "
                             f"(sizeof_hdr 348 or 540), found {len(first)} bytes starting {first[:4]!r}")
        offset = int(header_class(first[:sizeof_hdr]).get_data_offset())
        prefix = first + stream.read(max(0, offset - len(first)))
        header = header_class.from_fileobj(io.BytesIO(prefix))
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
        size = int(np.prod(shape)) * dtype.itemsize
        voxels = _zeroed_buffer(size)
        head = prefix[offset:offset + size]                  # a short file's voxels started early
        voxels[:len(head)] = head
        found = len(prefix) + _fill(stream, memoryview(voxels)[len(head):])
        if found < offset + size:
            raise InputError(f"cannot read volume {path}: truncated or corrupt file (expected "
                             f"{offset + size} bytes of header and voxels, found {found})")
        while stream.read(1 << 20):                           # to the end: gzip's CRC and length check
            pass
    array = np.frombuffer(voxels, dtype=dtype).reshape(shape, order="F")
    return header, array


def _read_nifti(path: Path) -> _Raw:
    """NIfTI-1/2 (.nii, .nii.gz) parsed by nibabel: voxels as stored (NaN kept), scl_slope and
    scl_inter applied in float32, a truncated or corrupt file an InputError.

    SimpleITK's NIfTI reader zero-fills a truncated .nii.gz and turns NaN into 0 without a
    word, so it is not used for NIfTI. The voxels are inflated into one buffer of their own
    size; scaling makes one float32 copy of it, never a float64 one.
    """
    try:
        header, voxels = _nifti_header_and_voxels(path)
    except InputError:
        raise
    except _corrupt_stream_errors() as exc:
        raise InputError(f"cannot read volume {path}: truncated or corrupt file "
                         f"({type(exc).__name__}: {str(exc).strip()})") from exc
    except Exception as exc:  # nibabel's HeaderDataError, OSError ...
        raise InputError(f"cannot read volume {path}: {type(exc).__name__}: {str(exc).strip()}") from exc
    shape = tuple(int(d) for d in header.get_data_shape())
    if len(shape) < 3 or any(d > 1 for d in shape[3:]):
        raise InputError(f"expected a 3-D volume in {path}, found a {len(shape)}-D image of size "
                         f"{list(shape)}")
    voxels = voxels.reshape(shape[:3], order="A")
    if voxels.dtype.kind not in "iuf":
        raise InputError(f"{path}: NIfTI voxel type {voxels.dtype} is not a scalar type this reader handles")
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    if (slope, inter) != (1.0, 0.0):
        scaled = voxels.astype(np.float32)
        del voxels
        scaled *= np.float32(slope)
        scaled += np.float32(inter)
        voxels = scaled
    spacing, origin, direction = _nifti_geometry(header)
    # nibabel's (i, j, k) array transposed is SimpleITK's (k, j, i) order, as a view
    return _Raw(array=voxels.T, spacing_xyz=spacing, origin=origin, direction=direction)


def _read_sitk(path: Path) -> _Raw:
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)        # before SimpleITK's import: 0.3 s a NIfTI cohort never needs
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputError(f"expected a DICOM series in folder {path}, found no DICOM files")
        if len(series) > 1:
            raise InputError(f"expected one DICOM series in folder {path}, found {len(series)}: "
                             f"{list(series)}")
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        image = reader.Execute()
    elif not path.is_file():
        raise InputError(f"expected a volume file or DICOM folder at {path}, found nothing")
    else:
        image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a scalar volume in {path}, found "
                         f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3-D volume in {path}, found a {image.GetDimension()}-D "
                         f"image of size {image.GetSize()}")
    return _Raw(array=sitk.GetArrayFromImage(image), spacing_xyz=tuple(image.GetSpacing()),
                origin=tuple(image.GetOrigin()),
                direction=np.asarray(image.GetDirection()).reshape(3, 3))


def _to_canonical(raw: _Raw) -> tuple[np.ndarray, tuple, tuple]:
    """File-order voxels -> LPS canonical view (axis 0 superior, 1 posterior, 2 left).

    Same result as ``sitk.DICOMOrient(image, "LPS")`` (nearest axis per index axis, oblique
    residual ignored) but as a numpy transpose + flips view: no copy of the voxels.
    Returns (array view, spacing (sz, sy, sx), origin LPS of the new voxel [0, 0, 0]).
    """
    direction = np.asarray(raw.direction, dtype=np.float64)
    world_of_index = np.argmax(np.abs(direction), axis=0)     # index axis a -> world axis
    if sorted(world_of_index.tolist()) != [0, 1, 2]:
        raise InputError("cannot bring the volume to a canonical orientation: its direction "
                         f"cosines {direction.round(3).tolist()} map two axes onto one")
    index_of_world = np.argsort(world_of_index)              # world axis w -> index axis
    sign = np.sign(direction[world_of_index, np.arange(3)])   # per index axis
    size_ijk = raw.array.shape[::-1]
    # numpy axis of index axis a is 2 - a; the canonical numpy order is world (z, y, x)
    array = raw.array.transpose([2 - index_of_world[w] for w in (2, 1, 0)])
    flips = tuple(slice(None, None, -1) if sign[index_of_world[w]] < 0 else slice(None)
                  for w in (2, 1, 0))
    array = array[flips]
    start_ijk = np.array([size_ijk[a] - 1 if sign[a] < 0 else 0 for a in range(3)], dtype=np.float64)
    origin = np.asarray(raw.origin, dtype=np.float64) + direction @ (start_ijk * np.asarray(raw.spacing_xyz))
    spacing = tuple(float(raw.spacing_xyz[index_of_world[w]]) for w in (2, 1, 0))
    return array, spacing, tuple(float(v) for v in origin)


#: Direction cosines farther than this from a signed axis permutation (about 0.06 degrees)
#: are oblique (gantry tilt, an oblique acquisition): the volume is resampled upright.
OBLIQUE_TOLERANCE = 1e-3


def _obliqueness(direction: np.ndarray) -> float:
    """Largest difference between the direction cosines and their nearest signed axis
    permutation (the sine of the tilt, for a tilt about one axis)."""
    direction = np.asarray(direction, dtype=np.float64)
    nearest = np.zeros((3, 3))
    world_of_index = np.argmax(np.abs(direction), axis=0)
    nearest[world_of_index, np.arange(3)] = np.sign(direction[world_of_index, np.arange(3)])
    return float(np.abs(direction - nearest).max())


def _resample_upright(raw: _Raw) -> tuple[np.ndarray, tuple, tuple]:
    """An oblique volume -> the canonical LPS grid holding the same physical voxels.

    Linear interpolation onto an axis-aligned grid that covers the tilted one, with the
    voxel sizes of the index axes nearest to each world axis; outside the tilted grid is the
    volume's minimum (air). The camera is placed in the patient frame, so a head stored
    10 degrees oblique must not render pitched by 10 degrees. Returns (array (nz, ny, nx)
    float32, spacing (sz, sy, sx), LPS origin of voxel [0, 0, 0]).
    """
    import itertools

    import SimpleITK as sitk

    direction = np.asarray(raw.direction, dtype=np.float64)
    spacing_ijk = np.asarray(raw.spacing_xyz, dtype=np.float64)
    image = sitk.GetImageFromArray(np.asarray(raw.array, dtype=np.float32))
    image.SetSpacing(tuple(spacing_ijk))
    image.SetOrigin(tuple(float(v) for v in raw.origin))
    image.SetDirection(tuple(direction.ravel()))
    last = np.array(raw.array.shape[::-1], dtype=np.float64) - 1.0
    corners = np.array([np.asarray(raw.origin) + direction @ (np.array(c) * last * spacing_ijk)
                        for c in itertools.product((0, 1), repeat=3)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = np.empty(3)
    spacing[np.argmax(np.abs(direction), axis=0)] = spacing_ijk
    size = [int(n) for n in np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1]
    upright = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(lo), tuple(spacing),
                            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                            float(np.min(raw.array)), sitk.sitkFloat32)
    # a copy: a view would dangle once the SimpleITK image is freed
    array = sitk.GetArrayFromImage(upright)
    return array, tuple(float(v) for v in spacing[::-1]), tuple(float(v) for v in lo)


def load_volume(path: str | os.PathLike, *, dtype=np.float32) -> Volume:
    """Read a NIfTI file (.nii/.nii.gz), another SimpleITK format (NRRD, MHA) or a DICOM series
    folder into the canonical LPS frame.

    dtype: the voxel type of ``Volume.array``; None keeps the type the voxels are stored in
    (after a NIfTI's scaling, which gives float32): an int16 CT stays int16, without a float32
    copy of twice its size.

    Raises InputError (quoting ``path``) when the file cannot be read or is truncated, is
    not a single-channel 3-D image (2-D, 4-D, vector), holds NaN/inf or holds a single value.
    """
    path = Path(path)
    try:
        raw = _read_sitk(path)
    except InputError:
        raise
    except Exception as exc:  # bad header ... (SimpleITK raises RuntimeError)
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "rror" in line), lines[-1] if lines else "")
        raise InputError(f"cannot read volume {path}: {type(exc).__name__}: {detail[:300]}") from exc
    if min(raw.array.shape) < 2:
        raise InputError(f"expected a 3-D volume in {path}, found size {raw.array.shape[::-1]} "
                         f"(a 2-D slice)")
    oblique = _obliqueness(raw.direction) > OBLIQUE_TOLERANCE
    if oblique:
        array, spacing, origin = _resample_upright(raw)
    else:
        array, spacing, origin = _to_canonical(raw)
    # min and max propagate NaN and show inf, so two passes check finiteness and emptiness;
    # on the voxels in memory order (the reoriented view has a reversed axis: twice as slow)
    stored = array if oblique else raw.array
    lo, hi = float(stored.min()), float(stored.max())
    del raw, stored
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"volume {path} holds {n_bad} NaN/inf voxels of {array.size}")
    if lo == hi:
        raise InputError(f"volume {path} is empty: every voxel equals {lo}")
    # read-only whichever decoder ran (a bytes view already is, a converted copy is not),
    # so a caller writing into a shared volume fails at once instead of corrupting it
    array.flags.writeable = False
    return Volume(array=array, spacing=spacing, origin=origin, source=str(path))


# --------------------------------------------------------------------------- discovery

@dataclass
class Study:
    """One PET/CT study. ``ct`` or ``pet`` is None when that side is missing (reported, not dropped)."""

    id: str
    subject: str
    ct: Path | None
    pet: Path | None
    layout: str
    #: modality -> why its volume cannot be chosen (two candidates); the stage fails that side
    problems: dict[str, str] = field(default_factory=dict)


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_named(folder: Path, names: tuple[str, ...]) -> tuple[Path | None, list[Path]]:
    """The first of ``names`` present in ``folder`` as NIfTI file or DICOM folder, and every
    entry carrying that name (more than one: ``CT.nii`` beside ``CT.nii.gz`` or a ``CT/``
    folder, which the stage reports instead of choosing one by directory order)."""
    entries = {p.name: p for p in folder.iterdir()}
    for name in names:
        found = [entries[name + suffix] for suffix in NIFTI_SUFFIXES
                 if name + suffix in entries and entries[name + suffix].is_file()]
        if name in entries and entries[name].is_dir():
            found.append(entries[name])
        if found:
            return found[0], found
    return None, []


def _ambiguity(modality: str, candidates: list[Path]) -> str:
    names = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in candidates))
    return (f"expected one {modality.upper()} volume, found {len(candidates)} candidates in "
            f"{candidates[0].parent}: {names} (remove or rename all but one)")


_FLAT = re.compile(r"^(?P<id>.+)_(?P<side>ct|pet)$", re.IGNORECASE)


def _autopet_study(patient_dir: Path, study_dir: Path) -> Study | None:
    sid = f"{patient_dir.name}_{study_dir.name}"
    study = Study(id=sid, subject=patient_dir.name, ct=None, pet=None, layout="autopet")
    for side, names in (("ct", CT_NAMES), ("pet", PET_NAMES)):
        chosen, candidates = _find_named(study_dir, names)
        if len(candidates) > 1:
            study.problems[side] = _ambiguity(side, candidates)
        else:
            setattr(study, side, chosen)
    if study.ct is None and study.pet is None and not study.problems:
        from faceaudit.petct.dicom_study import pick_series, series_folders

        if series_folders(study_dir):     # a TCIA download: DICOM series, told apart by header
            chosen, problems = pick_series(study_dir)
            study.ct, study.pet, study.problems, study.layout = chosen["ct"], chosen["pet"], problems, "tcia"
            return study
        # a folder with neither side is still reported when it holds some NIfTI (e.g. only SEG)
        if not any(_strip_nifti(p.name) for p in study_dir.iterdir()):
            return None
    return study


def _is_series_folder(path: Path) -> bool:
    """A folder holding files itself (a DICOM series), not only sub-folders (a patient)."""
    return path.is_dir() and any(p.is_file() for p in path.iterdir())


def _flat_candidates(root: Path) -> dict[tuple[str, str], list[Path]]:
    """(study id, "ct" | "pet") -> the files named ``<id>_<side>.nii[.gz]`` and the DICOM
    series folders named ``<id>_<side>/``, side in any case."""
    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.is_file():
            stem = _strip_nifti(path.name)
        else:
            stem = path.name if _is_series_folder(path) else None
        match = _FLAT.match(stem) if stem else None
        if match:
            found.setdefault((match["id"], match["side"].lower()), []).append(path)
    return found


def discover_studies(root: str | os.PathLike) -> list[Study]:
    """Find PET/CT studies under ``root``, sorted by id.

    AutoPET layout: ``root/PETCT_<patient>/<study>/{CTres|CT,SUV|PET}.nii.gz`` (or a DICOM
    folder of that name); id = ``PETCT_<patient>_<study>``, subject = ``PETCT_<patient>``.
    TCIA layout (FDG-PET-CT-Lesions as downloaded): the same folders, the study folder holding
    DICOM series sub-folders instead; CT and PET are the series whose Modality is CT and PT
    (petct.dicom_study: SEG and localisers ignored, two candidates a problem naming both).
    Flat layout: ``root/<id>_ct.nii.gz`` + ``root/<id>_pet.nii.gz``, either of which may be a
    DICOM series folder ``root/<id>_ct/``, ``root/<id>_pet/``; subject = id.
    CT and PET are paired by study id; a study missing one side is returned with that
    side None so the stage records it as failed. Two candidates for one side (``x_ct.nii``
    beside ``x_ct.nii.gz``, ``x_CT`` beside ``x_ct``, ``CT.nii`` beside ``CT.nii.gz``) are
    never resolved by directory order: that side is None and ``problems`` names both.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"expected a folder of PET/CT studies at {root}, found nothing")
    studies: dict[str, Study] = {}
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("PETCT_")):
        for study_dir in sorted(p for p in patient_dir.iterdir() if p.is_dir()):
            study = _autopet_study(patient_dir, study_dir)
            if study is not None:
                studies[study.id] = study
    for (sid, side), paths in sorted(_flat_candidates(root).items()):
        study = studies.setdefault(sid, Study(id=sid, subject=sid, ct=None, pet=None, layout="flat"))
        if len(paths) > 1:
            study.problems[side] = _ambiguity(side, paths)
        else:
            setattr(study, side, paths[0])
    if not studies:
        raise InputError(
            f"no PET/CT studies under {root}: expected PETCT_<patient>/<study>/"
            f"{{CTres,SUV}}.nii.gz folders or <id>_ct.nii.gz + <id>_pet.nii.gz files "
            f"(or <id>_ct/ + <id>_pet/ DICOM series folders)")
    return [studies[k] for k in sorted(studies)]
