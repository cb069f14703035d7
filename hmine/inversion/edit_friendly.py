"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024).

Notation: the sampler's timesteps t_0 > t_1 > ... > t_{n-1}; step i takes x^(i) (at t_i)
to x^(i+1) (at the previous timestep; x^(n) is the image's x_0). With eta_i > 0 the
sampler's step is ``x^(i+1) = mu_i(x^(i)) + sigma_i * z_i`` (:meth:`Sampler.step`, DDIM
eq. 12), mu_i being the step without its noise.

1. Draw every x^(i) independently from q(x_t | x_0) (the paper's eq. 6):
   ``x^(i) = sqrt(a_{t_i}) * x_0 + sqrt(1 - a_{t_i}) * n_i``, n_i ~ N(0, I) from the image's
   own generator (its seed), so an image's inversion does not depend on its batch.
2. The last step of a DDIM-spaced schedule with ``set_alpha_to_one`` has sigma = 0 (it
   lands on a_prev = 1 and is deterministic), so no z can fix its output. x^(n-1) is
   moved towards the fixed point of ``x = sqrt(a) * (x_0 - sqrt(1 - a_prev) * eps(x))
   / sqrt(a_prev) + sqrt(1 - a) * eps(x)``, which the last step maps onto x_0
   (:data:`FIXED_POINT_MAX_ITER` iterations at most). On a random U-Net this converges to
   float rounding in a few iterations; a trained denoiser at t ~ 0 removes fine detail
   (on the embedded model the last step's Jacobian has singular values down to ~1e-4), so
   some of x_0 lies outside what the last step can produce, and the iteration stalls at
   ~1e-3 (measured: 4e-3 after 10 iterations, 7e-4 after 200).
3. Per step, in order, the noise that lands on the next state (the paper's eq. 7):
   ``z_i = (x^(i+1) - mu_i(x^(i))) / sigma_i``; the next state is then recomputed as the
   sampler computes it, ``mu_i + sigma_i * z_i``, so that every later eps is evaluated on
   exactly the x the regeneration will see.
4. What the deterministic last step still misses, ``x_0 - x^(n)``, is stored as the
   inversion's ``residual`` and added after the last step by the regeneration: the
   image's own detail, kept under edits like the z_t (the role the last step's z_t would
   have if its sigma were not 0). Its size per image is ``residual_max``; it is None when
   the last step has noise of its own.

Regenerating x^(0) with every z_i and the residual
(:func:`~hmine.inversion.regenerate_inverted`) therefore replays the same trajectory bit
for bit, and ends on x_0 to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hmine.hooks import HSpaceHook
from hmine.inversion.autoencoder import encode_images
from hmine.inversion.regenerate import Inversion, finish, sigma_of
from hmine.sampling import SampleOutput, Sampler, resolve_etas
from hmine.threads import model_threads

#: The last step's fixed point is iterated until max |step(x) - x_0| is below this, or
#: :data:`FIXED_POINT_MAX_ITER` iterations.
FIXED_POINT_TOL = 1e-6
FIXED_POINT_MAX_ITER = 10


def noisy_states(seeds: Sequence[int], x0: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """x^(i) ~ q(x_t | x_0) for every step, drawn independently; (batch, step, C, H, W).

    Image k's noise comes from a CPU ``torch.Generator`` seeded with ``seeds[k]``.
    """
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {x0.shape[0]} images; give one seed per image")
    noise = torch.stack([
        torch.randn((len(alphas), *x0.shape[1:]), generator=torch.Generator(device="cpu").manual_seed(int(s)))
        for s in seeds
    ]).to(device=x0.device, dtype=x0.dtype)
    a = torch.tensor(alphas, dtype=x0.dtype, device=x0.device).view(1, -1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0[:, None] + (1 - a).sqrt() * noise


def invert_edit_friendly(
    sampler: Sampler,
    images: torch.Tensor,
    *,
    seeds: Sequence[int],
    eta: float | Sequence[float] = 1.0,
) -> Inversion:
    """Edit-friendly inversion of images in [-1, 1] (batch, 3, H, W) (module doc).

    Parameters
    ----------
    sampler : Sampler
    images : Tensor of shape (batch, 3, height, width)
    seeds : sequence of int
        One per image, for its draws of x_t ~ q(x_t | x_0).
    eta : float or list of float, default=1.0
        The eta of every step; > 0 wherever the step has noise to solve for.

    Returns
    -------
    Inversion
        ``method="edit_friendly"``, x_T, z (batch, step, C, H, W), the regenerated images,
        h of the trajectory, and the errors.
    """
    n_steps = sampler.num_inference_steps
    etas = resolve_etas(eta, n_steps)
    if any(e == 0 for e in etas[:-1]):
        raise ValueError(
            f"edit-friendly inversion needs eta > 0 at every step but the last, got {etas}; "
            "use method ddim for eta 0"
        )
    with model_threads(sampler.torch_threads):
        x0 = encode_images(sampler.model, images)
        out, x_T, z, residual = _invert(sampler, x0, list(seeds), etas)
    inversion = Inversion(
        method="edit_friendly",
        x_T=x_T.cpu(),
        z=z.cpu(),
        residual=None if residual is None else residual.cpu(),
        etas=etas,
        timesteps=sampler.timesteps.clone(),
        target=x0.cpu(),
    )
    # the trajectory computed here is the regeneration's own (step 3 of the module doc)
    return finish(sampler, inversion, images, out)


@torch.inference_mode()
def _invert(sampler: Sampler, x0: torch.Tensor, seeds: list[int], etas: list[float]):
    unet = sampler.model.unet
    timesteps = sampler.timesteps
    n_steps, batch = len(timesteps), x0.shape[0]
    alphas = [sampler._alphas(int(t))[0] for t in timesteps]
    # 1. independent x^(i) ~ q(x_t | x_0)
    states = noisy_states(seeds, x0, alphas)
    # 2. a deterministic last step: its input moved to the fixed point that lands on x_0
    t_last = timesteps[-1]
    deterministic_end = sigma_of(sampler, int(t_last), etas[-1]) == 0
    if deterministic_end:
        states[:, -1] = _last_step_fixed_point(sampler, x0, states[:, -1], t_last, etas[-1])
    # 3. the noise of every step, solved in trajectory order on the states as regenerated
    x = states[:, 0]
    x_T = x.clone()
    z = torch.zeros_like(states)
    hs = []
    with HSpaceHook(unet, sampler.h_position, record=True) as hook:
        for i, t in enumerate(timesteps):
            eps = sampler.eps(unet(x, t.expand(batch).to(x.device)).sample, t, x)
            hs.append(hook.recorded.pop())
            hook.clear()
            sigma = sigma_of(sampler, int(t), etas[i])
            target = states[:, i + 1] if i + 1 < n_steps else x0
            if sigma > 0:
                mu = sampler.step(eps, eps, int(t), x, etas[i], torch.zeros_like(x))
                z[:, i] = (target - mu) / sigma
            x = sampler.step(eps, eps, int(t), x, etas[i], z[:, i])
    # 4. what the deterministic last step misses, added back as the regeneration does
    residual = x0 - x if deterministic_end else None
    if residual is not None:
        x = x + residual
    images = sampler.model.decode(x)
    return SampleOutput(images=images, h=torch.stack(hs, dim=1), timesteps=timesteps), x_T, z, residual


def _last_step_fixed_point(sampler: Sampler, x0, x, t, eta) -> torch.Tensor:
    """The x that the sampler's deterministic last step (sigma = 0) maps onto ``x0`` (module doc, 2)."""
    unet = sampler.model.unet
    a_t, a_prev = sampler._alphas(int(t))
    t_batch = t.expand(x.shape[0]).to(x.device)
    for _ in range(FIXED_POINT_MAX_ITER):
        eps = sampler.eps(unet(x, t_batch).sample, t, x)
        landed = sampler.step(eps, eps, int(t), x, eta, torch.zeros_like(x))
        if float((landed - x0).abs().max()) <= FIXED_POINT_TOL:
            break
        x = a_t**0.5 * (x0 - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5 + (1 - a_t) ** 0.5 * eps
    return x
