"""Volume input: NIfTI files and DICOM series through SimpleITK, one canonical orientation,
and discovery of PET/CT studies in the AutoPET and flat folder layouts.

Canonical frame. Every volume is reoriented from its direction cosines to LPS
(``sitk.DICOMOrient(image, "LPS")``): voxel index i grows towards the patient's Left,
j towards Posterior, k towards Superior. The numpy array is therefore indexed
``array[k, j, i]``:

    axis 0 -> superior (head at high index)
    axis 1 -> posterior (face at low index)
    axis 2 -> patient's left

whatever the array order or axis flips stored in the file. World coordinates (mm)
are LPS ``(x, y, z)`` = ``origin + (i, j, k) * spacing`` (direction reduced to the
identity up to an oblique residual, which the nearest-axis reorientation ignores).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError

CANONICAL_ORIENTATION = "LPS"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Accepted names inside an AutoPET study folder, best first (CTres is CT on the PET grid).
CT_NAMES = ("CTres", "CT")
PET_NAMES = ("SUV", "PET")


@dataclass
class Volume:
    """A 3-D scalar volume in the canonical LPS frame.

    array: (nz, ny, nx) float32, axis 0 superior, axis 1 posterior, axis 2 patient's left.
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


_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                 768: "u4", 1024: "i8", 1280: "u8"}


@dataclass
class _Raw:
    """Voxels in file order (k, j, i) and the geometry SimpleITK derives for them (LPS)."""

    array: np.ndarray
    spacing_xyz: tuple
    origin: tuple
    direction: np.ndarray          # (3, 3), column a = world direction of index axis a


def _nifti_header(head: bytes, path: Path) -> tuple[tuple[int, int, int], np.dtype, int, float, float]:
    """(shape (nz, ny, nx), voxel dtype, vox_offset, slope, intercept) from NIfTI-1/2 bytes."""
    if len(head) < 348:
        raise InputError(f"cannot read volume {path}: {len(head)} bytes, shorter than a NIfTI header")
    endian = "<" if int.from_bytes(head[:4], "little") in (348, 540) else ">"
    header_size = int(np.frombuffer(head, endian + "i4", 1, 0)[0])
    if header_size == 348:
        dims = np.frombuffer(head, endian + "i2", 8, 40).astype(np.int64)
        code = int(np.frombuffer(head, endian + "i2", 1, 70)[0])
        vox_offset = int(np.frombuffer(head, endian + "f4", 1, 108)[0])
        slope, inter = (float(v) for v in np.frombuffer(head, endian + "f4", 2, 112))
    elif header_size == 540 and len(head) >= 540:
        code = int(np.frombuffer(head, endian + "i2", 1, 12)[0])
        dims = np.frombuffer(head, endian + "i8", 8, 16)
        vox_offset = int(np.frombuffer(head, endian + "i8", 1, 168)[0])
        slope, inter = (float(v) for v in np.frombuffer(head, endian + "f8", 2, 176))
    else:
        raise InputError(f"{path} is not a NIfTI file (header size {header_size})")
    ndim = int(dims[0])
    shape = [int(d) for d in dims[1: 1 + ndim]]
    if ndim < 3 or (ndim > 3 and any(d > 1 for d in shape[3:])):
        raise InputError(f"expected a 3-D volume in {path}, found a {ndim}-D image of size {shape}")
    if code not in _NIFTI_DTYPES:
        raise InputError(f"{path}: NIfTI datatype {code} is not a scalar type this reader handles")
    # NIfTI: scl_slope 0 or not finite means "no scaling"
    slope = slope if np.isfinite(slope) and slope != 0.0 else 1.0
    inter = inter if np.isfinite(inter) else 0.0
    return ((shape[2], shape[1], shape[0]), np.dtype(endian + _NIFTI_DTYPES[code]), vox_offset,
            slope, inter)


