"""The face-recognition stage: rank metrics against brute force, ORL identification with dlib,
and the stage end to end on a digital-mask folder built here from ORL photos."""

import csv
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ORL, load_script
from faceaudit.core import ranking
from faceaudit.core.files import InputError
from faceaudit.mask.embedding_cache import upstream_black_background
from faceaudit.mask.evaluation import chance_topk_multi, rank_queries
from faceaudit.mask.scenarios import read_mask_run, resolve_scenarios
from recognition_helpers import identify_folder

run_face_recognition = load_script("run_face_recognition")

VARIANTS = ("prep", "overlay", "mask_only", "mask_only_black")


def _orl_224(identity, stem):
    """An ORL photo (92x112 grey) as the mask stage's 224x224 RGB crop."""
    img = Image.open(ORL / identity / f"{stem}.pgm").resize((184, 224), Image.BILINEAR)
    out = np.full((224, 224), 128, np.uint8)
    out[:, 20:204] = np.asarray(img)
    return np.repeat(out[:, :, None], 3, axis=2)


def build_mask_run(folder, identities, *, query_stem=2, grey=150, video_query="0",
                   mask_backend="grey-ellipse", protocol=None):
    """A digital-mask run folder per the issue-5 contract; the "mask" is a flat grey ellipse
    over the face (overlay: half-blended), so masks carry no identity and no detectable face."""
    folder = Path(folder)
    yy, xx = np.mgrid[:224, :224]
    ellipse = (((xx - 112) / 60) ** 2 + ((yy - 120) / 85) ** 2 <= 1)[..., None]
    rows = []
    for ident in identities:
        for role, stem, video in (("database", 1, "0"), ("query", query_stem, video_query)):
            photo = _orl_224(ident, stem)
            flat = np.full_like(photo, grey)
            images = {"prep": photo,
                      "overlay": np.where(ellipse, photo // 2 + flat // 2, photo),
                      "mask_only": np.where(ellipse, flat, 255),
                      "mask_only_black": np.where(ellipse, flat, 0)}
            rel = {}
            for variant, pixels in images.items():
                path = Path(role) / ident / f"{stem}_{variant}.png"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / path)
                rel[variant] = str(path)
            rows.append({"id": f"{role}/{ident}/{stem}", "subject": ident, "status": "ok",
                         "reason": "", "role": role, "video": video,
                         "source": f"orl/{ident}/{stem}.pgm", "backend": mask_backend,
                         "det_score": "0.99", **rel})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if protocol:
        (folder / "run.json").write_text(json.dumps({"args": {"protocol": protocol,
                                                              "backend": mask_backend}}))
    return folder


def _results(save_dir):
    with open(save_dir / "results.csv", newline="") as fh:
        return {row["scenario"]: row for row in csv.DictReader(fh)}


