"""Image helpers shared by training, the edit stage and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] of shape (..., 3, H, W) to uint8."""
    return ((np.clip(np.asarray(images, dtype=np.float32), -1, 1) + 1) * 127.5).round().astype(np.uint8)


def write_image_grid(images: np.ndarray, path: Path, columns: int = 8, *, pad: int = 2, upscale: int = 1) -> None:
    """Save images of shape (n, 3, H, W) — uint8, or float in [-1, 1] — as one PNG grid."""
    from PIL import Image

    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    image = Image.fromarray(canvas)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
