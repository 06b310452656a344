"""The report is built from stage outputs; its tables must hold their numbers."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from faceaudit.core.figures import montage
from faceaudit.core.files import write_json, write_png
from faceaudit.core.manifest import ItemResult, Manifest
from faceaudit.report.build import find_stage_dirs, main, write_report


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def fixture_run(tmp_path):
    """A small run folder with one output of every stage, numbers chosen by hand."""
    run = tmp_path / "run"
    recon = run / "reconstruction"
    for sub in ("cts", "pets"):
        write_png(recon / sub / "PETCT_a_1.png", np.full((8, 8), 100, np.uint8))
    m = Manifest(recon / "manifest.csv")
    m.add(ItemResult("PETCT_a_1", "PETCT_a"))
    m.add(ItemResult("PETCT_b_1", "PETCT_b", status="failed", reason="EOFError: truncated gzip"))
    m.write()
    write_png(recon / "qa_montage.png", montage([np.zeros((16, 16), np.uint8)] * 2))
    write_json(recon / "run.json", {"stage": "reconstruction", "seed": 3, "seconds": 4.5,
                                    "versions": {"numpy": "2.4.6"}, "python": "3.11.7"})
    cv = run / "crossval"
    write_json(cv / "splits.json", {"folds": []})
    _write_csv(cv / "metrics.csv", [{"fold": 0, "id": "PETCT_a_1", "msssim_before": 0.4123,
                                     "msssim_after": 0.7341}])
    _write_csv(run / "landmarks" / "detection.csv",
               [{"variant": "ct", "mean": 0.955, "std": 0.013}, {"variant": "pet_unet", "mean": 0.625, "std": 0.03}])
    _write_csv(run / "landmarks" / "placement.csv",
               [{"variant": "pet_unet", "median_mad_mean": 13.9, "well_placed_mean": 0.467,
                 "well_placed_std": 0.276}])
    _write_csv(run / "matching" / "topk.csv",
               [{"align": "none", "k": 1, "mean": 0.413, "std": 0.055, "gallery_size": 4, "chance": 0.25},
                {"align": "none", "k": 5, "mean": 0.9, "std": 0.1, "gallery_size": 4, "chance": 1.0},
                {"align": "similarity", "k": 1, "mean": 0.288, "std": 0.02, "gallery_size": 4, "chance": 0.25},
                {"align": "similarity", "k": 5, "mean": 0.7, "std": 0.2, "gallery_size": 4, "chance": 1.0}])
    _write_csv(run / "digital_mask" / "selection.csv",
               [{"identity": "s1", "name": "1", "status": "accepted", "reason": ""},
                {"identity": "s1", "name": "2", "status": "rejected", "reason": "yaw 31.2 (|yaw| >= 20)"},
                {"identity": "s2", "name": "1", "status": "rejected", "reason": "yaw -25.0 (|yaw| >= 20)"},
                {"identity": "s2", "name": "2", "status": "rejected", "reason": "pitch 22.0 (|pitch| >= 20)"}])
    _write_csv(run / "face_recognition" / "results.csv",
               [{"scenario": "MaskOnly2MaskOnly", "protocol": "same-video", "rank1": 0.35, "rank1_ci_lo": 0.2,
                 "rank1_ci_hi": 0.5, "rank5": 0.65, "rank10": 0.725, "gallery_size": 40, "chance": 0.025,
                 "n_no_face": 1}])
    write_json(run / "timings.json", {"first_run": {"reconstruction": 12.5, "face recognition (dlib)": 7.0},
                                      "last_run": {"reconstruction": 0.5, "face recognition (dlib)": 1.0}})
    return run


def test_every_stage_is_found_by_its_files(fixture_run):
    stages = find_stage_dirs(fixture_run)
    assert {k: [p.name for p in v] for k, v in stages.items()} == {
        "reconstruction": ["reconstruction"], "crossval": ["crossval"], "placement": ["landmarks"],
        "matching": ["matching"], "digital_mask": ["digital_mask"], "recognition": ["face_recognition"]}


def test_tables_hold_the_stage_numbers(fixture_run):
    html_path, md_path = write_report(fixture_run)
    text = html_path.read_text(encoding="utf-8")
    assert "0.412" in text and "0.734" in text  # denoising metrics
    assert "EOFError: truncated gzip" in text  # failed items are listed with their reason
    assert "<td>rejected: yaw</td><td>2</td><td>50.0</td>" in text
    assert "<td>rejected: pitch</td><td>1</td><td>25.0</td>" in text
    assert "seed 3" in text and "numpy 2.4.6" in text
    assert "<tr><th>total</th><th>19.5</th><th>1.5</th></tr>" in text  # first and latest run
    md = md_path.read_text(encoding="utf-8")
    # our numbers, as percentages, beside the papers' (labelled as theirs)
    assert "| ct | 95.5 ± 1.3 | 88.0 ± 1.6 |  |  |  |" in md
    assert "| pet_unet | 62.5 ± 3.0 | 81.6 ± 3.1 | 46.7 ± 27.6 | 59.5 ± 3.5 | 13.9 |" in md
    assert "| none (ours) | 41.3 ± 5.5 | 90.0 ± 10.0 | 4 | 25.0 |" in md
    assert "| similarity (ours) | 28.8 ± 2.0 | 70.0 ± 20.0 | 4 | 25.0 |" in md
    assert "| none (paper) | 78.5 ± 5.3 | 92.5 ± 2.7 |" in md
    # scenario, protocol, gallery, chance, then the recognizer's group, then the paper
    assert ("| MaskOnly2MaskOnly | same-video | 40 | 2.5 | 35.0 [20.0, 50.0] | 65.0 | 72.5 | 1 | 52 |"
            in md)
    # results.csv without rank_ci_method (an older run): the interval is not called Wilson
    assert "rank-1 % [95 % CI]" in md and "bootstrap" not in md
    assert "not our data" in md
    assert oct(html_path.stat().st_mode & 0o777) == "0o600"


def test_cli_on_a_folder_without_stage_outputs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no stage outputs found below" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"error: expected a run folder at {tmp_path / 'absent'}, found nothing\n"


def test_rejections_are_grouped_by_their_rule_not_their_first_word(tmp_path):
    reasons = ["no face (no detection with confidence >= 0.1)", "no face (none)",
               "no landmarks (MediaPipe face mesh found no face on the crop)",
               "face too small (31 px box side in the photo < 40)", "low confidence (0.512 <= 0.9)",
               "more than one face (another at 0.400 >= 0.1)", "unreadable: cannot read image x.jpg"]
    _write_csv(tmp_path / "run" / "digital_mask" / "selection.csv",
               [{"identity": "s1", "name": str(k), "status": "rejected", "reason": r} for k, r in enumerate(reasons)]
               + [{"identity": "s1", "name": "ok", "status": "accepted", "reason": ""}])
    md = write_report(tmp_path / "run")[1].read_text(encoding="utf-8")
    for rule, n in (("no face", 2), ("no landmarks", 1), ("face too small", 1), ("low confidence", 1),
                    ("more than one face", 1), ("unreadable", 1)):
        assert f"| rejected: {rule} | {n} |" in md, rule
    assert "| accepted | 1 | 12.5 |" in md and "rejected: no |" not in md


def test_a_report_that_cannot_be_written_is_exit_2_with_one_line(fixture_run, monkeypatch, capsys):
    import errno

    from faceaudit.report import build

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(build, "atomic_write_text", read_only)
    assert main([str(fixture_run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write to {fixture_run / 'report.html'}: [Errno 30 EROFS] "
                   "Read-only file system\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a read-only file system needs root and unshare")
def test_a_read_only_run_folder_is_exit_2_with_one_line(fixture_run, tmp_path):
    """The run folder on a real read-only file system (tmpfs remounted ro, private namespace)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs tmpfs {mnt} && cp -r {fixture_run} {mnt}/run && mount -o remount,ro {mnt} && "
              f"exec {sys.executable} -m faceaudit.report {mnt}/run")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: cannot write to {mnt}/run") and "[Errno 30 EROFS]" in proc.stderr


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--allow-file-access-from-files"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_images_load_in_headless_chromium(fixture_run):
    html_path, _ = write_report(fixture_run)
    browser = _browser()
    try:
        browser.get(html_path.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), "
            "i.complete && i.naturalWidth > 0])")
    finally:
        browser.quit()
    assert images, "the report shows no figure"
    assert [src for src, ok in images if not ok] == []
    assert any(src.endswith("qa_montage.png") for src, _ in images)


