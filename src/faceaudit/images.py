"""2-D image helpers shared by the render, denoising and landmark stages.

Grey images inside the library are float32 arrays in [0, 1] of shape (H, W);
they become uint8 only when written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from faceaudit.stageio import InputError


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as float32 grey in [0, 1], shape (H, W)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected an image file at {path}, found nothing")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"cannot read {path} as an image: {exc}") from exc
    return arr


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, clipped and rounded."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` crop of an (H, W[, C]) image (upstream: 512 -> 208)."""
    h, w = image.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds image shape {image.shape[:2]}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def wavelet_denoise(image: np.ndarray) -> np.ndarray:
    """Upstream's non-deep baseline: BayesShrink soft thresholding (db1), output in [0, 1]."""
    from skimage.restoration import denoise_wavelet

    out = denoise_wavelet(np.asarray(image, dtype=np.float64), method="BayesShrink",
                          mode="soft", rescale_sigma=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
