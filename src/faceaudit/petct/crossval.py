"""PET -> CT render denoiser trained and tested with patient-level cross-validation.

Input: two folders of grey PNG renders (the reconstruction stage's ``cts/`` and ``pets/``),
paired by file stem (the study id); subjects (patients) come from ``manifest.csv`` in the
folders' parent when present, else subject = id. Every pair is centre-cropped
(512 -> 208 px upstream) and kept in memory as uint8.

Splits (``splits.json``, ids only):

* ``kfold`` (default): real K-fold grouped by patient. Patients are shuffled with the seed
  and dealt into K groups balanced by study count; fold k tests group k, and a validation
  set of patients (``val_fraction`` of all patients, at least one) is carved at random
  from the remaining ones. No patient is in two of train/val/test within a fold and every
  study is tested exactly once.
* ``upstream``: upstream's repeated random sub-sampling, by study: ``n_folds`` independent
  70/15/15 splits (seeded here, unseeded upstream). Test sets overlap across folds and a
  patient's studies may straddle train and test; the leak is counted in run.json.

Training: loss 1 - MS-SSIM (pytorch_msssim; window 11, sigma 1.5, 5 scales, data range 1,
as upstream's piqa loss), Adam, best model by mean validation loss. Epoch 0 in the loss
log is the untrained network evaluated on the validation set, and it competes for "best":
with the default residual U-Net (identity at start) the kept model is never worse than the
raw PET on the validation set.

Outputs in ``save_perfs_dir`` (see the brief's contract): splits.json, denoised/fold{k}/<id>.png,
loss_fold{k}.csv, loss_curves.png, metrics.csv, summary.csv (per fold),
qa_montage.png (PET | denoised | CT), manifest.csv, run.json,
fold{k}.json (what a finished fold was run with; a re-run skips a fold whose record matches),
and models in ``models_path`` (default save_perfs_dir/models): best_model_fold{k}.pt
(state_dict) + best_model_fold{k}.json (architecture and training settings).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.images import center_crop, read_grey, to_uint8, wavelet_denoise
from faceaudit.core.figures import figure_png, montage, new_axes
from faceaudit.core.files import (
    atomic_write_bytes,
    InputError,
    make_private_dir,
    read_json_file,
    write_csv,
    write_json,
    write_png,
)
from faceaudit.core.manifest import (
    describe_exception,
    ItemResult,
    Manifest,
    read_manifest,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
)
from faceaudit.core.runner import map_items, write_run_json
from faceaudit.petct.splits import (DEFAULT_VAL_FRACTION, PARTS, SCHEMES, kfold_patient_splits,
                                    make_splits, read_splits, split_leakage,
                                    upstream_random_splits)

DENOISERS = ("unet", "wavelet")
DEVICES = ("auto", "cpu", "cuda")

#: Upstream crop: 152 px off every border of a 512 px render.
DEFAULT_CROP = 208
#: MS-SSIM as upstream (piqa defaults): 5 scales, Gaussian window 11, sigma 1.5.
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_WIN = 11

#: Training images (the first ones, in id order) that set BatchNorm's running statistics
#: after each epoch; caps that extra forward pass on large cohorts.
BN_RECALIBRATION_IMAGES = 256

METRIC_COLUMNS = ("fold", "id", "subject", "msssim_before", "msssim_after", "psnr_before",
                  "psnr_after")
LOSS_COLUMNS = ("epoch", "train_loss", "val_loss")
SUMMARY_COLUMNS = ("fold", "n_test", "msssim_before", "msssim_after", "msssim_gain",
                   "psnr_before", "psnr_after", "n_improved")


# ----------------------------------------------------------------------------------------
# Pairing and loading
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderPair:
    """One study: its id, patient, and the CT and PET render files."""

    id: str
    subject: str
    ct_path: Path
    pet_path: Path


def pair_renders(ct_files: str | os.PathLike, pet_files: str | os.PathLike, *,
                 manifest_path: str | os.PathLike | None = None
                 ) -> tuple[list[RenderPair], list[ItemResult]]:
    """Pair ``<id>.png`` in the CT and PET folders by id.

    Returns (pairs sorted by id, problems). A study whose renders are missing is never
    dropped silently: it becomes a ``failed`` row (a side missing unexpectedly) or a
    ``skipped`` row (the reconstruction manifest already says it failed/was skipped).
    ``manifest_path`` defaults to ``Path(ct_files).parent / "manifest.csv"`` (optional file).
    """
    ct_dir, pet_dir = Path(ct_files), Path(pet_files)
    for name, folder in (("CT", ct_dir), ("PET", pet_dir)):
        if not folder.is_dir():
            raise InputError(f"expected a folder of {name} renders (*.png) at {folder}, found "
                             f"{'a file' if folder.exists() else 'nothing'}")
    if manifest_path is None:
        manifest_path = ct_dir.parent / "manifest.csv"
    manifest_path = Path(manifest_path)
    upstream_rows = {row["id"]: row for row in read_manifest(manifest_path)} \
        if manifest_path.is_file() else {}
    cts = {p.stem: p for p in ct_dir.glob("*.png")}
    pets = {p.stem: p for p in pet_dir.glob("*.png")}
    pairs, problems = [], []
    for item_id in sorted(set(cts) | set(pets) | set(upstream_rows)):
        row = upstream_rows.get(item_id)
        subject = (row.get("subject") or item_id) if row else item_id
        missing = [f"{name} render {folder / (item_id + '.png')}"
                   for name, folder, found in (("CT", ct_dir, cts), ("PET", pet_dir, pets))
                   if item_id not in found]
        if not missing:
            pairs.append(RenderPair(item_id, subject, cts[item_id], pets[item_id]))
            continue
        if row is not None and row.get("status") != STATUS_OK:
            reason = (f"reconstruction {row.get('status')}: {row.get('reason', '')}".strip()
                      + f"; missing {', '.join(missing)}")
            problems.append(ItemResult(item_id, subject, STATUS_SKIPPED, reason))
        else:
            problems.append(ItemResult(item_id, subject, STATUS_FAILED,
                                       f"unpaired: missing {' and '.join(missing)}"))
    return pairs, problems


def load_pair(pair: RenderPair, *, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair and centre-crop it: (ct, pet), each (crop, crop) uint8.

    Raises InputError for an unreadable file, CT/PET of different sizes, or renders
    smaller than the crop.
    """
    ct, pet = read_grey(pair.ct_path), read_grey(pair.pet_path)
    if ct.shape != pet.shape:
        raise InputError(f"size mismatch: CT {pair.ct_path} is {ct.shape[1]}x{ct.shape[0]} px, "
                         f"PET {pair.pet_path} is {pet.shape[1]}x{pet.shape[0]} px")
    if min(ct.shape) < crop:
        raise InputError(f"renders of {pair.id} are {ct.shape[1]}x{ct.shape[0]} px, smaller "
                         f"than the {crop} px crop")
    return to_uint8(center_crop(ct, crop)), to_uint8(center_crop(pet, crop))


