"""Inversion of given images into the sampler's trajectory space, and their regeneration with h edits.

Two inversions, both through hmine's own :class:`~hmine.sampling.Sampler` (its ``eps`` and
``step``), so that :func:`regenerate_inverted` replays an inverted image through the same
update as a sampled one:

``ddim`` (:func:`invert_ddim`)
    eta = 0: the DDIM ODE run forward from x_0 to x_T (Song et al. 2021, §4.3; the eps of
    each step is evaluated at the current, less noisy x, the usual approximation). Only
    x_T is stored; regeneration is approximate and the reconstruction error is recorded.
``edit_friendly`` (:func:`invert_edit_friendly`)
    Huberman-Spiegelglas, Kulikov and Michaeli, "An Edit Friendly DDPM Noise Space"
    (CVPR 2024): x_t drawn independently from q(x_t | x_0) at every step, then per step
    the noise map z_t that makes the eta > 0 sampler land exactly on the next x_t. x_T
    and every z_t are stored; regeneration reproduces the image to float rounding.

The images of a latent model are encoded first (:func:`encode_images`): the autoencoder's
latents times its ``scaling_factor``, the space the U-Net runs in (``DiffusionModel.decode``
divides by it again).
"""

from hmine.inversion.autoencoder import encode_images, images_from_target
from hmine.inversion.ddim import invert_ddim
from hmine.inversion.edit_friendly import invert_edit_friendly
from hmine.inversion.regenerate import (
    METHODS,
    Inversion,
    invert,
    psnr,
    regenerate_inverted,
    regenerate_inverted_with_delta,
)

__all__ = [
    "METHODS",
    "Inversion",
    "encode_images",
    "images_from_target",
    "invert",
    "invert_ddim",
    "invert_edit_friendly",
    "psnr",
    "regenerate_inverted",
    "regenerate_inverted_with_delta",
]
