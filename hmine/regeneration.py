"""Regenerating many edited images with no redundant U-Net pass.

An edit regenerates a sample's trajectory (same x_T, same per-step noise, :mod:`hmine.sampling`)
with a delta on h. The edit stage asks for many such images — directions x scales x
samples — and :func:`regenerate` computes them as *rows* (a seed and the index of its
delta), packed into U-Net calls of a fixed ``batch_size``:

- **Rows, not sample batches.** Any set of rows can share a call. Every call has exactly
  ``batch_size`` rows (the last is padded with zeros): torch's CPU kernels are chosen by
  the batch shape, and with the shape fixed a row's result does not depend on the rows
  beside it, so an image is the same bits however the rows are grouped (tested).
- **The unedited prefix once.** The steps before the first edited step (``t_edit_max``
  of the edit window) are the unedited trajectory; :func:`unedited_states` computes x_t at
  the first edited step once per seed, and every direction and scale starts from it.
- **The asymmetric step in one call.** Asyrp's step needs the eps of h and of h + delta at
  the same x_t; :class:`hmine.branching.BranchedForward` runs the path up to h once and
  the rest for both (then ``batch_size`` counts the rows of that call: half as many x_t
  go down; on a CPU keep that half at 8 or more, where the kernels stop changing with
  the batch size, for the plain sampler's bits).
- **Text-conditional models.** Each row is conditioned on its seed's prompt
  (:meth:`hmine.sampling.Sampler.conditioned_on`) and its delta goes into the guidance
  branches ``sample.text.edit_branches`` names (:meth:`hmine.sampling.Sampler.h_delta`).

- **Any trajectory source.** A row's key is a seed, whose x_T and per-step noise the
  sampler draws (:class:`SeedNoise`, the default); ``noise_source`` gives another source:
  an inverted image's x_T, z_t and residual (:class:`hmine.inversion.edits.InvertedNoise`),
  the residual added after the last step as :func:`hmine.inversion.regenerate_inverted` does.

Scale 0 is not regenerated at all by the edit stage: it is the stored ``x0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hmine.branching import BranchedForward, supports_branching
from hmine.hooks import HSpaceHook
from hmine.sampling import Sampler, noise_for_seed
from hmine.threads import model_threads


def first_edited_step(edit_steps: Sequence[bool]) -> int:
    """The index of the first edited step (steps run from high t to low t)."""
    for i, edited in enumerate(edit_steps):
        if edited:
            return i
    raise ValueError("no step is edited; widen the edit window")


def rows_per_call(sampler: Sampler, batch_size: int, asymmetric: bool) -> int:
    """How many rows (x_t) go into one U-Net call so that it computes ``batch_size`` images' eps.

    The branched asymmetric call sends each row through the up path twice, so it takes half.
    """
    if batch_size < 1:
        raise ValueError(f"the U-Net batch size must be >= 1, got {batch_size}")
    if asymmetric and supports_branching(sampler.model.unet):
        return max(1, batch_size // 2)
    return batch_size


def _pad(tensor: torch.Tensor, rows: int, axis: int = 0) -> torch.Tensor:
    missing = rows - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


def _noise(sampler: Sampler, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (rows, ...) and per-step noise (step, rows, ...) of ``seeds``, as the sampler draws them."""
    draws = [noise_for_seed(int(s), sampler.model.sample_shape, sampler.num_inference_steps) for s in seeds]
    return torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws], dim=1)


class SeedNoise:
    """The trajectory source of rows keyed by seed: x_T and per-step noise as the sampler draws them."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(self, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (rows, ...) and per-step noise (step, rows, ...) of the rows ``keys``."""
        return _noise(self.sampler, keys)

    def residual(self, keys: Sequence[int]) -> torch.Tensor | None:
        """What is added to x after the last step (rows, ...); None: nothing."""
        return None


@torch.inference_mode()
def _run_steps(
    sampler: Sampler,
    x: torch.Tensor,
    noise: torch.Tensor,
    deltas: torch.Tensor | None,
    steps: range,
    edit_steps: Sequence[bool],
    asymmetric: bool,
) -> torch.Tensor:
    """Denoise ``x`` (rows, ...) over ``steps`` with per-row ``deltas`` (rows, step, C, H, W).

    The arithmetic of :meth:`hmine.sampling.Sampler.sample` step for step, so an unedited
    row gives the stored sample's bits.
    """
    unet = sampler.model.unet
    branch = asymmetric and supports_branching(unet)
    for i in steps:
        t = sampler.timesteps[i]
        t_batch = t.expand(x.shape[0]).to(x.device)
        editing = deltas is not None and edit_steps[i]
        # where eps_D has weight 0 (the last step), Asyrp's step is the symmetric one
        asymmetric_here = asymmetric and sampler.direction_weight(int(t), sampler.etas[i]) != 0.0
        if not editing:
            eps = eps_original = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        elif branch and asymmetric_here:
            with BranchedForward(unet, sampler.h_position) as branched:
                branched.delta = sampler.h_delta(deltas[:, i], x.shape[0])
                both = sampler.unet_output(x, t_batch)
            eps_original = sampler.eps(both[: x.shape[0]], t, x)
            eps = sampler.eps(both[x.shape[0] :], t, x)
        else:
            with HSpaceHook(unet, sampler.h_position, record=False) as hook:
                eps_original = sampler.eps(sampler.unet_output(x, t_batch), t, x) if asymmetric_here else None
                hook.delta = sampler.h_delta(deltas[:, i], x.shape[0])
                eps = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        eps_P = eps
        eps_D = eps_original if (asymmetric_here or not editing) else eps
        x = sampler.step(eps_P, eps_D, int(t), x, sampler.etas[i], noise[i])
    return x


