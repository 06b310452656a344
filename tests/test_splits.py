"""The one reader of splits.json (stages 2 and 3): every rule with a real broken file."""

import json

import pytest

from faceaudit.core.contracts import RENDER_CROP
from faceaudit.core.files import InputError
from faceaudit.petct.splits import read_splits

IDS = ["a1", "a2", "b1", "c1", "d1", "e1"]
SUBJECTS = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "d1": "D", "e1": "E"}


def _good():
    return {"scheme": "kfold", "n_folds": 2, "seed": 0, "crop": 64, "folds": [
        {"fold": 0, "train": ["c1", "d1"], "val": ["e1"], "test": ["a1", "a2", "b1"]},
        {"fold": 1, "train": ["a1", "a2"], "val": ["b1"], "test": ["c1", "d1", "e1"]}]}


def _write(tmp_path, record, name="splits.json"):
    path = tmp_path / name
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def test_a_good_file_reads_back_as_written(tmp_path):
    path = _write(tmp_path, _good())
    splits = read_splits(path, known_ids=IDS, subjects=SUBJECTS)
    assert splits == {**_good(), "n_folds": 2}
    # crop absent -> the contract's crop; null -> no crop; a missing fold key -> its position
    record = _good()
    del record["crop"], record["folds"][1]["fold"]
    assert read_splits(_write(tmp_path, record))["crop"] == RENDER_CROP
    assert [f["fold"] for f in read_splits(_write(tmp_path, record))["folds"]] == [0, 1]
    record["crop"] = None
    assert read_splits(_write(tmp_path, record))["crop"] is None


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match=r"expected the cross-validation splits.json at .*absent"):
        read_splits(tmp_path / "absent.json")
    truncated = json.dumps(_good())[:-7]
    with pytest.raises(InputError, match=r"cannot read .*splits.json as JSON: "):
        read_splits(_write(tmp_path, truncated))
    with pytest.raises(InputError, match=r"expected a JSON object in .*splits.json, found list"):
        read_splits(_write(tmp_path, "[1, 2]"))
    with pytest.raises(InputError, match="expected a non-empty 'folds' list"):
        read_splits(_write(tmp_path, {"folds": []}))
    with pytest.raises(InputError, match=r"fold entry #1: expected an object"):
        read_splits(_write(tmp_path, {"folds": [_good()["folds"][0], [1, 2]]}))


def test_repeated_fold_numbers_are_refused(tmp_path):
    """Issue 12.7: folds 0, 0, 2 let the surviving fold-0 model score its own training images."""
    record = _good()
    record["folds"].append({"fold": 2, "train": ["a1"], "val": ["b1"], "test": ["c1"]})
    record["scheme"] = "upstream"  # overlapping test sets are allowed there; the number is not
    record["folds"][1]["fold"] = 0
    path = _write(tmp_path, record)
    with pytest.raises(InputError, match=r"splits.json: fold entry #1 \(fold 0\): fold number 0 "
                                         r"is already used by fold entry #0"):
        read_splits(path)


@pytest.mark.parametrize("value", [None, True, 1.0, "1", -1, [0]])
def test_fold_must_be_a_whole_number(tmp_path, value):
    record = _good()
    record["folds"][1]["fold"] = value
    with pytest.raises(InputError, match=r"fold entry #1: expected 'fold' to be a whole number "
                                         r">= 0, found"):
        read_splits(_write(tmp_path, record))


def test_partitions_must_be_lists_of_id_strings_without_repeats(tmp_path):
    record = _good()
    del record["folds"][0]["val"]
    with pytest.raises(InputError, match=r"fold entry #0 \(fold 0\): has no 'val' id list"):
        read_splits(_write(tmp_path, record))
    record = _good()
    record["folds"][1]["test"] = "c1"
    with pytest.raises(InputError, match=r"fold entry #1 \(fold 1\): has no 'test' id list"):
        read_splits(_write(tmp_path, record))
    record = _good()
    record["folds"][1]["train"] = ["a1", None, 7]
    with pytest.raises(InputError, match=r"fold 1\): expected study ids .* in 'train', found "
                                         r"\[None, 7\]"):
        read_splits(_write(tmp_path, record))
    record = _good()
    record["folds"][0]["test"] = ["a1", "a2", "b1", "a2"]
    with pytest.raises(InputError, match=r"fold 0\): 'test' lists ids more than once: \['a2'\]"):
        read_splits(_write(tmp_path, record))


def test_unknown_ids_only_when_the_known_ids_are_given(tmp_path):
    record = _good()
    record["folds"][1]["val"] = ["b1", "zz9"]
    path = _write(tmp_path, record)
    assert read_splits(path)["folds"][1]["val"] == ["b1", "zz9"]
    with pytest.raises(InputError, match=r"fold entry #1 \(fold 1\): names ids with no CT/PET "
                                         r"pair in the input folders: \['zz9'\]"):
        read_splits(path, known_ids=IDS)


def test_a_study_in_two_partitions_of_a_fold(tmp_path):
    record = _good()
    record["folds"][0]["train"].append("b1")
    with pytest.raises(InputError, match=r"fold 0\): has ids in both train and test: \['b1'\]"):
        read_splits(_write(tmp_path, record))


def test_kfold_keeps_patients_whole_and_tests_each_study_once(tmp_path):
    record = _good()
    # a2 (patient A) moves from test to val: no study is repeated, but patient A straddles
    record["folds"][0]["test"].remove("a2")
    record["folds"][0]["val"].append("a2")
    path = _write(tmp_path, record)
    assert read_splits(path)["folds"][0]["val"] == ["e1", "a2"]  # without subjects: no check
    with pytest.raises(InputError, match=r"fold 0\): scheme 'kfold' is grouped by patient, but "
                                         r"patients have studies in both val and test: \['A'\]"):
        read_splits(path, subjects=SUBJECTS)
    record["scheme"] = "upstream"  # upstream's scheme leaks by design (counted, not refused)
    assert read_splits(_write(tmp_path, record), subjects=SUBJECTS)["scheme"] == "upstream"

    record = _good()
    record["folds"][1]["test"].append("b1")
    record["folds"][1]["val"] = ["a1"]
    record["folds"][1]["train"] = ["a2"]
    with pytest.raises(InputError, match=r"fold 1\): scheme 'kfold' tests each study once, but "
                                         r"\['b1'\] is also tested in fold 0"):
        read_splits(_write(tmp_path, record))


@pytest.mark.parametrize("crop", [0, -208, "208", True, 20.5])
def test_crop_must_be_a_positive_integer(tmp_path, crop):
    record = _good()
    record["crop"] = crop
    with pytest.raises(InputError, match="'crop' must be a positive integer"):
        read_splits(_write(tmp_path, record))
