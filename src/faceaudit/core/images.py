"""2-D image helpers shared by the render, denoising and landmark stages.

Grey images inside the library are float32 arrays in [0, 1] of shape (H, W);
they become uint8 only when written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from faceaudit.core.files import InputError

#: EXIF tag 274: how the stored pixels must be turned to show the scene upright.
EXIF_ORIENTATION = 0x0112


def open_image(path: str | os.PathLike):
    """A loaded PIL image, upright; a missing or unreadable file is an InputError quoting the path.

    A phone stores a portrait photo as landscape pixels plus an EXIF orientation tag;
    read without it, the face lies on its side and the detector or the pose rule
    rejects it for a wrong reason. The tag is applied here, for every reader.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise InputError(f"expected an image file at {path}, found nothing")
    try:
        im = Image.open(path)
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)
    except Exception as exc:  # Pillow raises many types for broken files
        raise InputError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return im


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as float32 grey in [0, 1], shape (H, W)."""
    with open_image(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8, shape (H, W, 3); 16-bit and float grey are
    stretched to their own range (PIL's own conversion would clip them)."""
    with open_image(path) as im:
        if im.mode in ("I;16", "I;16B", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            span = max(float(np.ptp(arr)), 1e-12)
            arr = ((arr - arr.min()) / span * 255).astype(np.uint8)
            return np.repeat(arr[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


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
