"""The report is built from stage outputs; its tables must hold their numbers."""

import csv
import json
import shutil

import numpy as np
import pytest

from faceaudit.montage import montage
from faceaudit.report import find_stage_dirs, main, write_report
from faceaudit.stageio import ItemResult, Manifest, write_json, write_png


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
               [{"variant": "ct", "mean": 95.5, "std": 1.25}, {"variant": "pet", "mean": 12.5, "std": 3.0}])
    _write_csv(run / "matching" / "topk.csv",
               [{"align": "similarity", "k": 1, "mean": 41.3, "std": 5.5, "gallery_size": 4, "chance": 25}])
    _write_csv(run / "digital_mask" / "selection.csv",
               [{"id": "s1/1", "decision": "accepted", "reason": ""},
                {"id": "s1/2", "decision": "rejected", "reason": "yaw: 31.2 >= 20"},
                {"id": "s2/1", "decision": "rejected", "reason": "yaw: 25.0 >= 20"}])
    _write_csv(run / "face_recognition" / "results.csv",
               [{"scenario": "Face2Face", "rank1": 0.975, "rank1_ci_lo": 0.9, "rank1_ci_hi": 1.0,
                 "gallery_size": 40, "chance": 0.025}])
    write_json(run / "timings.json", {"stages": {"reconstruction": 12.5, "face recognition (dlib)": 7.0}})
    return run


def test_every_stage_is_found_by_its_files(fixture_run):
    stages = find_stage_dirs(fixture_run)
    assert {k: [p.name for p in v] for k, v in stages.items()} == {
        "reconstruction": ["reconstruction"], "crossval": ["crossval"], "placement": ["landmarks"],
        "matching": ["matching"], "digital_mask": ["digital_mask"], "recognition": ["face_recognition"]}


def test_tables_hold_the_stage_numbers(fixture_run):
    html_path, md_path = write_report(fixture_run)
    text = html_path.read_text()
    for number in ("0.412", "0.734", "95.5", "12.5", "41.3", "0.975", "12.5", "19.5"):
        assert number in text, number
    assert "EOFError: truncated gzip" in text  # failed items are listed with their reason
    assert "<td>rejected: yaw</td><td>2</td>" in text
    assert "88.0 ± 1.6" in text and "78.5 ± 5.3" in text  # the papers' numbers, labelled
    assert "The paper&#x27;s data, not ours" in text
    assert "seed 3" in text and "numpy 2.4.6" in text
    md = md_path.read_text()
    assert "| Face2Face | 0.975 | 0.9 | 1 | 40 | 0.025 |" in md
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