# ---------------------------------------------------------------- several recognizers, attacks, counts


def _recognition_run(folder, backends=("dlib", "mobilefacenet")):
    """A face-recognition folder as run_face_recognition writes it with several recognizers."""
    numbers = {  # (backend, scenario): rank1, lo, hi, rank5, rank10, no face, TAR 1 %, TAR 0.1 %
        ("dlib", "Face2Face"): (1.0, 0.912, 1.0, 1.0, 1.0, 0, 1.0, 0.975),
        ("dlib", "MaskOnly2MaskOnly"): (0.1, 0.04, 0.231, 0.3, 0.45, 3, 0.05, 0.01),
        ("mobilefacenet", "Face2Face"): (0.975, 0.871, 0.996, 1.0, 1.0, 0, 0.95, 0.9),
        ("mobilefacenet", "MaskOnly2MaskOnly"): (0.25, 0.142, 0.402, 0.5, 0.6, 0, 0.123, 0.026),
    }
    rows = []
    for (backend, scenario), (r1, lo, hi, r5, r10, nf, t1, t01) in numbers.items():
        if backend in backends:
            rows.append({"scenario": scenario, "protocol": "same-video", "rank1": r1,
                         "rank1_ci_lo": lo, "rank1_ci_hi": hi, "rank5": r5, "rank10": r10,
                         "mean_rank": 2.0, "n_queries": 40, "gallery_size": 40, "chance": 0.025,
                         "n_no_face": nf, "backend": backend, "rank_ci_method": "wilson score 95%",
                         "tar_at_far_1pct": t1, "tar_at_far_0.1pct": t01, "n_genuine_pairs": 40,
                         "n_impostor_pairs": 1560, "open_set_note": ""})
    _write_csv(folder / "results.csv", rows)
    several = len(backends) > 1
    write_json(folder / "results.json", {"backends": [
        {"name": b, "outputs": b if several else "."} for b in backends]})
    for b in backends:
        where = folder / b if several else folder
        _write_csv(where / "roc.csv", [
            {"scenario": s, "far": far, "tar": tar, "threshold": t}
            for s in ("Face2Face", "MaskOnly2MaskOnly")
            for far, tar, t in ((0.0, 0.0, 0.1), (0.01, 0.5, 0.3), (1.0, 1.0, 0.9))])
        write_png(where / "cmc.png", np.full((8, 8), 200, np.uint8))
    manifest = [{"id": f"{b}/prep/query/s{i}/2", "subject": f"s{i}", "status": "ok" if i > 2 else "skipped",
                 "reason": "", "backend": b} for b in backends for i in range(1, 11)]
    _write_csv(folder / "manifest.csv", manifest)


