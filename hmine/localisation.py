"""How local a Jacobian direction's edit is: the share of its change inside a mask.

Two measures for the top direction of each ``variant`` (masked, unmasked, localised) of
the first analysed step: the share of the first-order change of eps inside the mask at
that step (:func:`eps_changes_inside`), and the share of the edit's pixel change in the
final image (:func:`edit_along_top_directions`, which also writes the strips).

The work is batched like the rest of the Jacobian stage: ``jacobian.batch_size`` samples'
trajectories, unmasked top directions (:func:`hmine.jacobian.jacobian_subspaces`) and eps
changes at a time, and every edited image — sample x variant x scale — is a row of
:func:`hmine.regeneration.regenerate` at that fixed U-Net batch, the unedited steps
before the edit window computed once per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from hmine.masks import mask_for_eps

STRIPS_DIR = "jacobian_strips"


def strip_filename(seed: int, step: int) -> str:
    return f"sample-{int(seed)}-t{int(step)}.png"


def edit_along_top_directions(config, group, sampler, model, seeds, steps, step_index, masks, variants) -> None:
    """Strips and inside-mask fractions for the top direction of each variant at the first analysed step."""
    import xarray as xr

    from hmine.directions import projection_std
    from hmine.editing import edit_steps_from, write_strip
    from hmine.stages.sample import samples_path

    jac = config.jacobian
    h = xr.open_zarr(samples_path(config), consolidated=False)["h"]
    scales = sorted(set(jac.edit_scales) | {0.0})
    # the analysed step only, or every step ("global at t": the same vector at each)
    window = (steps[0], steps[0]) if jac.edit_window == "analysed_step" else (None, None)
    # 1. per sample, the top direction of each variant as a unit vector used at every
    #    step (only the window's steps are edited), and its eps share at the analysed step
    tops, eps_fractions = _top_directions(config, group, sampler, model, seeds, step_index[steps[0]], masks, variants)
    units = np.broadcast_to(tops[:, :, None], (*tops.shape[:2], h.sizes["step"], *tops.shape[2:]))
    # 2. the scale convention of every direction in hmine (std over all samples, ddof=1),
    #    in one pass over h for all of them
    scale_units = projection_std(units.reshape(-1, *units.shape[2:]), h).reshape(len(seeds), len(variants), -1)
    # 3. the edits, as rows at a fixed U-Net batch, and the share of their pixel change inside the mask
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), *window)
    edited = edited_images(sampler, seeds, units, scale_units, scales, edit_steps, jac.batch_size)
    change = np.abs(edited[:, :, scales.index(max(scales))] - edited[:, :, scales.index(0.0)]).sum(axis=2)
    inside = (change * np.asarray(masks)[:, None]).sum(axis=(2, 3))
    fractions = (inside / np.maximum(change.sum(axis=(2, 3)), 1e-12)).astype(np.float32)
    strips = config.run_dir / STRIPS_DIR
    strips.mkdir(parents=True, exist_ok=True)
    shown = [v for v, variant in enumerate(variants) if variant in ("masked", "localised")]
    for i, seed in enumerate(seeds):
        mask_tile = masks[i][None].repeat(3, axis=0) * 2 - 1
        rows = [[mask_tile] + list(edited[i, v]) for v in shown]
        write_strip(np.stack(rows), strips / strip_filename(int(seed), steps[0]), upscale=3)
    group["inside_mask_fraction"][...] = fractions
    group["inside_mask_eps_fraction"][...] = eps_fractions


def _top_directions(config, group, sampler, model, seeds, t_idx, masks, variants) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's top vector per variant (sample, variant, channel, y, x) and its eps share (sample, variant).

    ``masked`` and ``localised`` come from the store; ``unmasked`` is the top singular
    vector of the unmasked J, solved ``jacobian.batch_size`` samples at a time.
    """
    from hmine.jacobian import eps_of_h_rows, jacobian_subspaces

    jac = config.jacobian
    tops, shares = [], []
    for start in range(0, len(seeds), jac.batch_size):
        rows = list(range(start, min(start + jac.batch_size, len(seeds))))
        batch_seeds = [int(seeds[i]) for i in rows]
        out = sampler.sample(batch_seeds, return_trajectory=True)
        h0 = out.h[:, t_idx].float()
        f = eps_of_h_rows(model.unet, out.trajectory[:, t_idx], sampler.timesteps[t_idx], config.model.h_position)
        unmasked = jacobian_subspaces(f, h0, k=1, tol=jac.tol, max_iter=jac.max_iter, seeds=batch_seeds)
        top = {
            "masked": torch.from_numpy(np.asarray(group["vectors"][rows[0] : rows[-1] + 1, 0, 0])),
            "unmasked": torch.stack([result.vectors[0].cpu() for result in unmasked]),
        }
        if "localised" in variants:
            top["localised"] = torch.from_numpy(np.asarray(group["localised_vectors"][rows[0] : rows[-1] + 1, 0, 0]))
        eps_masks = torch.cat([mask_for_eps(masks[i], model.sample_shape) for i in rows])
        tops.append(torch.stack([top[variant].float() for variant in variants], dim=1).numpy())
        shares.append(np.stack([eps_changes_inside(f, h0, top[variant], eps_masks) for variant in variants], axis=1))
    return np.concatenate(tops), np.concatenate(shares).astype(np.float32)


