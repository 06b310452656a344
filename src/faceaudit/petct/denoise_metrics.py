"""Image metrics of the denoiser: MS-SSIM (also its training loss), PSNR, per-fold summaries.

MS-SSIM is computed as upstream's piqa loss: pytorch_msssim, Gaussian window 11,
sigma 1.5, 5 scales with the standard weights, data range 1; smaller images get the
largest window that fits (:func:`msssim_window`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from faceaudit.core.images import read_grey

if TYPE_CHECKING:
    from faceaudit.petct.render_pairs import RenderSet

#: MS-SSIM as upstream (piqa defaults): 5 scales, Gaussian window 11, sigma 1.5.
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_WIN = 11

METRIC_COLUMNS = ("fold", "id", "subject", "msssim_before", "msssim_after", "psnr_before",
                  "psnr_after")
SUMMARY_COLUMNS = ("fold", "n_test", "msssim_before", "msssim_after", "msssim_gain",
                   "psnr_before", "psnr_after", "n_improved")


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



def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    """A small text table of :func:`summarise_metrics` for the terminal."""
    lines = ["fold  n_test  MS-SSIM before -> after  PSNR before -> after  improved"]
    for row in summary:
        lines.append(f"{row['fold']:>4}  {row['n_test']:>6}  {row['msssim_before']:>14.4f} -> "
                     f"{row['msssim_after']:.4f}  {row['psnr_before']:>11.2f} -> "
                     f"{row['psnr_after']:.2f}  {row['n_improved']}/{row['n_test']}")
    return "\n".join(lines)


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
