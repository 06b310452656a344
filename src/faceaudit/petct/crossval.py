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

Outputs in ``save_perfs_dir``: splits.json, denoised/fold{k}/<id>.png, loss_fold{k}.csv,
loss_curves.png, metrics.csv, summary.csv (per fold), qa_montage.png (PET | denoised | CT),
manifest.csv, run.json, fold{k}.json (what a finished fold was run with; a re-run skips a
fold whose record matches), and models in ``models_path`` (default save_perfs_dir/models):
best_model_fold{k}.pt (state_dict) + best_model_fold{k}.json (architecture and settings).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import (DENOISED_DIR, MANIFEST_FILE, MODELS_DIR, RENDER_CROP,
                                      SPLITS_FILE, denoised_fold_dir, model_info_path,
                                      model_path)
from faceaudit.core.files import (InputError, atomic_write_bytes, make_private_dir,
                                  read_json_file, write_csv, write_json, write_png)
from faceaudit.core.images import read_grey, to_uint8, wavelet_denoise
from faceaudit.core.manifest import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ItemResult,
                                     Manifest)
from faceaudit.core.runner import write_run_json
from faceaudit.petct.denoise_figures import denoising_montage, plot_loss_curves
from faceaudit.petct.denoise_metrics import (METRIC_COLUMNS, MSSSIM_WEIGHTS, SUMMARY_COLUMNS,
                                             format_summary, image_metrics, msssim_window,
                                             summarise_metrics)
from faceaudit.petct.denoiser import (DEVICES, denoise_arrays, fold_seed, load_denoiser,
                                      resolve_device, save_model, torch_threads,
                                      train_denoiser)
from faceaudit.petct.render_pairs import RenderSet, load_renders, pair_renders
from faceaudit.petct.splits import PARTS, SCHEMES, make_splits, read_splits, split_leakage
from faceaudit.petct.splits import DEFAULT_VAL_FRACTION

DENOISERS = ("unet", "wavelet")
#: The crop stage 3 falls back to; kept here for the modules that import it from this stage.
DEFAULT_CROP = RENDER_CROP
LOSS_COLUMNS = ("epoch", "train_loss", "val_loss")


def write_loss_csv(path: Path, history: Sequence[Mapping[str, float]]) -> Path:
    """``loss_fold{k}.csv``: epoch, train_loss (blank at epoch 0), val_loss."""
    return write_csv(path, [
        {**row, "train_loss": "" if math.isnan(row["train_loss"]) else row["train_loss"]}
        for row in history], LOSS_COLUMNS)


def read_loss_csv(path: Path) -> list[dict[str, float]]:
    """The history :func:`write_loss_csv` wrote (epoch 0's train_loss as NaN)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{"epoch": int(r["epoch"]), "train_loss": float(r["train_loss"] or "nan"),
                 "val_loss": float(r["val_loss"])} for r in csv.DictReader(fh)]


def load_splits(path: str | os.PathLike, *, usable_ids: Sequence[str],
                failed_ids: Sequence[str] = (),
                subjects: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a splits.json with :func:`faceaudit.petct.splits.read_splits` for training.

    Every id must be a usable pair (``usable_ids``) or one reported failed in this run
    (``failed_ids``, removed from its fold since its row already says why); any other id
    is an InputError, as is every rule of ``read_splits`` (``subjects``: id -> patient)
    and an empty train or val set.
    """
    usable = set(usable_ids)
    record = read_splits(path, known_ids=usable | set(failed_ids), subjects=subjects)
    clean = []
    for fold in record["folds"]:
        parts = {part: sorted(i for i in fold[part] if i in usable) for part in PARTS}
        for part in ("train", "val"):
            if not parts[part]:
                raise InputError(f"{path}: fold {fold['fold']} has no usable {part} ids")
        clean.append({"fold": fold["fold"], **parts})
    return {**record, "folds": clean}



@dataclass
class CrossvalOptions:
    """What a fold is trained and checked with (defaults = the paper's); the fold count,
    validation share and device act before the folds and stay arguments of run_crossval."""

    n_epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0
    arch: str = "unet"
    denoiser: str = "unet"
    split_scheme: str = "kfold"
    crop: int = RENDER_CROP

    def check(self) -> None:
        from faceaudit.petct.unet import ARCHS, SPATIAL_MULTIPLE

        if self.arch not in ARCHS:
            raise InputError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        if self.denoiser not in DENOISERS:
            raise InputError(f"--denoiser must be one of {DENOISERS}, got {self.denoiser!r}")
        if self.split_scheme not in SCHEMES:
            raise InputError(f"--split_scheme must be one of {SCHEMES}, got {self.split_scheme!r}")
        if self.crop <= 32 or self.crop % SPATIAL_MULTIPLE:
            raise InputError(f"--crop must be a multiple of {SPATIAL_MULTIPLE} above 32 px, "
                             f"got {self.crop}")
        for name in ("n_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0, got {self.lr}")


