"""How local a Jacobian direction's edit is: the share of its change inside a mask.

Two measures for the top direction of each ``variant`` (masked, unmasked, localised) of
the first analysed step: the share of the first-order change of eps inside the mask at
that step (:func:`eps_change_inside`), and the share of the edit's pixel change in the
final image (:func:`edit_along_top_directions`, which also writes the strips).
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
    from hmine.editing import delta_for, regenerate_with_delta, write_strip
    from hmine.jacobian import eps_of_h, jacobian_subspace
    from hmine.stages.sample import samples_path

    jac = config.jacobian
    h = xr.open_zarr(samples_path(config), consolidated=False)["h"]
    t_idx = step_index[steps[0]]
    strips = config.run_dir / STRIPS_DIR
    strips.mkdir(parents=True, exist_ok=True)
    n_variants = len(variants)
    fractions = np.full((len(seeds), n_variants), np.nan, dtype=np.float32)
    eps_fractions = np.full((len(seeds), n_variants), np.nan, dtype=np.float32)
    scales = sorted(set(jac.edit_scales) | {0.0})
    # the analysed step only, or every step ("global at t": the same vector at each)
    window = {"t_edit": steps[0], "t_edit_max": steps[0]} if jac.edit_window == "analysed_step" else {}
    # 1. per sample, the top direction of each variant as a unit vector used at every
    #    step (only the window's steps are edited), and its eps share at the analysed step
    units = np.zeros((len(seeds), n_variants, h.sizes["step"], *h.shape[2:]), dtype=np.float32)
    for i, seed in enumerate(seeds):
        out = sampler.sample([int(seed)], return_trajectory=True)
        f = eps_of_h(model.unet, out.trajectory[:, t_idx], sampler.timesteps[t_idx], config.model.h_position)
        h0 = out.h[0, t_idx].float()
        top = {
            "masked": np.asarray(group["vectors"][i, 0, 0]),
            "unmasked": jacobian_subspace(f, h0, k=1, tol=jac.tol, max_iter=jac.max_iter, seed=int(seed)).vectors[0].numpy(),
        }
        if "localised" in variants:
            top["localised"] = np.asarray(group["localised_vectors"][i, 0, 0])
        eps_mask = mask_for_eps(masks[i], model.sample_shape)
        for v, variant in enumerate(variants):
            eps_fractions[i, v] = eps_change_inside(f, h0, torch.from_numpy(top[variant]).float(), eps_mask)
            units[i, v] = top[variant]
    # 2. the scale convention of every direction in hmine (std over all samples, ddof=1),
    #    in one pass over h for all of them
    scale_units = projection_std(units.reshape(-1, *units.shape[2:]), h).reshape(len(seeds), n_variants, -1)
    # 3. the edits and the share of their pixel change inside the mask
    shown = [v for v, variant in enumerate(variants) if variant in ("masked", "localised")]
    for i, seed in enumerate(seeds):
        mask_tile = masks[i][None].repeat(3, axis=0) * 2 - 1
        rows = []
        for v in range(n_variants):
            edited = {
                scale: regenerate_with_delta(
                    sampler, [int(seed)], delta_for(units[i, v], scale_units[i, v], scale), **window
                )[0]
                for scale in scales
            }
            change = np.abs(edited[max(scales)] - edited[0.0]).sum(axis=0)
            fractions[i, v] = float((change * masks[i]).sum() / max(change.sum(), 1e-12))
            if v in shown:
                rows.append([mask_tile] + [edited[s] for s in scales])
        write_strip(np.stack(rows), strips / strip_filename(int(seed), steps[0]), upscale=3)
    group["inside_mask_fraction"][...] = fractions
    group["inside_mask_eps_fraction"][...] = eps_fractions


def eps_change_inside(f, h0: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor) -> float:
    """‖M ⊙ J v‖² / ‖J v‖² for the unmasked f(h) = eps(x_t, h) at h0 (one forward-mode product).

    For a v-prediction model f is the U-Net's v; J_eps = sqrt(a_t) J_v, so the share is the same.
    """
    from torch.func import jvp

    with torch.inference_mode(False), torch.no_grad():
        change = jvp(f, (h0,), (direction.reshape(h0.shape),))[1]
    weights = torch.broadcast_to(mask[0], change.shape)
    return float((weights * change).square().sum() / change.square().sum().clamp_min(1e-30))
