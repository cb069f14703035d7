"""The embedded "shapes" world: procedural 32x32 images whose generative factors are known.

Every image is one filled shape on a flat grey background. The factors are

==============  ==========  ===================================================
factor          kind        values
==============  ==========  ===================================================
``shape``       discrete    0 circle, 1 square, 2 triangle
``color``       discrete    0 red, 1 green, 2 blue
``size``        continuous  half-extent of the shape in pixels, [SIZE_MIN, SIZE_MAX]
``x``, ``y``    continuous  centre of the shape in pixels (0 = left / top edge)
``background``  continuous  grey level of the background in [BG_MIN, BG_MAX]
==============  ==========  ===================================================

One pair of factors is deliberately correlated, the way smiling correlates with gender
in CelebA: circles are red with probability ``P_RED_GIVEN_CIRCLE`` while other shapes
draw their colour uniformly. Raw supervised directions for ``is_circle`` therefore leak
onto ``is_red`` and the conditional projection has something measurable to fix.

Binary attributes derived from the factors (the ones the direction stage uses) are listed
in :data:`BINARY_ATTRIBUTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")
# Saturated but not pure colours, so every shape is far from every background grey.
PALETTE = np.array(
    [[0.90, 0.15, 0.15], [0.15, 0.80, 0.20], [0.20, 0.30, 0.95]], dtype=np.float32
)
SIZE_MIN, SIZE_MAX = 5.0, 10.0
BG_MIN, BG_MAX = 0.05, 0.55
P_RED_GIVEN_CIRCLE = 0.8
# Thresholds of the binary attributes; chosen at the middle of each factor's range.
SIZE_LARGE_THRESHOLD = 0.5 * (SIZE_MIN + SIZE_MAX)
BG_LIGHT_THRESHOLD = 0.5 * (BG_MIN + BG_MAX)
CENTER = IMAGE_SIZE / 2.0

DISCRETE_FACTORS = {"shape": SHAPES, "color": COLORS}
CONTINUOUS_FACTORS = ("size", "x", "y", "background")
BINARY_ATTRIBUTES = ("is_circle", "is_red", "is_large", "is_left", "is_top", "is_light_bg")

_SUPERSAMPLE = 4  # 4x4 sub-pixels per pixel give smooth, antialiased edges


@dataclass(frozen=True)
class WorldBatch:
    """Images of the shapes world with their factors.

    Attributes
    ----------
    images : ndarray of shape (n, 3, 32, 32), float32 in [-1, 1]
    factors : dict of str to ndarray of shape (n,)
        ``shape`` and ``color`` as int64 class indices; ``size``, ``x``, ``y``,
        ``background`` as float32.
    masks : ndarray of shape (n, 32, 32), float32 in [0, 1]
        Fraction of each pixel covered by the shape (the foreground region).
    """

    images: np.ndarray
    factors: dict[str, np.ndarray]
    masks: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]


def sample_factors(n: int, seed: int) -> dict[str, np.ndarray]:
    """Draw ``n`` factor tuples from the training distribution (with the correlated pair)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, len(SHAPES), size=n)
    uniform_color = rng.integers(0, len(COLORS), size=n)
    circle_color = np.where(
        rng.random(n) < P_RED_GIVEN_CIRCLE, 0, rng.integers(1, len(COLORS), size=n)
    )
    color = np.where(shape == 0, circle_color, uniform_color)
    size = rng.uniform(SIZE_MIN, SIZE_MAX, size=n)
    # Keep the whole shape inside the canvas with a one-pixel margin.
    lo, hi = size + 1.0, IMAGE_SIZE - size - 1.0
    x = lo + rng.random(n) * (hi - lo)
    y = lo + rng.random(n) * (hi - lo)
    background = rng.uniform(BG_MIN, BG_MAX, size=n)
    return {
        "shape": shape.astype(np.int64),
        "color": color.astype(np.int64),
        "size": size.astype(np.float32),
        "x": x.astype(np.float32),
        "y": y.astype(np.float32),
        "background": background.astype(np.float32),
    }


def shape_coverage(factors: dict[str, np.ndarray], chunk: int = 1024) -> np.ndarray:
    """Fraction of each pixel covered by each image's shape, shape (n, 32, 32).

    Computed ``chunk`` images at a time, so memory stays bounded for any ``n`` (the
    supersampled grids take about 0.5 MB per image).
    """
    n = len(factors["shape"])
    if n > chunk:
        parts = [
            _shape_coverage({k: v[start : start + chunk] for k, v in factors.items()})
            for start in range(0, n, chunk)
        ]
        return np.concatenate(parts)
    return _shape_coverage(factors)


def _shape_coverage(factors: dict[str, np.ndarray]) -> np.ndarray:
    n = len(factors["shape"])
    sub = (np.arange(IMAGE_SIZE * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    gy, gx = np.meshgrid(sub, sub, indexing="ij")
    dx = gx[None] - factors["x"][:, None, None]
    dy = gy[None] - factors["y"][:, None, None]
    r = factors["size"][:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Upward isosceles triangle inscribed in the square of half-extent r.
    triangle = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2.0)
    inside = np.select(
        [factors["shape"][:, None, None] == k for k in range(3)], [circle, square, triangle]
    )
    inside = inside.reshape(n, IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE)
    return inside.mean(axis=(2, 4)).astype(np.float32)


def render(factors: dict[str, np.ndarray]) -> WorldBatch:
    """Render images (in [-1, 1]) and foreground masks for given factors."""
    coverage = shape_coverage(factors)
    color = PALETTE[factors["color"]][:, :, None, None]  # (n, 3, 1, 1)
    background = factors["background"][:, None, None, None]
    image01 = background + coverage[:, None] * (color - background)
    images = (image01 * 2.0 - 1.0).astype(np.float32)
    return WorldBatch(images=images, factors=factors, masks=coverage)


def generate(n: int, seed: int) -> WorldBatch:
    """Draw ``n`` images of the shapes world; the same (n, seed) always gives the same batch."""
    return render(sample_factors(n, seed))


def binary_attributes(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The binary attributes of :data:`BINARY_ATTRIBUTES` as bool arrays."""
    return {
        "is_circle": factors["shape"] == 0,
        "is_red": factors["color"] == 0,
        "is_large": factors["size"] > SIZE_LARGE_THRESHOLD,
        "is_left": factors["x"] < CENTER,
        "is_top": factors["y"] < CENTER,
        "is_light_bg": factors["background"] > BG_LIGHT_THRESHOLD,
    }


def foreground_mask(images: np.ndarray, min_contrast: float = 0.2) -> np.ndarray:
    """The shape's region in images of this world (generated ones included), (n, H, W) bool.

    The background is flat, so its colour is the median of the border pixels. A pixel is
    foreground when its colour distance to the background is more than half the largest
    distance in the image, i.e. when the shape covers more than half of it (edges are
    antialiased); ``min_contrast`` keeps a shapeless image from being all foreground.
    """
    images = np.asarray(images, dtype=np.float32)
    border = np.concatenate(
        [images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], axis=2
    )
    background = np.median(border, axis=2)[:, :, None, None]  # (n, 3, 1, 1)
    distance = np.sqrt(((images - background) ** 2).sum(axis=1))
    threshold = np.maximum(0.5 * distance.max(axis=(1, 2), keepdims=True), min_contrast)
    return distance > threshold
