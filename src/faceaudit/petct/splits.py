"""Cross-validation splits: making them (stage 2) and the one reader of ``splits.json``
(stages 2 and 3).

``splits.json`` holds ids only::

    {"scheme": "kfold", "n_folds": 5, "seed": 0, "crop": 208,
     "folds": [{"fold": 0, "train": [ids], "val": [ids], "test": [ids]}, ...]}

Two schemes are made here:

* ``kfold`` (default): real K-fold grouped by patient. Patients are shuffled with the seed
  and dealt into K groups balanced by study count; fold k tests group k, and a validation
  set of patients (``val_fraction`` of all patients, at least one) is drawn at random
  from the remaining ones. No patient is in two of train/val/test within a fold and every
  study is tested exactly once.
* ``upstream``: upstream's repeated random sub-sampling, by study: ``n_folds`` independent
  70/15/15 splits (seeded here, unseeded upstream). Test sets overlap across folds and a
  patient's studies may straddle train and test; :func:`split_leakage` counts the leak.

:func:`read_splits` is the only reader: a file that could make a stage train on its own
test images or score a study twice (repeated fold numbers, an id in two partitions of a
fold, a duplicated id, an unknown id) is a usage error naming the file and the entry.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import RENDER_CROP, SPLITS_FILE
from faceaudit.core.files import InputError, read_json_file

SCHEMES = ("kfold", "upstream")
PARTS = ("train", "val", "test")

#: Share of all patients used for validation inside each fold's training part (kfold).
DEFAULT_VAL_FRACTION = 0.15


# --------------------------------------------------------------------------- making splits

def _fold_rng(seed: int, fold: int) -> np.random.Generator:
    return np.random.default_rng([seed, fold])


def _deal_patients(names: Sequence[str], by_subject: Mapping[str, list[str]], *, n_folds: int,
                   seed: int) -> list[list[str]]:
    """Shuffle patients with ``seed`` and deal them, largest first, to the group with the
    fewest studies so far: K groups of patients balanced by study count."""
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    # Largest patients first (stable, so ties keep the random order) for balanced folds.
    order.sort(key=lambda name: -len(by_subject[name]))
    groups: list[list[str]] = [[] for _ in range(n_folds)]
    sizes = [0] * n_folds
    for name in order:
        target = min(range(n_folds), key=lambda k: (sizes[k], len(groups[k]), k))
        groups[target].append(name)
        sizes[target] += len(by_subject[name])
    if any(not group for group in groups):
        raise InputError(f"cannot deal {len(names)} patients into {n_folds} non-empty folds")
    return groups


def kfold_patient_splits(ids: Sequence[str], subjects: Mapping[str, str], *, n_folds: int,
                         seed: int, val_fraction: float = DEFAULT_VAL_FRACTION
                         ) -> list[dict[str, Any]]:
    """K folds grouped by patient: [{"fold", "train", "val", "test"}, ...] (sorted id lists).

    Patients are shuffled with ``seed`` and dealt, largest first, to the fold with the
    fewest studies so far; fold k's test set is group k. Its validation set is
    ``max(1, round(val_fraction * n_patients))`` patients drawn from the other groups
    (at least one patient is left for training).
    """
    if n_folds < 2:
        raise InputError(f"--n_folds must be >= 2 for K-fold, got {n_folds}")
    by_subject: dict[str, list[str]] = {}
    for item_id in sorted(ids):
        by_subject.setdefault(subjects[item_id], []).append(item_id)
    names = sorted(by_subject)
    if len(names) < max(3, n_folds + 1):
        raise InputError(f"K-fold with {n_folds} folds needs at least {max(3, n_folds + 1)} "
                         f"patients (test, validation and training each need one), "
                         f"found {len(names)}")
    groups = _deal_patients(names, by_subject, n_folds=n_folds, seed=seed)
    n_val = max(1, int(round(val_fraction * len(names))))
    folds = []
    for k, test_subjects in enumerate(groups):
        rest = sorted(set(names) - set(test_subjects))
        take = min(n_val, len(rest) - 1)
        val_subjects = set(_fold_rng(seed, k).choice(rest, size=take, replace=False).tolist())
        train_subjects = [s for s in rest if s not in val_subjects]
        if not train_subjects or not val_subjects:
            raise InputError(f"fold {k} of {n_folds} leaves {len(rest)} patient(s) outside its "
                             "test set; training and validation need one each: use fewer folds")
        folds.append({
            "fold": k,
            "train": sorted(i for s in train_subjects for i in by_subject[s]),
            "val": sorted(i for s in val_subjects for i in by_subject[s]),
            "test": sorted(i for s in test_subjects for i in by_subject[s]),
        })
    return folds


def upstream_random_splits(ids: Sequence[str], *, n_folds: int, seed: int
                           ) -> list[dict[str, Any]]:
    """Upstream's scheme, seeded: per fold an independent random 70/15/15 split of studies.

    train = the first ``n * 70 // 100`` of a permutation; the rest is halved into test
    (first half, rounded down) and val. Not grouped by patient, test sets overlap.
    """
    if n_folds < 1:
        raise InputError(f"--n_folds must be >= 1, got {n_folds}")
    ordered = sorted(ids)
    n = len(ordered)
    n_train = n * 70 // 100
    if n - n_train < 2:
        raise InputError(f"the upstream 70/15/15 split needs at least 4 studies, found {n}")
    folds = []
    for k in range(n_folds):
        perm = [ordered[i] for i in _fold_rng(seed, k).permutation(n)]
        rest = perm[n_train:]
        folds.append({"fold": k, "train": sorted(perm[:n_train]),
                      "val": sorted(rest[len(rest) // 2:]), "test": sorted(rest[:len(rest) // 2])})
    return folds


def make_splits(ids: Sequence[str], subjects: Mapping[str, str], *, scheme: str, n_folds: int,
                seed: int, crop: int, val_fraction: float = DEFAULT_VAL_FRACTION
                ) -> dict[str, Any]:
    """The splits.json record for ``scheme`` in SCHEMES."""
    if scheme == "kfold":
        folds = kfold_patient_splits(ids, subjects, n_folds=n_folds, seed=seed,
                                     val_fraction=val_fraction)
    elif scheme == "upstream":
        folds = upstream_random_splits(ids, n_folds=n_folds, seed=seed)
    else:
        raise InputError(f"--split_scheme must be one of {SCHEMES}, got {scheme!r}")
    return {"scheme": scheme, "n_folds": len(folds), "seed": seed, "crop": crop,
            "folds": folds}


def split_leakage(splits: Mapping[str, Any], subjects: Mapping[str, str]) -> list[dict[str, int]]:
    """Per fold, how many test patients also appear in train or val (0 for kfold)."""
    out = []
    for fold in splits["folds"]:
        test = {subjects.get(i, i) for i in fold["test"]}
        seen = {subjects.get(i, i) for i in fold["train"] + fold["val"]}
        out.append({"fold": fold["fold"], "test_subjects_also_in_train_or_val": len(test & seen)})
    return out


# --------------------------------------------------------------------------- reading splits

def _few(values: Sequence[Any], n: int = 5) -> str:
    """The first ``n`` values and how many there are, for an error message."""
    shown = list(values)[:n]
    more = f" ... ({len(values)} in all)" if len(values) > n else ""
    return f"{shown}{more}"


def _fold_number(entry: Mapping[str, Any], position: int, where: str) -> int:
    """The entry's ``fold``: a whole number >= 0 (bool, null, 1.5, "1" are errors);
    the entry's position when the key is absent (hand-written files)."""
    if "fold" not in entry:
        return position
    value = entry["fold"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{where}: expected 'fold' to be a whole number >= 0, "
                         f"found {value!r} ({type(value).__name__})")
    return value


