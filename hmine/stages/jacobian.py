"""Jacobian stage: per-image top singular directions of d eps / d h, into ``jacobian.zarr``.

For each of the first ``jacobian.n_samples`` samples and each analysed step, the
trajectory is regenerated from the sample's seed and the top-k right singular vectors
of J = d(M * eps(x_t, h)) / dh are found by batched block Krylov iteration
(:func:`hmine.jacobian.jacobian_subspace`), never materialising J.

Layout (``xr.open_zarr(run_dir / "jacobian.zarr", consolidated=False)``):
``singular_values`` (sample, step, k), ``vectors`` (sample, step, k, channel, y, x),
``residuals`` (sample, step, k), ``iterations`` (sample, step), ``mask``
(sample, height, width) and ``done`` (sample, step). Resumable per (sample, step); the
store is keyed by the stage's config hash, which covers k, the tolerance, the steps and
the model, plus the content hash of the masks. ``jacobian.batch_size`` pairs share their
U-Net calls (:func:`hmine.jacobian.jacobian_subspaces`); it is not in the hash, as the
results agree with one pair at a time to rounding (within 0.01 degrees, tested).

With a mask and ``jacobian.localised_rank`` > 0, it also stores k region-localised
directions per (sample, step) (:func:`hmine.jacobian.localised_directions`): those whose
first-order change of eps has the largest share inside the mask, searched in the top
``localised_rank`` right singular subspace of the unmasked J:
``localised_vectors`` (sample, step, k, channel, y, x), ``localised_shares``
(sample, step, k), the share ‖M ⊙ J v‖² / ‖J v‖², and ``localised_responses``
(sample, step, k), ‖J v‖ (d eps, as the singular values).

With a mask, the stage then edits each sample along the top direction of each
``variant`` (``masked``: the top singular vector of M ⊙ J, the stored ``vectors``;
``unmasked``: that of J; ``localised``: the top localised one) of the first analysed
step, scaled in standard deviations of the data along it as every direction in hmine,
and applied at every step ("global at t") or only at the analysed step
(``jacobian.edit_window``). It writes strips (mask, then the masked direction's edits
and, with localised directions, a second row for the localised one's) to
``jacobian_strips/`` and records:

``inside_mask_fraction`` (sample, variant)
    the share of the edit's absolute pixel change in the final image that falls inside
    the mask, at the largest scale;
``inside_mask_eps_fraction`` (sample, variant)
    the share of ‖J v‖², the first-order change of eps at the analysed step, that falls
    inside the mask. The first can be much lower than the second, because the later
    denoising steps spread a local change of eps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hmine.chunk_checks import (
    CHUNK_CHECKED_ARRAYS,
    damaged_entries,
    repair_damaged_entries,
)
from hmine.config import RunConfig
from hmine.localisation import STRIPS_DIR, edit_along_top_directions
from hmine.masks import load_masks, mask_for_eps
from hmine.stages.sample import StageResult, make_sampler, progress, samples_path
from hmine.stores import (
    ArraySpec,
    mark_complete,
    open_group,
    prepare_store,
    provenance_attrs,
    store_state,
)

logger = logging.getLogger(__name__)

JACOBIAN_STORE = "jacobian.zarr"


def jacobian_path(config: RunConfig) -> Path:
    return config.run_dir / JACOBIAN_STORE


def checked_arrays(group) -> list[str]:
    """The chunk-checked arrays a Jacobian store must hold: ``localised_vectors`` too when
    the settings it was written with (its ``hmine:stage_config``) asked for them."""
    settings = json.loads(group.attrs.get("hmine:stage_config", "{}")).get("jacobian", {})
    return CHUNK_CHECKED_ARRAYS[JACOBIAN_STORE] + (["localised_vectors"] if finds_localised(settings) else [])


def finds_localised(settings: dict) -> bool:
    """Whether Jacobian settings (``JacobianConfig.model_dump()``) ask for localised directions."""
    return settings.get("mask", "none") != "none" and settings.get("localised_rank", 0) > 0


def damaged_jacobian_entries(path: Path) -> list[tuple[int, ...]]:
    """(sample, step) pairs marked done in a complete ``jacobian.zarr`` whose chunks are damaged."""
    if store_state(path) != "complete":  # a partial store is resumed by the stage anyway
        return []
    group = open_group(path)
    return damaged_entries(group, path, checked_arrays(group))


def _analysed(config: RunConfig, samples) -> tuple[np.ndarray, list[int], list[int]]:
    """The analysed seeds, the analysed steps and all the run's steps; bad settings refused."""
    jac = config.jacobian
    seeds = samples["sample"][...][: jac.n_samples]
    if len(seeds) < jac.n_samples:
        raise ValueError(
            f"jacobian.n_samples is {jac.n_samples} but the run has {len(seeds)} samples; lower jacobian.n_samples"
        )
    all_steps = [int(t) for t in samples["step"][...]]
    steps = all_steps if jac.steps is None else list(jac.steps)
    unknown = [t for t in steps if t not in all_steps]
    if unknown:
        raise ValueError(f"jacobian.steps {unknown} are not timesteps of the run; they are {all_steps}")
    return seeds, steps, all_steps


