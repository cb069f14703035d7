"""The result of an inversion, and regeneration from it with a delta on h.

:func:`regenerate_inverted` is the sampler's loop (:meth:`hmine.sampling.Sampler.sample`)
with x_T and the per-step noise given instead of drawn from a seed (and an edit-friendly
inversion's residual added after the last step): the same U-Net calls,
the same :meth:`~hmine.sampling.Sampler.eps` and :meth:`~hmine.sampling.Sampler.step`, the
same :class:`~hmine.hooks.HSpaceHook` recording h and adding the delta, Asyrp's asymmetric
step and the edited-steps window. Fed a seed's own x_T and noise it gives exactly what the
sampler gives for that seed (a test checks it bit for bit), with or without an edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hmine.hooks import HSpaceHook
from hmine.sampling import SampleOutput, Sampler
from hmine.threads import model_threads

Method = Literal["ddim", "edit_friendly"]
METHODS: tuple[str, ...] = ("ddim", "edit_friendly")


@dataclass
class Inversion:
    """An inverted batch: what regenerates it, and what it regenerated to.

    Attributes
    ----------
    method : {"ddim", "edit_friendly"}
    x_T : Tensor of shape (batch, C, H, W)
        The sampler's starting point (sampler space: latents times ``scaling_factor`` for a
        latent model).
    z : Tensor of shape (batch, step, C, H, W), or None
        The noise of every step (edit-friendly); None for DDIM (eta 0 adds no noise).
    etas : list of float
        The eta of every step the regeneration must use (0 for DDIM).
    timesteps : Tensor of shape (step,)
    residual : Tensor of shape (batch, C, H, W), or None
        Added to x after the last step (edit-friendly with a deterministic last step: the
        part of x_0 that step cannot produce; :mod:`hmine.inversion.edit_friendly`, 4).
    target : Tensor of shape (batch, C, H, W), optional
        The sampler-space x_0 the inversion aimed at (:func:`~hmine.inversion.encode_images`).
    images : Tensor of shape (batch, 3, height, width), optional
        The regenerated images in [-1, 1] (scale 0 of every edit).
    h : Tensor of shape (batch, step, channel, y, x), optional
        h at every step of the regenerated trajectory.
    reconstruction_error : Tensor of shape (batch,), optional
        max |images - input images| per image, in [-1, 1] pixel units.
    target_error : Tensor of shape (batch,), optional
        max |images - decode(target)| per image: the inversion's own error, without the
        autoencoder's (equal to ``reconstruction_error`` for a pixel model).
    """

    method: str
    x_T: torch.Tensor
    z: torch.Tensor | None
    etas: list[float]
    timesteps: torch.Tensor
    residual: torch.Tensor | None = None
    target: torch.Tensor | None = None
    images: torch.Tensor | None = None
    h: torch.Tensor | None = None
    reconstruction_error: torch.Tensor | None = None
    target_error: torch.Tensor | None = None

    @property
    def residual_max(self) -> torch.Tensor | None:
        """max |residual| per image (batch,), or None without a residual."""
        return None if self.residual is None else self.residual.float().abs().flatten(1).amax(1)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"inversion method must be one of {METHODS}, got {self.method!r}")
        n_steps = len(self.timesteps)
        if len(self.etas) != n_steps:
            raise ValueError(f"etas has {len(self.etas)} entries, the inversion has {n_steps} steps")
        if self.z is not None and (self.z.ndim != self.x_T.ndim + 1 or self.z.shape[1] != n_steps):
            raise ValueError(f"z has shape {tuple(self.z.shape)}, expected (batch, {n_steps}, C, H, W)")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of images in [-1, 1] (peak-to-peak range 2); inf when equal."""
    mse = ((images.float() - reference.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def _check_timesteps(sampler: Sampler, timesteps: torch.Tensor) -> None:
    if not torch.equal(torch.as_tensor(timesteps).long().cpu(), sampler.timesteps.long().cpu()):
        raise ValueError(
            f"the inversion has timesteps {torch.as_tensor(timesteps).tolist()}, the sampler "
            f"{sampler.timesteps.tolist()}; regenerate with a sampler of the inversion's num_inference_steps"
        )


def regenerate_inverted(
    sampler: Sampler,
    inversion: Inversion,
    *,
    delta_h: torch.Tensor | None = None,
    edit_steps: Sequence[bool] | None = None,
    asymmetric: bool = False,
    record_h: bool = True,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Regenerate an inverted batch, optionally with a delta on h (the sampler's loop, module doc).

    Parameters
    ----------
    sampler : Sampler
        Of the inversion's model and number of steps; its own etas are not used, the
        inversion's are.
    inversion : Inversion
    delta_h : Tensor of shape (step, channel, y, x) or (batch, step, channel, y, x), optional
    edit_steps : sequence of bool of length step, optional
        Which steps get the edit; all by default (:func:`hmine.editing.edit_steps_from`).
    asymmetric : bool, default=False
        Asyrp's step: the original eps in the direction term.
    record_h : bool, default=True
    return_trajectory : bool, default=False

    Returns
    -------
    SampleOutput
    """
    _check_timesteps(sampler, inversion.timesteps)
    with model_threads(sampler.torch_threads):
        return _regenerate(
            sampler, inversion, delta_h, edit_steps, asymmetric, record_h, return_trajectory
        )


@torch.inference_mode()
def _regenerate(sampler, inversion, delta_h, edit_steps, asymmetric, record_h, return_trajectory) -> SampleOutput:
    unet = sampler.model.unet
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    n_steps = sampler.num_inference_steps
    batch = inversion.x_T.shape[0]
    x = inversion.x_T.to(device=device, dtype=dtype)
    if inversion.z is None:
        noise = torch.zeros((n_steps, *x.shape), device=device, dtype=dtype)
    else:
        noise = inversion.z.to(device=device, dtype=dtype).transpose(0, 1)  # (step, batch, ...) as the sampler
    if edit_steps is None:
        edit_steps = [True] * n_steps
    if len(edit_steps) != n_steps:
        raise ValueError(f"edit_steps has {len(edit_steps)} entries, expected {n_steps}")
    if delta_h is not None:
        delta_h = delta_h.to(device=device, dtype=dtype)
        step_axis = 0 if delta_h.ndim == 4 else 1
        if delta_h.shape[step_axis] != n_steps:
            raise ValueError(f"delta_h has {delta_h.shape[step_axis]} steps, expected {n_steps}")
    hs, trajectory = [], []
    with HSpaceHook(unet, sampler.h_position, record=record_h) as hook:
        for i, t in enumerate(sampler.timesteps):
            if return_trajectory:
                trajectory.append(x)
            t_batch = t.expand(batch).to(device)
            editing = delta_h is not None and edit_steps[i]
            hook.delta = None
            eps = eps_original = None
            if not editing or asymmetric:
                eps_original = sampler.eps(unet(x, t_batch).sample, t, x)
                if record_h:
                    hs.append(hook.recorded.pop())
            if editing:
                hook.delta = delta_h[i] if delta_h.ndim == 4 else delta_h[:, i]
                eps = sampler.eps(unet(x, t_batch).sample, t, x)
                hook.delta = None
                if record_h:
                    h_edit = hook.recorded.pop()
                    if not asymmetric:
                        hs.append(h_edit)
            eps_P = eps if editing else eps_original
            eps_D = eps_original if (asymmetric or not editing) else eps
            x = sampler.step(eps_P, eps_D, int(t), x, inversion.etas[i], noise[i])
            hook.clear()
    if inversion.residual is not None:
        x = x + inversion.residual.to(device=device, dtype=dtype)
    images = sampler.model.decode(x)
    return SampleOutput(
        images=images,
        h=torch.stack(hs, dim=1) if record_h else None,
        timesteps=sampler.timesteps,
        trajectory=torch.stack(trajectory, dim=1) if return_trajectory else None,
    )


def regenerate_inverted_with_delta(
    sampler: Sampler,
    inversion: Inversion,
    delta_h: torch.Tensor,
    *,
    t_edit: int | None = None,
    t_edit_max: int | None = None,
    asymmetric: bool = False,
) -> np.ndarray:
    """Images (batch, 3, H, W) as numpy of an inverted batch edited by ``delta_h``, as
    :func:`hmine.editing.regenerate_with_delta` does for seeds: only the steps whose timestep
    lies in [``t_edit``, ``t_edit_max``] get their delta."""
    from hmine.editing import edit_steps_from

    out = regenerate_inverted(
        sampler,
        inversion,
        delta_h=delta_h,
        edit_steps=edit_steps_from(sampler.timesteps.tolist(), t_edit, t_edit_max),
        asymmetric=asymmetric,
        record_h=False,
    )
    return out.images.float().cpu().numpy()


def sigma_of(sampler: Sampler, t: int, eta: float) -> float:
    """sigma_t of the sampler's step (DDIM eq. 16): the weight of the step's noise z_t."""
    a_t, a_prev = sampler._alphas(int(t))
    return eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5


def finish(sampler: Sampler, inversion: Inversion, images: torch.Tensor, out: SampleOutput) -> Inversion:
    """Fill in what the regeneration ``out`` of ``inversion`` gave and its errors against ``images``."""
    from hmine.inversion.autoencoder import images_from_target

    regenerated = out.images.float().cpu()
    inversion.images = regenerated
    inversion.h = out.h.float().cpu() if out.h is not None else None
    inversion.reconstruction_error = (regenerated - images.float().cpu()).abs().flatten(1).amax(1)
    with model_threads(sampler.torch_threads), torch.inference_mode():
        best = images_from_target(sampler.model, inversion.target).float().cpu()
    inversion.target_error = (regenerated - best).abs().flatten(1).amax(1)
    return inversion


def invert(
    sampler: Sampler,
    images: torch.Tensor,
    method: Method = "edit_friendly",
    *,
    seeds: Sequence[int] | None = None,
    eta: float | Sequence[float] = 1.0,
    refine: int = 0,
) -> Inversion:
    """Invert images in [-1, 1] (batch, 3, H, W) with ``method``; regenerated, with h and errors.

    Parameters
    ----------
    sampler : Sampler
        Gives the model, the timesteps, the h position and the torch threads.
    images : Tensor of shape (batch, 3, height, width)
    method : {"ddim", "edit_friendly"}, default="edit_friendly"
    seeds : sequence of int, optional
        One per image: the draws of x_t ~ q(x_t | x_0) (edit-friendly only); 0, 1, ... by default.
    eta : float or list of float, default=1.0
        The edit-friendly sampler's eta (> 0 at every step); DDIM always uses 0.
    refine : int, default=0
        DDIM only: fixed-point refinements of each inverse step (eps evaluated again at
        the new x); 0 is plain DDIM inversion.
    """
    from hmine.inversion.ddim import invert_ddim
    from hmine.inversion.edit_friendly import invert_edit_friendly

    if method == "ddim":
        return invert_ddim(sampler, images, refine=refine)
    if method == "edit_friendly":
        seeds = list(range(len(images))) if seeds is None else list(seeds)
        return invert_edit_friendly(sampler, images, seeds=seeds, eta=eta)
    raise ValueError(f"inversion method must be one of {METHODS}, got {method!r}")