def _fold_record(options: CrossvalOptions, fold: Mapping[str, Any]) -> dict[str, Any]:
    """What a fold's outputs depend on; a finished fold is reused only if this matches."""
    record = {"denoiser": options.denoiser, "crop": options.crop,
              "train": list(fold["train"]), "val": list(fold["val"]), "test": list(fold["test"])}
    if options.denoiser == "unet":
        record.update(arch=options.arch, n_epochs=options.n_epochs,
                      batch_size=options.batch_size, lr=options.lr, seed=options.seed)
    return record


def _finished_fold(save_dir: Path, models_dir: Path, k: int, record: Mapping[str, Any]
                   ) -> dict[str, Any] | None:
    """What fold{k}.json says about an earlier run of this fold (best epoch, seconds ...),
    or None unless that run had the same ``record`` and all its outputs are still there."""
    try:
        previous = read_json_file(save_dir / f"fold{k}.json")
    except InputError:
        return None
    if previous.pop("record", None) != dict(record):
        return None
    needed = [denoised_fold_dir(save_dir / DENOISED_DIR, k) / f"{i}.png" for i in record["test"]]
    if record["denoiser"] == "unet":
        needed += [save_dir / f"loss_fold{k}.csv", model_path(models_dir, k),
                   model_info_path(models_dir, k)]
    return previous if all(path.is_file() for path in needed) else None


def run_fold(k: int, fold: Mapping[str, Any], data: RenderSet, options: CrossvalOptions, *,
             save_dir: Path, models_dir: Path, device: str, progress: bool
             ) -> dict[str, Any]:
    """Train (or apply the wavelet baseline) for one fold and write its denoised test renders.

    Returns {"history": loss rows or [], "best_epoch", "best_val_loss", "seconds"}.
    """
    started = time.time()
    out_dir = make_private_dir(denoised_fold_dir(save_dir / DENOISED_DIR, k))
    test_ids = list(fold["test"])
    info: dict[str, Any] = {"history": [], "best_epoch": None, "best_val_loss": None}
    if options.denoiser == "wavelet":
        for item_id in test_ids:
            denoised = wavelet_denoise(data.pet[item_id].astype(np.float32) / 255.0)
            write_png(out_dir / f"{item_id}.png", to_uint8(denoised))
    else:
        train_pet, train_ct = data.stack(fold["train"])
        val_pet, val_ct = data.stack(fold["val"])
        model, result = train_denoiser(
            train_pet, train_ct, val_pet, val_ct, arch=options.arch, n_epochs=options.n_epochs,
            batch_size=options.batch_size, lr=options.lr, seed=fold_seed(options.seed, k),
            device=device, progress=progress, desc=f"fold {k}")
        write_loss_csv(save_dir / f"loss_fold{k}.csv", result.history)
        save_model(model, model_path(models_dir, k), info={
            "fold": k, "crop": options.crop, "in_channels": 1, "out_channels": 1,
            "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "n_epochs": options.n_epochs, "batch_size": options.batch_size, "lr": options.lr,
            "seed": options.seed, "torch_seed": fold_seed(options.seed, k),
            "loss": "1 - MS-SSIM (pytorch_msssim, 5 scales, data_range 1)",
            "input": "PET render centre crop, float [0, 1]", "target": "CT render"})
        if test_ids:
            test_pet, _ = data.stack(test_ids)
            denoised = denoise_arrays(model, test_pet.astype(np.float32) / 255.0,
                                      batch_size=options.batch_size, device=device)
            for item_id, image in zip(test_ids, denoised):
                write_png(out_dir / f"{item_id}.png", to_uint8(image))
        info.update(history=result.history, best_epoch=result.best_epoch,
                    best_val_loss=result.best_val_loss)
        if result.best_epoch == 0:
            # e.g. the upstream network can start with MS-SSIM clipped to 0 (loss exactly 1),
            # where pytorch_msssim's ReLU leaves no gradient; the saved model is the untrained one.
            print(f"warning: fold {k}: no epoch beat the untrained network on validation "
                  f"(loss {result.best_val_loss:.4f}); try another --seed, --lr or more epochs",
                  file=sys.stderr)
    info["seconds"] = round(time.time() - started, 3)
    return info