def _manifest(save_dir):
    with open(save_dir / "manifest.csv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


# ---------------------------------------------------------------- metrics


def _brute_force_rank(dist_row, subject, gallery_subjects):
    """Sort the gallery; the rank is 1 + impostors at or before the first own item."""
    if not np.isfinite(dist_row).any():
        return ranking.MISS
    own = [j for j, s in enumerate(gallery_subjects) if s == subject]
    own_d = [dist_row[j] for j in own if np.isfinite(dist_row[j])]
    if not own_d:
        return ranking.MISS
    best = min(own_d)
    order = sorted(range(len(gallery_subjects)), key=lambda j: (dist_row[j], gallery_subjects[j]
                                                               == subject))
    impostors_ahead = 0
    for j in order:
        if gallery_subjects[j] == subject and dist_row[j] == best:
            break
        if gallery_subjects[j] != subject:
            impostors_ahead += 1
    return 1 + impostors_ahead


def test_ranks_and_topk_equal_a_brute_force_reference():
    rng = np.random.default_rng(3)
    gallery_subjects = [f"id{i % 7}" for i in range(12)]  # some subjects twice
    query_subjects = [f"id{i % 9}" for i in range(20)]  # id7, id8 absent from the gallery
    g = [rng.normal(size=16) for _ in gallery_subjects]
    g[5] = None  # a gallery image with no face
    q = [rng.normal(size=16) for _ in query_subjects]
    q[2] = None  # a query with no face
    q[4] = g[4].copy()  # an exact duplicate
    dist, ranks = rank_queries(query_subjects, q, gallery_subjects, g)
    for i, subject in enumerate(query_subjects):
        row = dist[i].copy()
        if q[i] is not None:
            for j, vec in enumerate(g):
                if vec is None:
                    assert np.isnan(row[j])
                    continue
                cos = q[i] @ vec / np.linalg.norm(q[i]) / np.linalg.norm(vec)
                assert row[j] == pytest.approx(1 - cos)
        expected = _brute_force_rank(np.where(np.isnan(row), np.inf, row), subject,
                                     gallery_subjects)
        assert ranks[i] == expected, i
    assert ranks[2] == ranking.MISS and ranks[4] == 1
    assert all(ranks[i] == ranking.MISS for i, s in enumerate(query_subjects) if s in ("id7",
                                                                                       "id8"))
    for k in (1, 5, 10):
        brute = np.mean([(r != ranking.MISS) and r <= k for r in ranks])
        assert ranking.topk_accuracy(ranks, [k])[k] == pytest.approx(brute)


def test_chance_level_matches_k_over_g_and_a_simulation():
    assert chance_topk_multi(list("abcdefghij"), list("abc"), 1) == pytest.approx(0.1)
    assert chance_topk_multi(list("abcdefghij"), list("abc"), 5) == pytest.approx(0.5)
    gallery = list("aabbbcdefg")
    queries = list("abf")
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(20000):
        order = rng.permutation(len(gallery))
        for s in queries:
            own = [pos for pos, j in enumerate(order) if gallery[j] == s]
            hits.append(min(own) < 3)
    assert chance_topk_multi(gallery, queries, 3) == pytest.approx(np.mean(hits), abs=0.01)
    assert chance_topk_multi(gallery, ["a"], 3) == pytest.approx(1 - math.comb(8, 3) /
                                                                 math.comb(10, 3))


def test_rank_k_interval_is_wilson_95_in_results_and_table(tmp_path):
    """5 queries, 5 hits: a percentile bootstrap printed [100, 100]; Wilson 95 % gives
    [56.6, 100] (a 97.5 % interval would give 49.9)."""
    from faceaudit.core.runner import RunSettings
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    dm = build_mask_run(tmp_path / "DM", ["s1", "s2", "s3", "s4", "s5"])
    result = run_fr(dm, tmp_path / "FR", RecognitionOptions(
        scenarios=("Face2Face", "MaskOnly2Face"), n_boot=200), run=RunSettings(progress=False))
    rows = _results(tmp_path / "FR")
    face, mask = rows["Face2Face"], rows["MaskOnly2Face"]
    assert float(face["rank1"]) == 1.0
    assert round(float(face["rank1_ci_lo"]), 3) == 0.566 and float(face["rank1_ci_hi"]) == 1.0
    assert round(float(face["rank5_ci_lo"]), 3) == 0.566
    assert face["rank_ci_method"] == "wilson score 95%"
    assert "100.0% [56.6%, 100.0%]" in result.summary
    # 0 of 5: the interval keeps its width instead of collapsing to [0, 0]
    assert float(mask["rank1"]) == 0.0 and round(float(mask["rank1_ci_hi"]), 3) == 0.434
    # the mask's loss against Face2Face on the same 5 query photos, Newcombe's interval
    assert mask["reference"] == "Face2Face" and int(mask["n_paired_ref"]) == 5
    assert float(mask["rank1_diff_vs_ref"]) == -1.0
    assert float(mask["rank1_diff_ci_lo"]) == -1.0 and float(mask["rank1_diff_ci_hi"]) < -0.3
    assert face["rank1_diff_vs_ref"] == ""  # the reference itself
    assert float(face["mean_rank"]) == 1.0
    assert float(face["mean_rank_ci_lo"]) == float(face["mean_rank_ci_hi"]) == 1.0


def test_upstream_black_background_is_per_channel():
    rgb = np.array([[[255, 255, 255], [255, 10, 20], [254, 0, 255]]], np.uint8)
    out = upstream_black_background(rgb)
    np.testing.assert_array_equal(out, [[[0, 0, 0], [0, 10, 20], [254, 0, 0]]])
    assert rgb[0, 0, 0] == 255  # input untouched


def test_scenarios_fix_maskonlyblack2face_and_keep_the_upstream_switch():
    fixed = {s.name: s for s in resolve_scenarios(None, cross_available=False)}
    assert fixed["MaskOnlyBlack2Face"].database == "prep"
    assert not any(s.cross for s in fixed.values()) and len(fixed) == 7
    bug = {s.name: s for s in resolve_scenarios(None, cross_available=False,
                                                upstream_scenario_bug=True)}
    assert bug["MaskOnlyBlack2Face"].database == "mask_only_black"
    with pytest.raises(InputError, match="need --cross_masks_dir"):
        resolve_scenarios(["CrossMaskOnly2MaskOnly"], cross_available=False)
    with pytest.raises(InputError, match="unknown scenarios"):
        resolve_scenarios(["Mask2Nothing"], cross_available=False)


# ---------------------------------------------------------------- dlib on ORL


def test_dlib_separates_orl_identities():
    """10 ORL identities, photo 1 as database, photo 2 as query."""
    result = identify_folder(ORL, identities=[f"s{i}" for i in range(1, 11)], n_boot=200)
    m = result.metrics
    assert m["n_queries"] == 10 and m["gallery_size"] == 10 and m["chance"] == pytest.approx(0.1)
    assert m["rank1"] >= 0.9, result.ranks
    assert m["rank1_ci_lo"] < m["rank1"] <= m["rank1_ci_hi"]  # Wilson: not [1, 1] at 10/10
    assert m["n_no_face"] == 0


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    return build_mask_run(tmp_path_factory.mktemp("dm") / "DM", [f"s{i}" for i in range(1, 9)],
                          protocol="same-video")


def test_stage_end_to_end_on_a_mask_folder(mask_run, tmp_path, capsys):
    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                      "--n_boot", "300", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Face2Face" in printed and "MaskOnly2MaskOnly" in printed and "95% CI" in printed
    results = _results(save)
    assert list(results) == ["Face2Face", "Overlay2Face", "Overlay2Overlay", "MaskOnly2Face",
                             "MaskOnly2MaskOnly", "MaskOnlyBlack2Face",
                             "MaskOnlyBlack2MaskOnlyBlack"]
    face = results["Face2Face"]
    assert float(face["rank1"]) >= 0.875 and face["protocol"] == "same-video"
    assert int(face["gallery_size"]) == 8 and float(face["chance"]) == pytest.approx(1 / 8)
    # a flat grey ellipse has no face: every query is a reported miss, not dropped
    for name in ("MaskOnly2Face", "MaskOnly2MaskOnly", "MaskOnlyBlack2Face"):
        assert int(results[name]["n_queries"]) == 8 and int(results[name]["n_no_face"]) == 8
        assert float(results[name]["rank1"]) == 0.0
    assert results["MaskOnlyBlack2Face"]["database"] == "prep"
    manifest = _manifest(save)
    assert len(manifest) == 8 * 2 * 4  # every (role, identity, variant) embedded once
    row = manifest["mask_only/query/s3/2"]
    assert row["status"] == "ok" and row["face_found"] == "0" and "no face found" in row["reason"]
    assert manifest["prep/database/s3/1"]["face_found"] == "1"
    assert manifest["prep/database/s3/1"]["path"] == "database/s3/1_prep.png"
    dist = np.load(save / "distances" / "Face2Face.npz")
    assert dist["distances"].shape == (8, 8) and next(iter(dist["gallery_ids"])).startswith("prep/")
    report = json.loads((save / "results.json").read_text(encoding="utf-8"))
    assert len(report["scenarios"][0]["cmc"]) == 8
    assert report["detection"]["prep"] == {"n_images": 16, "n_found": 16, "n_failed": 0,
                                           "rate": 1.0}
    assert report["detection"]["mask_only"]["n_found"] == 0
    assert "faces found: prep 16/16" in printed
    run = json.loads((save / "run.json").read_text(encoding="utf-8"))
    assert run["protocol"] == "same-video" and run["embedding"]["n_embedded"] > 0
    assert (save / "cmc.png").stat().st_size > 1000
    assert stat.S_IMODE(save.stat().st_mode) == 0o700
    assert stat.S_IMODE((save / "results.csv").stat().st_mode) == 0o600

    # a re-run takes every embedding from the content-hash cache
    assert run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                      "--n_boot", "300", "--quiet",
                                      "--scenarios", "Face2Face", "MaskOnlyBlack2Face",
                                      "--upstream-scenario-bug"]) == 0
    run = json.loads((save / "run.json").read_text(encoding="utf-8"))
    assert run["embedding"]["n_embedded"] == 0 and run["embedding"]["n_from_cache"] > 0
    again = _results(save)
    assert list(again) == ["Face2Face", "MaskOnlyBlack2Face"]
    assert again["Face2Face"]["rank1"] == face["rank1"]
    assert again["MaskOnlyBlack2Face"]["database"] == "mask_only_black"


