"""The PET -> CT denoiser: training, BatchNorm recalibration, saving, loading, applying.

Training: loss 1 - MS-SSIM (see :mod:`faceaudit.petct.denoise_metrics`), Adam, best
model by mean validation loss. Epoch 0 of the loss history is the untrained network
evaluated on the validation set, and it competes for "best": with the default residual
U-Net (identity at start) the kept model is never worse than the raw PET on the
validation set. A model is saved as ``best_model_fold{k}.pt`` (state_dict) and its
``.json`` sidecar (architecture and training settings); :func:`load_denoiser` reads
both back (``torch.load(weights_only=True)``: no pickle).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import model_info_for
from faceaudit.core.files import InputError, atomic_write_bytes, write_csv, write_json
from faceaudit.core.manifest import describe_exception
from faceaudit.petct.denoise_metrics import msssim_loss

DEVICES = ("auto", "cpu", "cuda")

#: Training images (the first ones, in id order) that set BatchNorm's running statistics
#: after each epoch; caps that extra forward pass on large cohorts.
BN_RECALIBRATION_IMAGES = 256

LOSS_COLUMNS = ("epoch", "train_loss", "val_loss")


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


def _seeded_setup(train_pet: np.ndarray, train_ct: np.ndarray, *, arch: str, batch_size: int,
                  lr: float, seed: int, device: str, model_options: Mapping[str, Any] | None):
    """(model, optimiser, shuffling loader), seeded in this order so that a seed gives the
    same initial weights and the same batches on every run."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from faceaudit.petct.unet import build_model

    torch.manual_seed(seed)
    if device == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = build_model(arch, **dict(model_options or {})).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(train_pet), torch.from_numpy(train_ct)),
                        batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
    return model, optimiser, loader


def _train_epoch(model, optimiser, loader, *, device: str) -> float:
    """One pass over the shuffled training set; the mean training loss per image."""
    model.train()
    total = 0.0
    for pet_u8, ct_u8 in loader:
        x, y = _as_batch(pet_u8, device), _as_batch(ct_u8, device)
        optimiser.zero_grad(set_to_none=True)
        loss = msssim_loss(model(x), y)
        loss.backward()
        optimiser.step()
        total += float(loss.detach()) * len(x)
    return total / len(loader.dataset)


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
    from tqdm.auto import tqdm

    if len(train_pet) == 0 or len(val_pet) == 0:
        raise InputError(f"training needs non-empty train and val sets, got {len(train_pet)} "
                         f"and {len(val_pet)} images")
    model, optimiser, loader = _seeded_setup(train_pet, train_ct, arch=arch,
                                             batch_size=batch_size, lr=lr, seed=seed,
                                             device=device, model_options=model_options)
    val_loss = _mean_loss(model, val_pet, val_ct, batch_size=batch_size, device=device)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_loss": val_loss}]
    best = TrainResult(copy.deepcopy(model.state_dict()), 0, val_loss, history)
    bar = tqdm(range(1, n_epochs + 1), desc=desc, unit="epoch", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        train_loss = _train_epoch(model, optimiser, loader, device=device)
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
    write_json(model_info_for(pt_path), {**model_config(model), **info})
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
    sidecar = model_info_for(pt_path)
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


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` (None/0: unchanged) for the block."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
