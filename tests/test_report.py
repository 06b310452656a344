"""The report is built from stage outputs; its tables must hold their numbers."""

import csv
import shutil

import numpy as np
import pytest

from faceaudit.core.figures import montage
from faceaudit.report.build import find_stage_dirs, main, write_report
from faceaudit.core.files import write_json, write_png
from faceaudit.core.manifest import ItemResult, Manifest


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
    text = html_path.read_text()
    assert "0.412" in text and "0.734" in text  # denoising metrics
    assert "EOFError: truncated gzip" in text  # failed items are listed with their reason
    assert "<td>rejected: yaw</td><td>2</td><td>50.0</td>" in text
    assert "<td>rejected: pitch</td><td>1</td><td>25.0</td>" in text
    assert "seed 3" in text and "numpy 2.4.6" in text
    assert "<tr><th>total</th><th>19.5</th><th>1.5</th></tr>" in text  # first and latest run
    md = md_path.read_text()
    # our numbers, as percentages, beside the papers' (labelled as theirs)
    assert "| ct | 95.5 ± 1.3 | 88.0 ± 1.6 |  |  |  |" in md
    assert "| pet_unet | 62.5 ± 3.0 | 81.6 ± 3.1 | 46.7 ± 27.6 | 59.5 ± 3.5 | 13.9 |" in md
    assert "| none (ours) | 41.3 ± 5.5 | 90.0 ± 10.0 | 4 | 25.0 |" in md
    assert "| similarity (ours) | 28.8 ± 2.0 | 70.0 ± 20.0 | 4 | 25.0 |" in md
    assert "| none (paper) | 78.5 ± 5.3 | 92.5 ± 2.7 |" in md
    assert ("| MaskOnly2MaskOnly | same-video | 35.0 [20.0, 50.0] | 65.0 | 72.5 | 40 | 2.5 | 1 | 52 |"
            in md)
    assert "not our data" in md
    assert oct(html_path.stat().st_mode & 0o777) == "0o600"


def test_cli_on_a_folder_without_stage_outputs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no stage outputs found below" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2


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
