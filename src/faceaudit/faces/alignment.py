"""Five-point face alignment to the ArcFace template, shared by every ArcFace-family recognizer."""

from __future__ import annotations

import numpy as np


def norm_crop(image: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
    """insightface's 5-point similarity alignment to the ArcFace template.

    image : (H, W, 3) uint8, in the channel order the model is to receive.
    keypoints : (5, 2) pixels: eyes, nose tip, mouth corners (the detector's order).
    size : side of the square crop, pixels (112 for ArcFace).
    Returns the (size, size, 3) uint8 crop.
    """
    import warnings

    from insightface.utils import face_align

    with warnings.catch_warnings():  # skimage's estimate() deprecation, raised per call
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(image, landmark=np.asarray(keypoints, dtype=np.float32),
                                    image_size=int(size))