@dataclass
class RenderSet:
    """Cropped renders in memory, indexed by id."""

    ids: list[str]
    subjects: dict[str, str]
    ct: dict[str, np.ndarray]
    pet: dict[str, np.ndarray]

    def stack(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pet, ct) uint8 arrays of shape (len(ids), crop, crop)."""
        return (np.stack([self.pet[i] for i in ids]), np.stack([self.ct[i] for i in ids]))


def load_renders(pairs: Sequence[RenderPair], *, crop: int, progress: bool = True
                 ) -> tuple[RenderSet, list[ItemResult]]:
    """Load every pair; one bad file becomes a ``failed`` row, the rest load."""
    data = RenderSet([], {}, {}, {})
    problems = []
    for pair, result, error in map_items(partial(load_pair, crop=crop), pairs,
                                         desc="load renders", progress=progress):
        if error is not None:
            problems.append(ItemResult(pair.id, pair.subject, STATUS_FAILED,
                                       describe_exception(error)))
            continue
        data.ids.append(pair.id)
        data.subjects[pair.id] = pair.subject
        data.ct[pair.id], data.pet[pair.id] = result
    data.ids.sort()
    return data, problems


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# MS-SSIM loss and image metrics
# ----------------------------------------------------------------------------------------

def msssim_window(side: int) -> int:
    """Gaussian window for 5-scale MS-SSIM on images whose smaller side is ``side`` px.

    pytorch_msssim requires ``side > (win - 1) * 16``: the upstream window 11 needs more
    than 160 px (208 px crops are fine). Smaller images (tests, tiny crops) get the largest
    odd window that fits; below 33 px there is none and this raises ValueError.
    """
    if side > (MSSSIM_WIN - 1) * 16:
        return MSSSIM_WIN
    win = math.ceil(side / 16)
    win -= 1 - win % 2  # largest odd value <= ceil(side / 16)
    if win < 3:
        raise ValueError(f"images of {side} px are too small for 5-scale MS-SSIM "
                         "(need more than 32 px)")
    return win


def msssim(x, y, *, per_image: bool = False):
    """MS-SSIM of (N, 1, H, W) tensors in [0, 1]: a scalar mean, or (N,) with per_image."""
    import warnings

    from pytorch_msssim import ms_ssim

    with warnings.catch_warnings():
        # Tiny images skip the blur at the coarsest scale; that is expected here.
        warnings.filterwarnings("ignore", message="Skipping Gaussian Smoothing")
        return ms_ssim(x, y, data_range=1.0, size_average=not per_image,
                       win_size=msssim_window(min(x.shape[-2:])), weights=list(MSSSIM_WEIGHTS))


def msssim_loss(prediction, target):
    """Training loss 1 - MS-SSIM (mean over the batch)."""
    return 1.0 - msssim(prediction, target)


def image_metrics(candidate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MS-SSIM, PSNR in dB) of each candidate against its reference.

    Both (N, H, W) float in [0, 1]; returns two (N,) float64 arrays. PSNR is inf for
    identical images.
    """
    import torch

    cand = np.asarray(candidate, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    if cand.shape != ref.shape or cand.ndim != 3:
        raise ValueError(f"expected two (N, H, W) arrays of one shape, got {cand.shape} and "
                         f"{ref.shape}")
    with torch.no_grad():
        scores = msssim(torch.from_numpy(cand)[:, None], torch.from_numpy(ref)[:, None],
                        per_image=True).double().numpy()
    mse = ((cand.astype(np.float64) - ref.astype(np.float64)) ** 2).mean(axis=(1, 2))
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)
    return scores, psnr