def fold_metrics(k: int, test_ids: Sequence[str], data: RenderSet, denoised_dir: Path
                 ) -> list[dict[str, Any]]:
    """metrics.csv rows of fold ``k``: PET vs CT before, and the written denoised PNG vs CT after."""
    if not test_ids:
        return []
    pet, ct = data.stack(test_ids)
    denoised = np.stack([read_grey(denoised_dir / f"{i}.png") for i in test_ids])
    pet_f, ct_f = pet.astype(np.float32) / 255.0, ct.astype(np.float32) / 255.0
    ms_before, psnr_before = image_metrics(pet_f, ct_f)
    ms_after, psnr_after = image_metrics(denoised, ct_f)
    return [{"fold": k, "id": item_id, "subject": data.subjects[item_id],
             "msssim_before": float(ms_before[j]), "msssim_after": float(ms_after[j]),
             "psnr_before": float(psnr_before[j]), "psnr_after": float(psnr_after[j])}
            for j, item_id in enumerate(test_ids)]


def run_crossval(*, ct_files: str | os.PathLike, pet_files: str | os.PathLike,
                 save_perfs_dir: str | os.PathLike, n_epochs: int = 50, n_folds: int = 5,
                 batch_size: int = 32, lr: float = 1e-2,
                 splits_file: str | os.PathLike | None = None,
                 models_path: str | os.PathLike | None = None, device: str = "auto",
                 seed: int = 0, arch: str = "unet", denoiser: str = "unet",
                 split_scheme: str = "kfold", crop: int = RENDER_CROP,
                 val_fraction: float = DEFAULT_VAL_FRACTION, threads: int | None = None,
                 overwrite: bool = False, quiet: bool = False,
                 args: Mapping[str, Any] | None = None) -> int:
    """The crossval stage: pair, split, train/test every fold, write tables and figures.

    ``threads``: torch CPU threads during the run (None/0 = torch's default). On a
    shared or small machine 1 thread is often faster than oversubscribed cores.
    Results are bit-reproducible for a given seed, device and thread count.

    Returns EXIT_OK, or EXIT_ITEMS_FAILED when a study could not be paired or read
    (it is in manifest.csv with the reason; the others are processed).
    """
    import torch

    if threads is not None and threads < 0:
        raise InputError(f"--threads must be >= 0, got {threads}")
    with torch_threads(threads):
        started = time.time()
        options = CrossvalOptions(n_epochs=n_epochs, batch_size=batch_size, lr=lr, seed=seed,
                                  arch=arch, denoiser=denoiser, split_scheme=split_scheme,
                                  crop=crop)
        options.check()
        progress = not quiet
        save_dir = Path(save_perfs_dir)
        for folder in (Path(ct_files), Path(pet_files)):
            if folder.exists() and save_dir.resolve() == folder.resolve():
                raise InputError(f"--save_perfs_dir {save_dir} is an input folder; choose another")
        run_device = resolve_device(device) if denoiser == "unet" else "cpu"

        pairs, problems = pair_renders(ct_files, pet_files)
        data, load_problems = load_renders(pairs, crop=crop, progress=progress)
        problems += load_problems
        for problem in problems:
            print(f"warning: {problem.id}: {problem.status}: {problem.reason}", file=sys.stderr)
        if not data.ids:
            raise InputError(f"no readable CT/PET render pairs (<id>.png in both) in {ct_files} "
                             f"and {pet_files}")

        save_dir = make_private_dir(save_dir)
        models_dir = Path(models_path) if models_path else save_dir / MODELS_DIR
        if denoiser == "unet":
            make_private_dir(models_dir)
        failed_ids = [p.id for p in problems]
        if splits_file is not None:
            splits = load_splits(splits_file, usable_ids=data.ids, failed_ids=failed_ids,
                                 subjects={**{p.id: p.subject for p in problems}, **data.subjects})
            splits["crop"] = crop
        else:
            splits = make_splits(data.ids, data.subjects, scheme=split_scheme, n_folds=n_folds,
                                 seed=seed, crop=crop, val_fraction=val_fraction)
        write_json(save_dir / SPLITS_FILE, splits)

        manifest = Manifest(save_dir / MANIFEST_FILE)
        manifest.rows.clear()  # rebuilt from this run's pairing; finished folds are re-read below
        for problem in problems:
            manifest.add(problem)

        all_metrics: list[dict[str, Any]] = []
        histories: dict[int, list[dict[str, float]]] = {}
        fold_info: list[dict[str, Any]] = []
        for fold in splits["folds"]:
            k = int(fold["fold"])
            record = _fold_record(options, fold)
            info = None if overwrite else _finished_fold(save_dir, models_dir, k, record)
            reused = info is not None
            if reused:
                if progress:
                    print(f"fold {k}: outputs exist, skipped (use --overwrite to redo)",
                          file=sys.stderr)
                if denoiser == "unet":
                    info["history"] = read_loss_csv(save_dir / f"loss_fold{k}.csv")
            else:
                info = run_fold(k, fold, data, options, save_dir=save_dir, models_dir=models_dir,
                                device=run_device, progress=progress)
                write_json(save_dir / f"fold{k}.json", {
                    "record": record, "best_epoch": info["best_epoch"],
                    "best_val_loss": info["best_val_loss"], "seconds": info["seconds"],
                    "device": run_device})
            if info.get("history"):
                histories[k] = info["history"]
            rows = fold_metrics(k, fold["test"], data, denoised_fold_dir(save_dir / DENOISED_DIR, k))
            all_metrics += rows
            fold_info.append({"fold": k, "reused": reused, "n_train": len(fold["train"]),
                              "n_val": len(fold["val"]), "n_test": len(fold["test"]),
                              "best_epoch": info.get("best_epoch"),
                              "best_val_loss": info.get("best_val_loss"),
                              "seconds": info.get("seconds")})

        write_csv(save_dir / "metrics.csv", all_metrics, METRIC_COLUMNS)
        summary = summarise_metrics(all_metrics)
        write_csv(save_dir / "summary.csv", summary, SUMMARY_COLUMNS)
        if histories:
            atomic_write_bytes(save_dir / "loss_curves.png", plot_loss_curves(histories))

        qa = denoising_montage(splits, data, save_dir / DENOISED_DIR)
        if qa is not None:
            write_png(save_dir / "qa_montage.png", qa)

        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in all_metrics:
            by_id.setdefault(row["id"], []).append(row)
        for item_id in data.ids:
            rows = by_id.get(item_id, [])
            values: dict[str, Any] = {"test_folds": ";".join(str(r["fold"]) for r in rows)}
            for key in METRIC_COLUMNS[3:]:
                values[key] = float(np.mean([r[key] for r in rows])) if rows else ""
            manifest.add(ItemResult(item_id, data.subjects[item_id], STATUS_OK,
                                    "" if rows else "not in any fold's test set", values))
        manifest.write()

        if progress:
            print(format_summary(summary), file=sys.stderr)
        write_run_json(save_dir, stage="crossval", args=dict(args) if args is not None else {
            "ct_files": str(ct_files), "pet_files": str(pet_files),
            "save_perfs_dir": str(save_perfs_dir), "n_epochs": n_epochs, "n_folds": n_folds,
            "batch_size": batch_size, "lr": lr, "splits_file": splits_file,
            "models_path": models_path, "device": device, "seed": seed, "arch": arch,
            "denoiser": denoiser, "split_scheme": split_scheme, "crop": crop,
            "overwrite": overwrite}, seed=seed, started=started, extra={
            "device_used": run_device, "torch_threads": torch.get_num_threads(),
            "models_dir": str(models_dir) if denoiser == "unet" else None,
            "n_pairs": len(data.ids), "n_failed": manifest.count(STATUS_FAILED),
            "n_skipped": manifest.count(STATUS_SKIPPED),
            "scheme": splits["scheme"], "folds": fold_info, "summary": summary,
            "leakage": split_leakage(splits, data.subjects),
            "msssim": {"win_size": msssim_window(crop), "weights": list(MSSSIM_WEIGHTS),
                       "data_range": 1.0, "implementation": "pytorch_msssim.ms_ssim"}})
        return manifest.exit_code()



#: DEVICES, DEFAULT_CROP and load_denoiser are re-exported for the scripts and stage 3.
__all__ = ["DEFAULT_CROP", "DENOISERS", "DEVICES", "SCHEMES", "CrossvalOptions", "load_denoiser",
           "load_splits", "run_crossval"]