def test_corrupt_image_is_a_failed_row_and_a_miss(tmp_path, capsys):
    dm = build_mask_run(tmp_path / "DM", ["s1", "s2", "s3"])
    (dm / "query" / "s2" / "2_prep.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (dm / "query" / "s3" / "2_prep.png").unlink()
    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(dm), "--save_dir", str(save),
                                      "--scenarios", "Face2Face", "--n_boot", "100", "--quiet"])
    assert code == 1
    manifest = _manifest(save)
    assert manifest["prep/query/s2/2"]["status"] == "failed"
    assert "cannot read" in manifest["prep/query/s2/2"]["reason"]
    assert manifest["prep/query/s3/2"]["status"] == "failed"
    assert "found nothing" in manifest["prep/query/s3/2"]["reason"]
    face = _results(save)["Face2Face"]
    assert int(face["n_queries"]) == 3 and int(face["n_failed"]) == 2
    assert float(face["rank1"]) <= 1 / 3 + 1e-9  # the two unreadable queries are misses


def test_cross_mask_scenarios_pair_by_identity_and_role(tmp_path, capsys):
    ids = ["s1", "s2", "s3", "s4"]
    dm = build_mask_run(tmp_path / "DM_a", ids, mask_backend="grey150",
                        video_query="1", protocol=None)
    dm2 = build_mask_run(tmp_path / "DM_b", ids, grey=90, mask_backend="grey90")
    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(dm), "--save_dir", str(save),
                                      "--cross_masks_dir", str(dm2), "--n_boot", "100",
                                      "--quiet", "--scenarios", "Overlay2Overlay",
                                      "CrossOverlay2Overlay", "CrossMaskOnly2MaskOnly"])
    assert code == 0
    results = _results(save)
    cross = results["CrossOverlay2Overlay"]
    assert cross["protocol"] == "across-video (cross: grey90)" and cross["cross_mask"] == "1"
    assert int(cross["n_queries"]) == 4 and int(cross["gallery_size"]) == 4
    assert results["Overlay2Overlay"]["protocol"] == "across-video"
    run = json.loads((save / "run.json").read_text(encoding="utf-8"))
    assert run["cross_database_same_photos"] == {"n_identities_both": 4, "n_same_photos": 4}
    assert run["cross_mask_backend"] == "grey90"
    manifest = _manifest(save)
    assert manifest["cross:overlay/database/s1/1"]["run"] == "cross"
    assert "overlay/query/s1/2" in manifest and "cross:overlay/query/s1/2" not in manifest


