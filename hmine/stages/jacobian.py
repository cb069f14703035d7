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
the model, plus the content hash of the masks.

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

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hmine.config import RunConfig
from hmine.stages.sample import StageResult, make_sampler, progress, samples_path
from hmine.stores import (
    CHUNK_CHECKED_ARRAYS,
    ArraySpec,
    CONFIG_HASH,
    damaged_entries,
    mark_complete,
    open_group,
    prepare_store,
    repair_damaged_entries,
    provenance_attrs,
    store_state,
)

logger = logging.getLogger(__name__)

JACOBIAN_STORE = "jacobian.zarr"
STRIPS_DIR = "jacobian_strips"


def jacobian_path(config: RunConfig) -> Path:
    return config.run_dir / JACOBIAN_STORE


def load_masks(config: RunConfig, seeds: np.ndarray, images: np.ndarray) -> np.ndarray | None:
    """Masks (sample, height, width) in [0, 1] for the analysed samples, or None for no mask."""
    from hmine import world

    kind = config.jacobian.mask
    height, width = images.shape[-2:]
    if kind == "none":
        return None
    if kind in ("shape", "background"):
        foreground = world.foreground_mask(images)
        return (foreground if kind == "shape" else ~foreground).astype(np.float32)
    return np.stack([read_mask_file(config.jacobian.mask_dir, seed, (height, width)) for seed in seeds])


def read_mask_file(mask_dir: Path, seed: int, image_size: tuple[int, int] | None) -> np.ndarray:
    """The user mask ``<mask_dir>/<seed>.npy`` (or ``.png``) as float32, checked against the image size."""
    stem = Path(mask_dir) / str(int(seed))
    npy, png = stem.with_suffix(".npy"), stem.with_suffix(".png")
    if npy.exists():
        try:
            mask = np.load(npy, allow_pickle=False)  # never unpickle a user's file
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(
                f"jacobian.mask_dir: {npy} is not a plain numeric .npy array ({error}); save it with "
                "np.save(path, mask.astype(np.float32)), or as a grey-scale PNG"
            ) from None
    elif png.exists():
        from PIL import Image, UnidentifiedImageError

        try:
            mask = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"jacobian.mask_dir: {png} is not a readable PNG ({error}); save it again") from None
    else:
        raise FileNotFoundError(
            f"no mask for sample {int(seed)}: expected {stem}.npy or {stem}.png in jacobian.mask_dir"
        )
    mask = np.asarray(mask, dtype=np.float32)
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(
            f"mask for sample {int(seed)} has values in [{mask.min():g}, {mask.max():g}]; save weights in "
            "[0, 1] (.npy), or a grey-scale PNG, which is read as 0..255 / 255"
        )
    if image_size is not None and mask.shape != tuple(image_size):
        raise ValueError(
            f"mask for sample {int(seed)} has shape {mask.shape}, but the images are "
            f"{image_size[0]}x{image_size[1]}; save masks at the image size"
        )
    return mask


def _content_hash(masks: np.ndarray | None) -> str:
    return hashlib.sha256(masks.tobytes()).hexdigest()[:16] if masks is not None else "none"


def jacobian_mask_hash(config: RunConfig) -> str:
    """Content hash of the masks the stage would use now ("none" without masks).

    Part of the stage's key beside its config hash: mask files can change under the same
    config. Reads the first ``jacobian.n_samples`` images of a complete samples store
    (a shape mask is computed from them); "unknown" when the store is not complete.
    """
    if store_state(samples_path(config)) != "complete":
        return "unknown"
    samples = open_group(samples_path(config))
    seeds = samples["sample"][...][: config.jacobian.n_samples]
    if config.jacobian.mask == "none":
        return "none"
    images = np.asarray(samples["x0"][: len(seeds)], dtype=np.float32)
    return _content_hash(load_masks(config, seeds, images))


