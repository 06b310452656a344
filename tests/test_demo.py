"""The demo chains the six stage scripts exactly as ``make demo`` does; a tiny run proves the
wiring (arguments, folder contracts, report) end to end."""

import json
import shutil

import pytest

from conftest import ORL
from faceaudit.demo import run as demo
from faceaudit.demo.run import run_demo


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_then_skips_on_rerun(tmp_path):
    photos = tmp_path / "photos"
    for identity in ("s1", "s2", "s3", "s4", "s5", "s6"):
        shutil.copytree(ORL / identity, photos / identity)
    out = tmp_path / "demo"

    assert run_demo(out, jobs=1, n_patients=4, n_folds=2, n_epochs=1, photos=photos).exit_code == 0

    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert len(timings["first_run"]) == 8 and all(s > 0 for s in timings["first_run"].values())
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Landmarks detected and well placed", "PET-to-CT identification, top-k",
                    "Face recognition: rank-1", "Digital mask", "PET-to-CT denoiser"):
        assert heading in report, heading
    assert "| Face2Face | same-video |" in report
    assert (out / "crossval" / "denoised" / "fold1").is_dir()

    assert run_demo(out, jobs=1, n_patients=4, n_folds=2, n_epochs=1, photos=photos).exit_code == 0
    rerun = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert rerun["first_run"] == timings["first_run"]
    assert rerun["last_run"]["simulate PET/CT cohort"] == 0.0  # the cohort is not simulated again
    assert sum(rerun["last_run"].values()) < sum(timings["first_run"].values())


def test_demo_names_missing_scripts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path)
    assert demo.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the demo runs the stage scripts") and len(err.splitlines()) == 1
    assert "perform_morphological_reconstruction.py" in err


@pytest.fixture
def fake_steps(monkeypatch):
    """Stage commands that only record their argv (exit 0); no model check."""
    commands = []

    def call(argv, cwd=None):
        commands.append(argv)
        return 0

    monkeypatch.setattr(demo.subprocess, "call", call)
    monkeypatch.setattr(demo, "_missing_model", lambda: "")
    return commands


def _cohort(folder, *, seed, n):
    (folder / "PETCT_0123456789").mkdir(parents=True, exist_ok=True)
    (folder / "cohort.json").write_text(json.dumps({"simulated": True, "seed": seed, "n_patients": n}))
    (folder / "SIMULATED.txt").write_text("SIMULATED")


def _write_selection(out):
    (out / "digital_mask").mkdir(parents=True, exist_ok=True)
    (out / "digital_mask" / "selection.csv").write_text("identity,name,status,reason\ns1,1,accepted,\n")


def test_a_cohort_of_other_settings_is_simulated_again(tmp_path, fake_steps):
    out = tmp_path / "demo"
    _cohort(out / "cohort", seed=0, n=4)
    _write_selection(out)
    assert demo.run_demo(out, n_patients=4, seed=0).exit_code == 0
    assert not any("faceaudit.demo.cohort" in argv for argv in fake_steps)   # same seed and n: kept
    assert (out / "cohort" / "PETCT_0123456789").is_dir()
    for seed, n in ((1, 4), (0, 6)):
        fake_steps.clear()
        _cohort(out / "cohort", seed=0, n=4)
        demo.run_demo(out, n_patients=n, seed=seed)
        cohort_argv = [argv for argv in fake_steps if "faceaudit.demo.cohort" in argv]
        assert cohort_argv and cohort_argv[0][-4:] == ["--n", str(n), "--seed", str(seed)]
        assert not (out / "cohort").exists()    # the old patients went before the new cohort


def test_a_folder_that_is_not_a_cohort_is_not_removed(tmp_path, fake_steps, capsys):
    out = tmp_path / "demo"
    (out / "cohort").mkdir(parents=True)
    (out / "cohort" / "my_notes.txt").write_text("mine")
    assert demo.main([str(out)]) == 2
    assert "found ['my_notes.txt']" in capsys.readouterr().err
    assert (out / "cohort" / "my_notes.txt").is_file()


def test_the_demo_returns_its_summary_and_main_prints_it(tmp_path, fake_steps, capsys):
    out = tmp_path / "demo"
    _write_selection(out)
    result = demo.run_demo(out)
    assert capsys.readouterr().out == ""          # the library prints nothing
    assert result.exit_code == 0 and f"Report: {out / 'report.html'}" in result.summary
    assert "time per stage (s)" in result.summary
    assert demo.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== simulate PET/CT cohort" in printed and f"Report: {out / 'report.html'}" in printed


def test_a_report_without_stage_outputs_is_exit_2_with_one_line(tmp_path, fake_steps, capsys):
    assert demo.main([str(tmp_path / "demo")]) == 2   # the fake steps wrote nothing
    err = capsys.readouterr().err
    assert err.startswith("error: no stage outputs found below") and "Traceback" not in err


def test_a_step_that_fails_outright_stops_the_demo_with_its_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.subprocess, "call", lambda argv, cwd=None: 3)
    monkeypatch.setattr(demo, "_missing_model", lambda: "")
    assert demo.main([str(tmp_path / "demo")]) == 3
    assert "error: step 'simulate PET/CT cohort' failed (exit 3)" in capsys.readouterr().err