def _partitions(entry: Mapping[str, Any], where: str) -> dict[str, list[str]]:
    """The entry's train/val/test lists of id strings, each id at most once per list."""
    parts: dict[str, list[str]] = {}
    for part in ("test", "train", "val"):
        ids = entry.get(part)
        if not isinstance(ids, list):
            raise InputError(f"{where}: has no '{part}' id list (expected lists 'train', 'val' "
                             f"and 'test' of study ids), found {ids!r}")
        bad = [i for i in ids if not isinstance(i, str) or not i]
        if bad:
            raise InputError(f"{where}: expected study ids (non-empty strings) in '{part}', "
                             f"found {_few(bad)}")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise InputError(f"{where}: '{part}' lists ids more than once: {_few(repeated)}")
        parts[part] = list(ids)
    return {part: parts[part] for part in PARTS}


def _check_fold(parts: Mapping[str, list[str]], where: str, *, scheme: str,
                known_ids: Collection[str] | None, subjects: Mapping[str, str] | None) -> None:
    """An id in two partitions, an unknown id, and (kfold) a patient in two partitions."""
    if known_ids is not None:
        unknown = sorted({i for ids in parts.values() for i in ids} - set(known_ids))
        if unknown:
            raise InputError(f"{where}: names ids with no CT/PET pair in the input folders: "
                             f"{_few(unknown)}")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(parts[a]) & set(parts[b]))
        if shared:
            raise InputError(f"{where}: has ids in both {a} and {b}: {_few(shared)}")
    if subjects is not None and scheme == "kfold":
        patients = {part: {subjects.get(i, i) for i in ids} for part, ids in parts.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sorted(patients[a] & patients[b])
            if shared:
                raise InputError(f"{where}: scheme 'kfold' is grouped by patient, but patients "
                                 f"have studies in both {a} and {b}: {_few(shared)}")


def _check_entry(entry: Any, position: int, path: Path, *, scheme: str,
                 known_ids: Collection[str] | None, subjects: Mapping[str, str] | None
                 ) -> dict[str, Any]:
    """One fold entry as ``{"fold": k, "train": [...], "val": [...], "test": [...]}``."""
    where = f"{path}: fold entry #{position}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with 'fold', 'train', 'val' and "
                         f"'test', found {type(entry).__name__}")
    k = _fold_number(entry, position, where)
    parts = _partitions(entry, f"{where} (fold {k})")
    _check_fold(parts, f"{where} (fold {k})", scheme=scheme, known_ids=known_ids,
                subjects=subjects)
    return {"fold": k, **parts}