def _mask_for_eps(mask: np.ndarray, sample_shape) -> torch.Tensor:
    """A (1, 1, H, W) mask at the resolution of eps (downsampled for a latent model)."""
    tensor = torch.from_numpy(mask)[None, None]
    if tuple(tensor.shape[-2:]) != tuple(sample_shape[-2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=tuple(sample_shape[-2:]), mode="area")
    return tensor


def checked_arrays(group) -> list[str]:
    """The chunk-checked arrays a Jacobian store must hold: ``localised_vectors`` too when
    the settings it was written with (its ``hmine:stage_config``) asked for them."""
    import json

    settings = json.loads(group.attrs.get("hmine:stage_config", "{}")).get("jacobian", {})
    return CHUNK_CHECKED_ARRAYS[JACOBIAN_STORE] + (["localised_vectors"] if finds_localised(settings) else [])


def finds_localised(settings: dict) -> bool:
    """Whether Jacobian settings (``JacobianConfig.model_dump()``) ask for localised directions."""
    return settings.get("mask", "none") != "none" and settings.get("localised_rank", 0) > 0


def jacobian_intact(config: RunConfig) -> bool:
    """Whether every (sample, step) marked done in ``jacobian.zarr`` still has its chunk files, whole."""
    path = jacobian_path(config)
    if store_state(path) != "complete":  # a partial store is resumed by the stage anyway
        return True
    group = open_group(path)
    return not damaged_entries(group, path, checked_arrays(group))


def run_jacobian_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Compute Jacobian directions for the first ``jacobian.n_samples`` samples."""
    from hmine.jacobian import eps_of_h, jacobian_subspace, localised_directions, use_math_attention

    started = time.perf_counter()
    jac = config.jacobian
    path = jacobian_path(config)
    if store_state(samples_path(config)) != "complete":
        # unsampled batches read as fill values: empty shape masks, a distorted h reference
        raise FileNotFoundError(f"{samples_path(config)} is not complete; run the sample stage first")
    samples = open_group(samples_path(config))
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
    images = np.asarray(samples["x0"][: len(seeds)], dtype=np.float32)
    masks = load_masks(config, seeds, images)
    mask_hash = _content_hash(masks)
    config_hash = hashlib.sha256(f"{config.stage_hash('jacobian')}-{mask_hash}".encode()).hexdigest()[:16]
    if (
        store_state(path) == "complete"
        and open_group(path).attrs.get(CONFIG_HASH) == config_hash
        and jacobian_intact(config)
    ):
        logger.info("jacobian stage: %s is up to date", path)
        return StageResult(path, len(seeds) * len(steps), 0, len(seeds) * len(steps), 0, time.perf_counter() - started)

    h_shape = tuple(samples["h"].shape[2:])
    n, s, k = len(seeds), len(steps), jac.k
    height, width = images.shape[-2:]
    localised = finds_localised(jac.model_dump())
    variants = [] if masks is None else ["masked", "unmasked"] + (["localised"] if localised else [])
    n_variants = max(len(variants), 1)
    arrays = [
        ArraySpec("singular_values", (n, s, k), (1, 1, k), "float32", ("sample", "step", "k"), None, None, False),
        ArraySpec("vectors", (n, s, k, *h_shape), (1, 1, k, *h_shape), "float32", ("sample", "step", "k", "channel", "y", "x")),
        ArraySpec("residuals", (n, s, k), (1, 1, k), "float32", ("sample", "step", "k"), None, None, False),
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
            ArraySpec("localised_vectors", (n, s, k, *h_shape), (1, 1, k, *h_shape), "float32", ("sample", "step", "k", "channel", "y", "x")),
            ArraySpec("localised_shares", (n, s, k), (1, 1, k), "float32", ("sample", "step", "k"), None, None, False),
            ArraySpec("localised_responses", (n, s, k), (1, 1, k), "float32", ("sample", "step", "k"), None, None, False),
        ]
    if masks is not None:
        coords["mask"] = masks
    attrs = provenance_attrs(config.stage_inputs("jacobian"), config_hash, {"hmine:mask_hash": mask_hash})
    group = prepare_store(path, arrays, attrs, coords, replace_stale=True)  # a changed config recomputes
    damaged = repair_damaged_entries(group, path, checked_arrays(group))
    if damaged:
        logger.warning("jacobian stage: %d (sample, step) pairs had missing or truncated chunks; redoing them", len(damaged))

    strips = config.run_dir / STRIPS_DIR
    for old in strips.glob("sample-*-t*.png") if strips.exists() else []:  # an earlier config's strips
        old.unlink()
    sampler = make_sampler(config, model)
    model = sampler.model
    use_math_attention(model.unet)
    step_index = {t: i for i, t in enumerate(all_steps)}
    done = group["done"][...]
    todo = [(i, j) for i in range(n) for j in range(s) if not done[i, j]]
    trajectories: dict[int, object] = {}
    for i, j in progress(todo, "jacobian", "step", show_progress):
        if i not in trajectories:
            trajectories = {i: sampler.sample([int(seeds[i])], return_trajectory=True)}
        out = trajectories[i]
        t_idx = step_index[steps[j]]
        x_t = out.trajectory[:, t_idx]
        mask = _mask_for_eps(masks[i], model.sample_shape) if masks is not None else None
        f = eps_of_h(model.unet, x_t, sampler.timesteps[t_idx], config.model.h_position, mask=mask)
        result = jacobian_subspace(f, out.h[0, t_idx].float(), k=k, tol=jac.tol, max_iter=jac.max_iter, seed=int(seeds[i]))
        group["vectors"][i, j] = result.vectors.float().numpy()
        # f is the masked U-Net output; for a v-prediction model J_eps = sqrt(a_t) J_v
        scale = sampler.eps_jacobian_scale(int(sampler.timesteps[t_idx]))
        group["singular_values"][i, j] = scale * result.singular_values.float().numpy()
        group["residuals"][i, j] = result.residuals.float().numpy()
        group["iterations"][i, j] = result.iterations
        if localised:
            unmasked_f = eps_of_h(model.unet, x_t, sampler.timesteps[t_idx], config.model.h_position)
            local = localised_directions(
                unmasked_f, out.h[0, t_idx].float(), mask, k=k, rank=jac.localised_rank,
                tol=jac.tol, max_iter=jac.max_iter, seed=int(seeds[i]),
            )
            group["localised_vectors"][i, j] = local.vectors.float().numpy()
            group["localised_shares"][i, j] = local.shares.float().numpy()
            group["localised_responses"][i, j] = scale * local.responses.float().numpy()
        group["done"][i, j] = True  # data first, the mark second

    if masks is not None and n:
        _edit_along_top_direction(config, group, sampler, model, seeds, steps, step_index, masks, variants)
    mark_complete(group)
    seconds = time.perf_counter() - started
    logger.info("jacobian stage: %d (sample, step) pairs in %.1f s", len(todo), seconds)
    return StageResult(path, n * s, len(todo), n * s - len(todo), len(damaged), seconds)


def strip_filename(seed: int, step: int) -> str:
    return f"sample-{int(seed)}-t{int(step)}.png"


def _edit_along_top_direction(config, group, sampler, model, seeds, steps, step_index, masks, variants) -> None:
    """Strips and inside-mask fractions for the top direction of each variant at the first analysed step."""
    import xarray as xr

    from hmine.directions import projection_std
    from hmine.editing import delta_for, regenerate_with_delta, write_strip
    from hmine.jacobian import eps_of_h, jacobian_subspace

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
        eps_mask = _mask_for_eps(masks[i], model.sample_shape)
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


# -- Jacobian directions as edits -------------------------------------------------------

JACOBIAN_PREFIX = "jacobian/"
_VARIANT_ARRAYS = {"masked": "vectors", "localised": "localised_vectors"}
_NAME = re.compile(r"^jacobian/(?P<variant>[a-z]+)/(?P<k>\d+)(?:@t(?P<step>\d+))?$")


@dataclass(frozen=True)
class JacobianDirection:
    """A per-image Jacobian direction named in ``edit.directions``.

    ``jacobian/<variant>/<k>`` applies each analysed step's k-th vector (0-based) at that
    step only ("per step"; steps the stage did not analyse are not edited), and
    ``jacobian/<variant>/<k>@t<step>`` applies the vector of the analysed step ``step`` at
    every step ("global at t"). ``variant`` is ``masked`` (the top singular vectors of the
    possibly masked Jacobian, the store's ``vectors``) or ``localised``.
    """

    name: str
    variant: str
    k: int
    at_step: int | None

    @classmethod
    def parse(cls, name: str) -> JacobianDirection:
        match = _NAME.match(name)
        if match is None or match["variant"] not in _VARIANT_ARRAYS:
            raise ValueError(
                f"edit.directions: {name!r} is not a Jacobian direction; write jacobian/<variant>/<k> "
                f"(per step) or jacobian/<variant>/<k>@t<step> (global at t), variant one of "
                f"{sorted(_VARIANT_ARRAYS)}, e.g. jacobian/localised/0@t100"
            )
        return cls(name, match["variant"], int(match["k"]), None if match["step"] is None else int(match["step"]))

    def check_against(self, group) -> None:
        """Refuse, naming the fix, a direction that ``jacobian.zarr`` (a zarr group) does not hold."""
        array = _VARIANT_ARRAYS[self.variant]
        if array not in group:
            raise ValueError(
                f"edit.directions names {self.name!r}, but jacobian.zarr has no {self.variant} directions; "
                "localised ones need jacobian.mask and jacobian.localised_rank > 0"
            )
        k = group[array].shape[2]
        if self.k >= k:
            raise ValueError(f"edit.directions names {self.name!r}, but jacobian.zarr holds k={k} directions per step (0..{k - 1})")
        steps = [int(t) for t in group["step"][...]]
        if self.at_step is not None and self.at_step not in steps:
            raise ValueError(f"edit.directions names {self.name!r}, but the Jacobian stage analysed the steps {steps}")

    def units(self, group, run_steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per analysed sample, unit vectors (sample, run step, channel, y, x) and their seeds.

        Per step: the vector of each analysed step at that step, zero at the others.
        Global at t: the vector of step t at every step.
        """
        vectors = group[_VARIANT_ARRAYS[self.variant]]  # (sample, analysed step, k, channel, y, x)
        analysed = [int(t) for t in group["step"][...]]
        seeds = np.asarray(group["sample"][...])
        units = np.zeros((len(seeds), len(run_steps), *vectors.shape[3:]), dtype=np.float32)
        if self.at_step is not None:
            units[:] = np.asarray(vectors[:, analysed.index(self.at_step), self.k])[:, None]
        else:
            for j, t in enumerate(analysed):
                units[:, run_steps.index(t)] = np.asarray(vectors[:, j, self.k])
        return units, seeds