def eps_changes_inside(f, h0: torch.Tensor, directions: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """‖M_r ⊙ J_r v_r‖² / ‖J_r v_r‖² for each image r of the unmasked row-wise F(H) = eps(X_t, H) at h0.

    One forward-mode product for all images (``f`` from :func:`hmine.jacobian.eps_of_h_rows`,
    ``h0`` and ``directions`` (n, channel, y, x), ``masks`` (n, 1, H, W)). For a
    v-prediction model f is the U-Net's v; J_eps = sqrt(a_t) J_v, so the share is the same.
    """
    from torch.func import jvp

    with torch.inference_mode(False), torch.no_grad():
        tangent = directions.reshape(h0.shape).to(dtype=h0.dtype, device=h0.device)
        change = jvp(f, (h0.detach().clone(),), (tangent,))[1].double().cpu()
    weights = torch.broadcast_to(masks.double().cpu(), change.shape)
    inside = (weights * change).square().flatten(1).sum(1)
    return (inside / change.square().flatten(1).sum(1).clamp_min(1e-30)).numpy()


def edited_images(sampler, seeds, units, scale_units, scales, edit_steps, batch_size: int) -> np.ndarray:
    """Every sample's image along every one of its ``units`` at every scale: (sample, unit, scale, C, H, W).

    ``units`` (sample, unit, step, channel, y, x) with ``scale_units`` (sample, unit, step):
    the edit at scale s adds ``s * scale_unit * unit`` to h at the ``edit_steps``. Each
    image is a row of :func:`hmine.regeneration.regenerate` at U-Net batch ``batch_size``.
    Scale 0 is one row per sample (a zero delta, regenerated by the same calls as its
    edits, so that the change an edit makes holds no rounding of another batch), shared
    by all its units.
    """
    from hmine.editing import delta_for
    from hmine.regeneration import regenerate

    n, n_units = units.shape[:2]
    edited = [scale for scale in scales if scale != 0.0]
    deltas = [torch.zeros(units.shape[2:], dtype=torch.float32)]  # delta 0: scale 0, unedited
    delta_index = []  # per sample: scale 0, then unit by unit its edited scales
    for i in range(n):
        delta_index.append(0)
        for u in range(n_units):
            delta_index += range(len(deltas), len(deltas) + len(edited))
            deltas += [delta_for(units[i, u], scale_units[i, u], scale) for scale in edited]
    per_sample = 1 + n_units * len(edited)
    row_seeds = [int(seeds[i]) for i in range(n) for _ in range(per_sample)]
    images = None
    for rows, batch in regenerate(
        sampler, row_seeds, torch.stack(deltas), delta_index, edit_steps=edit_steps, batch_size=batch_size
    ):
        if images is None:
            images = np.empty((len(row_seeds), *batch.shape[1:]), dtype=np.float32)
        images[rows] = batch
    images = images.reshape(n, per_sample, *images.shape[1:])
    out = np.empty((n, n_units, len(scales), *images.shape[2:]), dtype=np.float32)
    for j, scale in enumerate(scales):
        if scale == 0.0:
            out[:, :, j] = images[:, None, 0]
        else:
            out[:, :, j] = images[:, 1 + edited.index(scale) :: len(edited)][:, :n_units]
    return out
