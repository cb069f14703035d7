"""Images as one PIL grid, with row and column labels (:func:`image_grid`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time: ``import hmine`` stays cheap
    from PIL import Image


# --------------------------------------------------------------------------------------
# images


def _as_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch
        images = images.detach().float().cpu().numpy()
    return np.asarray(getattr(images, "values", images))


def _uint8(images: Any) -> np.ndarray:
    from hmine.imaging import to_uint8

    array = _as_numpy(images)
    return array if array.dtype == np.uint8 else to_uint8(array)


def _grid_canvas(cells: np.ndarray, pad: int) -> np.ndarray:
    """uint8 cells (rows, cols, 3, H, W) on a white canvas, ``pad`` pixels apart (H, W, 3)."""
    rows, cols, _, h, w = cells.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = cells[r, c].transpose(1, 2, 0)
    return canvas


def image_grid(
    images: Any,
    columns: int | None = None,
    *,
    upscale: int = 1,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Images as one PIL image: a grid, optionally with row and column labels.

    Parameters
    ----------
    images : array-like
        Float images in [-1, 1] (as every hmine store holds them) or uint8, as a numpy
        array, torch tensor or DataArray of shape (3, H, W), (n, 3, H, W) or
        (rows, columns, 3, H, W). ``run.edit(...)`` (scale, color, height, width) gives
        one row, ``run.samples["x0"][:16]`` sixteen images.
    columns : int, optional
        For (n, 3, H, W): images per row (default: all of them in one row, at most 8).
    upscale : int, default=1
        Nearest-neighbour enlargement (the demo's images are 32 x 32).
    pad : int, default=2
        White pixels between images.
    row_labels, column_labels : sequence of str, optional
        Written left of each row and above each column.

    Returns
    -------
    PIL.Image.Image
        Shown as a picture by Jupyter; ``.save("grid.png")`` writes it.

    Examples
    --------
    >>> run = hmine.open_run("stores/demo")  # doctest: +SKIP
    >>> hmine.image_grid(run.samples["x0"][:16], columns=8, upscale=2)  # doctest: +SKIP
    >>> hmine.image_grid(run.edit(3, "probe/is_red", [-20, 0, 20]), upscale=3)  # doctest: +SKIP
    """
    from PIL import Image

    cells = _grid_cells(_uint8(images), columns)
    rows, cols = cells.shape[:2]
    for labels, count, what in ((row_labels, rows, "row_labels"), (column_labels, cols, "column_labels")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{what} has {len(labels)} entries for {count} {what.split('_')[0]}s")
    image = Image.fromarray(_grid_canvas(cells, pad))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    if row_labels is None and column_labels is None:
        return image
    return _labelled(image, cells.shape[3:], pad * upscale, upscale, row_labels, column_labels)


def _grid_cells(cells: np.ndarray, columns: int | None) -> np.ndarray:
    """uint8 images of shape (3, H, W), (n, 3, H, W) or (rows, columns, 3, H, W) as (rows, columns, 3, H, W)."""
    if cells.ndim == 3:
        cells = cells[None, None]
    elif cells.ndim == 4:
        n = cells.shape[0]
        columns = columns or min(n, 8)
        rows = -(-n // columns)
        blank = np.full((rows * columns - n, *cells.shape[1:]), 255, np.uint8)
        cells = np.concatenate([cells, blank]).reshape(rows, columns, *cells.shape[1:])
    elif cells.ndim != 5:
        raise ValueError(f"images must have shape (3, H, W), (n, 3, H, W) or (rows, columns, 3, H, W), got {cells.shape}")
    if cells.shape[2] != 3:
        raise ValueError(f"images must have 3 color channels on the axis before (H, W), got shape {cells.shape}")
    return cells


def _labelled(image: Image.Image, cell_size, pad: int, upscale: int, row_labels, column_labels) -> Image.Image:
    """``image`` (a grid of ``cell_size`` cells, ``pad`` pixels apart once upscaled) with labels left and above."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    left = max((size(str(t))[0] for t in row_labels or []), default=0) + (8 if row_labels else 0)
    top = max((size(str(t))[1] for t in column_labels or []), default=0) + (6 if column_labels else 0)
    labelled = Image.new("RGB", (image.width + left, image.height + top), "white")
    labelled.paste(image, (left, top))
    draw = ImageDraw.Draw(labelled)
    h, w = cell_size[0] * upscale, cell_size[1] * upscale
    for r, text in enumerate(row_labels or []):  # left of the row, centred on it
        y = top + pad + r * (h + pad) + (h - size(str(text))[1]) // 2
        draw.text((4, y), str(text), fill="black", font=font)
    for c, text in enumerate(column_labels or []):  # above the column, centred on it
        x = left + pad + c * (w + pad) + (w - size(str(text))[0]) // 2
        draw.text((x, 2), str(text), fill="black", font=font)
    return labelled


def _scale_label(scale: float) -> str:
    return f"{scale:+g}" if scale else "0"
