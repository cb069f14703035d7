"""CLIP's image preprocessing done with torch alone (no torchvision, no PIL round trip).

It follows the checkpoint's own image processor settings (its ``preprocessor_config.json``,
read with transformers' ``CLIPImageProcessor``): resize (shortest edge or exact size, with
its resample filter, antialiased), centre crop, its mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The normalisation constants of CLIP's image processor (OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"

# PIL resample codes (what preprocessor_config.json stores) -> torch interpolation modes.
# torch's antialiased bilinear/bicubic use PIL's kernels; PIL's nearest is torch's nearest-exact.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "nearest-exact": 0, "nearest_exact": 0, "bilinear": 2, "bicubic": 3}


def _size_entry(size, key: str):
    """``size[key]`` of a processor size: a dict (transformers 4) or a SizeDict (transformers 5)."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _three(values, name: str, what: str) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{what}: {PROCESSOR_CONFIG} {name} has {len(values)} entries, expected 3 (RGB)")
    return tuple(values)


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a checkpoint's CLIP image processor does to an image, done with torch.

    Applied to images in [0, 1] (the labeller maps its [-1, 1] images there, which stands in
    for the processor's rescaling of 8-bit pixels), in the processor's order: resize, centre
    crop, normalise.

    Attributes
    ----------
    do_resize : bool
    shortest_edge : int or None
        Resize the shorter side to this, the longer to ``int(shortest_edge * long / short)``
        (truncated, as transformers does); None when resizing to (height, width).
    height, width : int or None
        Exact resize size, used when ``shortest_edge`` is None.
    resample : str
        torch interpolation mode: "bicubic", "bilinear" (both antialiased, like PIL) or
        "nearest-exact" (PIL's nearest).
    do_center_crop : bool
    crop_height, crop_width : int
        The crop starts at ``(side - crop) // 2``; an image smaller than the crop is padded
        with zeros (black) first, as transformers does.
    do_normalize : bool
    image_mean, image_std : tuple of float
    source : str
        Where the settings came from, for messages.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    height: int | None = None
    width: int | None = None
    resample: str = "bicubic"
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    source: str = "CLIP's default image processor"

    @classmethod
    def clip_defaults(cls, image_size: int) -> "ImagePreprocessing":
        """CLIP's defaults (shortest edge, centre crop, bicubic, OpenAI mean/std) sized to the vision tower."""
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size,
                   source=f"CLIP's default image processor sized to {image_size}")

    @classmethod
    def from_processor(cls, processor, what: str, source: str) -> "ImagePreprocessing":
        """Settings of a transformers ``CLIPImageProcessor`` (as loaded from ``preprocessor_config.json``).

        Raises
        ------
        ValueError
            Settings torch cannot follow (a resample filter other than nearest, bilinear or
            bicubic; a size other than shortest_edge alone or height and width; rescaling
            other than 1/255); the message starts with ``what`` and names the setting.
        """
        fix = f"use a checkpoint whose {PROCESSOR_CONFIG} hmine can follow, or edit that file"
        do_resize = bool(getattr(processor, "do_resize", True))
        size = getattr(processor, "size", None)
        if isinstance(size, int):  # old configs: an int is the shortest edge
            size = {"shortest_edge": size}
        shortest_edge, height, width = (_size_entry(size, key) for key in ("shortest_edge", "height", "width"))
        if do_resize and (_size_entry(size, "longest_edge") or not (shortest_edge or (height and width))):
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} size {size!r} is neither shortest_edge alone nor height and width; {fix}"
            )
        resample = getattr(processor, "resample", 3)
        try:
            code = int(resample)
        except (TypeError, ValueError):  # a torchvision InterpolationMode or a name
            code = _RESAMPLE_NAMES.get(str(getattr(resample, "value", resample)).lower())
        if do_resize and code not in _RESAMPLE_MODES:
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} resample={resample!r} is not nearest (0), bilinear (2) or "
                f"bicubic (3), the filters torch can follow; {fix}"
            )
        rescale_factor = float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True) and abs(rescale_factor - 1 / 255) > 1e-9:
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} rescale_factor={rescale_factor} does not map 8-bit pixels to [0, 1]; {fix}"
            )
        crop = getattr(processor, "crop_size", None)
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_center_crop = bool(getattr(processor, "do_center_crop", True))
        crop_height, crop_width = _size_entry(crop, "height"), _size_entry(crop, "width")
        if do_center_crop and not (crop_height and crop_width):
            raise ValueError(f"{what}: {PROCESSOR_CONFIG} crop_size {crop!r} has no height and width; {fix}")
        return cls(
            do_resize=do_resize,
            shortest_edge=int(shortest_edge) if shortest_edge else None,
            height=int(height) if height and not shortest_edge else None,
            width=int(width) if width and not shortest_edge else None,
            resample=_RESAMPLE_MODES.get(code, "bicubic"),
            do_center_crop=do_center_crop,
            crop_height=int(crop_height or 0),
            crop_width=int(crop_width or 0),
            do_normalize=bool(getattr(processor, "do_normalize", True)),
            image_mean=_three(getattr(processor, "image_mean", CLIP_MEAN), "image_mean", what),
            image_std=_three(getattr(processor, "image_std", CLIP_STD), "image_std", what),
            source=source,
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (transformers' ``get_resize_output_image_size``)."""
        if not self.do_resize:
            return height, width
        if self.shortest_edge is None:
            return self.height, self.width
        short_side, long_side = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long_side / short_side)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel values for an input of (height, width)."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        return self.resized_size(height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values from float images (n, C, H, W) in [0, 1]."""
        new_size = self.resized_size(*images.shape[-2:])
        if new_size != tuple(images.shape[-2:]):  # PIL returns a same-size resize unchanged
            antialias = self.resample != "nearest-exact"
            extra = {"align_corners": False} if antialias else {}
            images = F.interpolate(images, size=new_size, mode=self.resample, antialias=antialias, **extra)
            # Bicubic overshoots past [0, 1] at edges; the processor resizes 8-bit images,
            # which clips there, so clip too.
            images = images.clamp(0.0, 1.0)
        if self.do_center_crop:
            images = center_crop(images, self.crop_height, self.crop_width)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
            images = (images - mean) / std
        return images


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop to (height, width) as transformers' ``center_crop`` does.

    The crop starts at ``(side - crop) // 2``; an image smaller than the crop is first
    padded with zeros, ``ceil((crop - side) / 2)`` before it.
    """
    in_height, in_width = images.shape[-2:]
    pad_height, pad_width = max(height - in_height, 0), max(width - in_width, 0)
    if pad_height or pad_width:
        top_pad, left_pad = (pad_height + 1) // 2, (pad_width + 1) // 2
        images = F.pad(images, (left_pad, pad_width - left_pad, top_pad, pad_height - top_pad))
        in_height, in_width = images.shape[-2:]
    top, left = (in_height - height) // 2, (in_width - width) // 2
    return images[..., top : top + height, left : left + width]