def _template(config: RunConfig, seeds, steps, h_shape, image_size, masks) -> tuple[list, dict, list[str]]:
    """The store's arrays and coordinates, and the variants of the diagnostic edits."""
    n, s, k = len(seeds), len(steps), config.jacobian.k
    height, width = image_size
    localised = finds_localised(config.jacobian.model_dump())
    variants = [] if masks is None else ["masked", "unmasked"] + (["localised"] if localised else [])
    n_variants = max(len(variants), 1)
    per_k = ("sample", "step", "k")
    arrays = [
        ArraySpec("singular_values", (n, s, k), (1, 1, k), "float32", per_k, None, None, False),
        ArraySpec("vectors", (n, s, k, *h_shape), (1, 1, k, *h_shape), "float32", (*per_k, "channel", "y", "x")),
        ArraySpec("residuals", (n, s, k), (1, 1, k), "float32", per_k, None, None, False),
        ArraySpec("iterations", (n, s), (1, 1), "int32", ("sample", "step"), None, None, False),
        ArraySpec("done", (n, s), (1, 1), "bool", ("sample", "step"), None, False, False),
        ArraySpec("mask", (n, height, width), (n, height, width), "float32", ("sample", "height", "width"), None, 1.0, False),
        ArraySpec("inside_mask_fraction", (n, n_variants), (n, n_variants), "float32", ("sample", "variant"), None, float("nan"), False),
        ArraySpec("inside_mask_eps_fraction", (n, n_variants), (n, n_variants), "float32", ("sample", "variant"), None, float("nan"), False),
        ArraySpec("sample", (n,), (n,), "int64", ("sample",), None, None, False),
        ArraySpec("step", (s,), (s,), "int64", ("step",), None, None, False),
    ]
    coords = {"sample": seeds, "step": np.asarray(steps, dtype=np.int64)}
    if variants:
        arrays.append(ArraySpec("variant", (n_variants,), (n_variants,), "str", ("variant",), None, "", False))
        coords["variant"] = np.array(variants, dtype=object)
    if localised:
        arrays += [
            ArraySpec("localised_vectors", (n, s, k, *h_shape), (1, 1, k, *h_shape), "float32", (*per_k, "channel", "y", "x")),
            ArraySpec("localised_shares", (n, s, k), (1, 1, k), "float32", per_k, None, None, False),
            ArraySpec("localised_responses", (n, s, k), (1, 1, k), "float32", per_k, None, None, False),
        ]
    if masks is not None:
        coords["mask"] = masks
    return arrays, coords, variants


