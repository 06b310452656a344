"""Stage 2: a PET -> CT render denoiser trained and tested with patient-level
cross-validation.

The stage pairs the reconstruction stage's CT and PET renders by study id
(:mod:`~faceaudit.petct.render_pairs`), splits the studies into folds by patient or
reads the folds of an earlier ``splits.json`` (:mod:`~faceaudit.petct.splits`), and for
each fold trains the denoiser on its training images, keeps the epoch with the best
validation loss (:mod:`~faceaudit.petct.denoiser`) and denoises its test images; MS-SSIM
and PSNR of PET vs CT before and after denoising are tabulated per study and per fold
(:mod:`~faceaudit.petct.denoise_metrics`). The wavelet baseline (upstream's BayesShrink)
replaces training when asked.

The items of the stage are the folds. A re-run skips a fold only when the content of its
training, validation and test renders and the options that shape its model (denoiser,
crop, architecture, epochs, batch size, learning rate, seed) are those that produced its
outputs, and the outputs are all there; otherwise the fold is trained again. A fold that
fails removes what it had written and the other folds go on.

Outputs in ``save_dir``: splits.json, denoised/fold{k}/<id>.png, loss_fold{k}.csv,
loss_curves.png, metrics.csv, summary.csv (per fold), qa_montage.png (PET | denoised | CT),
manifest.csv (a row per fold ``fold{k}`` and per study), run.json, and models in
``models_path`` (default save_dir/models): best_model_fold{k}.pt (state_dict) +
best_model_fold{k}.json (architecture and training settings).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import (
    DENOISE_SUMMARY_FILE,
    DENOISED_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    MODELS_DIR,
    RENDER_CROP,
    SPLITS_FILE,
    denoised_fold_dir,
    model_info_path,
    model_path,
)
from faceaudit.core.files import (
    InputError,
    atomic_write_bytes,
    file_digest,
    make_private_dir,
    read_json_file,
    write_csv,
    write_json,
    write_png,
)
from faceaudit.core.images import to_uint8, wavelet_denoise
from faceaudit.core.manifest import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ItemResult, describe_exception
from faceaudit.core.options import expect, expect_choice, expect_number, expect_whole
from faceaudit.core.runner import RunSettings, StageResult, StageRun, fingerprint, is_location_error
from faceaudit.petct.denoise_figures import denoising_montage, plot_loss_curves
from faceaudit.petct.denoise_metrics import (
    METRIC_COLUMNS,
    MSSSIM_WEIGHTS,
    SUMMARY_COLUMNS,
    fold_metrics,
    format_summary,
    msssim_window,
    summarise_metrics,
)
from faceaudit.petct.denoiser import (
    DEVICES,
    denoise_arrays,
    fold_seed,
    load_denoiser,
    read_loss_csv,
    resolve_device,
    save_model,
    torch_threads,
    train_denoiser,
    write_loss_csv,
)
from faceaudit.petct.render_pairs import RenderPair, RenderSet, load_renders, pair_renders
from faceaudit.petct.splits import DEFAULT_VAL_FRACTION, PARTS, SCHEMES, load_splits, make_splits, split_leakage

log = logging.getLogger(__name__)

DENOISERS = ("unet", "wavelet")


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossvalOptions:
    """What the stage computes (defaults = the paper's); how it runs is in RunSettings.

    ``splits_file``: reuse the folds of an earlier run (then ``split_scheme``, ``n_folds``
    and ``val_fraction`` are not used). ``models_path``: folder for the fold models
    (default ``<save_dir>/models``). ``threads``: torch CPU threads (0: torch's choice);
    results are bit-reproducible for a given seed, device and thread count.
    """

    n_epochs: int = 50
    n_folds: int = 5
    batch_size: int = 32
    lr: float = 1e-2
    arch: str = "unet"
    denoiser: str = "unet"
    split_scheme: str = "kfold"
    crop: int = RENDER_CROP
    val_fraction: float = DEFAULT_VAL_FRACTION
    splits_file: str | None = None
    models_path: str | None = None
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        from faceaudit.petct.unet import ARCHS, SPATIAL_MULTIPLE

        for flag, value, choices in (("--arch", self.arch, ARCHS),
                                     ("--denoiser", self.denoiser, DENOISERS),
                                     ("--split_scheme", self.split_scheme, SCHEMES),
                                     ("--device", self.device, DEVICES)):
            expect_choice(flag, value, choices)
        expect_whole("--n_epochs", self.n_epochs, 1)
        expect_whole("--batch_size", self.batch_size, 1)
        least = 2 if self.split_scheme == "kfold" else 1
        expect_whole("--n_folds", self.n_folds, least)  # a kfold split needs a second fold
        expect_number("--lr", self.lr, low=0, low_open=True)
        expect_number("the validation fraction", self.val_fraction, low=0, high=1, low_open=True,
                      high_open=True)
        expect_whole("--crop", self.crop, 33)
        expect(self.crop % SPATIAL_MULTIPLE == 0, "--crop", f"a multiple of {SPATIAL_MULTIPLE} above 32 px",
               self.crop)
        expect_whole("--threads", self.threads, 0)

    def model_shaping(self, seed: int) -> dict[str, Any]:
        """The options a fold's outputs depend on (device and threads change only rounding)."""
        shaping: dict[str, Any] = {"denoiser": self.denoiser, "crop": self.crop}
        if self.denoiser == "unet":
            shaping.update(arch=self.arch, n_epochs=self.n_epochs, batch_size=self.batch_size,
                           lr=self.lr, seed=seed)
        return shaping


# ----------------------------------------------------------------------------------------
# Inputs: renders and folds
# ----------------------------------------------------------------------------------------

def _check_locations(ct_dir: Path, pet_dir: Path, save_dir: Path) -> None:
    for folder in (ct_dir, pet_dir):
        if folder.exists() and save_dir.resolve() == folder.resolve():
            raise InputError(f"expected an output folder other than the input folders, "
                             f"found --save_perfs_dir {save_dir} = {folder}")


def _load_studies(pairs: Sequence[RenderPair], problems: list[ItemResult], *, ct_dir: Path,
                  pet_dir: Path, crop: int, progress: bool
                  ) -> tuple[RenderSet, dict[str, tuple[str, str]], list[ItemResult]]:
    """Cropped renders in memory, the content digest of each pair's two files, and every
    study that could not be used (unpaired, unreadable), each logged as a warning."""
    data, load_problems = load_renders(pairs, crop=crop, progress=progress)
    problems = problems + load_problems
    for problem in problems:
        log.warning("%s: %s: %s", problem.id, problem.status, problem.reason)
    if not data.ids:
        raise InputError(f"expected readable CT/PET render pairs (<id>.png in both) in {ct_dir} "
                         f"and {pet_dir}, found none")
    digests = {p.id: (file_digest(p.ct_path), file_digest(p.pet_path))
               for p in pairs if p.id in data.ct}
    return data, digests, problems


def _fold_plan(data: RenderSet, problems: Sequence[ItemResult], options: CrossvalOptions, *,
               seed: int) -> dict[str, Any]:
    """The splits record of this run: read from ``options.splits_file`` or made anew."""
    if options.splits_file is not None:
        subjects = {**{p.id: p.subject for p in problems}, **data.subjects}
        splits = load_splits(options.splits_file, usable_ids=data.ids,
                             failed_ids=[p.id for p in problems], subjects=subjects)
        splits["crop"] = options.crop
        return splits
    return make_splits(data.ids, data.subjects, scheme=options.split_scheme,
                       n_folds=options.n_folds, seed=seed, crop=options.crop,
                       val_fraction=options.val_fraction)


def fold_fingerprint(fold: Mapping[str, Any], digests: Mapping[str, tuple[str, str]],
                     shaping: Mapping[str, Any]) -> str:
    """SHA-256 of the fold's partitions (ids with the content of their CT and PET renders)
    and of the options that shape its model: what a skipped fold must match."""
    parts = {part: [[i, *digests[i]] for i in fold[part]] for part in PARTS}
    return fingerprint(dict(shaping), parts)


# ----------------------------------------------------------------------------------------
# One fold
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldPaths:
    """Where fold ``k`` writes."""

    k: int
    denoised: Path
    loss_csv: Path
    model: Path
    model_info: Path

    @classmethod
    def of(cls, k: int, save_dir: Path, models_dir: Path) -> FoldPaths:
        return cls(k, denoised_fold_dir(save_dir / DENOISED_DIR, k),
                   save_dir / f"loss_fold{k}.csv", model_path(models_dir, k),
                   model_info_path(models_dir, k))

    def outputs(self, test_ids: Sequence[str], denoiser: str) -> list[Path]:
        files = [self.denoised / f"{i}.png" for i in test_ids]
        return files + ([self.loss_csv, self.model, self.model_info] if denoiser == "unet" else [])

    def remove(self) -> None:
        """Remove what the fold writes (a failed fold leaves nothing half written)."""
        if self.denoised.is_dir():
            shutil.rmtree(self.denoised)
        for path in (self.loss_csv, self.model, self.model_info):
            if path.is_file():
                path.unlink()


def _wavelet_fold(fold: Mapping[str, Any], data: RenderSet, paths: FoldPaths) -> dict[str, Any]:
    """Upstream's BayesShrink baseline on the fold's test PET renders (no training)."""
    for item_id in fold["test"]:
        denoised = wavelet_denoise(data.pet[item_id].astype(np.float32) / 255.0)
        write_png(paths.denoised / f"{item_id}.png", to_uint8(denoised))
    return {"history": [], "best_epoch": None, "best_val_loss": None}


def _unet_fold(fold: Mapping[str, Any], data: RenderSet, paths: FoldPaths,
               options: CrossvalOptions, *, seed: int, device: str, progress: bool
               ) -> dict[str, Any]:
    """Train on the fold's train set, keep the best epoch on its val set, save the model and
    the loss history, denoise the test set."""
    k = paths.k
    train_pet, train_ct = data.stack(fold["train"])
    val_pet, val_ct = data.stack(fold["val"])
    model, result = train_denoiser(
        train_pet, train_ct, val_pet, val_ct, arch=options.arch, n_epochs=options.n_epochs,
        batch_size=options.batch_size, lr=options.lr, seed=fold_seed(seed, k),
        device=device, progress=progress, desc=f"fold {k}")
    write_loss_csv(paths.loss_csv, result.history)
    save_model(model, paths.model, info={
        "fold": k, "crop": options.crop, "in_channels": 1, "out_channels": 1,
        "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
        "n_epochs": options.n_epochs, "batch_size": options.batch_size, "lr": options.lr,
        "seed": seed, "torch_seed": fold_seed(seed, k),
        "loss": "1 - MS-SSIM (pytorch_msssim, 5 scales, data_range 1)",
        "input": "PET render centre crop, float [0, 1]", "target": "CT render"})
    test_ids = list(fold["test"])
    if test_ids:
        test_pet, _ = data.stack(test_ids)
        denoised = denoise_arrays(model, test_pet.astype(np.float32) / 255.0,
                                  batch_size=options.batch_size, device=device)
        for item_id, image in zip(test_ids, denoised):
            write_png(paths.denoised / f"{item_id}.png", to_uint8(image))
    if result.best_epoch == 0:
        # e.g. the upstream network can start with MS-SSIM clipped to 0 (loss exactly 1),
        # where pytorch_msssim's ReLU leaves no gradient; the saved model is the untrained one.
        log.warning("fold %d: no epoch beat the untrained network on validation (loss %.4f); "
                    "try another --seed, --lr or more epochs", k, result.best_val_loss)
    return {"history": result.history, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss}


def run_fold(fold: Mapping[str, Any], data: RenderSet, options: CrossvalOptions,
             paths: FoldPaths, *, seed: int, device: str, progress: bool) -> dict[str, Any]:
    """Train (or apply the wavelet baseline) for one fold and write its denoised test renders.

    Returns {"history": loss rows or [], "best_epoch", "best_val_loss", "seconds"}.
    """
    started = time.time()
    paths.remove()  # stale outputs of an earlier run of this fold must not survive
    make_private_dir(paths.denoised)
    if options.denoiser == "wavelet":
        info = _wavelet_fold(fold, data, paths)
    else:
        info = _unet_fold(fold, data, paths, options, seed=seed, device=device,
                          progress=progress)
    info["seconds"] = round(time.time() - started, 3)
    return info



# ----------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------

def _fold_row(k: int, fold: Mapping[str, Any], info: Mapping[str, Any], device: str
              ) -> ItemResult:
    return ItemResult(f"fold{k}", "", STATUS_OK, "", {
        "fold": k, "n_train": len(fold["train"]), "n_val": len(fold["val"]),
        "n_test": len(fold["test"]), "best_epoch": info.get("best_epoch"),
        "best_val_loss": info.get("best_val_loss"), "seconds": info.get("seconds"),
        "device": device})


def _reuse_fold(stage: StageRun, k: int, paths: FoldPaths, denoiser: str
                ) -> dict[str, Any] | None:
    """The earlier row, loss history and best epoch of a fresh fold (as its model's .json
    records them); None when they cannot be read back (the fold is then trained again)."""
    try:
        history = read_loss_csv(paths.loss_csv) if denoiser == "unet" else []
        info = read_json_file(paths.model_info) if denoiser == "unet" else {}
        seconds = float(stage.previous(f"fold{k}").get("seconds") or "nan")
    except (OSError, InputError, KeyError, ValueError, TypeError):
        return None
    return {"row": stage.skipped(f"fold{k}"), "reused": True, "history": history,
            "best_epoch": info.get("best_epoch"), "best_val_loss": info.get("best_val_loss"),
            "seconds": None if seconds != seconds else seconds}


def _do_fold(stage: StageRun, fold: Mapping[str, Any], data: RenderSet,
             digests: Mapping[str, tuple[str, str]], options: CrossvalOptions,
             paths: FoldPaths, *, device: str) -> dict[str, Any] | None:
    """Skip, train or fail one fold and journal its row; returns what the fold did, or
    None when it failed (its outputs are then removed)."""
    k, run = paths.k, stage.run
    fp = fold_fingerprint(fold, digests, options.model_shaping(run.seed))
    if stage.is_fresh(f"fold{k}", fp, paths.outputs(fold["test"], options.denoiser)):
        reused = _reuse_fold(stage, k, paths, options.denoiser)
        if reused is not None:
            stage.record(reused.pop("row"), fp)
            return reused
    try:
        info = run_fold(fold, data, options, paths, seed=run.seed, device=device,
                        progress=run.progress)
    except Exception as exc:  # one fold's failure (a bad render, CUDA out of memory) only
        paths.remove()
        if is_location_error(exc):
            raise  # the whole output location is unusable: exit 2, not a failed fold
        stage.record(ItemResult(f"fold{k}", "", STATUS_FAILED, describe_exception(exc),
                                {"fold": k}))
        return None
    stage.record(_fold_row(k, fold, info, device), fp)
    return {"reused": False, **info}


def _remove_stale_folds(save_dir: Path, models_dir: Path, folds: Sequence[int]) -> None:
    """Outputs of folds the current splits no longer have (an earlier run with more folds),
    and the fold{k}.json records of the stage's earlier versions (the manifest's fold rows
    hold that now). A --models_path outside the output folder is never pruned."""
    keep = set(folds)

    def stale(path: Path, pattern: str) -> bool:
        match = re.fullmatch(pattern, path.name)
        return match is not None and int(match.group(1)) not in keep

    denoised = save_dir / DENOISED_DIR
    for path in (denoised.iterdir() if denoised.is_dir() else ()):
        if path.is_dir() and stale(path, r"fold(\d+)"):
            shutil.rmtree(path)
    for path in save_dir.iterdir():
        if path.is_file() and (stale(path, r"loss_fold(\d+)\.csv")
                               or re.fullmatch(r"fold\d+\.json", path.name)):
            path.unlink()
    if models_dir == save_dir / MODELS_DIR and models_dir.is_dir():
        for path in models_dir.iterdir():
            if path.is_file() and stale(path, r"best_model_fold(\d+)\.(?:pt|json)"):
                path.unlink()


def _write_tables(save_dir: Path, splits: Mapping[str, Any], data: RenderSet,
                  metrics: list[dict[str, Any]], histories: Mapping[int, list]
                  ) -> list[dict[str, Any]]:
    """metrics.csv, summary.csv, loss_curves.png and qa_montage.png; the summary rows."""
    write_csv(save_dir / METRICS_FILE, metrics, METRIC_COLUMNS)
    summary = summarise_metrics(metrics)
    write_csv(save_dir / DENOISE_SUMMARY_FILE, summary, SUMMARY_COLUMNS)
    if histories:
        atomic_write_bytes(save_dir / "loss_curves.png", plot_loss_curves(histories))
    qa = denoising_montage(splits, data, save_dir / DENOISED_DIR)
    if qa is not None:
        write_png(save_dir / "qa_montage.png", qa)
    return summary


def _record_studies(stage: StageRun, data: RenderSet, metrics: Sequence[Mapping[str, Any]],
                    splits: Mapping[str, Any], folds: Sequence[Mapping[str, Any]]) -> None:
    """A row per usable study: the folds that tested it and its mean metrics; a study whose
    only test folds failed is skipped with a reason naming them (the fold rows failed)."""
    failed_tests: dict[str, list[int]] = {}
    for fold, record in zip(splits["folds"], folds):
        for item_id in fold["test"] if record["status"] == STATUS_FAILED else ():
            failed_tests.setdefault(item_id, []).append(record["fold"])
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for row in metrics:
        by_id.setdefault(row["id"], []).append(row)
    for item_id in data.ids:
        rows = by_id.get(item_id, [])
        values: dict[str, Any] = {"test_folds": ";".join(str(r["fold"]) for r in rows)}
        for key in METRIC_COLUMNS[3:]:
            values[key] = float(np.mean([r[key] for r in rows])) if rows else ""
        status, reason = STATUS_OK, "" if rows else "not in any fold's test set"
        if not rows and item_id in failed_tests:
            status = STATUS_SKIPPED
            reason = f"its test fold failed: {', '.join(f'fold{k}' for k in failed_tests[item_id])}"
        stage.record(ItemResult(item_id, data.subjects[item_id], status, reason, values))


def _summary_text(save_dir: Path, folds: Sequence[Mapping[str, Any]],
                  problems: Sequence[ItemResult], summary: Sequence[Mapping[str, Any]]) -> str:
    trained = sum(1 for f in folds if f["status"] == STATUS_OK and not f["reused"])
    reused = sum(1 for f in folds if f["reused"])
    failed = [f["fold"] for f in folds if f["status"] == STATUS_FAILED]
    bad = [p.id for p in problems if p.status == STATUS_FAILED]
    n_skipped = sum(p.status == STATUS_SKIPPED for p in problems)
    failed_folds = f", {len(failed)} failed: {', '.join(map(str, failed))}" if failed else ""
    bad_ids = f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
    lines = [f"crossval: {len(folds)} folds ({trained} trained, {reused} unchanged"
             f"{failed_folds}); studies: {len(bad)} failed{bad_ids}, {n_skipped} skipped "
             f"upstream; details in {save_dir / MANIFEST_FILE}"]
    if summary:
        lines.append(format_summary(summary))
    return "\n".join(lines)


def _fold_loop(stage: StageRun, splits: Mapping[str, Any], data: RenderSet,
               digests: Mapping[str, tuple[str, str]], options: CrossvalOptions, *,
               models_dir: Path, device: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, list]]:
    """Every fold skipped, trained or failed; (fold records, metrics rows, loss histories)."""
    folds, metrics, histories = [], [], {}
    for fold in splits["folds"]:
        k = int(fold["fold"])
        paths = FoldPaths.of(k, stage.save_dir, models_dir)
        info = _do_fold(stage, fold, data, digests, options, paths, device=device)
        record = {"fold": k, "status": STATUS_FAILED if info is None else STATUS_OK,
                  "reused": bool(info and info["reused"]), "n_train": len(fold["train"]),
                  "n_val": len(fold["val"]), "n_test": len(fold["test"])}
        if info is not None:
            record.update({key: info.get(key) for key in ("best_epoch", "best_val_loss",
                                                          "seconds")})
            if info.get("history"):
                histories[k] = info["history"]
            metrics += fold_metrics(k, fold["test"], data, paths.denoised)
        folds.append(record)
    return folds, metrics, histories


def run_crossval(ct_files: str | os.PathLike, pet_files: str | os.PathLike,
                 save_dir: str | os.PathLike, options: CrossvalOptions, *,
                 run: RunSettings) -> StageResult:
    """The crossval stage: pair, split, train/test every fold, write tables and figures.

    Returns the StageResult: exit code 0, or 1 when a study could not be paired or read
    or a fold failed (each is a manifest row with the reason; the rest is processed).
    Unusable inputs, splits or options raise InputError / OptionsError (exit 2).
    """
    ct_dir, pet_dir, save_dir = Path(ct_files), Path(pet_files), Path(save_dir)
    _check_locations(ct_dir, pet_dir, save_dir)
    # every input is read and checked before the output folder is made: unusable renders or
    # splits stop the stage (exit 2) with nothing written
    pairs, problems = pair_renders(ct_dir, pet_dir)
    data, digests, problems = _load_studies(pairs, problems, ct_dir=ct_dir, pet_dir=pet_dir,
                                            crop=options.crop, progress=run.progress)
    splits = _fold_plan(data, problems, options, seed=run.seed)
    device = resolve_device(options.device) if options.denoiser == "unet" else "cpu"
    models_dir = Path(options.models_path) if options.models_path else save_dir / MODELS_DIR
    with torch_threads(options.threads), StageRun("crossval", save_dir, run,
                                                  options=options) as stage:
        write_json(save_dir / SPLITS_FILE, splits)
        if options.denoiser == "unet":
            make_private_dir(models_dir)
        for problem in problems:
            stage.record(problem)
        fold_numbers = [int(f["fold"]) for f in splits["folds"]]
        _remove_stale_folds(save_dir, models_dir, fold_numbers)
        folds, metrics, histories = _fold_loop(stage, splits, data, digests, options,
                                               models_dir=models_dir, device=device)
        summary = _write_tables(save_dir, splits, data, metrics, histories)
        _record_studies(stage, data, metrics, splits, folds)
        stage.extra.update(_run_record(splits, data, folds, summary, options,
                                       models_dir=models_dir, device=device))
        keep = [f"fold{k}" for k in fold_numbers] + data.ids + [p.id for p in problems]
        return stage.finish(keep_ids=keep, summary=_summary_text(save_dir, folds, problems,
                                                                  summary),
                            details={"folds": folds, "summary": summary})


def _run_record(splits: Mapping[str, Any], data: RenderSet, folds: list[dict[str, Any]],
                summary: list[dict[str, Any]], options: CrossvalOptions, *, models_dir: Path,
                device: str) -> dict[str, Any]:
    """What run.json adds for this stage."""
    import torch

    return {
        "device_used": device, "torch_threads": torch.get_num_threads(),
        "models_dir": str(models_dir) if options.denoiser == "unet" else None,
        "n_pairs": len(data.ids), "scheme": splits["scheme"], "folds": folds,
        "summary": summary, "leakage": split_leakage(splits, data.subjects),
        "msssim": {"win_size": msssim_window(options.crop), "weights": list(MSSSIM_WEIGHTS),
                   "data_range": 1.0, "implementation": "pytorch_msssim.ms_ssim"}}


#: DEVICES and load_denoiser are re-exported for the scripts and stage 3.
__all__ = ["DENOISERS", "DEVICES", "SCHEMES", "CrossvalOptions", "FoldPaths",
           "fold_fingerprint", "load_denoiser", "load_splits", "run_crossval", "run_fold"]
