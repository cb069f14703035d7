"""Regenerating samples with a learned editor (Δh_t or the delta block) at any coefficient.

The same trajectory as :func:`hmine.regeneration.regenerate` — the seed's x_T and per-step
noise, the unedited prefix before the edit window, Asyrp's asymmetric step inside it — with
the change of h computed by an editor (:mod:`hmine.learning.editors`) and scaled per row by a
coefficient: the delta block's edit is h + c f(h, t), so it has no fixed direction to
store; Δh_t at coefficient c is ``regenerate`` with the delta c Δh_t (the same bits, tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hmine.branching import supports_branching
from hmine.learning.editors import FunctionBranchedForward, FunctionHook
from hmine.regeneration import first_edited_step, rows_per_call, unedited_states
from hmine.sampling import Sampler, noise_for_seed
from hmine.threads import model_threads


@torch.inference_mode()
def _edited_steps(sampler: Sampler, editor, x, noise, coefficients, steps: range, edit_steps, asymmetric: bool):
    """Denoise ``x`` over ``steps`` with the editor's change of h times ``coefficients`` (per row)."""
    unet = sampler.model.unet
    branch = asymmetric and supports_branching(unet)
    for i in steps:
        t = sampler.timesteps[i]
        t_batch = t.expand(x.shape[0]).to(x.device)
        asymmetric_here = asymmetric and sampler.direction_weight(int(t), sampler.etas[i]) != 0.0

        def delta_fn(h, i=i, t=t):
            return editor(h, i, t)

        if not edit_steps[i]:
            eps = eps_original = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        elif branch and asymmetric_here:
            with FunctionBranchedForward(unet, sampler.h_position, delta_fn, coefficients):
                both = sampler.unet_output(x, t_batch)
            eps_original, eps = sampler.eps(both[: x.shape[0]], t, x), sampler.eps(both[x.shape[0] :], t, x)
        else:
            eps_original = sampler.eps(sampler.unet_output(x, t_batch), t, x) if asymmetric_here else None
            with FunctionHook(unet, sampler.h_position, delta_fn, coefficients):
                eps = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        eps_D = eps_original if (asymmetric_here or not edit_steps[i]) else eps
        x = sampler.step(eps, eps_D, int(t), x, sampler.etas[i], noise[i])
    return x


def regenerate_learned(
    sampler: Sampler,
    seeds: Sequence[int],
    editor,
    coefficients: Sequence[float],
    *,
    edit_steps: Sequence[bool],
    asymmetric: bool = True,
    batch_size: int = 64,
    start_states: dict[int, torch.Tensor] | None = None,
    noise_source=None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regenerate rows: row r is ``seeds[r]`` edited by ``editor`` at ``coefficients[r]``.

    Parameters
    ----------
    sampler : Sampler
    seeds : sequence of int
    editor : callable (h, step index, timestep) -> change of h, e.g. a trained
        :class:`~hmine.learning.editors.DeltaH` or :class:`~hmine.learning.editors.BlockEditor`
    coefficients : sequence of float, one per row
        The edit's strength: 1 is the trained edit, 0 none, negative the opposite.
    edit_steps : sequence of bool
    asymmetric : bool, default=True
        Asyrp's step (the edited eps in P_t only), as the editor was trained.
    batch_size : int, default=64
        Images whose eps one U-Net call computes (:func:`hmine.regeneration.rows_per_call`).
    start_states : dict of seed -> Tensor, optional
        x_t at the first edited step (:func:`hmine.regeneration.unedited_states`).
    noise_source : SeedNoise or alike, optional
        The rows' per-step noise by seed (e.g. quality boosting's, :class:`hmine.interval.BoostedNoise`)
        and the residual it adds after the last step; the seeds' own noise by default.

    Yields
    ------
    rows : ndarray of int
    images : ndarray (len(rows), color, height, width) in [-1, 1]
    """
    if len(seeds) != len(coefficients):
        raise ValueError(f"{len(seeds)} seeds but {len(coefficients)} coefficients; give one per row")
    first = first_edited_step(edit_steps)
    if start_states is None:
        unique = sorted({int(s) for s in seeds})
        start_states = dict(zip(unique, unedited_states(sampler, unique, first, batch_size, noise_source)))
    param = next(sampler.model.unet.parameters())
    if isinstance(editor, torch.nn.Module):
        editor.to(param.device)
    per_call = rows_per_call(sampler, batch_size, asymmetric)
    coefficients = torch.as_tensor(np.asarray(coefficients, dtype=np.float32))
    with model_threads(sampler.torch_threads):
        for start in range(0, len(seeds), per_call):
            rows = np.arange(start, min(start + per_call, len(seeds)))
            chunk = [int(seeds[r]) for r in rows]
            if noise_source is None:
                noise = torch.stack([noise_for_seed(s, sampler.model.sample_shape, sampler.num_inference_steps)[1] for s in chunk], dim=1)
            else:
                noise = noise_source(chunk)[1]
            x = torch.stack([start_states[s] for s in chunk]).to(param)
            pad = per_call - len(rows)  # fixed call shapes: a row's bits do not depend on its neighbours
            if pad:
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
                noise = torch.cat([noise, noise.new_zeros((noise.shape[0], pad, *noise.shape[2:]))], dim=1)
            row_coefficients = torch.cat([coefficients[torch.from_numpy(rows)], torch.zeros(pad)]).to(param)
            x = _edited_steps(sampler, editor, x, noise.to(param), row_coefficients,
                              range(first, sampler.num_inference_steps), edit_steps, asymmetric)  # fmt: skip
            residual = None if noise_source is None else noise_source.residual(chunk)
            if residual is not None:  # an edit-friendly inversion's, after the last step (as regenerate adds it)
                x = x + torch.cat([residual, residual.new_zeros((pad, *residual.shape[1:]))]).to(param)
            with torch.inference_mode():
                images = sampler.model.decode(x)[: len(rows)]
            yield rows, images.float().cpu().numpy()


def images_of(rows_and_images: Iterator[tuple[np.ndarray, np.ndarray]], n_rows: int) -> np.ndarray:
    """Collect :func:`regenerate_learned`'s (or ``regenerate``'s) output into one array in row order."""
    out = None
    for rows, images in rows_and_images:
        if out is None:
            out = np.empty((n_rows, *images.shape[1:]), dtype=images.dtype)
        out[rows] = images
    return out if out is not None else np.empty((0,))
