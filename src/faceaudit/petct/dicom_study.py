"""A DICOM study folder as TCIA delivers FDG-PET-CT-Lesions: several series, CT and PET
picked by their Modality tag, PET turned into body-weight SUV from its header.

Layout (NBIA download)::

    FDG-PET-CT-Lesions/PETCT_<patient>/<study date-description-uid>/<series>/1-001.dcm ...

A study folder holding no ``CTres``/``SUV`` volume but DICOM series sub-folders is read by
header: the first file of each series gives Modality (0008,0060), ImageType (0008,0008)
and the series is counted. CT = the ``CT`` series, PET = the ``PT`` series; SEG, RTSTRUCT,
SR and other modalities are ignored, so are localisers (ImageType holding LOCALIZER, or
fewer than ``MIN_SERIES_FILES`` files: a scout or a dose report). Two candidate series of
one modality are never chosen between: that side fails with a reason naming both. A series
whose header cannot be read fails both sides of its study (its Modality is unknown).

SUV (body weight): ``SUV = C [Bq/ml] x weight [g] / (injected dose [Bq] x 2^(-dt / T1/2))``
where DecayCorrection (0054,1102) is START (the scanner decay-corrected to the series
start): dt from RadiopharmaceuticalStartTime (0018,1072) to SeriesTime (0008,0031), or
AcquisitionTime (0008,0032) when the series has none. Where it is ADMIN (corrected to the
injection already) there is no decay term: ``SUV = C x weight / dose``. Dose (0018,1074),
half-life (0018,1075) from the RadiopharmaceuticalInformationSequence (0054,0016), weight
(0010,1030) in kg. Applied only when Units (0054,1001) is BQML, DecayCorrection START or
ADMIN and every value needed is present and positive; otherwise (NONE, or no decay
correction stated: which time the values refer to is unknown) the PET stays as stored and
its units are ``relative`` with a note saying why (the renders do not change: the PET skin
level is relative to the body's own uptake; only the SUV numbers would be wrong).

The sequence items are not in SimpleITK's header dictionary, so a value missing there is
looked up in the file's bytes before the pixel data (explicit VR little endian, where OB,
OW, SQ, UN, UT ... have two reserved bytes and a 4-byte length, or implicit VR).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from faceaudit.core.files import InputError

#: A series with fewer files is a localiser, a scout or a report, not a volume.
MIN_SERIES_FILES = 8
MODALITY_OF_SIDE = {"ct": "CT", "pet": "PT"}
UNITS_SUV, UNITS_RELATIVE = "suv", "relative"

_MODALITY, _IMAGE_TYPE, _DESCRIPTION = "0008|0060", "0008|0008", "0008|103e"
_UNITS, _WEIGHT, _SERIES_TIME, _ACQUISITION_TIME = "0054|1001", "0010|1030", "0008|0031", "0008|0032"
_INJECTION_TIME, _DOSE, _HALF_LIFE = "0018|1072", "0018|1074", "0018|1075"
_DECAY_CORRECTION = "0054|1102"
DECAY_TO_SERIES_START, DECAY_TO_INJECTION = "START", "ADMIN"

#: Explicit VR little endian: these VRs are followed by two reserved bytes and a 4-byte
#: length (PS3.5 7.1.2); every other VR by a 2-byte length.
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                              b"UR", b"UT", b"UV"})
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_dicom_file(path: Path) -> bool:
    """The DICOM Part 10 preamble: 'DICM' at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def series_folders(study_dir: Path) -> list[Path]:
    """Sub-folders of ``study_dir`` whose first file is a DICOM file."""
    found = []
    for folder in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        files = _files(folder)
        if files and is_dicom_file(files[0]):
            found.append(folder)
    return found


def _header(path: Path) -> dict[str, str]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM header of {path}: {str(exc).strip()[:200]}") from exc
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def _scan_value(path: Path, key: str, *, limit: int = 1 << 20) -> str | None:
    """The value of element ``key`` ("gggg|eeee") found anywhere before the pixel data of
    ``path`` (inside sequences too), as text; None when absent or of undefined length.
    Explicit VR (a 2-byte length, or 2 reserved bytes and a 4-byte one for OB, SQ, UN, UT
    ...) or implicit VR (a 4-byte length)."""
    group, element = (int(part, 16) for part in key.split("|"))
    with open(path, "rb") as fh:
        data = fh.read(limit)
    end = data.find(struct.pack("<HH", 0x7FE0, 0x0010))
    data = data[: end if end > 0 else len(data)]
    at = data.find(struct.pack("<HH", group, element), 132)
    if at < 0 or len(data) < at + 8:
        return None
    vr = data[at + 4: at + 6]
    if vr in _LONG_LENGTH_VRS:
        if len(data) < at + 12:
            return None
        length, start = struct.unpack("<I", data[at + 8: at + 12])[0], at + 12
    elif vr.isalpha() and vr.isupper():
        length, start = struct.unpack("<H", data[at + 6: at + 8])[0], at + 8
    else:
        length, start = struct.unpack("<I", data[at + 4: at + 8])[0], at + 8
    if length == _UNDEFINED_LENGTH:
        return None
    return data[start: start + length].decode("ascii", "replace").strip("\x00 ")


@dataclass
class Series:
    """One DICOM series folder of a study: modality, file count, localiser or not."""

    folder: Path
    modality: str
    n_files: int
    localizer: bool