def run_jacobian_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Compute Jacobian directions for the first ``jacobian.n_samples`` samples."""
    from hmine.stages import INPUT_IDENTITY, identity_record, up_to_date

    started = time.perf_counter()
    path = jacobian_path(config)
    if store_state(samples_path(config)) != "complete":
        # unsampled batches read as fill values: empty shape masks, a distorted h reference
        raise FileNotFoundError(f"{samples_path(config)} is not complete; run the sample stage first")
    samples = open_group(samples_path(config))
    seeds, steps, all_steps = _analysed(config, samples)
    if up_to_date(config, "jacobian"):
        logger.info("jacobian stage: %s is up to date", path)
        return StageResult(path, len(seeds) * len(steps), 0, len(seeds) * len(steps), 0, time.perf_counter() - started)

    images = np.asarray(samples["x0"][: len(seeds)], dtype=np.float32)
    masks = load_masks(config, seeds, images)
    arrays, coords, variants = _template(config, seeds, steps, tuple(samples["h"].shape[2:]), images.shape[-2:], masks)
    record = identity_record(config, "jacobian")
    attrs = provenance_attrs(config.stage_inputs("jacobian"), record[INPUT_IDENTITY], record)
    group = prepare_store(path, arrays, attrs, coords, replace_stale=True)  # a changed input recomputes
    damaged = repair_damaged_entries(group, path, checked_arrays(group))
    if damaged:
        logger.warning("jacobian stage: %d (sample, step) pairs had missing or truncated chunks; redoing them", len(damaged))

    strips = config.run_dir / STRIPS_DIR
    for old in strips.glob("sample-*-t*.png") if strips.exists() else []:  # an earlier config's strips
        old.unlink()
    sampler = make_sampler(config, model)
    step_index = {t: i for i, t in enumerate(all_steps)}
    done = group["done"][...]
    todo = [(i, j) for i in range(len(seeds)) for j in range(len(steps)) if not done[i, j]]
    _analyse(config, group, sampler, seeds, steps, step_index, masks, todo, show_progress)
    if masks is not None and len(seeds):
        edit_along_top_directions(config, group, sampler, sampler.model, seeds, steps, step_index, masks, variants)
    mark_complete(group)
    seconds = time.perf_counter() - started
    total = len(seeds) * len(steps)
    logger.info("jacobian stage: %d (sample, step) pairs in %.1f s", len(todo), seconds)
    return StageResult(path, total, len(todo), total - len(todo), len(damaged), seconds)


def _analyse(config: RunConfig, group, sampler, seeds, steps, step_index, masks, todo, show_progress) -> None:
    """Top-k (and localised) directions of each (sample, step) in ``todo``, written as they come.

    ``jacobian.batch_size`` pairs at a time share their U-Net calls
    (:func:`hmine.jacobian.jacobian_subspaces`); each pair's data and done-mark are written
    as soon as its batch is solved, so a kill loses at most the batch in flight.
    """
    from hmine.jacobian import use_math_attention

    jac = config.jacobian
    use_math_attention(sampler.model.unet)
    trajectories: dict[int, object] = {}
    batches = [todo[start : start + jac.batch_size] for start in range(0, len(todo), jac.batch_size)]
    for batch in progress(batches, "jacobian", "batch", show_progress):
        needed = sorted({i for i, _ in batch})
        if set(needed) - set(trajectories):  # todo runs sample by sample: keep only this batch's
            out = sampler.sample([int(seeds[i]) for i in needed], return_trajectory=True)
            trajectories = {i: (out.trajectory[r], out.h[r]) for r, i in enumerate(needed)}
        _solve_batch(config, group, sampler, seeds, steps, step_index, masks, batch, trajectories)


def _solve_batch(config: RunConfig, group, sampler, seeds, steps, step_index, masks, batch, trajectories) -> None:
    """Solve the (sample, step) pairs of ``batch`` together and write each with its done-mark."""
    import torch

    from hmine.jacobian import eps_of_h_rows, jacobian_subspaces, localised_directions_batch

    jac, model = config.jacobian, sampler.model
    t_idx = [step_index[steps[j]] for _, j in batch]
    x_t = torch.stack([trajectories[i][0][t] for (i, _), t in zip(batch, t_idx)])
    h0 = torch.stack([trajectories[i][1][t] for (i, _), t in zip(batch, t_idx)]).float()
    timesteps = torch.stack([sampler.timesteps[t] for t in t_idx])
    mask = torch.cat([mask_for_eps(masks[i], model.sample_shape) for i, _ in batch]) if masks is not None else None
    batch_seeds = [int(seeds[i]) for i, _ in batch]
    f = eps_of_h_rows(model.unet, x_t, timesteps, config.model.h_position, mask=mask)
    results = jacobian_subspaces(f, h0, k=jac.k, tol=jac.tol, max_iter=jac.max_iter, seeds=batch_seeds)
    local = None
    if "localised_vectors" in group:
        unmasked_f = eps_of_h_rows(model.unet, x_t, timesteps, config.model.h_position)
        local = localised_directions_batch(
            unmasked_f, h0, mask, k=jac.k, rank=jac.localised_rank, tol=jac.tol, max_iter=jac.max_iter, seeds=batch_seeds
        )
    for r, (i, j) in enumerate(batch):
        result = results[r]
        group["vectors"][i, j] = result.vectors.float().cpu().numpy()
        # f is the masked U-Net output; for a v-prediction model J_eps = sqrt(a_t) J_v
        scale = sampler.eps_jacobian_scale(int(timesteps[r]))
        group["singular_values"][i, j] = scale * result.singular_values.float().cpu().numpy()
        group["residuals"][i, j] = result.residuals.float().cpu().numpy()
        group["iterations"][i, j] = result.iterations
        if local is not None:
            group["localised_vectors"][i, j] = local[r].vectors.float().cpu().numpy()
            group["localised_shares"][i, j] = local[r].shares.float().cpu().numpy()
            group["localised_responses"][i, j] = scale * local[r].responses.float().cpu().numpy()
        group["done"][i, j] = True  # data first, the mark second
