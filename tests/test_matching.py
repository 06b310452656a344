"""Matching stage: distance matrices with ids, top-k/CMC against a brute force,
misses, alignment, distractors, corrupt, missing and wrong-shaped landmark files,
options, skips."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import load_script
from faceaudit.core.files import InputError, read_npz, write_npz
from faceaudit.core.manifest import read_manifest
from faceaudit.core.runner import OptionsError, RunSettings
from faceaudit.petct.alignment import distance_matrix
from faceaudit.petct.landmarks import read_landmark_set
from faceaudit.petct.matching import MatchingOptions, run_landmark_matching

N_POINTS = 478


def base_face(seed=0):
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0.3, 0.7, N_POINTS), rng.uniform(0.25, 0.75, N_POINTS),
                            rng.normal(0, 0.03, N_POINTS)])


def posed(shape, rng, *, degrees=10.0, scale=0.1, shift=0.05):
    """A random similarity pose about the shape's centre."""
    rot = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, 3), degrees=True).as_matrix()
    c = shape.mean(0)
    return (1 + rng.uniform(-scale, scale)) * (shape - c) @ rot.T + c + rng.uniform(-shift, shift, 3)


def identities(n, seed=1, shape_noise=0.01):
    rng = np.random.default_rng(seed)
    base = base_face()
    return [base + rng.normal(0, shape_noise, base.shape) for _ in range(n)]


def write_fold(root, k, variant, ids, landmarks, detected=None, subjects=None):
    landmarks = np.array(landmarks, dtype=np.float64)
    detected = np.ones(len(ids), bool) if detected is None else np.asarray(detected)
    landmarks[~detected] = np.nan
    write_npz(root / f"fold{k}" / f"landmarks_{variant}.npz", ids=np.array(ids, dtype=str),
              subjects=np.array(subjects or ids, dtype=str), landmarks=landmarks, detected=detected)


def same_faces_fold(root, n=4):
    """Fold 0 where every PET probe holds exactly its CT's landmarks: (faces, ids)."""
    faces = identities(n)
    ids = [f"s{i}" for i in range(n)]
    write_fold(root, 0, "pet", ids, faces)
    write_fold(root, 0, "ct", ids, faces)
    return faces, ids


def same_faces_folds(root, n_folds, n=3):
    """Folds 0..n_folds-1, each of the same ``n`` faces as PET probes and CT gallery: (faces, ids)."""
    faces = identities(n)
    ids = ["a", "b", "c", "d", "e"][:n]
    for k in range(n_folds):
        write_fold(root, k, "pet", ids, faces)
        write_fold(root, k, "ct", ids, faces)
    return faces, ids


def match(landmarks, out, **options):
    """Run the stage with MatchingOptions(**options), no progress bars; the exit code."""
    return run_landmark_matching(landmarks, out, MatchingOptions(**options), run=RunSettings(progress=False)).exit_code


def topk_rows(path):
    return {(r["align"], int(r["k"])): r for r in csv.DictReader(open(path))}


def test_identical_landmark_sets_rank_first_for_every_alignment(tmp_path):
    faces = identities(6)
    ids = [f"s{i}" for i in range(6)]
    order = [3, 0, 5, 1, 4, 2]  # the gallery file lists the ids in another order
    write_fold(tmp_path / "LM", 0, "pet", ids, faces)
    write_fold(tmp_path / "LM", 0, "ct", [ids[i] for i in order], [faces[i] for i in order])
    code = match(tmp_path / "LM", tmp_path / "MT", n_folds=1,
                                 aligns=("none", "rigid", "similarity", "icp"))
    assert code == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    for align in ("none", "rigid", "similarity", "icp"):
        assert float(rows[(align, 1)]["mean"]) == 1.0
        assert float(rows[(align, 1)]["chance"]) == pytest.approx(1 / 6, rel=1e-5)
        assert float(rows[(align, 1)]["gallery_size"]) == 6
    # ids stay in order through the matrices, and entries are the pairwise Frobenius norms
    d = read_npz(tmp_path / "MT" / "distances_fold0_none.npz")
    assert d["probe_ids"].tolist() == ids
    assert d["gallery_ids"].tolist() == [ids[i] for i in order]
    for i in range(6):
        for j, g in enumerate(order):
            assert d["distances"][i, j] == pytest.approx(np.linalg.norm(faces[i] - faces[g]), rel=1e-9, abs=1e-12)


