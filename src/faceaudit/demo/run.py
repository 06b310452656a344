"""The whole suite on the embedded demo data, then one report.

``python -m faceaudit.demo OUT`` (what ``make demo`` runs):

1. simulate an AutoPET-like PET/CT cohort from the shipped head CT (labelled simulated);
2. the four PET/CT stage scripts, with demo-sized settings;
3. the two digital-mask stage scripts on the shipped ORL faces (two mask backends,
   so the cross-mask attack runs too), attacked by two recognizers (dlib and
   mobilefacenet; the latter from the model cache `make models` fills);
4. ``OUT/report.html`` and ``OUT/report.md``.

Each stage runs as its own script from the repository root, exactly as a user
would run it, and skips work already finished, so a re-run is quick. Time per
stage goes to ``OUT/timings.json`` and into the report.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faceaudit.core.cli import run_guarded
from faceaudit.core.files import InputError, make_private_dir, read_json_file, write_json
from faceaudit.core.runner import EXIT_ITEMS_FAILED, EXIT_OK, StageResult
from faceaudit.faces.orl import orl_root

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
#: The recognizers attacking the masks: dlib (bundled) and mobilefacenet (`make models`).
RECOGNIZERS = ("dlib", "mobilefacenet")
COHORT_STEP = "simulate PET/CT cohort"
#: What ``python -m faceaudit.demo.cohort`` writes beside the PETCT_* patient folders.
COHORT_FILES = frozenset({"README.md", "SIMULATED.txt", "cohort.json"})
STAGE_SCRIPTS = ("perform_morphological_reconstruction.py", "perform_crossval.py",
                 "perform_landmark_placement.py", "perform_landmark_matching.py",
                 "run_digital_mask.py", "run_face_recognition.py")


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    is_done: Callable[[], bool] | None = None  # a step that is done already is not run again
    prepare: Callable[[], None] | None = None  # run before the step's command


def cohort_is_current(cohort: Path, *, n_patients: int, seed: int) -> bool:
    """True when ``cohort`` holds a finished simulated cohort (SIMULATED.txt, written last)
    made with this ``n_patients`` and ``seed`` (as its cohort.json records them)."""
    if not (cohort / "SIMULATED.txt").is_file():
        return False
    try:
        record = read_json_file(cohort / "cohort.json")
    except InputError:
        return False
    return record.get("n_patients") == n_patients and record.get("seed") == seed


def remove_stale_cohort(cohort: Path) -> None:
    """Delete a simulated cohort of other settings before a new one is written: its patients
    (other names under another seed, more of them under a larger n) would otherwise stay
    beside the new ones and enter every later stage. A folder holding anything the cohort
    writer does not write is left alone (InputError)."""
    if not cohort.is_dir():
        return
    foreign = sorted(p.name for p in cohort.iterdir()
                     if p.name not in COHORT_FILES and not p.name.startswith(("PETCT_", ".")))
    if foreign:
        raise InputError(f"expected {cohort} to hold only a simulated cohort (PETCT_* folders, "
                         f"{', '.join(sorted(COHORT_FILES))}), found {foreign[:3]}; choose another output folder")
    shutil.rmtree(cohort)


def demo_steps(out: Path, *, jobs: int, n_patients: int, seed: int, n_folds: int,
               n_epochs: int, overwrite: bool, photos: Path) -> list[Step]:
    py = sys.executable
    again = ["--overwrite"] if overwrite else []
    common = ["--seed", str(seed)] + again
    recon, cv, lm, mt = out / "reconstruction", out / "crossval", out / "landmarks", out / "matching"
    dm, dm2, fr = out / "digital_mask", out / "digital_mask_meanshape", out / "face_recognition"
    cohort = out / "cohort"

    def script(name: str) -> str:
        return str(REPO_ROOT / name)

    return [
        Step(COHORT_STEP,
             [py, "-m", "faceaudit.demo.cohort", str(cohort), "--n", str(n_patients), "--seed", str(seed)],
             is_done=None if overwrite else functools.partial(cohort_is_current, cohort,
                                                              n_patients=n_patients, seed=seed),
             prepare=functools.partial(remove_stale_cohort, cohort)),
        Step("reconstruction",
             [py, script("perform_morphological_reconstruction.py"), "--petct_path", str(cohort),
              "--save_dir", str(recon), "--jobs", str(jobs)] + again),
        Step("cross-validation (U-Net)",
             [py, script("perform_crossval.py"), "--ct_files", str(recon / "cts"),
              "--pet_files", str(recon / "pets"), "--save_perfs_dir", str(cv),
              "--n_folds", str(n_folds), "--n_epochs", str(n_epochs), "--batch_size", "8",
              "--lr", "1e-3", "--device", "cpu", "--threads", "1"] + common),
        Step("landmark placement",
             [py, script("perform_landmark_placement.py"), "--ct_files", str(recon / "cts"),
              "--pet_files", str(recon / "pets"), "--splits_file", str(cv / "splits.json"),
              "--models_path", str(cv / "models"), "--denoised_dir", str(cv / "denoised"),
              "--save_dir", str(lm)] + again),
        Step("landmark matching",
             # a demo fold holds ~5 patients: the other folds' CTs join every gallery (distractors);
             # the recognizers attack the same PET and U-Net renders against the same gallery
             [py, script("perform_landmark_matching.py"), "--landmarks_files", str(lm),
              "--n_folds", str(n_folds), "--distractors", str(lm), "--save_dir", str(mt),
              "--embedder", ",".join(RECOGNIZERS), "--renders_dir", str(recon),
              "--denoised_dir", str(cv / "denoised")] + again),
        Step("digital mask (mediapipe mesh)",
             [py, script("run_digital_mask.py"), "--input_dir", str(photos), "--save_dir", str(dm),
              "--backend", "mediapipe", "--jobs", str(jobs)] + common),
        Step("digital mask (mean shape)",
             [py, script("run_digital_mask.py"), "--input_dir", str(photos), "--save_dir", str(dm2),
              "--backend", "meanshape", "--jobs", str(jobs)] + common),
        Step(f"face recognition ({', '.join(RECOGNIZERS)})",
             [py, script("run_face_recognition.py"), "--masks_dir", str(dm), "--save_dir", str(fr),
              "--cross_masks_dir", str(dm2), "--backend", ",".join(RECOGNIZERS)] + common),
    ]


def run_demo(out: str | Path, *, jobs: int = 2, n_patients: int = 20, seed: int = 0, n_folds: int = 5,
             n_epochs: int = 8, overwrite: bool = False, photos: str | Path | None = None,
             say: Callable[[str], None] | None = None) -> StageResult:
    """Run every step, then the report; returns the time table and the report's path as the
    summary, exit 0 or 1 (some items failed). A step that fails outright (exit >= 2) stops
    the demo: its exit code, and a summary naming the step and its command. ``say`` gets
    the progress lines ("== step ..."); without it they go to the log.

    Raises InputError when the stage scripts or a recognizer's model are missing, or when
    the report finds nothing to report.
    """
    from faceaudit.report.build import write_report

    say = say or log.info
    out = make_private_dir(out)
    missing = [n for n in STAGE_SCRIPTS if not (REPO_ROOT / n).is_file()]
    if missing:
        raise InputError(f"the demo runs the stage scripts from a source checkout; {missing} not found "
                         f"in {REPO_ROOT}")
    missing_model = _missing_model()
    if missing_model:   # found now, not after the PET/CT stages have run for minutes
        raise InputError(missing_model)
    # first_run: the run that did a stage's work; last_run: this run (a re-run mostly skips)
    timings_path = out / "timings.json"
    timings = read_json_file(timings_path) if timings_path.is_file() else {}
    first_run, last_run = timings.get("first_run", {}), {}
    worst = EXIT_OK
    for step in demo_steps(out, jobs=jobs, n_patients=n_patients, seed=seed, n_folds=n_folds,
                           n_epochs=n_epochs, overwrite=overwrite,
                           photos=Path(photos) if photos else orl_root()):
        if step.is_done is not None and step.is_done():
            say(f"== {step.name}: already done, skipped")
            last_run[step.name] = 0.0
            continue
        say(f"== {step.name}")
        if step.prepare is not None:
            step.prepare()
        start = time.perf_counter()
        code = subprocess.call(step.argv, cwd=REPO_ROOT)
        seconds = round(time.perf_counter() - start, 1)
        last_run[step.name] = seconds
        if overwrite or step.name not in first_run:
            first_run[step.name] = seconds
        write_json(timings_path, {"first_run": first_run, "last_run": last_run})
        say(f"== {step.name}: exit {code}, {seconds:.1f} s")
        if code == EXIT_ITEMS_FAILED:
            worst = EXIT_ITEMS_FAILED
        elif code != EXIT_OK:
            return StageResult("demo", out, {}, code, summary=(
                f"error: step '{step.name}' failed (exit {code}); command: {' '.join(step.argv)}"))
    html_path, _ = write_report(out)
    write_json(timings_path, {"first_run": first_run, "last_run": last_run})
    lines = [f"\n{'time per stage (s)':<36} {'first run':>9} {'this run':>9}"]
    lines += [f"  {name:<34} {first_run.get(name, seconds):9.1f} {seconds:9.1f}"
              for name, seconds in last_run.items()]
    lines += [f"  {'total':<34} {sum(first_run.values()):9.1f} {sum(last_run.values()):9.1f}",
              f"\nReport: {html_path}"]
    return StageResult("demo", out, {}, worst, summary="\n".join(lines))


def _missing_model() -> str:
    """Why a converted recognizer of RECOGNIZERS is not in the model cache ("" when all are)."""
    from faceaudit.core.files import InputError
    from faceaudit.faces.embedding import TFJS_BACKENDS
    from faceaudit.models import cached_model

    for name in RECOGNIZERS:
        if name in TFJS_BACKENDS:
            try:
                cached_model(name)
            except InputError as exc:
                return str(exc)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceaudit.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created 0700)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--n-patients", type=int, default=20)
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--n-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", default=None,
                        help="<Identity>/<image> photos for the mask audit (default: the bundled ORL faces)")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage")
    args = parser.parse_args(argv)
    return run_guarded(_run, args)


def _run(args: argparse.Namespace) -> int:
    """The demo, its progress lines and summary printed (a failed step's on stderr)."""
    result = run_demo(args.out, jobs=args.jobs, n_patients=args.n_patients, seed=args.seed,
                      n_folds=args.n_folds, n_epochs=args.n_epochs, overwrite=args.overwrite,
                      photos=args.photos, say=functools.partial(print, flush=True))
    failed = result.exit_code not in (EXIT_OK, EXIT_ITEMS_FAILED)
    print(result.summary, file=sys.stderr if failed else sys.stdout)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