def test_bad_mask_folder_is_a_usage_error(tmp_path, capsys):
    dm = tmp_path / "DM"
    dm.mkdir()
    (dm / "manifest.csv").write_text("id,subject,status,reason\nquery/a/1,a,ok,\n")
    code = run_face_recognition.main(["--masks_dir", str(dm), "--save_dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lacks columns" in err and "role" in err and str(dm) in err
    assert run_face_recognition.main(["--masks_dir", str(tmp_path / "nowhere"),
                                      "--save_dir", str(tmp_path / "o")]) == 2
    assert "found nothing" in capsys.readouterr().err


def test_protocol_is_inferred_from_videos_without_run_json(tmp_path):
    same = read_mask_run(build_mask_run(tmp_path / "a", ["s1", "s2"]))
    across = read_mask_run(build_mask_run(tmp_path / "b", ["s1", "s2"], video_query="7"))
    assert (same.protocol, across.protocol) == ("same-video", "across-video")
    assert same.backend == "grey-ellipse"


def test_missing_model_dir_stops_the_stage_with_the_documented_error(mask_run, tmp_path, capsys):
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir",
                                      str(tmp_path / "FR"), "--backend", "insightface",
                                      "--model_dir", str(tmp_path / "no_buffalo_l")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "det_10g.onnx" in err and "w600k_r50.onnx" in err
    assert "insightface model zoo" in err and str(tmp_path / "no_buffalo_l") in err
    assert not (tmp_path / "FR").exists()  # nothing written before the model is found


def test_embedding_cache_round_trip_and_stale_or_corrupt_files(tmp_path):
    from faceaudit.faces.embedding import EmbeddingResult
    from faceaudit.mask.embedding_cache import EmbeddingCache

    path = tmp_path / "dlib.npz"
    cache = EmbeddingCache(path, "model A", 4)
    cache.put("h1", EmbeddingResult(np.arange(4, dtype=np.float32), 0.9, "", "hog"))
    cache.put("h2", EmbeddingResult(None, float("nan"), "no face found", ""))
    cache.save()
    again = EmbeddingCache(path, "model A", 4)
    again.load()
    hit = again.get("h1")
    assert np.array_equal(hit.vector, np.arange(4)) and hit.det_score == 0.9 and hit.detector == "hog"
    miss = again.get("h2")
    assert miss.vector is None and miss.reason == "no face found"  # cached as a no-face result
    other = EmbeddingCache(path, "model B", 4)
    other.load()
    assert other.entries == {} and "another model" in other.discarded_reason
    path.write_bytes(b"PK\x03\x04 truncated")
    broken = EmbeddingCache(path, "model A", 4)
    broken.load()
    assert broken.entries == {} and "unreadable cache ignored" in broken.discarded_reason


# ---------------------------------------------------------------- the stage API (issue 11, 13.4)


@pytest.mark.parametrize("value", ["0", "-5", "39"])
def test_nonsense_n_boot_is_a_usage_error_before_any_work(mask_run, tmp_path, capsys, value):
    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                      "--n_boot", value, "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expected --n_boot to be a whole number >= 40") and value in err
    assert not save.exists()  # stopped before embedding anything


def test_options_are_validated_on_creation():
    from faceaudit.core.runner import OptionsError
    from faceaudit.mask.recognition import RecognitionOptions

    with pytest.raises(OptionsError, match="expected --backend to be one of .*found 'facenet'"):
        RecognitionOptions(backend="facenet")
    with pytest.raises(OptionsError, match="expected --scenarios among .*Mask2Nothing"):
        RecognitionOptions(scenarios=("Face2Face", "Mask2Nothing"))
    with pytest.raises(OptionsError, match="n_boot"):
        RecognitionOptions(n_boot=2000.0)
    opts = RecognitionOptions(scenarios=["Face2Face", "Face2Face"])
    assert opts.scenarios == ("Face2Face",) and opts.backends == ("dlib",)


def test_unknown_backend_on_the_command_line_exits_2(mask_run, tmp_path, capsys):
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir",
                                      str(tmp_path / "FR"), "--backend", "facenet"])
    assert code == 2 and "facenet" in capsys.readouterr().err
    assert not (tmp_path / "FR").exists()


def test_library_returns_the_table_and_prints_nothing(mask_run, tmp_path, capsys):
    from faceaudit.core.runner import RunSettings, StageResult
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    save = tmp_path / "FR"
    options = RecognitionOptions(scenarios=("Face2Face",), n_boot=100)
    result = run_fr(mask_run, save, options, run=RunSettings(progress=False))
    assert isinstance(result, StageResult) and result.exit_code == 0
    assert capsys.readouterr().out == ""
    assert "Face2Face" in result.summary and "faces found: prep 16/16" in result.summary
    assert result.counts == {"ok": 16, "failed": 0, "skipped": 0}
    run = json.loads((save / "run.json").read_text(encoding="utf-8"))
    assert run["stage"] == "face_recognition" and run["options"]["n_boot"] == 100
    # a re-run reuses every embedding: the rows say skipped and keep their numbers
    again = run_fr(mask_run, save, options, run=RunSettings(progress=False))
    assert again.counts == {"ok": 0, "failed": 0, "skipped": 16}
    row = _manifest(save)["prep/query/s3/2"]
    assert row["status"] == "skipped" and row["face_found"] == "1" and row["fingerprint"]
    # --overwrite recomputes them
    fresh = run_fr(mask_run, save, options, run=RunSettings(progress=False, overwrite=True))
    assert fresh.counts["ok"] == 16


