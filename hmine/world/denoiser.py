"""The exact denoiser of the shapes world: what a sampler does with no model error at all.

For an empirical sample of the world, x_1 … x_N, and the forward process
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) ε, the posterior of x0 given x_t is a softmax over
the N images,

    w_i(x_t) ∝ exp(-‖x_t - sqrt(a_t) x_i‖² / (2 (1 - a_t))),                   (1)

and the minimum-mean-squared-error denoiser, the function every DDPM is trained to
approximate, is its mean:

    E[x0 | x_t] = Σ_i w_i(x_t) x_i,   ε̂(x_t, t) = (x_t - sqrt(a_t) E[x0 | x_t]) / sqrt(1 - a_t).   (2)

Plugged into a sampler in place of a U-Net, (2) tells what the sampler alone does to the
world's factor frequencies: a trained model cannot do better than the exact denoiser of
its data under the same sampler, so a frequency gap the exact denoiser shows is the
sampler's, not the model's. (With N images the exact denoiser reproduces training
images; the frequencies of the images a sampler lands on are what it measures.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmine.world import renderer

__all__ = ["ExactWorldDenoiser"]


@dataclass
class _Output:
    sample: torch.Tensor


class ExactWorldDenoiser:
    """ε̂(x_t, t) of eq. 2 for ``n_images`` world images, called like a diffusers U-Net.

    Parameters
    ----------
    alphas_cumprod : Tensor of shape (num_train_timesteps,)
        The noise schedule's a_t, e.g. ``scheduler.alphas_cumprod`` of the embedded DDPM.
    n_images : int, default=20000
        Size of the empirical world sample (its frequencies are those of the world to
        within sampling error: 0.5 pp at 20,000).
    seed : int, default=4242
        Seed of the world sample.
    images : Tensor of shape (N, C, H, W), optional
        Use these images instead of drawing world images (tests).

    Attributes
    ----------
    images_ : Tensor of shape (N, C * H * W), float64
    factors_ : dict of ndarray or None
        The world factors of ``images_`` (None when ``images`` was given).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, n_images: int = 20000, seed: int = 4242, images=None):
        if images is None:
            batch = renderer.generate(n_images, seed=seed)
            images, self.factors_ = torch.from_numpy(batch.images), batch.factors
        else:
            images, self.factors_ = torch.as_tensor(images), None
        self.image_shape = tuple(images.shape[1:])
        self.images_ = images.reshape(len(images), -1).double()
        self._squared_norms = self.images_.square().sum(dim=1)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def posterior_weights(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """w_i(x_t) of eq. 1, shape (batch, N)."""
        a = self.alphas_cumprod[int(t)]
        flat = x_t.reshape(len(x_t), -1).double()
        # ‖x_t − √a x_i‖² expanded, so that the (batch, N) distances are one matrix product
        squared_distances = flat.square().sum(1, keepdim=True) - 2 * a.sqrt() * flat @ self.images_.T + a * self._squared_norms
        return torch.softmax(-squared_distances / (2 * (1 - a)), dim=1)

    def posterior_mean(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """E[x0 | x_t] of eq. 2, shaped like ``x_t``, float64."""
        return (self.posterior_weights(x_t, t) @ self.images_).reshape(x_t.shape)

    def __call__(self, x_t: torch.Tensor, t) -> _Output:
        """ε̂(x_t, t) (eq. 2) in ``x_t``'s dtype, as ``.sample`` (the U-Net call convention)."""
        t = int(torch.as_tensor(t).reshape(-1)[0])
        a = self.alphas_cumprod[t]
        eps = (x_t.double() - a.sqrt() * self.posterior_mean(x_t, t)) / (1 - a).sqrt()
        return _Output(eps.to(x_t.dtype))