def read_series(folder: Path) -> Series:
    files = _files(folder)
    header = _header(files[0])
    image_type = header.get(_IMAGE_TYPE, "").upper()
    return Series(folder=folder, modality=header.get(_MODALITY, "").upper(), n_files=len(files),
                  localizer="LOCALIZER" in image_type or len(files) < MIN_SERIES_FILES)


def pick_series(study_dir: Path) -> tuple[dict[str, Path | None], dict[str, str]]:
    """``({"ct": folder | None, "pet": folder | None}, problems)`` for a folder of DICOM
    series: one volume series per modality, or a problem naming every candidate. A series
    whose header cannot be read fails both sides of this study (it may be either one), not
    the discovery of every study."""
    series, unreadable = [], []
    for folder in series_folders(study_dir):
        try:
            series.append(read_series(folder))
        except (InputError, OSError) as exc:
            unreadable.append(str(exc))
    if unreadable:
        reason = (f"{'; '.join(unreadable)} (its Modality is unknown, so neither CT nor PET can be "
                  f"chosen; remove or repair the series)")
        return {"ct": None, "pet": None}, {"ct": reason, "pet": reason}
    chosen: dict[str, Path | None] = {}
    problems: dict[str, str] = {}
    for side, modality in MODALITY_OF_SIDE.items():
        candidates = [s.folder for s in series if s.modality == modality and not s.localizer]
        chosen[side] = candidates[0] if len(candidates) == 1 else None
        if len(candidates) > 1:
            names = ", ".join(f"{p.name}/" for p in candidates)
            problems[side] = (f"expected one {modality} series in {study_dir}, found {len(candidates)}: "
                              f"{names} (remove all but one)")
    return chosen, problems


# --------------------------------------------------------------------------- SUV

def _seconds(time_text: str) -> float:
    """DICOM TM 'HHMMSS.frac' (or 'HH:MM:SS') -> seconds after midnight."""
    text = time_text.replace(":", "").strip()
    if len(text) < 4 or not text[:4].isdigit():
        raise ValueError(f"not a DICOM time: {time_text!r}")
    seconds = float(text[4:]) if len(text) > 4 else 0.0
    return int(text[:2]) * 3600 + int(text[2:4]) * 60 + seconds


def suv_factor(series_folder: Path) -> tuple[float | None, str]:
    """(factor turning the stored PET values into body-weight SUV, or None; a note saying
    why not). See the module docstring."""
    first = _files(Path(series_folder))[0]
    header = _header(first)

    def value(key: str) -> str | None:
        return header.get(key) or _scan_value(first, key)

    units = (value(_UNITS) or "").upper()
    if units != "BQML":
        return None, f"PET units {units or 'not stated'} (expected BQML)"
    decay = (value(_DECAY_CORRECTION) or "").upper()
    if decay not in (DECAY_TO_SERIES_START, DECAY_TO_INJECTION):
        return None, (f"PET decay correction (0054,1102) {decay or 'not stated'} "
                      f"(expected {DECAY_TO_SERIES_START} or {DECAY_TO_INJECTION})")
    texts = {"weight": value(_WEIGHT), "dose": value(_DOSE)}
    if decay == DECAY_TO_SERIES_START:
        texts.update({"half-life": value(_HALF_LIFE), "injection time": value(_INJECTION_TIME),
                      "series time": value(_SERIES_TIME) or value(_ACQUISITION_TIME)})
    missing = [name for name, text in texts.items() if not text]
    if missing:
        return None, f"PET header lacks {', '.join(missing)}"
    try:
        weight_g, dose = float(texts["weight"]) * 1000.0, float(texts["dose"])
        if weight_g <= 0 or dose <= 0:
            return None, "PET header holds a weight or dose <= 0"
        if decay == DECAY_TO_INJECTION:
            return weight_g / dose, ""
        return weight_g / (dose * _decay_since_injection(texts)), ""
    except ValueError as exc:
        return None, f"PET header value unreadable: {exc}"


def _decay_since_injection(texts: dict[str, str]) -> float:
    """2^(-dt / T1/2), dt from the injection to the series start (ValueError if unreadable)."""
    half_life = float(texts["half-life"])
    if half_life <= 0:
        raise ValueError(f"half-life {texts['half-life']!r} <= 0")
    elapsed = _seconds(texts["series time"]) - _seconds(texts["injection time"])
    if elapsed < 0:                       # injected before midnight, scanned after
        elapsed += 24 * 3600.0
    return 2.0 ** (-elapsed / half_life)


def pet_in_suv(volume, path: Path):
    """(PET volume in SUV where it can be, its numbers pet_units / pet_suv_factor). A NIfTI
    PET is taken as SUV (AutoPET's SUV.nii.gz); a DICOM series in Bq/ml is converted from its
    header (suv_factor), or left as stored with units "relative"."""
    import numpy as np

    from faceaudit.petct.volumes import Volume

    if not Path(path).is_dir():
        return volume, {"units": UNITS_SUV}
    factor, note = suv_factor(Path(path))
    if factor is None:
        return volume, {"units": UNITS_RELATIVE, "units_note": note}
    array = volume.array * np.float32(factor)
    array.flags.writeable = False
    return (Volume(array=array, spacing=volume.spacing, origin=volume.origin, source=volume.source),
            {"units": UNITS_SUV, "suv_factor": factor})