def test_recognizers_side_by_side_with_wilson_intervals_open_set_and_roc(tmp_path):
    run = tmp_path / "run"
    _recognition_run(run / "face_recognition")
    html_path, md_path = write_report(run)
    md = md_path.read_text(encoding="utf-8")
    assert ("| scenario | protocol | gallery | chance % | rank-1 % [Wilson 95 % CI], dlib | rank-5 %, dlib "
            "| rank-10 %, dlib | no face found, dlib | rank-1 % [Wilson 95 % CI], mobilefacenet |") in md
    assert ("| Face2Face | same-video | 40 | 2.5 | 100.0 [91.2, 100.0] | 100.0 | 100.0 | 0 "
            "| 97.5 [87.1, 99.6] | 100.0 | 100.0 | 0 |  |") in md
    assert ("| MaskOnly2MaskOnly | same-video | 40 | 2.5 | 10.0 [4.0, 23.1] | 30.0 | 45.0 | 3 "
            "| 25.0 [14.2, 40.2] | 50.0 | 60.0 | 0 | 52 |") in md
    # open set: TAR at FAR 1 % and 0.1 % per recognizer, with the pair counts
    assert "| scenario | TAR % at FAR 1 %, dlib | TAR % at FAR 0.1 %, dlib | TAR % at FAR 1 %, mobilefacenet" in md
    assert "| MaskOnly2MaskOnly | 5.0 | 1.0 | 12.3 | 2.6 | 40 | 1560 |" in md
    # the ROC drawn from both roc.csv files, and each recognizer's CMC
    assert (run / "report_figures" / "roc_face_recognition.png").stat().st_size > 1000
    assert "](report_figures/roc_face_recognition.png)" in md
    assert "](face_recognition/dlib/cmc.png)" in md and "](face_recognition/mobilefacenet/cmc.png)" in md
    # the manifest counts say what they count: images per recognizer
    assert ("10 images embedded by dlib: 8 ok, 2 skipped; 10 images embedded by mobilefacenet: "
            "8 ok, 2 skipped") in md
    assert "Recognizers: dlib, mobilefacenet" in md
    assert "<th>rank-1 % [Wilson 95 % CI], mobilefacenet</th>" in html_path.read_text(encoding="utf-8")


