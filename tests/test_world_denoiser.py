"""The exact denoiser of an empirical world sample, against Tweedie's formula and by sampling."""

import numpy as np
import pytest
import torch

from hmine.world.ddpm import DDPMTrainConfig, build_scheduler
from hmine.world.denoiser import ExactWorldDenoiser


@pytest.fixture(scope="module")
def alphas_cumprod():
    return build_scheduler(DDPMTrainConfig()).alphas_cumprod


@pytest.mark.parametrize("t", [50, 400, 900])
def test_posterior_mean_is_tweedies_formula_on_the_mixture_density(alphas_cumprod, t):
    # Independent route: p(x_t) is the mixture Σ_i N(x_t; √a x_i, (1 − a) I) / N, and
    # Tweedie: E[x0 | x_t] = (x_t + (1 − a) ∇ log p(x_t)) / √a, the gradient by autograd.
    images = torch.randn(7, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-1, 1)
    denoiser = ExactWorldDenoiser(alphas_cumprod, images=images)
    a = alphas_cumprod[t].double()
    x_t = (a.sqrt() * images[[2, 5]] + (1 - a).sqrt() * torch.randn(2, 3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    flat = x_t.reshape(2, 1, -1)
    log_density = torch.logsumexp(-(flat - a.sqrt() * images.reshape(1, 7, -1)).square().sum(-1) / (2 * (1 - a)), dim=1)
    (score,) = torch.autograd.grad(log_density.sum(), x_t)
    tweedie = (x_t + (1 - a) * score) / a.sqrt()
    torch.testing.assert_close(denoiser.posterior_mean(x_t.detach(), t), tweedie.detach(), rtol=1e-9, atol=1e-9)
    weights = denoiser.posterior_weights(x_t.detach(), t)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))


def test_eps_inverts_the_forward_process_at_low_noise(alphas_cumprod):
    denoiser = ExactWorldDenoiser(alphas_cumprod, n_images=32, seed=1)
    images = denoiser.images_.reshape(32, *denoiser.image_shape).float()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    a = alphas_cumprod[20]
    x_t = a.sqrt() * images + (1 - a).sqrt() * noise
    torch.testing.assert_close(denoiser(x_t, torch.tensor([20])).sample, noise, rtol=0, atol=1e-3)


def test_ddim_with_the_exact_denoiser_lands_on_world_images(alphas_cumprod):
    from diffusers import DDIMScheduler

    from hmine.labelling import WorldLabeller

    denoiser = ExactWorldDenoiser(alphas_cumprod, n_images=64, seed=3)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    scheduler.set_timesteps(20)
    x = torch.randn((6, *denoiser.image_shape), generator=torch.Generator().manual_seed(4))
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, t).sample, t, x).prev_sample
    distances = torch.cdist(x.reshape(6, -1).double(), denoiser.images_)
    nearest = distances.argmin(dim=1)
    assert distances.min(dim=1).values.max() / np.sqrt(x[0].numel()) < 0.02  # copies, to 2 % rms
    # and they are classified as the world images they copy
    scores = WorldLabeller().score(x.numpy())
    np.testing.assert_array_equal(scores["shape"].to_numpy().astype(int), denoiser.factors_["shape"][nearest.numpy()])