def _check_header(record: Mapping[str, Any], where: str) -> tuple[str, int | None]:
    """The record's scheme (a string) and crop (a whole number > 0, or null for none)."""
    scheme = record.get("scheme", "custom")
    if not isinstance(scheme, str):
        raise InputError(f"{where}: expected 'scheme' to be a string, found {scheme!r}")
    crop = record.get("crop", RENDER_CROP)
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop <= 0):
        raise InputError(f"{where}: 'crop' must be a positive integer, found {crop!r}")
    return scheme, crop


def _read_record(path: Path) -> dict[str, Any]:
    """The file's JSON object, with a non-empty ``folds`` list."""
    if not path.is_file():
        raise InputError(f"expected the cross-validation {SPLITS_FILE} at {path}, found nothing")
    try:
        record = read_json_file(path)
    except OSError as exc:              # a file that cannot be opened is an input, not an output, fault
        raise InputError(f"cannot read {path}: {exc}") from exc
    folds = record.get("folds")
    if not isinstance(folds, list) or not folds:
        raise InputError(f"{path}: expected a non-empty 'folds' list like "
                         '{"folds": [{"fold": 0, "train": [...], "val": [...], "test": [...]}]}, '
                         f"found keys {sorted(record)}")
    return record


def read_splits(path: str | os.PathLike, *, known_ids: Collection[str] | None = None,
                subjects: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read and check a ``splits.json``; the one reader used by stages 2 and 3.

    Parameters
    ----------
    path
        The file written by the cross-validation stage (or by hand, same layout).
    known_ids
        When given, every id in the file must be one of these (the studies with a CT/PET
        pair in this run, plus those reported failed, which the caller then drops).
    subjects
        id -> patient. When given and the scheme is ``kfold`` (grouped by patient), a
        patient with studies in two partitions of one fold is an error too.

    Returns
    -------
    dict
        ``{"scheme", "n_folds", "seed", "crop", "folds": [{"fold", "train", "val", "test"}]}``,
        the folds in file order and each id list as written. ``crop`` is RENDER_CROP when
        absent and None when the file says null (no crop).

    Raises
    ------
    InputError
        Naming the file and the entry, for: a missing file or malformed JSON, no non-empty
        ``folds`` list, a fold entry without train/val/test id lists, a ``fold`` that is not
        a whole number >= 0 (null, bool, 1.5, "1"), a fold number used twice, ids that are
        not non-empty strings, an id twice in one list, an id in two partitions of a fold,
        an unknown id (with ``known_ids``), a patient in two partitions of a kfold fold
        (with ``subjects``), a study tested in two folds of a kfold file, a bad crop.
    """
    path = Path(path)
    record = _read_record(path)
    scheme, crop = _check_header(record, str(path))
    clean: list[dict[str, Any]] = []
    entry_of_fold: dict[int, int] = {}
    tested_in: dict[str, int] = {}
    for position, entry in enumerate(record["folds"]):
        fold = _check_entry(entry, position, path, scheme=scheme, known_ids=known_ids,
                            subjects=subjects)
        k, where = fold["fold"], f"{path}: fold entry #{position} (fold {fold['fold']})"
        if k in entry_of_fold:
            raise InputError(f"{where}: fold number {k} is already used by fold entry "
                             f"#{entry_of_fold[k]}; each fold needs its own number")
        entry_of_fold[k] = position
        if scheme == "kfold":
            again = sorted(i for i in fold["test"] if i in tested_in)
            if again:
                raise InputError(f"{where}: scheme 'kfold' tests each study once, but "
                                 f"{_few(again)} is also tested in fold {tested_in[again[0]]}")
            tested_in.update({i: k for i in fold["test"]})
        clean.append(fold)
    return {"scheme": scheme, "n_folds": len(clean), "seed": record.get("seed"), "crop": crop,
            "folds": clean}


def load_splits(path: str | os.PathLike, *, usable_ids: Sequence[str],
                failed_ids: Sequence[str] = (),
                subjects: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a splits.json with :func:`read_splits` for training (stage 2).

    Every id must be a usable pair (``usable_ids``) or one reported failed in this run
    (``failed_ids``, removed from its fold since its row already says why); any other id
    is an InputError, as is every rule of ``read_splits`` (``subjects``: id -> patient)
    and an empty train or val set.
    """
    usable = set(usable_ids)
    record = read_splits(path, known_ids=usable | set(failed_ids), subjects=subjects)
    clean = []
    for fold in record["folds"]:
        parts = {part: sorted(i for i in fold[part] if i in usable) for part in PARTS}
        for part in ("train", "val"):
            if not parts[part]:
                raise InputError(f"{path}: fold {fold['fold']} has no usable {part} ids")
        clean.append({"fold": fold["fold"], **parts})
    return {**record, "folds": clean}


__all__ = ["DEFAULT_VAL_FRACTION", "PARTS", "SCHEMES", "kfold_patient_splits", "load_splits",
           "make_splits", "read_splits", "split_leakage", "upstream_random_splits"]