def test_one_recognizer_keeps_one_column_group_and_its_files_in_the_folder(tmp_path):
    run = tmp_path / "run"
    _recognition_run(run / "fr", backends=("mobilefacenet",))
    md = write_report(run)[1].read_text(encoding="utf-8")
    assert "| scenario | protocol | gallery | chance % | rank-1 % [Wilson 95 % CI] | rank-5 % |" in md
    assert "| Face2Face | same-video | 40 | 2.5 | 97.5 [87.1, 99.6] | 100.0 | 100.0 | 0 |  |" in md
    assert "](report_figures/roc_fr.png)" in md and "](fr/cmc.png)" in md
    assert "10 images: 8 ok, 2 skipped" in md


def test_matching_shows_each_attack_with_chance_when_topk_has_an_attack_column(tmp_path):
    run = tmp_path / "run"
    rows = []
    for attack, key, probe, top1, top5, det in (
            ("landmarks-none", "none", "pet_unet", 0.413, 0.9, 0.8),
            ("landmarks-similarity", "similarity", "pet_unet", 0.288, 0.7, 0.8),
            ("embedding-mobilefacenet", "embedding-mobilefacenet_pet_unet", "pet_unet", 0.6, 0.95, 0.9)):
        for k, mean, chance in ((1, top1, 0.25), (3, 0.5, 0.75), (5, top5, 1.0)):
            rows.append({"attack": attack, "probe": probe, "align": key, "k": k, "mean": mean,
                         "std": 0.05, "gallery_size": 4, "chance": chance,
                         "probe_detection_rate": det})
    _write_csv(run / "matching" / "topk.csv", rows)
    _write_csv(run / "matching" / "manifest.csv",
               [{"id": f"fold{k}", "subject": "", "status": "failed" if k == 4 else "ok",
                 "reason": "no landmarks" if k == 4 else ""} for k in range(5)])
    md = write_report(run)[1].read_text(encoding="utf-8")
    assert ("| attack | probe | top-1 % | chance top-1 % | top-5 % | chance top-5 % | gallery "
            "| probes with features % |") in md
    assert "| landmarks-none | pet_unet | 41.3 ± 5.0 | 25.0 | 90.0 ± 5.0 | 100.0 | 4 | 80.0 |" in md
    assert ("| embedding-mobilefacenet | pet_unet | 60.0 ± 5.0 | 25.0 | 95.0 ± 5.0 | 100.0 | 4 | 90.0 |"
            in md)
    assert "| landmarks-none (paper) | pet | 78.5 ± 5.3 | ~0.9 | 92.5 ± 2.7 |  |" in md
    assert "- 5 folds: 1 failed, 4 ok" in md  # the matching manifest holds one row per fold


