"""Augmentation of rendered world images towards what a DDPM generates: tint, blur, jitter, noise.

DDPM samples are never quite as clean as rendered images (the embedded DDPM's backgrounds
are often coloured); training on these augmentations keeps the classifier right on them,
and :func:`degrade` / :func:`tint_background` are the fixed versions evaluation uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _box_blur(images: torch.Tensor) -> torch.Tensor:
    """3x3 box blur per channel; replicate padding keeps the flat background flat."""
    kernel = torch.full((3, 1, 3, 3), 1.0 / 9.0, dtype=images.dtype)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def _zero_mean_tints(n: int, tint_max: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) per-channel offsets in about ±tint_max whose channel mean is 0."""
    tint = tint_max * (2 * torch.rand((n, 3), generator=generator) - 1)
    return tint - tint.mean(dim=1, keepdim=True)


def augment(
    images: torch.Tensor,
    background: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator,
    *,
    noise_max: float,
    blur_probability: float,
    contrast_jitter: float,
    brightness_jitter: float,
    tint_probability: float = 0.0,
    tint_max: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tinted background, blur, contrast/brightness jitter and Gaussian noise.

    DDPM samples are slightly noisy, slightly soft, slightly off in level and often have
    a coloured background; these augmentations put rendered images in that
    neighbourhood. All randomness comes from ``generator``.

    Parameters
    ----------
    images : torch.Tensor of shape (n, 3, 32, 32) in [-1, 1]
    background : torch.Tensor of shape (n,)
        True background grey level in [0, 1].
    masks : torch.Tensor of shape (n, 32, 32) in [0, 1]
        Shape coverage (:attr:`hmine.world.WorldBatch.masks`); the tint goes where the
        shape is not.
    generator : torch.Generator
    tint_probability, tint_max : float
        With this probability the background gets a per-channel tint drawn in
        ±``tint_max`` (grey-level units) minus its channel mean, so it turns coloured
        while its grey level (the ``background`` factor) stays put.
    noise_max : float
        Each image gets Gaussian noise of std drawn uniformly in [0, noise_max].
    blur_probability : float
        Each image is blurred with this probability, by a random mix
        ``(1 - a) · image + a · box3x3(image)`` with ``a`` uniform in [0.25, 1].
    contrast_jitter, brightness_jitter : float
        ``image · c + b`` with ``c`` uniform in [1 - contrast_jitter, 1 + contrast_jitter]
        and ``b`` uniform in ±brightness_jitter (in [-1, 1] pixel units).

    Returns
    -------
    images : torch.Tensor
        Augmented, clamped to [-1, 1] as samplers clamp their output.
    background : torch.Tensor
        The background grey level (channel mean) the augmented image actually shows:
        contrast and brightness move it, so the regression target moves with it
        (otherwise the ``background`` target would be inconsistent with the pixels).
    """
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    # Draw every random number whatever the settings, so one setting doesn't shift the
    # random stream of the others.
    tint_use = torch.rand(n, generator=generator) < tint_probability
    tint = _zero_mean_tints(n, tint_max, generator) * tint_use.view(n, 1)
    blur_use = torch.rand(n, generator=generator) < blur_probability
    blur_amount = uniform(0.25, 1.0, n) * blur_use
    contrast = uniform(1.0 - contrast_jitter, 1.0 + contrast_jitter, n)
    brightness = uniform(-brightness_jitter, brightness_jitter, n)
    noise_std = uniform(0.0, noise_max, n)
    noise = torch.randn(images.shape, generator=generator)

    background_rgb = (background.view(n, 1) + tint).clamp(0.0, 1.0)  # (n, 3) in [0, 1]
    images = images + 2 * (background_rgb - background.view(n, 1)).view(n, 3, 1, 1) * (1 - masks[:, None])
    a = blur_amount.view(n, 1, 1, 1)
    images = (1 - a) * images + a * _box_blur(images)
    images = images * contrast.view(n, 1, 1, 1) + brightness.view(n, 1, 1, 1)
    background_pixel = ((background_rgb * 2 - 1) * contrast.view(n, 1) + brightness.view(n, 1)).clamp(-1.0, 1.0)
    images = images + noise_std.view(n, 1, 1, 1) * noise
    return images.clamp(-1.0, 1.0), (background_pixel.mean(dim=1) + 1) / 2


def degrade(images: torch.Tensor, seed: int, noise_std: float = 0.1) -> torch.Tensor:
    """Fixed evaluation degradation: full 3x3 box blur then Gaussian noise of ``noise_std``.

    Unlike :func:`augment` it leaves the background level alone, so the world's factors
    stay the ground truth.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    return (_box_blur(images) + noise_std * noise).clamp(-1.0, 1.0)


def tint_background(images: torch.Tensor, masks: torch.Tensor, seed: int, tint_max: float = 0.3) -> torch.Tensor:
    """Colour every image's background by a zero-mean per-channel tint in about ±``tint_max``.

    The grey level (channel mean) of the background is kept, up to clamping at the ends
    of [0, 1], so the world's factors stay the ground truth.
    """
    n = images.shape[0]
    background = (images[:, :, 0, 0].mean(dim=1) + 1) / 2  # the corner is always background
    tint = _zero_mean_tints(n, tint_max, torch.Generator().manual_seed(seed))
    shift = (background.view(n, 1) + tint).clamp(0.0, 1.0) - background.view(n, 1)
    return (images + 2 * shift.view(n, 3, 1, 1) * (1 - masks[:, None])).clamp(-1.0, 1.0)