def test_a_second_run_into_a_locked_folder_exits_2(mask_run, tmp_path, capsys):
    from faceaudit.core.runner import OutputLock

    save = tmp_path / "FR"
    save.mkdir()
    lock = OutputLock(save)
    lock.acquire()
    try:
        code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                          "--scenarios", "Face2Face", "--quiet"])
    finally:
        lock.release()
    assert code == 2 and "another --save_dir" in capsys.readouterr().err
    assert not (save / "results.csv").exists()


def test_a_broken_model_file_exits_2_naming_it_before_any_output(mask_run, tmp_path, capsys):
    model = tmp_path / "w600k_r50.onnx"
    model.write_bytes(b"")  # an interrupted download
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir",
                                      str(tmp_path / "FR"), "--backend", "arcface-onnx",
                                      "--model_dir", str(model), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expected an ArcFace-style ONNX model") and str(model) in err
    assert "found an empty file (0 bytes)" in err and "Traceback" not in err
    assert not (tmp_path / "FR").exists()


def test_input_normalisation_option_reaches_the_model_and_run_json(mask_run, tmp_path, capsys):
    """--input_mean/--input_std set an ArcFace ONNX's normalisation; run.json records it with
    where it came from; one without the other, or with no ArcFace backend, is exit 2."""
    from test_embedding import tiny_arcface

    model = tiny_arcface(tmp_path / "arc.onnx")
    argv = ["--masks_dir", str(mask_run), "--scenarios", "Face2Face", "--quiet", "--n_boot", "40"]
    assert run_face_recognition.main(argv + ["--save_dir", str(tmp_path / "FR"), "--backend",
                                             "arcface-onnx", "--model_dir", str(model),
                                             "--input_mean", "127.5", "--input_std", "128"]) == 0
    described = json.loads((tmp_path / "FR" / "run.json").read_text(encoding="utf-8"))
    embedder = described["backends"][0]["embedder"]
    assert (embedder["input_mean"], embedder["input_std"], embedder["normalisation"]) == (
        127.5, 128.0, "option")
    assert run_face_recognition.main(argv + ["--save_dir", str(tmp_path / "FR2"), "--backend",
                                             "arcface-onnx", "--model_dir", str(model)]) == 0
    default = json.loads((tmp_path / "FR2" / "run.json").read_text(encoding="utf-8"))
    assert default["backends"][0]["embedder"]["input_std"] == 127.5
    capsys.readouterr()
    assert run_face_recognition.main(argv + ["--save_dir", str(tmp_path / "FR3"), "--backend",
                                             "arcface-onnx", "--model_dir", str(model),
                                             "--input_mean", "127.5"]) == 2
    assert "input_mean (a finite number) and input_std (> 0) together" in capsys.readouterr().err
    assert run_face_recognition.main(argv + ["--save_dir", str(tmp_path / "FR3"), "--input_mean",
                                             "0", "--input_std", "1"]) == 2
    assert "only with insightface or arcface-onnx" in capsys.readouterr().err
    assert not (tmp_path / "FR3").exists()


# ---------------------------------------------------------------- open set (issue 13.7)


def _synthetic_scenario(query_vectors, gallery_vectors):
    """evaluate_scenario on hand-made embeddings: identity i's database image is e_i."""
    from faceaudit.mask.embedding_cache import EmbeddingRecord
    from faceaudit.mask.evaluation import evaluate_scenario
    from faceaudit.mask.scenarios import SCENARIOS, ImageRef

    refs, records = {"query": [], "database": []}, {}
    for role, vectors in (("query", query_vectors), ("database", gallery_vectors)):
        for i, vec in enumerate(vectors):
            ref = ImageRef(f"prep/{role}/id{i:02d}/1", f"id{i:02d}", role, "prep",
                           Path(f"/nowhere/{role}{i}.png"), f"{role}/id{i:02d}/1", "masks")
            refs[role].append(ref)
            records[ref.id] = EmbeddingRecord("ok", "" if vec is not None else "no face",
                                              vector=vec)
    return evaluate_scenario(SCENARIOS["Face2Face"], refs["query"], refs["database"], records,
                             protocol="synthetic", n_boot=100)


def test_open_set_rates_known_answer_on_synthetic_embeddings():
    """40 identities: queries 0-2 equal the *next* identity's database image (3 impostor
    pairs at distance 0, their genuine pairs at 1), query 3 has no face, the other 36
    equal their own (distance 0); every other pair is orthogonal (distance 1)."""
    eye = np.eye(40, dtype=np.float32)
    queries = [eye[i + 1] if i < 3 else eye[i] for i in range(40)]
    queries[3] = None
    result = _synthetic_scenario(queries, list(eye))
    m = result.metrics
    assert (m["n_genuine_pairs"], m["n_impostor_pairs"]) == (40, 1560)
    # 1 %: 15 false accepts allowed, threshold 1 (the 16th smallest impostor distance):
    # the 36 exact matches are accepted; queries 0-2 (genuine at 1) and 3 (no face) are not
    assert m["tar_at_far_1pct"] == pytest.approx(36 / 40)
    # 0.1 %: 1 false accept allowed, but 3 impostors tie at 0: nothing can be accepted
    assert m["tar_at_far_0.1pct"] == 0.0 and m["threshold_at_far_0.1pct"] == 0.0
    assert m["open_set_note"] == ""
    assert m["rank1"] == pytest.approx(36 / 40)