def test_crossval_counts_folds_and_studies_apart(tmp_path):
    run = tmp_path / "run"
    cv = run / "crossval"
    write_json(cv / "splits.json", {"folds": []})
    _write_csv(cv / "metrics.csv", [{"fold": 0, "id": "PETCT_a_1", "msssim_before": 0.4}])
    _write_csv(cv / "manifest.csv",
               [{"id": f"fold{k}", "subject": "", "status": "ok", "reason": ""} for k in range(3)]
               + [{"id": f"PETCT_{s}_1", "subject": f"PETCT_{s}", "status": st, "reason": ""}
                  for s, st in (("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "skipped"))])
    md = write_report(run)[1].read_text(encoding="utf-8")
    assert "- 3 folds: 3 ok; 4 studies: 3 ok, 1 skipped" in md


def _cohort(folder, readme):
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(readme)
    (folder / "SIMULATED.txt").write_text(readme)


def test_the_report_says_the_cohort_is_simulated_from_real_face_shapes(fixture_run):
    _cohort(fixture_run / "cohort", "# SIMULATED PET/CT cohort\n\nThe faces are simulated from 40 real "
                                    "face shapes: the MediaPipe face meshes of the 40\npeople of ORL.\n")
    html_path, md_path = write_report(fixture_run)
    md = md_path.read_text(encoding="utf-8")
    assert "The PET/CT cohort of this run is SIMULATED (cohort): no patient data" in md
    assert "Its faces are simulated from 40 real face shapes, as the cohort's README.md says." in md
    assert "<b>SIMULATED</b>" in html_path.read_text(encoding="utf-8")


def test_a_cohort_outside_the_run_folder_is_found_through_the_reconstruction(fixture_run, tmp_path):
    md = write_report(fixture_run)[1].read_text(encoding="utf-8")
    assert "SIMULATED" not in md  # nothing says so: no notice
    _cohort(tmp_path / "elsewhere", "Every volume here is SIMULATED (one head CT, deformed).\n")
    write_json(fixture_run / "reconstruction" / "run.json",
               {"stage": "reconstruction", "args": {"petct_path": str(tmp_path / "elsewhere")}})
    md = write_report(fixture_run)[1].read_text(encoding="utf-8")
    assert f"The PET/CT cohort of this run is SIMULATED ({tmp_path / 'elsewhere'})" in md
    assert "real face shapes" not in md  # its README does not say so


def test_matching_shows_the_pooled_wilson_interval_and_the_gallery_growth(tmp_path):
    run = tmp_path / "run"
    rows = []
    for k, hits, lo, hi in ((1, 6, 0.106, 0.408), (5, 20, 0.553, 0.871)):
        rows.append({"attack": "landmarks-none", "probe": "pet_unet", "align": "none", "k": k, "mean": hits / 27,
                     "std": 0.05, "pooled_hits": hits, "pooled_n": 27, "pooled_topk": hits / 27, "ci_lo": lo,
                     "ci_hi": hi, "gallery_size": 25, "chance": k / 25, "probe_detection_rate": 1.0})
    _write_csv(run / "matching" / "topk.csv", rows)
    _write_csv(run / "matching" / "gallery_growth.csv",
               [{"attack": "landmarks-none", "probe": "pet_unet", "align": "none", "gallery": g, "gallery_size": s,
                 "n_probes": 27, "n_draws": 50, "top1": t1, "chance_top1": 1 / s, "top5": t5, "chance_top5": 5 / s}
                for g, s, t1, t5 in (("10", 10, 0.5, 0.9), ("20", 20, 0.3, 0.8), ("full", 25, 0.222, 0.741))])
    md = write_report(run)[1].read_text(encoding="utf-8")
    assert ("| attack | probe | top-1 % | top-1 % pooled [Wilson 95 % CI] | chance top-1 % | top-5 % "
            "| top-5 % pooled [Wilson 95 % CI] | chance top-5 % | gallery | probes with features % |") in md
    assert "| landmarks-none | pet_unet | 22.2 ± 5.0 | 22.2 [10.6, 40.8] | 4.0 | 74.1 ± 5.0 | 74.1 [55.3, 87.1] |" in md
    assert "How identification falls as the gallery grows" in md
    assert "| landmarks-none | pet_unet | 10 | 50.0 | 10.0 | 90.0 | 50.0 |" in md
    assert "| landmarks-none | pet_unet | 25 (full) | 22.2 | 4.0 | 74.1 | 20.0 |" in md
    assert "is SIMULATED: these numbers" not in md  # no simulated cohort found: not claimed
    _cohort(run / "cohort", "# SIMULATED PET/CT cohort\n")
    md = write_report(run)[1].read_text(encoding="utf-8")
    assert "This run's PET/CT cohort is SIMULATED: these numbers show the method on simulated patients" in md
