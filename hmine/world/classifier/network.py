"""The shapes world's attribute classifier network: a small CNN with shape, colour and regression heads.

It predicts every factor of :mod:`hmine.world` from pixels — ``shape`` and ``color`` as
classes, ``size``, ``x``, ``y`` and ``background`` by regression — and from those the
binary attributes the direction stage uses (:data:`hmine.world.BINARY_ATTRIBUTES`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from hmine.world import renderer as world

CONTINUOUS = world.CONTINUOUS_FACTORS  # ("size", "x", "y", "background")
# The world's known range of each continuous factor; the regression head predicts
# (value - low) / (high - low), about [0, 1], so the four factors weigh alike in the loss.
# x and y stay SIZE_MIN + 1 px away from the edges (world.sample_factors).
FACTOR_RANGES = {
    "size": (world.SIZE_MIN, world.SIZE_MAX),
    "x": (world.SIZE_MIN + 1.0, world.IMAGE_SIZE - world.SIZE_MIN - 1.0),
    "y": (world.SIZE_MIN + 1.0, world.IMAGE_SIZE - world.SIZE_MIN - 1.0),
    "background": (world.BG_MIN, world.BG_MAX),
}
# Binary attributes read off a continuous factor: (factor, threshold, True when above it).
THRESHOLDED_ATTRIBUTES = {
    "is_large": ("size", world.SIZE_LARGE_THRESHOLD, True),
    "is_left": ("x", world.CENTER, False),
    "is_top": ("y", world.CENTER, False),
    "is_light_bg": ("background", world.BG_LIGHT_THRESHOLD, True),
}
# Temperatures of the soft scores sigmoid(±(value - threshold) / temperature), in the
# factor's own units (pixels; grey level in [0, 1]). These defaults are replaced by
# calibrated ones (see calibrate_temperatures) in every exported model's config.json.
DEFAULT_TEMPERATURES = {"is_large": 0.15, "is_left": 0.15, "is_top": 0.15, "is_light_bg": 0.005}

ARCHITECTURE = "ShapesClassifier"


class ShapesClassifier(nn.Module):
    """CNN over 32x32 images in [-1, 1] with shape, colour and regression heads.

    Three stages of two 3x3 convolutions (GroupNorm, ReLU) with ``width``, 2·``width``
    and 4·``width`` channels, each ending in a stride-2 convolution: 32 -> 16 -> 8 -> 4
    pixels. A 1x1 convolution squeezes the 4x4 map to ``squeeze`` channels and the
    flattened map feeds a ``hidden``-unit layer shared by the heads. The map is flattened
    rather than pooled so that where the shape is (``x``, ``y``) survives; two coordinate
    channels are appended to the input for the same reason.

    Parameters
    ----------
    width : int, default=32
        Channels of the first stage (doubled at each of the next two).
    squeeze : int, default=32
        Channels of the 4x4 map before flattening.
    hidden : int, default=128
        Width of the shared fully connected layer.
    temperatures : dict of str to float, optional
        Soft-score temperatures of the thresholded binary attributes;
        :data:`DEFAULT_TEMPERATURES` where not given.

    Notes
    -----
    ``forward`` returns the raw heads; :func:`predict_attributes` turns them into a table.
    The regression head predicts factors scaled by :data:`FACTOR_RANGES`; the ranges are
    stored with the weights (buffers ``factor_low``, ``factor_span``) so an exported model
    keeps the units it was trained in.
    """

    def __init__(
        self,
        width: int = 32,
        squeeze: int = 32,
        hidden: int = 128,
        temperatures: dict[str, float] | None = None,
    ):
        super().__init__()
        unknown = set(temperatures or {}) - set(THRESHOLDED_ATTRIBUTES)
        if unknown:
            raise ValueError(f"temperatures for unknown attributes {sorted(unknown)}; known: {list(THRESHOLDED_ATTRIBUTES)}")
        self.width, self.squeeze, self.hidden = int(width), int(squeeze), int(hidden)
        self.temperatures = {**DEFAULT_TEMPERATURES, **(temperatures or {})}

        def conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            # GroupNorm, not BatchNorm: identical in train and eval and for any batch size.
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(math.gcd(8, c_out), c_out),
                nn.ReLU(inplace=True),
            )

        w = self.width
        self.features = nn.Sequential(
            conv(3 + 2, w, 1), conv(w, w, 2),  # 16x16
            conv(w, 2 * w, 1), conv(2 * w, 2 * w, 2),  # 8x8
            conv(2 * w, 4 * w, 1), conv(4 * w, 4 * w, 2),  # 4x4
            nn.Conv2d(4 * w, self.squeeze, 1), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(self.squeeze * 16, self.hidden), nn.ReLU(inplace=True))
        self.shape_head = nn.Linear(self.hidden, len(world.SHAPES))
        self.color_head = nn.Linear(self.hidden, len(world.COLORS))
        self.regression_head = nn.Linear(self.hidden, len(CONTINUOUS))
        ramp = torch.linspace(-1.0, 1.0, world.IMAGE_SIZE)
        coordinates = torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"))  # (2, 32, 32): x, y
        self.register_buffer("coordinates", coordinates, persistent=False)
        self.register_buffer("factor_low", torch.tensor([FACTOR_RANGES[k][0] for k in CONTINUOUS]))
        self.register_buffer("factor_span", torch.tensor([FACTOR_RANGES[k][1] - FACTOR_RANGES[k][0] for k in CONTINUOUS]))

    @property
    def config(self) -> dict:
        """The constructor arguments, as stored in ``config.json``."""
        return {
            "architecture": ARCHITECTURE,
            "width": self.width,
            "squeeze": self.squeeze,
            "hidden": self.hidden,
            "temperatures": dict(self.temperatures),
        }

    @classmethod
    def from_config(cls, config: dict) -> ShapesClassifier:
        """Build an (untrained) classifier from a :attr:`config` dict."""
        config = dict(config)
        architecture = config.pop("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise ValueError(f"config describes a {architecture!r}, not a {ARCHITECTURE!r}")
        return cls(**config)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw heads for images (n, 3, 32, 32) in [-1, 1].

        Returns
        -------
        dict with ``shape_logits`` (n, 3), ``color_logits`` (n, 3) and
        ``continuous_scaled`` (n, 4): the factors of :data:`CONTINUOUS` scaled to ~[0, 1].
        """
        coordinates = self.coordinates.expand(images.shape[0], -1, -1, -1)
        z = self.shared(self.features(torch.cat([images, coordinates], dim=1)))
        return {
            "shape_logits": self.shape_head(z),
            "color_logits": self.color_head(z),
            "continuous_scaled": self.regression_head(z),
        }

    def to_world_units(self, scaled: torch.Tensor) -> torch.Tensor:
        """Regression outputs (n, 4) back in world units (pixels, grey level)."""
        return scaled * self.factor_span + self.factor_low

    def scale_targets(self, factors: dict[str, np.ndarray]) -> torch.Tensor:
        """World factors as the (n, 4) scaled regression targets."""
        values = torch.from_numpy(np.stack([factors[k] for k in CONTINUOUS], axis=1).astype(np.float32))
        return (values - self.factor_low) / self.factor_span


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