def test_open_set_columns_roc_csv_and_the_too_few_pairs_note(mask_run, tmp_path):
    from faceaudit.core.runner import RunSettings
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    save = tmp_path / "FR"
    result = run_fr(mask_run, save, RecognitionOptions(scenarios=("Face2Face", "MaskOnly2Face"),
                                                       n_boot=100),
                    run=RunSettings(progress=False))
    face = _results(save)["Face2Face"]
    # 8 identities: 8 genuine and 56 impostor pairs, too few for 1 % (100) and 0.1 % (1000)
    assert (face["n_genuine_pairs"], face["n_impostor_pairs"]) == ("8", "56")
    assert face["tar_at_far_1pct"] == "nan" and face["tar_at_far_0.1pct"] == "nan"
    assert face["open_set_note"] == ("FAR 1% needs >= 100 impostor pairs, found 56; "
                                     "FAR 0.1% needs >= 1000 impostor pairs, found 56")
    assert "TAR@FAR 1%" in result.summary and "needs >= 100 impostor pairs" in result.summary
    with open(save / "roc.csv", newline="") as fh:
        roc = list(csv.DictReader(fh))
    assert list(roc[0]) == ["scenario", "far", "tar", "threshold"]
    face_roc = [r for r in roc if r["scenario"] == "Face2Face"]
    assert (face_roc[0]["far"], face_roc[0]["tar"]) == ("0", "0")
    assert float(face_roc[-1]["far"]) == 1.0 and float(face_roc[-1]["tar"]) == 1.0
    # no face in any mask: the curve never leaves (0, 0)
    assert [(r["far"], r["tar"]) for r in roc if r["scenario"] == "MaskOnly2Face"] == [("0", "0")]
    assert (save / "roc.png").stat().st_size > 1000


# ---------------------------------------------------------------- several recognizers (issue 14.3)


class _TableEmbedder:
    """A fake recognizer: a fixed vector per image content, or no face. ``faces`` maps the
    SHA-256 of an image's pixels to its vector (None: no face); other images get ``other``."""

    def __init__(self, name, faces, other, dim=8):
        self.name, self.faces, self.other, self.dim = name, faces, other, dim

    def describe(self):
        return {"backend": self.name, "fake": True, "input_mean": 0.0, "input_std": 1.0}

    def embed(self, rgb):
        import hashlib

        from faceaudit.faces.embedding import EmbeddingResult

        vec = self.faces.get(hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest(),
                             self.other)
        if vec is None:
            return EmbeddingResult(None, float("nan"), "no face (fake)", "")
        return EmbeddingResult(np.asarray(vec, np.float32), 0.9, "", "fake")


def _two_fakes(dm):
    """'dlib' finds faces on photos only (one-hot of the identity; masks: no face);
    'mobilefacenet' also on overlays (one-hot) and gives every mask one constant vector."""
    import hashlib

    from faceaudit.core.images import read_rgb

    rows = read_mask_run(dm).rows
    subjects = sorted({r["subject"] for r in rows})
    photo, overlay = {}, {}
    for row in rows:
        onehot = np.eye(len(subjects))[subjects.index(row["subject"])]
        for variant, table in (("prep", photo), ("overlay", overlay)):
            rgb = read_rgb(dm / row[variant])
            table[hashlib.sha256(rgb.tobytes()).hexdigest()] = onehot
    return {"dlib": _TableEmbedder("dlib", photo, None),
            "mobilefacenet": _TableEmbedder("mobilefacenet", {**photo, **overlay},
                                            np.ones(len(subjects)))}


def _rows_by_backend(save_dir):
    with open(save_dir / "results.csv", newline="") as fh:
        return {(row["backend"], row["scenario"]): row for row in csv.DictReader(fh)}