# ----------------------------------------------------------------------------------------
# Training and inference
# ----------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; 'cuda' without CUDA is an InputError."""
    import torch

    if device not in DEVICES:
        raise InputError(f"--device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA device")
    return device


def fold_seed(seed: int, fold: int) -> int:
    """A 63-bit torch seed derived from (seed, fold), so folds do not share initialisations."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _as_batch(array_u8, device):
    import torch

    return (torch.as_tensor(array_u8).to(device=device, dtype=torch.float32) / 255.0)[:, None]


def denoise_arrays(model, images: np.ndarray, *, batch_size: int = 32,
                   device: str = "cpu") -> np.ndarray:
    """Run ``model`` (in eval mode) on (N, H, W) float32 [0, 1] images, ``batch_size`` at a time.

    Images whose sides are not multiples of 8 are edge-padded and cropped back. The
    upstream network normalises with batch statistics, so its output depends on which
    images share a batch; inputs are processed in the given order.
    """
    import torch
    import torch.nn.functional as F

    from faceaudit.petct.unet import SPATIAL_MULTIPLE

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {images.shape}")
    n, h, w = images.shape
    pad_h, pad_w = (-h) % SPATIAL_MULTIPLE, (-w) % SPATIAL_MULTIPLE
    model.eval()
    out = np.empty_like(images)
    with torch.no_grad():
        for start in range(0, n, max(1, batch_size)):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device)[:, None]
            if pad_h or pad_w:
                batch = F.pad(batch, (0, pad_w, 0, pad_h), mode="replicate")
            pred = model(batch)[:, 0, :h, :w]
            out[start:start + batch_size] = pred.float().cpu().numpy()
    return out


@dataclass
class TrainResult:
    """Best state (by validation loss), its epoch, and the loss history."""

    state_dict: dict
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def recalibrate_batchnorm(model, pet: np.ndarray, *, batch_size: int, device: str) -> None:
    """Set every BatchNorm layer's running statistics to the exact average over ``pet``.

    With few optimiser steps (small cohorts, demo epochs) the default exponential average
    (momentum 0.1, starting from mean 0 / var 1) is far from the statistics of the trained
    weights, and eval() outputs are wrong even when the training loss is low. One extra
    forward pass over (up to BN_RECALIBRATION_IMAGES) training images after each epoch
    fixes that ("precise BN").
    Models without BatchNorm modules (the upstream network) are left as they are.
    """
    import torch
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
    model.train()
    with torch.no_grad():
        for start in range(0, len(pet), batch_size):
            model(_as_batch(pet[start:start + batch_size], device))
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
    model.eval()


def _mean_loss(model, pet, ct, *, batch_size, device) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(pet), batch_size):
            x = _as_batch(pet[start:start + batch_size], device)
            y = _as_batch(ct[start:start + batch_size], device)
            total += float(msssim_loss(model(x), y)) * len(x)
    return total / len(pet)


def train_denoiser(train_pet: np.ndarray, train_ct: np.ndarray, val_pet: np.ndarray,
                   val_ct: np.ndarray, *, arch: str = "unet", n_epochs: int = 50,
                   batch_size: int = 32, lr: float = 1e-2, seed: int = 0, device: str = "cpu",
                   progress: bool = True, desc: str = "train",
                   model_options: Mapping[str, Any] | None = None) -> tuple[Any, TrainResult]:
    """Train PET -> CT with 1 - MS-SSIM and Adam; keep the state with the lowest val loss.

    Arrays are uint8 (N, H, W) renders (H, W multiples of 8). Epoch 0 is the untrained
    model's validation loss (no training loss). Deterministic on CPU for a given ``seed``
    (weights initialised after ``torch.manual_seed(seed)``, shuffling from a generator
    seeded with it). Returns (model holding the best state, TrainResult).
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    from faceaudit.petct.unet import build_model

    if len(train_pet) == 0 or len(val_pet) == 0:
        raise InputError(f"training needs non-empty train and val sets, got {len(train_pet)} "
                         f"and {len(val_pet)} images")
    torch.manual_seed(seed)
    if device == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = build_model(arch, **dict(model_options or {})).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(train_pet), torch.from_numpy(train_ct)),
                        batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
    val_loss = _mean_loss(model, val_pet, val_ct, batch_size=batch_size, device=device)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_loss": val_loss}]
    best = TrainResult(copy.deepcopy(model.state_dict()), 0, val_loss, history)
    bar = tqdm(range(1, n_epochs + 1), desc=desc, unit="epoch", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        total = 0.0
        for pet_u8, ct_u8 in loader:
            x, y = _as_batch(pet_u8, device), _as_batch(ct_u8, device)
            optimiser.zero_grad(set_to_none=True)
            loss = msssim_loss(model(x), y)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(x)
        train_loss = total / len(train_pet)
        recalibrate_batchnorm(model, train_pet[:BN_RECALIBRATION_IMAGES], batch_size=batch_size,
                              device=device)
        val_loss = _mean_loss(model, val_pet, val_ct, batch_size=batch_size, device=device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best.best_val_loss:
            best.state_dict = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_val_loss = epoch, val_loss
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}",
                        best=f"{best.best_val_loss:.4f}@{best.best_epoch}")
    bar.close()
    model.load_state_dict(best.state_dict)
    model.eval()
    return model, best


