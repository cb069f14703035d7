"""DDIM inversion: the eta = 0 sampler's ODE run forward, from x_0 to x_T.

The sampler's DDIM step from timestep t (alpha a_t) to the previous one (a_prev) is
(Song et al. 2021, eq. 12 with sigma = 0)::

    x_prev = sqrt(a_prev) * (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t) + sqrt(1 - a_prev) * eps

Solved for x_t with eps fixed::

    x_t = sqrt(a_t) * (x_prev - sqrt(1 - a_prev) * eps) / sqrt(a_prev) + sqrt(1 - a_t) * eps

eps should be eps(x_t, t), which is unknown; plain DDIM inversion takes eps(x_prev, t),
the U-Net at the step's own timestep on the less noisy x (as diffusers' inverse scheduler
and null-text inversion do). With ``refine = k`` each step evaluates eps again k times at
the x_t it found (fixed-point iteration, as in ReNoise / AIDI), which shrinks the mismatch.
The inversion is approximate either way: the regeneration from x_T is measured against the
input (``reconstruction_error``, PSNR) and h is recorded on the regenerated trajectory, the
one every edit replays.
"""

from __future__ import annotations

import torch

from hmine.inversion.autoencoder import encode_images
from hmine.inversion.regenerate import Inversion, finish, regenerate_inverted
from hmine.sampling import Sampler
from hmine.threads import model_threads


def invert_ddim(sampler: Sampler, images: torch.Tensor, *, refine: int = 0) -> Inversion:
    """DDIM-invert images in [-1, 1] of shape (batch, 3, H, W); the result regenerated, with h and errors.

    Parameters
    ----------
    sampler : Sampler
    images : Tensor of shape (batch, 3, height, width)
    refine : int, default=0
        Fixed-point refinements of eps per step (module doc).

    Returns
    -------
    Inversion
        ``method="ddim"``, ``z=None``, every eta 0.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    with model_threads(sampler.torch_threads):
        x0 = encode_images(sampler.model, images)
        x_T = _ddim_forward(sampler, x0, refine)
    inversion = Inversion(
        method="ddim",
        x_T=x_T.cpu(),
        z=None,
        etas=[0.0] * sampler.num_inference_steps,
        timesteps=sampler.timesteps.clone(),
        target=x0.cpu(),
    )
    return finish(sampler, inversion, images, regenerate_inverted(sampler, inversion))


@torch.inference_mode()
def _ddim_forward(sampler: Sampler, x0: torch.Tensor, refine: int) -> torch.Tensor:
    unet = sampler.model.unet
    x = x0
    batch = x.shape[0]
    for t in reversed(sampler.timesteps):  # the sampler's last step first: x_0 -> x_{t_last}
        a_t, a_prev = sampler._alphas(int(t))
        t_batch = t.expand(batch).to(x.device)
        x_prev = x
        eps = sampler.eps(unet(x_prev, t_batch).sample, t, x_prev)
        # 1. the DDIM step solved for x_t, eps taken at the less noisy x (module doc)
        x = a_t**0.5 * (x_prev - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5 + (1 - a_t) ** 0.5 * eps
        # 2. optional fixed-point refinement: eps evaluated at the x_t just found
        for _ in range(refine):
            eps = sampler.eps(unet(x, t_batch).sample, t, x)
            x = a_t**0.5 * (x_prev - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5 + (1 - a_t) ** 0.5 * eps
    return x
