"""Embedding attack of the matching stage: known ranks with a fake recognizer, misses,
the landmark attack's gallery (distractors included), the embedding cache, exit 2 before
any work, and the real dlib recognizer on the shipped head CT's render."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ORL, load_script
from faceaudit.core.files import InputError, read_npz, write_npz
from faceaudit.core.manifest import read_manifest
from faceaudit.core.runner import OptionsError, RunSettings
from faceaudit.faces.embedding import EmbeddingResult
from faceaudit.petct.embedding_attack import RENDER_INPUT, render_for_recognizer
from faceaudit.petct.matching import MatchingOptions, run_landmark_matching

N_POINTS = 478
RENDER = 240  # > RENDER_CROP, so the centre crop is exercised


class FakeRecognizer:
    """Looks up the vector of a render by its grey level (uniform images); level 0 = no face."""

    dim = 4

    def __init__(self, vectors: dict[int, list[float]]) -> None:
        self.vectors = vectors
        self.calls = []

    def describe(self) -> dict:
        return {"backend": "fake", "dim": self.dim}

    def embed(self, rgb: np.ndarray) -> EmbeddingResult:
        assert rgb.dtype == np.uint8 and rgb.shape == (208, 208, 3)  # the landmark stage's crop, RGB
        level = int(rgb[104, 104, 0])
        self.calls.append(level)
        if level == 0:
            return EmbeddingResult(None, float("nan"), "no face", "")
        return EmbeddingResult(np.array(self.vectors[level], dtype=np.float32), 0.9, "", "fake")


def write_render(path, level):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((RENDER, RENDER), level, np.uint8)).save(path)


def write_landmarks(root, fold, variant, ids, detected=None, seed=0):
    rng = np.random.default_rng(seed)
    detected = np.ones(len(ids), bool) if detected is None else np.asarray(detected)
    landmarks = rng.uniform(0.3, 0.7, (len(ids), N_POINTS, 3))
    landmarks[~detected] = np.nan
    write_npz(root / f"fold{fold}" / f"landmarks_{variant}.npz", ids=np.array(ids, dtype=str),
              subjects=np.array(ids, dtype=str), landmarks=landmarks, detected=detected)


#: grey level -> vector. CTs of a, b, c, d are the axes; PET probes are placed at known angles.
VECTORS = {10: [1, 0, 0, 0], 20: [0, 1, 0, 0], 30: [0, 0, 1, 0], 40: [0, 0, 0, 1],
           11: [0.9, 0.1, 0, 0],       # a: nearest its own CT -> rank 1
           21: [0, 0.6, 0.8, 0],       # b: c's CT is nearer than its own -> rank 2
           41: [0.3, 0, 0, 0.7],       # d: rank 1
           31: [0, 0, 0.9, 0.1],       # c: rank 1
           50: [0.5, 0.5, 0.5, 0.5]}   # a distractor


def known_fold(tmp_path, *, pet_levels=(11, 21, 0, 41), ct_levels=(10, 20, 30, 40)):
    """One fold of 4 subjects a-d with renders and landmarks; (LM, RECON)."""
    ids = ["a", "b", "c", "d"]
    lm, recon = tmp_path / "LM", tmp_path / "RECON"
    for i, pet, ct in zip(ids, pet_levels, ct_levels):
        write_render(recon / "pets" / f"{i}.png", pet)
        write_render(recon / "cts" / f"{i}.png", ct)
    write_landmarks(lm, 0, "pet", ids)
    write_landmarks(lm, 0, "ct", ids)
    return lm, recon


def run_stage(lm, out, recognizer, **options):
    options = {"aligns": ("none",), "embedders": ("dlib",), **options}
    result = run_landmark_matching(lm, out, MatchingOptions(**options), run=RunSettings(progress=False),
                                   make_embedder=lambda name: recognizer)
    return result.exit_code


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def topk(path):
    return {(r["align"], int(r["k"])): r for r in csv_rows(path)}


def test_known_ranks_topk_and_a_render_without_a_face_is_a_miss(tmp_path):
    lm, recon = known_fold(tmp_path)
    fake = FakeRecognizer(VECTORS)
    assert run_stage(lm, tmp_path / "MT", fake, renders_dir=recon) == 0
    rows = topk(tmp_path / "MT" / "topk.csv")
    key = "embedding-dlib_pet"
    row1, row3 = rows[(key, 1)], rows[(key, 3)]
    assert row1["attack"] == "embedding-dlib" and row1["probe"] == "pet"
    assert float(row1["mean"]) == 0.5            # a and d at rank 1; b at rank 2; c has no face
    assert float(rows[(key, 3)]["mean"]) == 0.75  # c stays a miss at every k
    assert float(rows[(key, 15)]["mean"]) == 0.75
    assert float(row1["mean_probe_detected"]) == pytest.approx(2 / 3)
    assert float(row1["gallery_size"]) == 4 and float(row1["chance"]) == 0.25
    assert float(row1["probe_detection_rate"]) == 0.75 and float(row1["gallery_detection_rate"]) == 1.0
    assert row1["n_probes"] == "4" and row3["n_miss_no_landmarks"] == "1"
    # the landmark rows are still there, labelled as such
    assert rows[("none", 1)]["attack"] == "landmarks-none" and rows[("none", 1)]["probe"] == "pet"
    ranks = {r["id"]: r for r in csv_rows(tmp_path / "MT" / "ranks.csv")}
    assert [ranks[i][f"rank_{key}"] for i in "abcd"] == ["1", "2", "0", "1"]
    assert ranks["c"][f"face_{key}"] == "False" and ranks["a"][f"face_{key}"] == "True"
    d = read_npz(tmp_path / "MT" / f"distances_fold0_{key}.npz")
    assert np.isnan(d["distances"][2]).all() and d["probe_valid"].tolist() == [True, True, False, True]
    assert d["distances"][1, 2] == pytest.approx(0.2) and d["distances"][1, 1] == pytest.approx(0.4)
    (fold,) = read_manifest(tmp_path / "MT" / "manifest.csv")  # still one row per fold
    assert fold["id"] == "fold0" and float(fold[f"top1_{key}"]) == 0.5
    summary = json.loads((tmp_path / "MT" / "summary.json").read_text(encoding="utf-8"))
    assert summary["embedding"]["recognizers"]["dlib"]["render_input"] == RENDER_INPUT


def test_a_ct_render_without_a_face_never_matches_and_its_probe_is_a_miss(tmp_path):
    lm, recon = known_fold(tmp_path, pet_levels=(11, 21, 30, 41), ct_levels=(10, 0, 30, 40))
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(VECTORS), renders_dir=recon) == 0
    row = topk(tmp_path / "MT" / "topk.csv")[("embedding-dlib_pet", 1)]
    # b's CT has no face: b is a miss, and that CT is never ranked ahead of anyone
    assert float(row["mean"]) == 0.75 and float(row["mean_both_detected"]) == 1.0
    assert float(row["gallery_size"]) == 4  # kept in the gallery, not dropped
    assert float(row["gallery_detection_rate"]) == 0.75 and float(row["probe_detection_rate"]) == 1.0
    ranks = {r["id"]: r["rank_embedding-dlib_pet"] for r in csv_rows(tmp_path / "MT" / "ranks.csv")}
    assert ranks == {"a": "1", "b": "0", "c": "1", "d": "1"}


def test_no_face_on_any_pet_render_is_all_misses_not_a_crash(tmp_path):
    lm, recon = known_fold(tmp_path, pet_levels=(0, 0, 0, 0))
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(VECTORS), renders_dir=recon) == 0
    row = topk(tmp_path / "MT" / "topk.csv")[("embedding-dlib_pet", 15)]
    assert float(row["mean"]) == 0.0 and row["n_miss_no_landmarks"] == "4"
    assert float(row["probe_detection_rate"]) == 0.0
    assert np.isnan(read_npz(tmp_path / "MT" / "distances_fold0_embedding-dlib_pet.npz")["distances"]).all()


def test_the_gallery_is_the_landmark_attacks_with_distractors(tmp_path):
    """Two folds, --distractors LM: each fold's gallery is its CTs with landmarks plus the
    other fold's CTs, for both attacks; a distractor nearer than a probe's own CT lowers it."""
    lm, recon = tmp_path / "LM", tmp_path / "RECON"
    levels = {"a": (11, 10), "b": (21, 20), "x": (41, 40), "y": (31, 30), "z": (31, 50)}
    for i, (pet, ct) in levels.items():
        write_render(recon / "pets" / f"{i}.png", pet)
        write_render(recon / "cts" / f"{i}.png", ct)
    write_landmarks(lm, 0, "pet", ["a", "b"])
    write_landmarks(lm, 0, "ct", ["a", "b"])
    write_landmarks(lm, 1, "pet", ["x", "y", "z"])
    write_landmarks(lm, 1, "ct", ["x", "y", "z"], detected=[True, True, False])  # z: no CT landmarks
    vectors = {**VECTORS, 21: [0.1, 0.45, 0.55, 0]}  # b's PET: the distractor y's CT (30) is nearer
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(vectors), renders_dir=recon, distractors=lm) == 0
    for k in (0, 1):
        landmark = read_npz(tmp_path / "MT" / f"distances_fold{k}_none.npz")
        embedding = read_npz(tmp_path / "MT" / f"distances_fold{k}_embedding-dlib_pet.npz")
        assert embedding["gallery_ids"].tolist() == landmark["gallery_ids"].tolist()
        assert embedding["probe_ids"].tolist() == landmark["probe_ids"].tolist()
    g0 = read_npz(tmp_path / "MT" / "distances_fold0_none.npz")["gallery_ids"].tolist()
    assert g0[:2] == ["a", "b"] and [g.split(":")[-1] for g in g0[2:]] == ["x", "y"]  # z has no landmarks
    rows = topk(tmp_path / "MT" / "topk.csv")
    for key in ("none", "embedding-dlib_pet"):
        assert float(rows[(key, 1)]["gallery_size"]) == pytest.approx((4 + 4) / 2)
        assert rows[(key, 1)]["chance"] == rows[("none", 1)]["chance"]
    ranks = {r["id"]: r["rank_embedding-dlib_pet"] for r in csv_rows(tmp_path / "MT" / "ranks.csv")}
    assert ranks["b"] == "2"          # behind the distractor y
    assert ranks["z"] == "0"          # its CT is not in the landmark gallery: a miss for both attacks
    assert float(rows[("embedding-dlib_pet", 1)]["gallery_detection_rate"]) == 1.0  # z's CT has a face


def test_a_rerun_embeds_nothing_again_and_a_changed_render_only_that_one(tmp_path):
    lm, recon = known_fold(tmp_path)
    fake = FakeRecognizer(VECTORS)
    assert run_stage(lm, tmp_path / "MT", fake, renders_dir=recon) == 0
    assert sorted(fake.calls) == sorted([11, 21, 0, 41, 10, 20, 30, 40])  # each render once
    stamp = os.stat(tmp_path / "MT" / "distances_fold0_embedding-dlib_pet.npz").st_mtime_ns
    fake.calls.clear()
    assert run_stage(lm, tmp_path / "MT", fake, renders_dir=recon) == 0
    assert fake.calls == []
    assert read_manifest(tmp_path / "MT" / "manifest.csv")[0]["status"] == "skipped"
    assert os.stat(tmp_path / "MT" / "distances_fold0_embedding-dlib_pet.npz").st_mtime_ns == stamp
    write_render(recon / "pets" / "c.png", 31)  # c's PET now shows c's face
    assert run_stage(lm, tmp_path / "MT", fake, renders_dir=recon) == 0
    assert fake.calls == [31]
    write_render(recon / "pets" / "c.png", 30)  # the same bytes as c's CT: the cached vector
    assert run_stage(lm, tmp_path / "MT", fake, renders_dir=recon) == 0
    assert fake.calls == [31]
    assert read_manifest(tmp_path / "MT" / "manifest.csv")[0]["status"] == "ok"
    assert float(topk(tmp_path / "MT" / "topk.csv")[("embedding-dlib_pet", 1)]["mean"]) == 0.75


def test_denoised_renders_are_attacked_too(tmp_path):
    lm, recon = known_fold(tmp_path)
    for i, level in zip("abcd", (10, 30, 30, 40)):  # the U-Net PET of b looks like c
        write_render(tmp_path / "CV" / "denoised" / "fold0" / f"{i}.png", level)
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(VECTORS), renders_dir=recon,
                     denoised_dir=tmp_path / "CV" / "denoised") == 0
    rows = topk(tmp_path / "MT" / "topk.csv")
    assert rows[("embedding-dlib_pet_unet", 1)]["probe"] == "pet_unet"
    assert float(rows[("embedding-dlib_pet_unet", 1)]["mean"]) == 0.75
    assert float(rows[("embedding-dlib_pet", 1)]["mean"]) == 0.5


def test_a_missing_probe_render_fails_its_fold_and_the_others_finish(tmp_path):
    lm, recon = known_fold(tmp_path)
    write_landmarks(lm, 1, "pet", ["e"])
    write_landmarks(lm, 1, "ct", ["e"])
    write_render(recon / "cts" / "e.png", 10)  # no pets/e.png
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(VECTORS), renders_dir=recon) == 1
    man = {r["id"]: r for r in read_manifest(tmp_path / "MT" / "manifest.csv")}
    assert man["fold1"]["status"] == "failed" and "pets/e.png" in man["fold1"]["reason"]
    assert man["fold0"]["status"] == "ok"
    assert not list((tmp_path / "MT").glob("distances_fold1_*"))


def test_a_render_that_cannot_be_read_fails_its_fold_not_the_stage(tmp_path):
    """An OSError that is not the output location's (here a folder where pets/e.png should be:
    IsADirectoryError; a PermissionError alike) stopped the whole stage with exit 2."""
    lm, recon = known_fold(tmp_path)
    write_landmarks(lm, 1, "pet", ["e"])
    write_landmarks(lm, 1, "ct", ["e"])
    write_render(recon / "cts" / "e.png", 10)
    (recon / "pets" / "e.png").mkdir()
    assert run_stage(lm, tmp_path / "MT", FakeRecognizer(VECTORS), renders_dir=recon) == 1
    man = {r["id"]: r for r in read_manifest(tmp_path / "MT" / "manifest.csv")}
    assert man["fold1"]["status"] == "failed" and "IsADirectoryError" in man["fold1"]["reason"]
    assert man["fold0"]["status"] == "ok"
    assert not list((tmp_path / "MT").glob("distances_fold1_*"))
    assert float(topk(tmp_path / "MT" / "topk.csv")[("embedding-dlib_pet", 1)]["mean"]) == 0.5


def test_unusable_inputs_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    lm, recon = known_fold(tmp_path)
    script = load_script("perform_landmark_matching")
    out = tmp_path / "MT"
    base = ["--landmarks_files", str(lm), "--save_dir", str(out)]
    monkeypatch.setenv("FACEAUDIT_MODELS", str(tmp_path / "empty_model_cache"))
    for extra, message in (
            (["--embedder", "mobilefacenet", "--renders_dir", str(recon)], "make models"),
            (["--embedder", "arcface-onnx", "--renders_dir", str(recon)], "expected --embedder to be"),
            (["--embedder", "dlib"], "expected --renders_dir"),
            (["--renders_dir", str(recon)], "expected --embedder NAME"),
            (["--embedder", "dlib", "--renders_dir", str(tmp_path / "nowhere")], "found no such folder"),
            (["--embedder", "dlib", "--renders_dir", str(recon), "--distractors", str(tmp_path / "D")],
             "expected a CT render of every distractor")):
        if "--distractors" in extra:
            write_landmarks(tmp_path / "D", 0, "ct", ["stranger"])
        assert script.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(OptionsError):
        MatchingOptions(embedders=("dlib", "nope"), renders_dir=str(recon))
    assert MatchingOptions(embedders=("dlib", "dlib"), renders_dir=recon).embedders == ("dlib",)


def test_renders_are_cropped_as_the_landmark_stage_crops_them(tmp_path):
    image = np.zeros((512, 512), np.uint8)
    image[152:360, 152:360] = 200  # exactly the 208 centre crop
    Image.fromarray(image).save(tmp_path / "r.png")
    rgb = render_for_recognizer(tmp_path / "r.png")
    assert rgb.shape == (208, 208, 3) and rgb.dtype == np.uint8 and (rgb == 200).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dlib", pytest.param("mobilefacenet", marks=pytest.mark.models)])
def test_a_real_recognizer_ranks_the_shipped_head_ct_render_first_against_itself(tmp_path, headsq_ct, name):
    """A real recognizer end to end: the shipped head CT's frontal render as CT and as PET
    probe, an ORL face as a second gallery person. The recognizer finds the face in the
    render and the probe ranks first."""
    from faceaudit.petct.render import render_frontal
    from faceaudit.petct.surface import extract_head_surface

    surface = extract_head_surface(headsq_ct.array, headsq_ct.spacing, modality="ct", origin=headsq_ct.origin)
    render = render_frontal(surface.mesh).image
    other = np.zeros_like(render)  # an ORL face (92 x 112) inside the 208 centre crop
    other[200:312, 210:302] = np.asarray(Image.open(ORL / "s1" / "1.pgm").convert("L"))
    recon, lm = tmp_path / "RECON", tmp_path / "LM"
    for folder in ("cts", "pets"):
        (recon / folder).mkdir(parents=True)
        Image.fromarray(render).save(recon / folder / "head.png")
        Image.fromarray(other).save(recon / folder / "orl1.png")
    write_landmarks(lm, 0, "pet", ["head", "orl1"])
    write_landmarks(lm, 0, "ct", ["head", "orl1"])
    options = MatchingOptions(aligns=("none",), embedders=(name,), renders_dir=str(recon))
    try:
        result = run_landmark_matching(lm, tmp_path / "MT", options, run=RunSettings(progress=False))
    except InputError as exc:  # the converted model is not in the cache (make models)
        pytest.skip(str(exc))
    assert result.exit_code == 0
    key = f"embedding-{name}_pet"
    ranks = {r["id"]: r for r in csv_rows(tmp_path / "MT" / "ranks.csv")}
    assert ranks["head"][f"face_{key}"] == "True" and ranks["orl1"][f"face_{key}"] == "True"
    assert ranks["head"][f"rank_{key}"] == "1" and ranks["orl1"][f"rank_{key}"] == "1"
    d = read_npz(tmp_path / "MT" / f"distances_fold0_{key}.npz")["distances"]
    assert d[0, 0] == pytest.approx(0.0, abs=1e-5) and d[0, 1] > 0.05
