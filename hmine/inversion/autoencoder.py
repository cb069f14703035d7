"""From images to the space the sampler runs in, and back.

A pixel model's sampler runs on the images themselves. A latent model's U-Net runs on the
autoencoder's latents multiplied by its ``config.scaling_factor`` (diffusers' ``LDMPipeline``
convention, which :meth:`hmine.models.DiffusionModel.decode` undoes by dividing before
decoding). For a VQ autoencoder the target of an inversion is the *quantized* latent: the
decoder quantizes whatever it is given, so a regenerated latent within rounding of a code
vector decodes to exactly the image the target decodes to.
"""

from __future__ import annotations

import torch

from hmine.models import DiffusionModel


@torch.no_grad()
def encode_images(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """The sampler-space x_0 of images in [-1, 1], shape (batch, color, height, width).

    Pixel model: the images (as the U-Net's dtype and device). Latent model:
    ``quantize(vqvae.encode(images).latents) * scaling_factor``.

    Raises
    ------
    ValueError
        When the images' size is not the one the model makes (name it and the model's size).
    """
    param = next(model.unet.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    if model.vqvae is None:
        expected = model.sample_shape
        if tuple(images.shape[1:]) != tuple(expected):
            raise ValueError(f"images have shape {tuple(images.shape[1:])}, the model makes {tuple(expected)}")
        return images
    vqvae = model.vqvae
    latents = vqvae.encode(images.to(dtype=next(vqvae.parameters()).dtype)).latents
    if hasattr(vqvae, "quantize"):
        latents = vqvae.quantize(latents)[0]
    if tuple(latents.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(
            f"images of shape {tuple(images.shape[1:])} encode to latents {tuple(latents.shape[1:])}, "
            f"the U-Net runs on {tuple(model.sample_shape)}; resize the images to the model's size"
        )
    return (latents * float(vqvae.config.scaling_factor)).to(dtype=param.dtype)


@torch.no_grad()
def images_from_target(model: DiffusionModel, x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from sampler-space x_0 (``model.decode``: identity for a pixel model)."""
    return model.decode(x0)
