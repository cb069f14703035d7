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
from dataclasses import dataclass
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
from hmine.sharding import ShardPlan
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


@dataclass
class JacobianPlan:
    """What :func:`prepare_jacobian_stage` found (the ``state`` of its :class:`~hmine.sharding.ShardPlan`)."""

    path: Path
    seeds: np.ndarray
    steps: list[int]
    all_steps: list[int]
    masks: np.ndarray | None
    variants: list[str]
    n_todo: int
    repaired: int
    started: float


def run_jacobian_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Compute Jacobian directions for the first ``jacobian.n_samples`` samples.

    The three steps of the sharded stage (:mod:`hmine.sharding`) in one process:
    :func:`prepare_jacobian_stage`, :func:`analyse_groups` over every group left,
    :func:`finish_jacobian_stage`.
    """
    plan = prepare_jacobian_stage(config)
    sampler = make_sampler(config, model) if plan.todo or plan.state.masks is not None else None
    computed = analyse_groups(config, plan.todo, plan.identity, sampler=sampler, show_progress=show_progress)
    return finish_jacobian_stage(config, plan, len(computed), sampler=sampler)


def prepare_jacobian_stage(config: RunConfig) -> ShardPlan:
    """Check the inputs, create or reopen ``jacobian.zarr`` and list the work left.

    The units are groups of solver batches (lists of [sample, step] pairs) that
    :func:`analyse_groups` computes from one regeneration of their samples' trajectories
    (:func:`trajectory_groups`): a shard holds whole groups, so every batch sees the same
    trajectories in any process. The identity is the store's input identity.
    """
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
        return ShardPlan([], "", JacobianPlan(path, seeds, steps, all_steps, None, [], 0, 0, started))

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
    done = group["done"][...]
    todo = [(i, j) for i in range(len(seeds)) for j in range(len(steps)) if not done[i, j]]
    batch_size = config.jacobian.batch_size
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    groups = [[[list(pair) for pair in batch] for batch in g] for g in trajectory_groups(batches)]
    state = JacobianPlan(path, seeds, steps, all_steps, masks, variants, len(todo), len(damaged), started)
    return ShardPlan(groups, record[INPUT_IDENTITY], state)


def trajectory_groups(batches: list[list[tuple[int, int]]]) -> list[list]:
    """Consecutive solver batches that share one regeneration of trajectories.

    A batch regenerates the trajectories of exactly its samples when one of them is not
    held from the batch before, else it reuses those (:func:`analyse_groups`); a group
    starts at each regeneration.
    """
    groups, held = [], set()
    for batch in batches:
        needed = {i for i, _ in batch}
        if needed - held:
            groups.append([])
            held = needed
        groups[-1].append(batch)
    return groups


def analyse_groups(config: RunConfig, groups: list, identity: str, *, sampler=None,
                   show_progress: bool = False) -> list:  # fmt: skip
    """Top-k (and localised) directions of the (sample, step) pairs of each group, written as they come.

    ``jacobian.batch_size`` pairs at a time share their U-Net calls
    (:func:`hmine.jacobian.jacobian_subspaces`); each pair's data and done-mark are written
    as soon as its batch is solved, so a kill loses at most the batch in flight. A group
    whose pairs are all done is skipped. The masks are the store's. Refuses a store whose
    input identity is not ``identity``. Returns the groups computed.
    """
    from hmine.jacobian import use_math_attention
    from hmine.stages import INPUT_IDENTITY
    from hmine.threads import model_threads

    if not groups:
        return []
    path = jacobian_path(config)
    group = open_group(path, mode="r+")
    if group.attrs.get(INPUT_IDENTITY) != identity:
        raise RuntimeError(f"{path} was prepared for other inputs; rerun the jacobian stage to prepare it again")
    done = group["done"][...]
    todo = [g for g in groups if not all(done[i, j] for batch in g for i, j in batch)]
    if not todo:
        return []
    sampler = sampler or make_sampler(config)
    use_math_attention(sampler.model.unet)
    seeds, steps = group["sample"][...], [int(t) for t in group["step"][...]]
    step_index = {int(t): i for i, t in enumerate(open_group(samples_path(config))["step"][...])}
    masks = None if config.jacobian.mask == "none" else np.asarray(group["mask"][...], dtype=np.float32)
    batches = [[(int(i), int(j)) for i, j in batch] for g in todo for batch in g]
    trajectories: dict[int, object] = {}
    for batch in progress(batches, "jacobian", "batch", show_progress):
        needed = sorted({i for i, _ in batch})
        if set(needed) - set(trajectories):  # todo runs sample by sample: keep only this batch's
            out = sampler.sample([int(seeds[i]) for i in needed], return_trajectory=True)
            trajectories = {i: (out.trajectory[r], out.h[r]) for r, i in enumerate(needed)}
        with model_threads(sampler.torch_threads):
            _solve_batch(config, group, sampler, seeds, steps, step_index, masks, batch, trajectories)
    return todo


def finish_jacobian_stage(config: RunConfig, plan: ShardPlan, computed: int, *, sampler=None) -> StageResult:
    """Check every pair is done, make the diagnostic edits of a masked run, mark the store complete."""
    state = plan.state
    total = len(state.seeds) * len(state.steps)
    if not plan.identity:  # up to date
        return StageResult(state.path, total, 0, total, 0, time.perf_counter() - state.started)
    group = open_group(state.path, mode="r+")
    if not group["done"][...].all():
        raise RuntimeError(f"jacobian stage: (sample, step) pairs of {state.path} are not done; rerun to resume them")
    if state.masks is not None and len(state.seeds):
        from hmine.jacobian import use_math_attention

        sampler = sampler or make_sampler(config)
        use_math_attention(sampler.model.unet)  # as the analysis had it: the same kernels in any process
        step_index = {t: i for i, t in enumerate(state.all_steps)}
        edit_along_top_directions(config, group, sampler, sampler.model, state.seeds, state.steps, step_index,
                                  state.masks, state.variants)  # fmt: skip
    mark_complete(group)
    seconds = time.perf_counter() - state.started
    logger.info("jacobian stage: %d (sample, step) pairs in %.1f s", state.n_todo, seconds)
    return StageResult(state.path, total, state.n_todo, total - state.n_todo, state.repaired, seconds)


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