def test_two_recognizers_give_a_row_per_recognizer_and_scenario(mask_run, tmp_path):
    from faceaudit.core.runner import RunSettings
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    save = tmp_path / "FR"
    options = RecognitionOptions(backend="dlib, mobilefacenet", n_boot=100,
                                 scenarios=("Face2Face", "Overlay2Face", "MaskOnly2Face"))
    assert options.backends == ("dlib", "mobilefacenet") and options.backend == "dlib,mobilefacenet"
    fakes = _two_fakes(mask_run)
    result = run_fr(mask_run, save, options, run=RunSettings(progress=False), embedder=fakes)
    assert result.exit_code == 0
    rows = _rows_by_backend(save)
    assert len(rows) == 6  # 2 recognizers x 3 scenarios
    expect = {("dlib", "Face2Face"): (1.0, 0), ("dlib", "Overlay2Face"): (0.0, 8),
              ("dlib", "MaskOnly2Face"): (0.0, 8),
              ("mobilefacenet", "Face2Face"): (1.0, 0), ("mobilefacenet", "Overlay2Face"): (1.0, 0),
              # one vector for every mask: all 8 database photos tie, ties count against
              ("mobilefacenet", "MaskOnly2Face"): (0.0, 0)}
    for key, (rank1, no_face) in expect.items():
        assert float(rows[key]["rank1"]) == rank1, key
        assert int(rows[key]["n_no_face"]) == no_face, key
        assert int(rows[key]["n_queries"]) == 8 and int(rows[key]["gallery_size"]) == 8
    assert float(rows["mobilefacenet", "MaskOnly2Face"]["mean_rank"]) == 8.0
    # each recognizer's files in its own folder, today's names inside
    for backend in ("dlib", "mobilefacenet"):
        dist = np.load(save / backend / "distances" / "Overlay2Face.npz")
        assert dist["distances"].shape == (8, 8)
        assert (save / backend / "roc.csv").is_file() and (save / backend / "cmc.png").is_file()
    assert np.isnan(np.load(save / "dlib" / "distances" / "Overlay2Face.npz")["distances"]).all()
    assert not (save / "distances").exists() and not (save / "roc.csv").exists()
    # results.json and run.json name each recognizer with its description (mean/std)
    record = json.loads((save / "results.json").read_text(encoding="utf-8"))
    assert [b["name"] for b in record["backends"]] == ["dlib", "mobilefacenet"]
    assert record["backends"][1]["embedder"]["input_std"] == 1.0
    assert record["backends"][1]["outputs"] == "mobilefacenet"
    assert {(s["backend"], s["scenario"]) for s in record["scenarios"]} == set(expect)
    run = json.loads((save / "run.json").read_text(encoding="utf-8"))
    assert [b["name"] for b in run["backends"]] == ["dlib", "mobilefacenet"]
    assert run["backends"][0]["detection"]["overlay"]["n_found"] == 0
    assert run["backends"][1]["detection"]["overlay"]["n_found"] == 8  # overlays: queries only
    # one manifest row per image and recognizer, ids kept apart by the recognizer's name
    manifest = _manifest(save)
    assert len(manifest) == 2 * (16 + 8 + 8)  # photos both roles, overlay and mask queries
    assert manifest["dlib/overlay/query/s3/2"]["face_found"] == "0"
    assert manifest["mobilefacenet/overlay/query/s3/2"]["face_found"] == "1"
    # the summary: each scenario once, one column group per recognizer
    lines = result.summary.splitlines()
    assert "dlib" in lines[1] and "mobilefacenet" in lines[1]
    face = next(line for line in lines if line.startswith("Overlay2Face "))
    assert face.count("|") == 2 and face.index("0.0% [0.0%, 32.4%]") < face.index("100.0% [67.6%, 100.0%]")
    assert "faces found (mobilefacenet): prep 16/16, overlay 8/8" in result.summary
    # a re-run takes every embedding of both from the cache
    again = run_fr(mask_run, save, options, run=RunSettings(progress=False), embedder=fakes)
    assert again.counts == {"ok": 0, "failed": 0, "skipped": 64}
    assert _rows_by_backend(save) == rows


def test_outputs_this_run_did_not_write_are_removed(mask_run, tmp_path):
    """Two recognizers, then one (flat layout), then two with fewer scenarios: no folder of a
    recognizer or distances file of a scenario from an earlier run is left; a file the stage
    did not write stays, with its folder."""
    from faceaudit.core.runner import RunSettings
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    save, fakes, quiet = tmp_path / "FR", _two_fakes(mask_run), RunSettings(progress=False)

    def run(backend, scenarios):
        run_fr(mask_run, save, RecognitionOptions(backend=backend, n_boot=40, scenarios=scenarios),
               run=quiet, embedder=fakes)
        return sorted(str(p.relative_to(save)) for p in save.rglob("*")
                      if p.suffix in (".npz", ".png", ".csv", ".txt") and p.parent.name != "embeddings")

    three = ("Face2Face", "Overlay2Face", "MaskOnly2Face")
    run("dlib,mobilefacenet", three)
    (save / "dlib" / "notes.txt").write_text("the auditor's own file")
    flat = run("mobilefacenet", ("Face2Face",))
    assert flat == sorted(["cmc.png", "dlib/notes.txt", "distances/Face2Face.npz", "manifest.csv",
                           "results.csv", "roc.csv", "roc.png"])
    assert not (save / "mobilefacenet").exists() and not (save / "dlib" / "distances").exists()
    run("dlib,mobilefacenet", three)
    fewer = run("dlib,mobilefacenet", ("Face2Face", "MaskOnly2Face"))
    assert [f for f in fewer if "distances" in f] == [
        f"{b}/distances/{s}.npz" for b in ("dlib", "mobilefacenet")
        for s in ("Face2Face", "MaskOnly2Face")]
    assert not (save / "distances").exists() and not (save / "roc.csv").exists()
    assert (save / "dlib" / "notes.txt").is_file()
    assert {r["backend"] for r in _rows_by_backend(save).values()} == {"dlib", "mobilefacenet"}