def unedited_states(
    sampler: Sampler, seeds: Sequence[int], stop: int, batch_size: int, noise_source: SeedNoise | None = None
) -> torch.Tensor:
    """x_t at step index ``stop`` of each seed's unedited trajectory (x_T for ``stop`` 0), (seed, ...).

    With ``noise_source`` the rows ``seeds`` are that source's keys (:func:`regenerate`).
    """
    noise_source = SeedNoise(sampler) if noise_source is None else noise_source
    param = next(sampler.model.unet.parameters())
    states = []
    with model_threads(sampler.torch_threads):
        for start in range(0, len(seeds), batch_size):
            chunk = [int(s) for s in seeds[start : start + batch_size]]
            x, noise = noise_source(chunk)
            if stop > 0:
                x = _pad(x.to(param), batch_size)
                noise = _pad(noise.to(param), batch_size, axis=1)
                with sampler.conditioned_on(chunk, rows=batch_size):  # a text model's prompts
                    x = _run_steps(sampler, x, noise, None, range(stop), [False] * stop, False)[: len(chunk)]
            states.append(x.cpu())
    return torch.cat(states) if states else torch.empty((0, *sampler.model.sample_shape))


def regenerate(
    sampler: Sampler,
    seeds: Sequence[int],
    deltas: torch.Tensor,
    delta_index: Sequence[int],
    *,
    edit_steps: Sequence[bool],
    asymmetric: bool = False,
    batch_size: int = 64,
    start_states: dict[int, torch.Tensor] | None = None,
    noise_source: SeedNoise | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regenerate rows: row r is ``seeds[r]`` with ``deltas[delta_index[r]]`` (step, C, H, W) on h.

    Parameters
    ----------
    sampler : Sampler
    seeds : sequence of int
    deltas : Tensor of shape (n_deltas, step, channel, y, x)
    delta_index : sequence of int, one per row
    edit_steps : sequence of bool
        The steps that get the delta (:func:`hmine.editing.edit_steps_from`).
    asymmetric : bool, default=False
        Asyrp's step (the original eps in the direction term).
    batch_size : int, default=64
        Images whose eps one U-Net call computes; fixed, so results do not depend on how
        rows are grouped (module docstring).
    start_states : dict of seed -> Tensor, optional
        x_t at the first edited step of each seed (:func:`unedited_states`); computed
        here when not given.
    noise_source : SeedNoise or alike, optional
        Gives the rows' x_T, per-step noise and residual by key (``seeds`` are then its keys,
        e.g. indices of inverted images, :class:`hmine.inversion.edits.InvertedNoise`); the
        seeds' own noise by default.

    Yields
    ------
    rows : ndarray of int
        The indices of the rows done.
    images : ndarray of shape (len(rows), color, height, width)
        Their images in [-1, 1].
    """
    if len(seeds) != len(delta_index):
        raise ValueError(f"{len(seeds)} seeds but {len(delta_index)} delta indices; give one per row")
    first = first_edited_step(edit_steps)
    noise_source = SeedNoise(sampler) if noise_source is None else noise_source
    if start_states is None:
        unique = sorted({int(s) for s in seeds})
        start_states = dict(zip(unique, unedited_states(sampler, unique, first, batch_size, noise_source)))
    param = next(sampler.model.unet.parameters())
    per_call = rows_per_call(sampler, batch_size, asymmetric)
    delta_index = np.asarray(delta_index, dtype=np.int64)
    with model_threads(sampler.torch_threads):
        for start in range(0, len(seeds), per_call):
            rows = np.arange(start, min(start + per_call, len(seeds)))
            chunk = [int(seeds[r]) for r in rows]
            _, noise = noise_source(chunk)
            x = torch.stack([start_states[s] for s in chunk])
            x = _pad(x.to(param), per_call)
            noise = _pad(noise.to(param), per_call, axis=1)
            row_deltas = _pad(deltas[torch.from_numpy(delta_index[rows])].to(param), per_call)
            with sampler.conditioned_on(chunk, rows=per_call):  # a text model's prompts
                x = _run_steps(sampler, x, noise, row_deltas, range(first, sampler.num_inference_steps), edit_steps, asymmetric)
            residual = noise_source.residual(chunk)
            if residual is not None:  # an edit-friendly inversion's, after the last step
                x = x + _pad(residual.to(param), per_call)
            with torch.inference_mode():
                images = sampler.model.decode(x)[: len(rows)]
            yield rows, images.float().cpu().numpy()