def save_model(model, pt_path: str | os.PathLike, *, info: Mapping[str, Any]) -> Path:
    """Write ``model``'s state_dict to ``pt_path`` and its config + ``info`` to the .json beside it."""
    import torch

    from faceaudit.petct.unet import model_config

    pt_path = Path(pt_path)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(pt_path, buf.getvalue())
    write_json(pt_path.with_suffix(".json"), {**model_config(model), **info})
    return pt_path


class Denoiser:
    """A trained denoiser: call it on (N, H, W) (or (H, W)) float32 [0, 1] images."""

    def __init__(self, model, config: Mapping[str, Any], *, device: str = "cpu",
                 batch_size: int = 32) -> None:
        self.model = model
        self.config = dict(config)
        self.device = device
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            return self(images[None])[0]
        return denoise_arrays(self.model, images, batch_size=self.batch_size, device=self.device)


def load_denoiser(pt_path: str | os.PathLike, device: str = "cpu", *,
                  batch_size: int = 32) -> Denoiser:
    """Load ``best_model_fold{k}.pt`` and its ``.json`` sidecar (torch.load weights_only=True).

    Returns a callable mapping (N, H, W) float32 [0, 1] PET renders (centre crops, e.g.
    208 x 208) to denoised renders of the same shape. A missing file or a state that does
    not fit the recorded architecture is an InputError naming the file.
    """
    import torch

    from faceaudit.petct.unet import build_model

    pt_path = Path(pt_path)
    sidecar = pt_path.with_suffix(".json")
    for path in (pt_path, sidecar):
        if not path.is_file():
            raise InputError(f"expected a denoiser file at {path}, found nothing "
                             "(perform_crossval.py writes best_model_fold{k}.pt and .json)")
    try:
        config = json.loads(sidecar.read_text(encoding="utf-8"))
        model = build_model(config["arch"], **config.get("options", {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot read the architecture from {sidecar}: {exc}") from exc
    device = resolve_device(device)
    try:
        state = torch.load(pt_path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # pickle errors, truncated zip, shape mismatches
        raise InputError(f"cannot load a {config['arch']} state_dict from {pt_path}: "
                         f"{describe_exception(exc)}") from exc
    model.to(device).eval()
    return Denoiser(model, config, device=device, batch_size=batch_size)


# ----------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------

def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.csv rows with fold as int and the four metrics as float."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected a metrics.csv at {path}, found nothing")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        out.append({**row, "fold": int(row["fold"]),
                    **{k: float(row[k]) for k in METRIC_COLUMNS[3:]}})
    return out


def summarise_metrics(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per fold: n_test, mean MS-SSIM and PSNR of PET vs CT before/after denoising,
    the MS-SSIM gain, and how many test images got closer to their CT (MS-SSIM up)."""
    folds: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        folds.setdefault(int(row["fold"]), []).append(row)
    summary = []
    for fold in sorted(folds):
        items = folds[fold]

        def mean(key):
            values = np.array([float(r[key]) for r in items], dtype=np.float64)
            finite = values[np.isfinite(values)]
            return float(finite.mean()) if finite.size else float("nan")

        before, after = mean("msssim_before"), mean("msssim_after")
        summary.append({
            "fold": fold, "n_test": len(items),
            "msssim_before": before, "msssim_after": after, "msssim_gain": after - before,
            "psnr_before": mean("psnr_before"), "psnr_after": mean("psnr_after"),
            "n_improved": sum(float(r["msssim_after"]) > float(r["msssim_before"])
                              for r in items),
        })
    return summary


def summarise_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """:func:`summarise_metrics` of a crossval run's metrics.csv (for the report)."""
    return summarise_metrics(read_metrics_csv(path))


def plot_loss_curves(histories: Mapping[int, Sequence[Mapping[str, float]]]) -> bytes:
    """PNG bytes: train (solid) and validation (dashed) loss per epoch, one colour per fold."""
    fig, ax = new_axes(figsize=(6.4, 4.2), dpi=100)
    for index, fold in enumerate(sorted(histories)):
        colour = f"C{index % 10}"
        rows = histories[fold]
        epochs = [r["epoch"] for r in rows if math.isfinite(r["train_loss"])]
        ax.plot(epochs, [r["train_loss"] for r in rows if math.isfinite(r["train_loss"])],
                color=colour, label=f"fold {fold} train")
        ax.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], color=colour,
                linestyle="--", marker=".", label=f"fold {fold} val")
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("1 - MS-SSIM (PET -> CT)")
    ax.set_title("Denoiser loss per fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return figure_png(fig)


def _read_loss_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{"epoch": int(r["epoch"]), "train_loss": float(r["train_loss"] or "nan"),
                 "val_loss": float(r["val_loss"])} for r in csv.DictReader(fh)]


def qa_montage(splits: Mapping[str, Any], data: RenderSet, denoised_root: Path, *,
               per_fold: int = 2, tile: int = 208) -> np.ndarray | None:
    """RGB montage, one row per shown test image: PET | denoised PET | CT, with MS-SSIM to CT.

    Shows the first ``per_fold`` test ids of every fold; None when no fold has a test set.
    """
    images, labels = [], []
    for fold in splits["folds"]:
        for item_id in fold["test"][:per_fold]:
            path = denoised_root / f"fold{fold['fold']}" / f"{item_id}.png"
            if not path.is_file():
                continue
            pet = data.pet[item_id].astype(np.float32) / 255.0
            ct = data.ct[item_id].astype(np.float32) / 255.0
            denoised = read_grey(path)
            scores, _ = image_metrics(np.stack([pet, denoised]), np.stack([ct, ct]))
            images += [to_uint8(pet), to_uint8(denoised), to_uint8(ct)]
            labels += [f"f{fold['fold']} PET {scores[0]:.3f}", f"denoised {scores[1]:.3f}",
                       f"CT {item_id[:22]}"]
    if not images:
        return None
    return montage(images, labels=labels, ncols=3, tile=tile)


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    """A small text table of :func:`summarise_metrics` for the terminal."""
    lines = ["fold  n_test  MS-SSIM before -> after  PSNR before -> after  improved"]
    for row in summary:
        lines.append(f"{row['fold']:>4}  {row['n_test']:>6}  {row['msssim_before']:>14.4f} -> "
                     f"{row['msssim_after']:.4f}  {row['psnr_before']:>11.2f} -> "
                     f"{row['psnr_after']:.2f}  {row['n_improved']}/{row['n_test']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------

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
    crop: int = DEFAULT_CROP

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
    needed = [save_dir / "denoised" / f"fold{k}" / f"{i}.png" for i in record["test"]]
    if record["denoiser"] == "unet":
        needed += [save_dir / f"loss_fold{k}.csv", models_dir / f"best_model_fold{k}.pt",
                   models_dir / f"best_model_fold{k}.json"]
    return previous if all(path.is_file() for path in needed) else None


def run_fold(k: int, fold: Mapping[str, Any], data: RenderSet, options: CrossvalOptions, *,
             save_dir: Path, models_dir: Path, device: str, progress: bool
             ) -> dict[str, Any]:
    """Train (or apply the wavelet baseline) for one fold and write its denoised test renders.

    Returns {"history": loss rows or [], "best_epoch", "best_val_loss", "seconds"}.
    """
    started = time.time()
    out_dir = make_private_dir(save_dir / "denoised" / f"fold{k}")
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
        write_csv(save_dir / f"loss_fold{k}.csv", [
            {**row, "train_loss": "" if math.isnan(row["train_loss"]) else row["train_loss"]}
            for row in result.history], LOSS_COLUMNS)
        save_model(model, models_dir / f"best_model_fold{k}.pt", info={
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
                 split_scheme: str = "kfold", crop: int = DEFAULT_CROP,
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
    with _torch_threads(threads):
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
        models_dir = Path(models_path) if models_path else save_dir / "models"
        if denoiser == "unet":
            make_private_dir(models_dir)
        failed_ids = [p.id for p in problems]
        if splits_file is not None:
            splits = load_splits(splits_file, usable_ids=data.ids, failed_ids=failed_ids,
                                 subjects={**{p.id: p.subject for p in problems}, **data.subjects})
            splits["crop"] = crop
        else:
            splits = make_splits(data.ids, data.subjects, scheme=split_scheme, n_folds=n_folds, seed=seed, crop=crop,
                                 val_fraction=val_fraction)
        write_json(save_dir / "splits.json", splits)

        manifest = Manifest(save_dir / "manifest.csv")
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
                    info["history"] = _read_loss_csv(save_dir / f"loss_fold{k}.csv")
            else:
                info = run_fold(k, fold, data, options, save_dir=save_dir, models_dir=models_dir,
                                device=run_device, progress=progress)
                write_json(save_dir / f"fold{k}.json", {
                    "record": record, "best_epoch": info["best_epoch"],
                    "best_val_loss": info["best_val_loss"], "seconds": info["seconds"],
                    "device": run_device})
            if info.get("history"):
                histories[k] = info["history"]
            rows = fold_metrics(k, fold["test"], data, save_dir / "denoised" / f"fold{k}")
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

        qa = qa_montage(splits, data, save_dir / "denoised")
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


@contextmanager
def _torch_threads(threads: int | None):
    """torch's CPU thread count set to ``threads`` (None/0: unchanged) for the block."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
