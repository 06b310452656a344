"""The demo chains the six stage scripts exactly as ``make demo`` does; a tiny run proves the
wiring (arguments, folder contracts, report) end to end."""

import json
import shutil

import pytest

from faceaudit.demo.run import PACKAGE_DATA, run_demo


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_then_skips_on_rerun(tmp_path):
    photos = tmp_path / "photos"
    for identity in ("s1", "s2", "s3", "s4", "s5", "s6"):
        shutil.copytree(PACKAGE_DATA / "orl_faces" / identity, photos / identity)
    out = tmp_path / "demo"

    assert run_demo(out, jobs=1, n_patients=4, n_folds=2, n_epochs=1, photos=photos) == 0

    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert len(timings["first_run"]) == 8 and all(s > 0 for s in timings["first_run"].values())
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Landmarks detected and well placed", "PET-to-CT identification, top-k",
                    "Face recognition: rank-1", "Digital mask", "PET-to-CT denoiser"):
        assert heading in report, heading
    assert "| Face2Face | same-video |" in report
    assert (out / "crossval" / "denoised" / "fold1").is_dir()

    assert run_demo(out, jobs=1, n_patients=4, n_folds=2, n_epochs=1, photos=photos) == 0
    rerun = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert rerun["first_run"] == timings["first_run"]
    assert rerun["last_run"]["simulate PET/CT cohort"] == 0.0  # the cohort is not simulated again
    assert sum(rerun["last_run"].values()) < sum(timings["first_run"].values())


def test_demo_names_missing_scripts(tmp_path, monkeypatch, capsys):
    from faceaudit.demo import run as demo

    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path)
    assert demo.run_demo(tmp_path / "out") == 2
    assert "perform_morphological_reconstruction.py" in capsys.readouterr().err
