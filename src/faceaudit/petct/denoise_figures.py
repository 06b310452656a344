"""The denoiser's figures: loss curves per fold and a PET | denoised | CT montage."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faceaudit.core.contracts import RENDER_CROP, denoised_fold_dir
from faceaudit.core.figures import figure_png, montage, new_axes
from faceaudit.core.images import read_grey, to_uint8
from faceaudit.petct.denoise_metrics import image_metrics
from faceaudit.petct.render_pairs import RenderSet


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



def denoising_montage(splits: Mapping[str, Any], data: RenderSet, denoised_root: Path, *,
                      per_fold: int = 2, tile: int = RENDER_CROP) -> np.ndarray | None:
    """RGB montage, one row per shown test image: PET | denoised PET | CT, with MS-SSIM to CT.

    Shows the first ``per_fold`` test ids of every fold; None when no fold has a test set.
    """
    images, labels = [], []
    for fold in splits["folds"]:
        for item_id in fold["test"][:per_fold]:
            path = denoised_fold_dir(denoised_root, fold["fold"]) / f"{item_id}.png"
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