def _inflate(data: bytes) -> bytes:
    """Every gzip member of ``data`` (bgzip/pigz files have several); EOFError if cut short."""
    import zlib

    parts = []
    while data:
        inflater = zlib.decompressobj(wbits=47)          # 32 + 15: gzip or zlib header
        parts.append(inflater.decompress(data))
        if not inflater.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = inflater.unused_data
        if not data.strip(b"\0"):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_nifti_gz_fast(path: Path, info) -> _Raw | None:
    """SimpleITK's own reader (its zlib-ng inflates ~1.3-2x faster than Python's zlib),
    accepted only when the voxels it returns are byte for byte the file's: header + voxel
    bytes must give the CRC-32 and size stored in the gzip trailer. A truncated file (which
    SimpleITK zero-fills), NaNs (which it turns into 0), scaling, byte swapping or several
    gzip members all fail that check and return None: the caller then decodes the file itself.
    """
    import gzip
    import struct
    import zlib

    import SimpleITK as sitk

    try:
        with open(path, "rb") as fh:
            fh.seek(-8, os.SEEK_END)
            crc_stored, size_stored = struct.unpack("<II", fh.read(8))
        with gzip.open(path, "rb") as fh:
            head = fh.read(540)
            shape, dtype, vox_offset, slope, inter = _nifti_header(head, path)
            if vox_offset > len(head):
                head += fh.read(vox_offset - len(head))
        if (slope, inter) != (1.0, 0.0) or not dtype.isnative or len(head) < vox_offset:
            return None
        image = sitk.ReadImage(str(path))
    except (InputError, OSError, EOFError, RuntimeError, zlib.error, struct.error):
        return None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        return None
    # a copy: a view would dangle once the SimpleITK image is freed
    array = sitk.GetArrayFromImage(image)
    if array.dtype != dtype or array.shape != shape or not array.flags["C_CONTIGUOUS"]:
        return None
    crc = zlib.crc32(memoryview(array).cast("B"), zlib.crc32(head[:vox_offset]))
    if crc != crc_stored or (vox_offset + array.nbytes) & 0xFFFFFFFF != size_stored:
        return None
    direction = np.asarray(info.GetDirection()).reshape(info.GetDimension(), -1)[:3, :3]
    return _Raw(array=array, spacing_xyz=tuple(info.GetSpacing()[:3]),
                origin=tuple(info.GetOrigin()[:3]), direction=direction)


def _read_nifti(path: Path) -> _Raw:
    """NIfTI-1/2 (.nii, .nii.gz) -> voxels + geometry.

    SimpleITK's NIfTI reader zero-fills a truncated .nii.gz and turns NaN into 0 without a
    word. The geometry (qform/sform -> LPS) comes from SimpleITK's header reader; the voxels
    come from SimpleITK only when they match the gzip trailer's CRC (``_read_nifti_gz_fast``),
    otherwise they are decoded here in one pass that fails on truncation and keeps NaNs.
    """
    import zlib

    import SimpleITK as sitk

    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    gz = path.name.lower().endswith(".gz")
    if gz:
        fast = _read_nifti_gz_fast(path, info)
        if fast is not None:
            return fast
    try:
        raw = path.read_bytes()
        if gz:
            raw = _inflate(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read volume {path}: truncated or corrupt file "
                         f"({type(exc).__name__}: {exc})") from exc
    shape, dtype, vox_offset, slope, inter = _nifti_header(raw[:540], path)
    n_voxels = int(np.prod(shape))
    if len(raw) < vox_offset + n_voxels * dtype.itemsize:
        raise InputError(f"cannot read volume {path}: truncated, {len(raw) - vox_offset} bytes of voxel "
                         f"data for {n_voxels} voxels of {dtype.itemsize} bytes")
    array = np.frombuffer(raw, dtype, n_voxels, vox_offset).reshape(shape)
    if (slope, inter) != (1.0, 0.0):
        array = array.astype(np.float32) * np.float32(slope) + np.float32(inter)
    direction = np.asarray(info.GetDirection()).reshape(info.GetDimension(), -1)[:3, :3]
    return _Raw(array=array, spacing_xyz=tuple(info.GetSpacing()[:3]),
                origin=tuple(info.GetOrigin()[:3]), direction=direction)


def _read_sitk(path: Path) -> _Raw:
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
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
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


def load_volume(path: str | os.PathLike, *, dtype=np.float32) -> Volume:
    """Read a NIfTI file (.nii/.nii.gz), another SimpleITK format (NRRD, MHA) or a DICOM series
    folder into the canonical LPS frame.

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
    array, spacing, origin = _to_canonical(raw)
    del raw
    if array.dtype != dtype:
        array = array.astype(dtype)
    # min and max propagate NaN and show inf, so two passes check finiteness and emptiness
    lo, hi = float(array.min()), float(array.max())
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
        # a folder with neither side (e.g. only SEG) is still reported, not skipped
        if not any(_strip_nifti(p.name) for p in study_dir.iterdir()):
            return None
    return study


def _flat_candidates(root: Path) -> dict[tuple[str, str], list[Path]]:
    """(study id, "ct" | "pet") -> the files named ``<id>_<side>.nii[.gz]``, side in any case."""
    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(root.iterdir()):
        stem = _strip_nifti(path.name) if path.is_file() else None
        match = _FLAT.match(stem) if stem else None
        if match:
            found.setdefault((match["id"], match["side"].lower()), []).append(path)
    return found


def discover_studies(root: str | os.PathLike) -> list[Study]:
    """Find PET/CT studies under ``root``, sorted by id.

    AutoPET layout: ``root/PETCT_<patient>/<study>/{CTres|CT,SUV|PET}.nii.gz`` (or a DICOM
    folder of that name); id = ``PETCT_<patient>_<study>``, subject = ``PETCT_<patient>``.
    Flat layout: ``root/<id>_ct.nii.gz`` + ``root/<id>_pet.nii.gz``; subject = id.
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
            f"{{CTres,SUV}}.nii.gz folders or <id>_ct.nii.gz + <id>_pet.nii.gz files")
    return [studies[k] for k in sorted(studies)]