def brute_force_ranks(dist, probe_subjects, gallery_subjects):
    ranks = []
    for i, s in enumerate(probe_subjects):
        order = sorted(range(len(gallery_subjects)), key=lambda j: dist[i, j])
        pos = [r for r, j in enumerate(order, 1) if gallery_subjects[j] == s]
        ranks.append(pos[0] if pos else 0)
    return np.array(ranks)


def test_topk_and_cmc_equal_a_brute_force_on_random_landmarks(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "LM"
    n = 30
    for k in range(3):
        ids = [f"f{k}_s{i}" for i in range(n)]
        write_fold(root, k, "pet_unet", ids, 0.5 + 0.1 * rng.normal(size=(n, N_POINTS, 3)))
        write_fold(root, k, "ct", ids, 0.5 + 0.1 * rng.normal(size=(n, N_POINTS, 3)))
    assert match(root, tmp_path / "MT", aligns=("none", "similarity")) == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    summary = json.loads((tmp_path / "MT" / "summary.json").read_text(encoding="utf-8"))
    assert summary["probe_variant"] == "pet_unet"  # the default when every fold has it
    for align in ("none", "similarity"):
        per_fold_ranks = []
        for k in range(3):
            d = read_npz(tmp_path / "MT" / f"distances_fold{k}_{align}.npz")
            per_fold_ranks.append(brute_force_ranks(d["distances"], d["probe_subjects"], d["gallery_subjects"]))
        for kk in (1, 3, 5, 10, 15):
            accs = [np.mean((r > 0) & (r <= kk)) for r in per_fold_ranks]
            assert float(rows[(align, kk)]["mean"]) == pytest.approx(np.mean(accs), abs=1e-6)
            assert float(rows[(align, kk)]["std"]) == pytest.approx(np.std(accs), abs=1e-6)
            assert float(rows[(align, kk)]["fold1"]) == pytest.approx(accs[1], abs=1e-6)
            assert float(rows[(align, kk)]["chance"]) == pytest.approx(kk / n, rel=1e-5)
        cmc = [np.mean([np.mean((r > 0) & (r <= rr)) for r in per_fold_ranks]) for rr in range(1, n + 1)]
        np.testing.assert_allclose(summary["cmc_mean"][align], cmc)
    assert (tmp_path / "MT" / "cmc.png").stat().st_size > 1000


def test_probe_or_ct_without_landmarks_is_a_miss(tmp_path):
    faces = identities(5)
    ids = [f"s{i}" for i in range(5)]
    write_fold(tmp_path / "LM", 0, "pet", ids, faces, detected=[True, False, True, True, True])
    write_fold(tmp_path / "LM", 0, "ct", ids, faces, detected=[True, True, False, True, True])
    assert match(tmp_path / "LM", tmp_path / "MT", n_folds=1, aligns=("none",)) == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    assert float(rows[("none", 1)]["mean"]) == pytest.approx(3 / 5)
    assert float(rows[("none", 15)]["mean"]) == pytest.approx(3 / 5)  # a miss at every k
    assert float(rows[("none", 1)]["mean_both_detected"]) == 1.0
    assert float(rows[("none", 1)]["mean_probe_detected"]) == pytest.approx(3 / 4)  # upstream denominator
    assert rows[("none", 1)]["n_miss_no_landmarks"] == "2"
    # each row names its attack and probe variant, and the landmark detection rates
    assert rows[("none", 1)]["attack"] == "landmarks-none" and rows[("none", 1)]["probe"] == "pet"
    assert float(rows[("none", 1)]["probe_detection_rate"]) == pytest.approx(4 / 5)
    assert float(rows[("none", 1)]["gallery_detection_rate"]) == pytest.approx(4 / 5)
    assert float(rows[("none", 1)]["gallery_size"]) == 4  # only CTs with landmarks
    ranks = {r["id"]: r for r in csv.DictReader(open(tmp_path / "MT" / "ranks.csv"))}
    assert ranks["s1"]["rank_none"] == "0" and "no landmarks on pet" in ranks["s1"]["reason"]
    assert ranks["s2"]["rank_none"] == "0" and "no ct landmarks" in ranks["s2"]["reason"]
    assert ranks["s0"]["rank_none"] == "1" and ranks["s0"]["fold"] == "0"
    assert ranks["s2"]["own_ct_landmarks"] == "False" and ranks["s2"]["probe_landmarks"] == "True"
    # the manifest has one row per fold (the items), with its counts
    (fold,) = read_manifest(tmp_path / "MT" / "manifest.csv")
    assert fold["id"] == "fold0" and fold["status"] == "ok"
    assert fold["n_probes"] == "5" and fold["n_probe_no_landmarks"] == "1" and fold["gallery_size"] == "4"
    assert float(fold["top1_none"]) == pytest.approx(3 / 5)


def test_similarity_alignment_removes_pose_and_unaligned_exploits_it(tmp_path):
    """PET and CT of one session share the pose: unaligned matching works through pose.
    When the probe's pose is independent of its CT's, only aligned matching finds the shape."""
    rng = np.random.default_rng(3)
    faces = identities(20, shape_noise=0.01)
    ids = [f"s{i}" for i in range(20)]
    gallery = [posed(f, rng) for f in faces]
    probes = [posed(f + rng.normal(0, 0.001, f.shape), rng) for f in faces]
    write_fold(tmp_path / "LM", 0, "pet", ids, probes)
    write_fold(tmp_path / "LM", 0, "ct", ids, gallery)
    assert match(tmp_path / "LM", tmp_path / "MT", aligns=("none", "rigid", "similarity")) == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    assert float(rows[("similarity", 1)]["mean"]) == 1.0
    assert float(rows[("none", 1)]["mean"]) < 0.5


def test_distractors_enlarge_the_gallery_and_never_match(tmp_path):
    same_faces_fold(tmp_path / "LM")
    # other people's landmarks, with colliding ids/subjects and one undetected face
    others = tmp_path / "others"
    write_fold(others, 0, "ct", ["s0", "s1", "x"], identities(3, seed=9), detected=[True, True, False])
    assert match(tmp_path / "LM", tmp_path / "MT", aligns=("none",), distractors=others) == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    assert float(rows[("none", 1)]["gallery_size"]) == 6
    assert float(rows[("none", 1)]["mean"]) == 1.0
    d = read_npz(tmp_path / "MT" / "distances_fold0_none.npz")
    assert all(g.startswith("distractor:") for g in d["gallery_ids"][4:])


def test_corrupt_and_missing_landmark_files_are_reported(tmp_path):
    root = tmp_path / "LM"
    faces, ids = same_faces_folds(root, 3)
    blob = (root / "fold1" / "landmarks_ct.npz").read_bytes()
    (root / "fold1" / "landmarks_ct.npz").write_bytes(blob[: len(blob) // 2])  # truncated
    (root / "fold2" / "landmarks_pet.npz").unlink()
    code = match(root, tmp_path / "MT", n_folds=3, aligns=("none",))
    assert code == 1
    man = {r["id"]: r for r in read_manifest(tmp_path / "MT" / "manifest.csv")}
    assert man["fold1"]["status"] == "failed" and "cannot read" in man["fold1"]["reason"]
    assert "landmarks_ct.npz" in man["fold1"]["reason"]
    assert man["fold2"]["status"] == "failed" and "found nothing" in man["fold2"]["reason"]
    assert man["fold0"]["status"] == "ok"
    summary = json.loads((tmp_path / "MT" / "summary.json").read_text(encoding="utf-8"))
    assert [f["fold"] for f in summary["failed_folds"]] == [1, 2]
    # once the files are back, a re-run into the same folder reports no failure
    write_fold(root, 1, "ct", ids, faces)
    write_fold(root, 2, "pet", ids, faces)
    assert match(root, tmp_path / "MT", n_folds=3, aligns=("none",)) == 0
    statuses = {r["id"]: r["status"] for r in read_manifest(tmp_path / "MT" / "manifest.csv")}
    assert statuses == {"fold0": "skipped", "fold1": "ok", "fold2": "ok"}
    with pytest.raises(InputError, match="found no such folder"):
        match(tmp_path / "absent", tmp_path / "MT2")
    wrong = tmp_path / "wrong.npz"
    write_npz(wrong, ids=np.array(["a", "b"]), landmarks=np.zeros((2, 478)))
    with pytest.raises(InputError, match="expected landmarks of shape"):
        read_landmark_set(wrong)


def test_script_icp_flag_adds_the_icp_rows(tmp_path, capsys):
    same_faces_fold(tmp_path / "LM")
    script = load_script("perform_landmark_matching")
    assert script.main(["--landmarks_files", str(tmp_path / "LM"), "--n_folds", "1",
                        "--save_dir", str(tmp_path / "MT"), "--icp"]) == 0
    out = capsys.readouterr().out
    assert "similarity" in out and "icp" in out and "chance" in out
    assert {a for a, _ in topk_rows(tmp_path / "MT" / "topk.csv")} == {"none", "similarity", "icp"}
    assert script.main(["--landmarks_files", str(tmp_path / "LM"), "--save_dir", str(tmp_path / "MT"),
                        "--align", "warp"]) == 2
    assert "expected --align to be a comma-separated list" in capsys.readouterr().err


def test_unusable_options_exit_2_before_any_work(tmp_path, capsys):
    same_faces_fold(tmp_path / "LM")
    script = load_script("perform_landmark_matching")
    for extra, message in ((["--n_folds", "0"], "expected --n_folds to be a whole number >= 1, found 0"),
                           (["--align", ""], "expected --align"),
                           (["--probe", "../x"], "expected --probe to be a variant name")):
        assert script.main(["--landmarks_files", str(tmp_path / "LM"), "--save_dir", str(tmp_path / "MT"),
                            *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "MT").exists()
    with pytest.raises(OptionsError, match="expected ranks k to be whole numbers >= 1, found"):
        MatchingOptions(ks=(1, 0))
    assert MatchingOptions(aligns=("none", "icp", "none")).aligns == ("none", "icp")


def test_a_wrong_shaped_landmark_file_fails_its_fold_and_the_others_finish(tmp_path, capsys):
    """Issue 12 point 8: a readable file of the wrong shape used to abort the stage (exit 2,
    no output); now it is a failed fold row with the reason, and the other folds are written."""
    root = tmp_path / "LM"
    faces, ids = same_faces_folds(root, 4)
    out = tmp_path / "MT"
    assert match(root, out, aligns=("none", "similarity")) == 0
    assert (out / "distances_fold1_none.npz").is_file()
    # fold 1: 468 points (a mesh without irises); fold 2: one (n, 1434) array; both readable npz
    write_npz(root / "fold1" / "landmarks_pet.npz", ids=np.array(ids), subjects=np.array(ids),
              landmarks=np.stack(faces)[:, :468], detected=np.ones(3, bool))
    write_npz(root / "fold2" / "landmarks_ct.npz", ids=np.array(ids),
              landmarks=np.stack(faces).reshape(3, -1), detected=np.ones(3, bool))
    script = load_script("perform_landmark_matching")
    assert script.main(["--landmarks_files", str(root), "--save_dir", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "2 of 4 folds scored" in printed and "failed fold 1" in printed
    man = {r["id"]: r for r in read_manifest(out / "manifest.csv")}
    assert set(man) == {"fold0", "fold1", "fold2", "fold3"}
    assert man["fold1"]["status"] == "failed"
    assert "expected landmarks of shape (3, 478, 3)" in man["fold1"]["reason"]
    assert "found (3, 468, 3)" in man["fold1"]["reason"] and "landmarks_pet.npz" in man["fold1"]["reason"]
    assert man["fold2"]["status"] == "failed" and "found (3, 1434)" in man["fold2"]["reason"]
    assert man["fold0"]["status"] == "skipped" and man["fold3"]["status"] == "skipped"
    # the good folds are scored and written; a failed fold keeps no distances of an earlier run
    rows = topk_rows(out / "topk.csv")
    assert "fold0" in rows[("none", 1)] and "fold3" in rows[("none", 1)] and "fold1" not in rows[("none", 1)]
    assert float(rows[("similarity", 1)]["mean"]) == 1.0
    assert sorted(p.name for p in out.glob("distances_fold*")) == [
        "distances_fold0_none.npz", "distances_fold0_similarity.npz",
        "distances_fold3_none.npz", "distances_fold3_similarity.npz"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [f["fold"] for f in summary["failed_folds"]] == [1, 2]
    assert [f["fold"] for f in summary["folds"]] == [0, 3]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["counts"] == {"ok": 0, "failed": 2, "skipped": 2}


def test_distance_matrix_rejects_unknown_alignment():
    with pytest.raises(ValueError, match="align must be one of"):
        distance_matrix(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), align="affine")


def test_rerun_reuses_distances_only_for_unchanged_inputs(tmp_path):
    import os

    faces, ids = same_faces_fold(tmp_path / "LM")
    out = tmp_path / "MT"
    assert match(tmp_path / "LM", out, aligns=("none",)) == 0
    path = out / "distances_fold0_none.npz"
    stamp = os.stat(path).st_mtime_ns
    assert match(tmp_path / "LM", out, aligns=("none",)) == 0
    assert os.stat(path).st_mtime_ns == stamp  # same inputs: reused
    assert read_manifest(out / "manifest.csv")[0]["status"] == "skipped"
    assert match(tmp_path / "LM", out, aligns=("none", "rigid")) == 0  # another option: redone ...
    assert os.stat(path).st_mtime_ns == stamp  # ... reusing the matrix it already has
    assert read_manifest(out / "manifest.csv")[0]["status"] == "ok"
    write_fold(tmp_path / "LM", 0, "pet", ids, [f + 0.01 for f in faces])  # placement re-run
    assert match(tmp_path / "LM", out, aligns=("none",)) == 0
    assert read_manifest(out / "manifest.csv")[0]["status"] == "ok"
    d = read_npz(path)["distances"]
    assert d[0, 0] == pytest.approx(np.linalg.norm(np.full((N_POINTS, 3), 0.01)))


def test_distractors_from_a_placement_folder_pool_the_other_folds(tmp_path):
    """--distractors LM adds the other folds' CT faces to each fold's gallery (never the fold's own)."""
    root = tmp_path / "LM"
    faces = identities(6)
    for k in range(2):
        ids = [f"f{k}_s{i}" for i in range(3)]
        write_fold(root, k, "pet", ids, faces[3 * k:3 * k + 3])
        write_fold(root, k, "ct", ids, faces[3 * k:3 * k + 3])
    assert match(root, tmp_path / "MT", aligns=("none",), distractors=root) == 0
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    assert float(rows[("none", 1)]["gallery_size"]) == 6  # 3 own + 3 of the other fold (CT only)
    assert float(rows[("none", 1)]["mean"]) == 1.0
    d = read_npz(tmp_path / "MT" / "distances_fold0_none.npz")
    assert [g.split(":")[-1] for g in d["gallery_ids"][3:]] == ["f1_s0", "f1_s1", "f1_s2"]


def test_a_fold_with_no_probes_is_counted_not_a_crash(tmp_path):
    """Placement writes an empty landmarks file when every test image of a fold failed."""
    faces = identities(3)
    ids = ["a", "b", "c"]
    root = tmp_path / "LM"
    write_fold(root, 0, "pet", ids, faces)
    write_fold(root, 0, "ct", ids, faces)
    write_fold(root, 1, "pet", [], np.zeros((0, N_POINTS, 3)))
    write_fold(root, 1, "ct", ids, faces)
    assert match(root, tmp_path / "MT", aligns=("none", "similarity")) == 0
    d = read_npz(tmp_path / "MT" / "distances_fold1_similarity.npz")
    assert d["distances"].shape == (0, 3)
    summary = json.loads((tmp_path / "MT" / "summary.json").read_text(encoding="utf-8"))
    assert [f["n_probes"] for f in summary["folds"]] == [3, 0]
    rows = topk_rows(tmp_path / "MT" / "topk.csv")
    assert rows[("similarity", 1)]["fold1"] == "nan"
    assert float(rows[("similarity", 1)]["mean"]) == 1.0  # the mean of the folds that had probes
    assert float(rows[("similarity", 1)]["std"]) == 0.0


def test_distances_of_folds_and_alignments_no_longer_scored_are_removed(tmp_path):
    """Fewer folds, or an alignment dropped: the old distances_fold{k}_*.npz went on lying
    beside the new results (faces' distances of folds that are not in topk.csv)."""
    root, out = tmp_path / "LM", tmp_path / "MT"
    same_faces_folds(root, 3)
    assert match(root, out, aligns=("none", "similarity")) == 0
    assert len(list(out.glob("distances_fold*_*.npz"))) == 6
    assert match(root, out, n_folds=2, aligns=("none",)) == 0
    assert sorted(p.name for p in out.glob("distances_fold*")) == ["distances_fold0_none.npz",
                                                                   "distances_fold1_none.npz"]


def test_when_every_fold_fails_no_distances_or_cmc_of_an_earlier_run_stay(tmp_path):
    root, out = tmp_path / "LM", tmp_path / "MT"
    same_faces_folds(root, 2)
    assert match(root, out, aligns=("none",)) == 0
    assert (out / "cmc.png").is_file()
    for k in range(2):
        blob = (root / f"fold{k}" / "landmarks_ct.npz").read_bytes()
        (root / f"fold{k}" / "landmarks_ct.npz").write_bytes(blob[: len(blob) // 2])
    assert match(root, out, aligns=("none",)) == 1
    assert not (out / "cmc.png").exists() and not list(out.glob("distances_fold*"))
    assert {r["status"] for r in read_manifest(out / "manifest.csv")} == {"failed"}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a tiny file system needs root and unshare")
def test_a_full_output_location_stops_the_stage_with_exit_2(tmp_path):
    """A real full disk (64 KiB tmpfs) while writing a distance matrix is the location's
    fault: exit 2 with one line, not a failed fold and the next fold failing the same way."""
    import subprocess
    import sys

    root = tmp_path / "LM"
    same_faces_folds(root, 2)
    for k in range(2):   # 300 x 300 random distances do not fit in 64 KiB
        faces = np.random.default_rng(k).uniform(0, 1, (300, N_POINTS, 3))
        ids = [f"s{i}" for i in range(300)]
        write_fold(root, k, "pet", ids, faces)
        write_fold(root, k, "ct", ids, faces)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = load_script("perform_landmark_matching").__file__
    command = f"{sys.executable} {script} --landmarks_files {root} --save_dir {mnt}/MT --align none --quiet"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt} && exec {command}"],
                          capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "ENOSPC" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- pooled intervals, gallery growth


def test_wilson_known_answer_for_six_hits_of_twenty_seven():
    from faceaudit.core.stats import wilson_interval

    assert tuple(round(v, 3) for v in wilson_interval(6, 27)) == (0.106, 0.408)


def test_topk_rows_pool_hits_over_folds_with_the_wilson_interval(tmp_path):
    """Two folds, 3 probes each: fold 0 finds all (identical faces), fold 1 none (its probes'
    subjects are absent from the gallery): pooled top-1 3/6 with Wilson [0.188, 0.812]."""
    root = tmp_path / "LM"
    faces = identities(3)
    write_fold(root, 0, "pet", ["a", "b", "c"], faces)
    write_fold(root, 0, "ct", ["a", "b", "c"], faces)
    write_fold(root, 1, "pet", ["x", "y", "z"], faces)
    write_fold(root, 1, "ct", ["a", "b", "c"], faces)
    assert match(root, tmp_path / "MT", aligns=("none",)) == 0
    row = topk_rows(tmp_path / "MT" / "topk.csv")[("none", 1)]
    assert (int(row["pooled_hits"]), int(row["pooled_n"])) == (3, 6)
    assert float(row["pooled_topk"]) == 0.5 and float(row["mean"]) == 0.5
    assert (round(float(row["ci_lo"]), 3), round(float(row["ci_hi"]), 3)) == (0.188, 0.812)


def test_gallery_growth_known_answers_on_a_synthetic_distance_matrix():
    """Probe 0's true match is always nearest; probe 1's is the farthest of N = 40 items;
    probe 2 had no features (a miss at every size)."""
    from faceaudit.petct.matching_tables import probe_hit_rates

    n = 40
    gallery = np.array([f"g{j}" for j in range(n)])
    d = np.tile(np.arange(1.0, n + 1), (3, 1))   # g0 nearest ... g39 farthest
    d[1] = d[1, ::-1]                               # for probe 1, g0 is the farthest
    subjects, valid = ["g0", "g0", "g0"], np.array([True, True, False])
    for size in (2, 5, 6, 10, 20, 40, None):
        rates = probe_hit_rates(d, subjects, gallery, valid, size, ks=(1, 5), n_draws=50,
                                rng=np.random.default_rng(0))
        assert rates[0].tolist() == [1.0, 1.0]
        assert rates[1, 0] == 0.0
        assert rates[1, 1] == (1.0 if size is not None and size <= 5 else 0.0)
        assert rates[2].tolist() == [0.0, 0.0]
    # a true match at rank 3 of 40: in a gallery of G it is top-1 only when neither of the
    # two nearer items is drawn: (G-1 choose 0 of the 2) = C(37, G-1) / C(39, G-1)
    d3 = np.arange(1.0, n + 1)[None, :]
    rates = probe_hit_rates(d3, ["g2"], gallery, np.array([True]), 10, ks=(1,), n_draws=4000,
                            rng=np.random.default_rng(1))
    assert rates[0, 0] == pytest.approx((30 * 29) / (39 * 38), abs=0.03)


def test_stage_writes_gallery_growth_with_chance_and_a_seed(tmp_path):
    """25 identical-face subjects per fold: every attack finds all at every size; the sizes
    kept are those not above the gallery (10, 20) and the full 25; chance is k/G."""
    root = tmp_path / "LM"
    faces = identities(25, shape_noise=0.05)
    ids = [f"s{i}" for i in range(25)]
    for k in range(2):
        write_fold(root, k, "pet", ids, faces)
        write_fold(root, k, "ct", ids, faces)
    result = run_landmark_matching(root, tmp_path / "MT", MatchingOptions(aligns=("none", "similarity")),
                                   run=RunSettings(progress=False, seed=7))
    assert result.exit_code == 0
    rows = list(csv.DictReader(open(tmp_path / "MT" / "gallery_growth.csv")))
    assert [(r["align"], r["gallery"]) for r in rows] == [
        (a, g) for a in ("none", "similarity") for g in ("10", "20", "full")]
    for r in rows:
        assert float(r["top1"]) == 1.0 and float(r["top5"]) == 1.0 and int(r["n_probes"]) == 50
        size = float(r["gallery_size"])
        assert size == (25.0 if r["gallery"] == "full" else float(r["gallery"]))
        assert float(r["chance_top1"]) == pytest.approx(1 / size)
        assert float(r["chance_top5"]) == pytest.approx(5 / size)
    assert "identification as the gallery grows" in result.summary
    assert "pooled [95 % CI]" in result.summary and "100.0 [92.9, 100.0] (50/50)" in result.summary


def test_gallery_growth_is_reproducible_from_the_seed_and_averages_random_galleries(tmp_path):
    """Random faces (identification partly right): the same seed gives the same table, and
    a smaller gallery never identifies worse on average than the full one."""
    rng = np.random.default_rng(5)
    root = tmp_path / "LM"
    ids = [f"s{i}" for i in range(45)]
    truth = 0.5 + 0.1 * rng.normal(size=(45, N_POINTS, 3))
    write_fold(root, 0, "pet", ids, truth + 1.0 * rng.normal(size=truth.shape))
    write_fold(root, 0, "ct", ids, truth)
    tables = []
    for out, seed in (("A", 3), ("B", 3), ("C", 4)):
        assert run_landmark_matching(root, tmp_path / out, MatchingOptions(aligns=("none",)),
                                     run=RunSettings(progress=False, seed=seed)).exit_code == 0
        tables.append({r["gallery"]: r for r in csv.DictReader(open(tmp_path / out / "gallery_growth.csv"))})
    assert list(tables[0]) == ["10", "20", "40", "full"]
    assert tables[0] == tables[1]
    top1 = [float(tables[0][g]["top1"]) for g in ("10", "20", "40", "full")]
    assert 0 < top1[-1] < 1 and top1 == sorted(top1, reverse=True) and top1[0] > top1[-1]
    full = topk_rows(tmp_path / "A" / "topk.csv")[("none", 1)]
    assert float(tables[0]["full"]["top1"]) == pytest.approx(float(full["mean"]))
    assert any(tables[0][g]["top1"] != tables[2][g]["top1"] for g in ("10", "20", "40"))