def test_skipped_rows_are_decided_by_the_stage_fingerprint_not_the_cache(mask_run, tmp_path):
    """The embedding cache alone does not make a row 'skipped': with the manifest gone the
    cached embeddings serve rows that are ok (reused, said in the reason); a re-run with
    the manifest back is skipped; another model description is embedded anew (ok)."""
    from faceaudit.core.manifest import JOURNAL_NAME
    from faceaudit.core.runner import RunSettings
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    save, quiet = tmp_path / "FR", RunSettings(progress=False)
    options = RecognitionOptions(backend="mobilefacenet", n_boot=40, scenarios=("Face2Face",))
    fakes = _two_fakes(mask_run)
    first = run_fr(mask_run, save, options, run=quiet, embedder=fakes)
    assert first.counts == {"ok": 16, "failed": 0, "skipped": 0}
    (save / "manifest.csv").unlink()
    (save / JOURNAL_NAME).unlink(missing_ok=True)
    second = run_fr(mask_run, save, options, run=quiet, embedder=fakes)
    assert second.counts == {"ok": 16, "failed": 0, "skipped": 0}
    assert all(r["reason"].startswith("embedding reused from the cache")
               for r in _manifest(save).values())
    third = run_fr(mask_run, save, options, run=quiet, embedder=fakes)
    assert third.counts == {"ok": 0, "failed": 0, "skipped": 16}
    assert all(r["reason"] == "inputs and options unchanged" for r in _manifest(save).values())
    fakes["mobilefacenet"].describe = lambda: {"backend": "mobilefacenet", "model_files": {
        "mobilefacenet.onnx": "another digest"}}
    fourth = run_fr(mask_run, save, options, run=quiet, embedder=fakes)
    assert fourth.counts == {"ok": 16, "failed": 0, "skipped": 0}


def test_a_fake_embedder_does_not_outlive_its_run(mask_run, tmp_path):
    from faceaudit.mask.embedding_cache import _EMBEDDERS
    from faceaudit.mask.recognition import RecognitionOptions
    from faceaudit.mask.recognition import run_face_recognition as run_fr

    before = dict(_EMBEDDERS)
    run_fr(mask_run, tmp_path / "FR", RecognitionOptions(backend="mobilefacenet", n_boot=100,
                                                         scenarios=("Face2Face",)),
           embedder=_two_fakes(mask_run))
    assert _EMBEDDERS == before


def test_an_embedder_given_to_embed_images_serves_that_call_only(mask_run):
    from faceaudit.mask.embedding_cache import _EMBEDDERS, EmbedConfig, embed_images

    refs = read_mask_run(mask_run).refs("prep", "query", run="masks")
    config = EmbedConfig("mobilefacenet", model_dir="/nowhere")
    fake = _two_fakes(mask_run)["mobilefacenet"]
    records, info = embed_images(refs, config, cache_dir=None, jobs=2, progress=False,
                                 embedder=fake)
    assert info["embedder"]["fake"] and all(r.found for r in records.values())
    assert config not in _EMBEDDERS     # a later call builds the real one (or fails naming it)
    with pytest.raises(InputError, match="make models"):
        embed_images(refs, config, cache_dir=None, progress=False)


@pytest.mark.parametrize("value, message", [
    ("dlib,dlib", "expected --backend to name each recognizer once, found 'dlib' more than once"),
    ("dlib,facenet", "expected --backend to be one of .* found 'facenet' in 'dlib,facenet'"),
    ("dlib,", "found ''"),
])
def test_a_bad_backend_list_exits_2_before_any_work(mask_run, tmp_path, capsys, value, message):
    import re

    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                      "--backend", value, "--quiet"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not save.exists()


def test_a_missing_converted_model_exits_2_naming_make_models(mask_run, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setenv("FACEAUDIT_MODELS", str(tmp_path / "empty_cache"))
    save = tmp_path / "FR"
    code = run_face_recognition.main(["--masks_dir", str(mask_run), "--save_dir", str(save),
                                      "--backend", "dlib,mobilefacenet", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mobilefacenet.onnx" in err and "make models" in err and "empty_cache" in err
    assert not save.exists()  # nothing embedded, nothing written


def test_model_dir_goes_to_the_backends_that_read_it():
    from faceaudit.mask.recognition import RecognitionOptions

    opts = RecognitionOptions(backend="dlib,mobilefacenet", model_dir="/cache")
    assert opts.model_dir_for("dlib") is None and opts.model_dir_for("mobilefacenet") == "/cache"
    opts = RecognitionOptions(backend="arcface-onnx,mobilefacenet", model_dir="/w600k_r50.onnx")
    assert opts.model_dir_for("arcface-onnx") == "/w600k_r50.onnx"
    assert opts.model_dir_for("mobilefacenet") is None  # the model cache, not the ArcFace file


def test_the_demo_attacks_with_dlib_and_mobilefacenet_and_checks_the_model_first(tmp_path, capsys,
                                                                                 monkeypatch):
    from faceaudit.demo import run as demo

    steps = demo.demo_steps(tmp_path, jobs=1, n_patients=2, seed=0, n_folds=2, n_epochs=1,
                            overwrite=False, photos=ORL)
    argv = steps[-1].argv
    assert argv[argv.index("--backend") + 1] == "dlib,mobilefacenet"
    monkeypatch.setenv("FACEAUDIT_MODELS", str(tmp_path / "empty_cache"))
    assert demo.main([str(tmp_path / "out")]) == 2   # run_demo raises InputError; main: exit 2
    assert "make models" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cohort").exists()  # stopped before the first stage
