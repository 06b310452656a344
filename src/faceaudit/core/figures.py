"""Pictures for QA and reports: contact sheets of many small images on one labelled
grid, and matplotlib figures rendered to PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def montage(images: Sequence[np.ndarray], *, labels: Sequence[str] | None = None,
            ncols: int = 6, tile: int = 160, background: int = 255) -> np.ndarray:
    """Arrange grey or RGB uint8 images in a grid of ``tile`` x ``tile`` cells.

    Each image is scaled to fit its cell (aspect ratio kept); a label, if given,
    is printed under it. Returns an RGB uint8 array.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("montage needs at least one image")
    label_h = 14 if labels is not None else 0
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    sheet = Image.new("RGB", (ncols * tile, nrows * (tile + label_h)), (background,) * 3)
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr).convert("RGB")
        im.thumbnail((tile, tile))
        r, c = divmod(i, ncols)
        x0 = c * tile + (tile - im.width) // 2
        y0 = r * (tile + label_h) + (tile - im.height) // 2
        sheet.paste(im, (x0, y0))
        if labels is not None:
            draw.text((c * tile + 2, r * (tile + label_h) + tile), str(labels[i])[:26], fill=(0, 0, 0))
    return np.asarray(sheet)


def new_axes(*, figsize: tuple[float, float], dpi: int):
    """``(fig, ax)`` on matplotlib's Agg backend: stages run headless, on servers and CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=dpi)


def figure_png(fig) -> bytes:
    """A finished figure as PNG bytes (tight layout); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
