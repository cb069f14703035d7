"""Edit stage: apply directions to stored samples at several scales, and measure the effect.

Outputs in the run directory:

``edits.zarr``
    ``images`` with dims (direction, scale, sample, color, height, width): each of the
    first ``edit.n_samples`` samples regenerated from its seed with the direction added
    to h at the given scale (scale 0 is the unedited regeneration); ``done`` (direction,)
    marks directions whose images are all written — the stage resumes per direction.
``edit_strips/<direction>.png``
    rows are samples, columns the scales from the most negative to the most positive.
``edit_effects.parquet``
    one row per (direction, scale, attribute): the mean attribute score of the edited
    images, its mean change against the unedited images and, for binary attributes,
    the fraction of samples whose decision (score > threshold) flipped — the analogue of
    Haas et al. Table I (diagonal: intended effect; off-diagonal: leakage).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.config import RunConfig
from hmine.stages.sample import StageResult, make_sampler, progress, samples_path
from hmine.config import config_hash as config_hash_of
from hmine.stores import (
    CHUNK_CHECKED_ARRAYS,
    CONFIG_HASH,
    DIRECTIONS_UUID,
    JACOBIAN_UUID,
    ArraySpec,
    STORE_UUID,
    damaged_entries,
    mark_complete,
    open_group,
    prepare_store,
    repair_damaged_entries,
    provenance_attrs,
    store_state,
    table_meta,
    write_table,
)

logger = logging.getLogger(__name__)

EDITS_STORE = "edits.zarr"
EFFECTS_TABLE = "edit_effects.parquet"
STRIPS_DIR = "edit_strips"
SUPERVISED_METHODS = ("mean_difference", "probe", "conditional")


_CHECKED_ARRAYS = CHUNK_CHECKED_ARRAYS[EDITS_STORE]


def edits_intact(config: RunConfig) -> bool:
    """Whether every direction marked done in ``edits.zarr`` still has all its chunk files, whole.

    Read-only and cheap: the stage and the Prefect cache key use it, so a deleted or
    truncated chunk is redone instead of being read as (fill-value) images.
    """
    path = config.run_dir / EDITS_STORE
    if store_state(path) != "complete":  # a partial store is resumed by the stage anyway
        return True
    return not damaged_entries(open_group(path), path, _CHECKED_ARRAYS)


def effects_measured_from(edits_path: Path) -> bool:
    """Whether ``edit_effects.parquet`` was measured from this very edit store.

    The table is written after the store is marked complete: a run killed in between
    leaves a table of the previous edits, which must not pass for these.
    """
    meta = table_meta(Path(edits_path).with_name(EFFECTS_TABLE)) or {}
    attrs = open_group(edits_path).attrs
    return meta.get(CONFIG_HASH) == attrs.get(CONFIG_HASH) and meta.get("hmine:edits_uuid") == attrs.get(STORE_UUID)


def strip_filename(direction: str) -> str:
    """A file name for a direction name such as ``conditional/probe/is_circle|is_red``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", direction) + ".png"


def select_directions(directions, requested: list[str], jacobian_group=None) -> list[str]:
    """Names to edit with: the requested ones (checked), else every supervised direction.

    Names starting with ``jacobian/`` are per-image Jacobian directions
    (:class:`hmine.stages.jacobian.JacobianDirection`), checked against ``jacobian_group``,
    the Jacobian stage's store.
    """
    from hmine.stages.jacobian import JACOBIAN_PREFIX, JacobianDirection

    names = [str(n) for n in directions["name"].values]
    if requested:
        unknown = [n for n in requested if not n.startswith(JACOBIAN_PREFIX) and n not in names]
        if unknown:
            raise ValueError(f"edit.directions names {unknown}, which directions.zarr lacks; it has {names}")
        for name in (n for n in requested if n.startswith(JACOBIAN_PREFIX)):
            JacobianDirection.parse(name).check_against(jacobian_group)
        return list(requested)
    methods = [str(m) for m in directions["method"].values]
    return [n for n, m in zip(names, methods) if m in SUPERVISED_METHODS]


def run_edit_stage(config: RunConfig, *, model=None, labeller=None, show_progress: bool = True) -> StageResult:
    """Edit the first ``edit.n_samples`` samples with each selected direction and scale."""
    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import delta_for, edit_steps_from, regenerate_with_delta, write_strip
    from hmine.labelling import make_labeller
    from hmine.stages.directions import directions_path

    started = time.perf_counter()
    edit = config.edit
    run_dir = config.run_dir
    path = run_dir / EDITS_STORE
    directions = open_directions(directions_path(config))
    jacobian_group = open_jacobian_for_edits(config)
    names = select_directions(directions, edit.directions, jacobian_group)
    samples = open_group(samples_path(config))
    all_seeds = samples["sample"][...]
    seeds = all_seeds[: edit.n_samples]
    if len(seeds) < edit.n_samples:
        raise ValueError(
            f"edit.n_samples is {edit.n_samples} but the run has {len(seeds)} samples; lower edit.n_samples"
        )
    if jacobian_group is not None and not np.isin(jacobian_group["sample"][...], seeds).any():
        raise ValueError(
            "edit.directions names Jacobian directions, but none of the samples the Jacobian stage "
            f"analysed is among the first edit.n_samples={edit.n_samples}; raise edit.n_samples"
        )
    image_shape = samples["x0"].shape[1:]
    scales = sorted(set(float(s) for s in edit.scales) | {0.0})
    # the edits depend on the settings and on the very directions they apply: both go
    # into the store's key, so new directions make the store stale like a new config
    directions_uuid = directions.attrs.get(STORE_UUID, "")
    keyed_on = {"edit": config.stage_hash("edit"), "directions": directions_uuid}
    made_from = {DIRECTIONS_UUID: directions_uuid}
    if jacobian_group is not None:  # per-image Jacobian directions: keyed on that store too
        keyed_on["jacobian"] = made_from[JACOBIAN_UUID] = jacobian_group.attrs.get(STORE_UUID, "")
    config_hash = config_hash_of(keyed_on)
    arrays = [
        ArraySpec(
            "images",
            (len(names), len(scales), len(seeds), *image_shape),
            (1, 1, len(seeds), *image_shape),
            "float32",
            ("direction", "scale", "sample", "color", "height", "width"),
            {"long_name": "edited image", "units": "pixel value in [-1, 1]"},
        ),
        ArraySpec("done", (len(names),), (1,), "bool", ("direction",), {"long_name": "direction written"}, False, False),
        ArraySpec(
            "edited", (len(names), len(seeds)), (1, len(seeds)), "bool", ("direction", "sample"),
            {"long_name": "the sample has this direction (per-image Jacobian directions: only the analysed samples)"},
            # True when unwritten: a store from before this array, reopened to resume, holds
            # only directions every sample has
            True, False,
        ),
        ArraySpec("direction", (len(names),), (len(names),), "str", ("direction",), None, "", False),
        ArraySpec("scale", (len(scales),), (len(scales),), "float64", ("scale",), {"units": "std of the data along the direction"}, None, False),
        ArraySpec("sample", (len(seeds),), (len(seeds),), "int64", ("sample",), {"long_name": "seed"}, None, False),
    ]
    coords = {"direction": np.array(names, dtype=object), "scale": np.array(scales), "sample": seeds}
    attrs = provenance_attrs(config.stage_inputs("edit"), config_hash, made_from)
    if store_state(path) == "complete" and open_group(path).attrs.get(CONFIG_HASH) == config_hash:
        if effects_measured_from(path) and edits_intact(config):
            logger.info("edit stage: %s is up to date", path)
            return StageResult(path, len(names), 0, len(names), 0, time.perf_counter() - started)
    sampler = make_sampler(config, model)
    edit_steps_from(sampler.timesteps.tolist(), edit.t_edit, edit.t_edit_max)  # an empty window: refused, nothing written
    group = prepare_store(path, arrays, attrs, coords, replace_stale=True)  # a changed config recomputes
    damaged = repair_damaged_entries(group, path, _CHECKED_ARRAYS)
    if damaged:
        logger.warning("edit stage: %d directions had missing or truncated chunks; redoing them", len(damaged))

    batch = config.sample.batch_size  # the sample stage's batches: scale 0 is bit-identical
    todo = [i for i, done in enumerate(group["done"][...]) if not done]
    strips = run_dir / STRIPS_DIR
    strips.mkdir(parents=True, exist_ok=True)
    run_steps = [int(t) for t in samples["step"][...]]
    for d in progress(todo, "edit", "direction", show_progress):
        per_image = _per_image_units(names[d], jacobian_group, run_steps, config, all_seeds)
        if per_image is None:
            selected = direction_by_name(directions, names[d])
            unit = selected["direction"].values
            scale_unit = selected["scale_unit"].values
            has_direction = np.ones(len(seeds), dtype=bool)
        else:
            unit, scale_unit, has_direction = per_image[0], per_image[1], per_image[2][: len(seeds)]
        for s, scale in enumerate(scales):
            # (step, ...) for a direction shared by all samples; (sample, step, ...) per image
            delta = delta_for(unit, scale_unit, scale)
            for start in range(0, len(seeds), batch):
                # the sample stage's whole batch, also past edit.n_samples: CPU kernels differ
                # with the batch size, and a shorter batch would not give the stored images
                # bit for bit at scale 0
                chunk = all_seeds[start : start + batch]
                kept = min(len(chunk), len(seeds) - start)
                group["images"][d, s, start : start + kept] = regenerate_with_delta(
                    sampler,
                    chunk.tolist(),
                    delta if per_image is None else delta[start : start + len(chunk)],
                    t_edit=edit.t_edit,
                    t_edit_max=edit.t_edit_max,
                    asymmetric=edit.asymmetric,
                )[:kept]
        group["edited"][d] = has_direction
        shown_samples = np.flatnonzero(has_direction)[: edit.strip_samples]
        shown = group["images"][d, :, :][:, shown_samples]  # (scale, sample, ...)
        write_strip(np.swapaxes(shown, 0, 1), strips / strip_filename(names[d]), upscale=3)
        group["done"][d] = True
    mark_complete(group)

    effects = measure_effects(
        group,
        names,
        scales,
        labeller or make_labeller(config.label),
        config.directions.threshold,
        config.label.attributes,
    )
    write_table(
        effects,
        run_dir / EFFECTS_TABLE,
        {"hmine:config_hash": config_hash, "hmine:edits_uuid": group.attrs[STORE_UUID]},
    )
    seconds = time.perf_counter() - started
    logger.info("edit stage: %d directions edited in %.1f s", len(todo), seconds)
    return StageResult(path, len(names), len(todo), len(names) - len(todo), len(damaged), seconds)


def measure_effects(group, names, scales, labeller, threshold: float, binary_attributes: list[str]) -> pd.DataFrame:
    """Per (direction, scale, attribute): mean score, mean change and decision flips.

    Changes are measured against the scale-0 images of the same direction (the unedited
    regeneration), sample by sample. For the binary attributes, ``flip_to_positive`` is
    the fraction of samples scored negative (score <= threshold) before the edit that
    are positive after it, among those that were negative; ``flip_to_negative`` the reverse.
    """
    zero = scales.index(0.0)
    rows = []
    for d, name in enumerate(names):
        # only the samples that have the direction (a per-image Jacobian direction exists for
        # the analysed samples alone); stores from before the "edited" array: all of them
        edited = np.asarray(group["edited"][d], dtype=bool) if "edited" in group else slice(None)
        per_scale = [
            labeller.score(np.asarray(group["images"][d, s])[edited]).reset_index(drop=True) for s in range(len(scales))
        ]
        base = per_scale[zero]
        for s, scale in enumerate(scales):
            scores = per_scale[s]
            for attribute in scores.columns:
                before, after = base[attribute].to_numpy(), scores[attribute].to_numpy()
                row = {
                    "direction": name,
                    "scale": scale,
                    "attribute": attribute,
                    "mean_score": float(after.mean()),
                    "mean_change": float((after - before).mean()),
                    "flip_to_positive": float("nan"),
                    "flip_to_negative": float("nan"),
                }
                if attribute in binary_attributes:
                    negative, positive = before <= threshold, before > threshold
                    if negative.any():
                        row["flip_to_positive"] = float((after[negative] > threshold).mean())
                    if positive.any():
                        row["flip_to_negative"] = float((after[positive] <= threshold).mean())
                rows.append(row)
    return pd.DataFrame(rows)


def open_jacobian_for_edits(config: RunConfig):
    """The Jacobian stage's store when ``edit.directions`` names Jacobian directions, else None."""
    from hmine.stages.jacobian import JACOBIAN_PREFIX, jacobian_path

    if not any(name.startswith(JACOBIAN_PREFIX) for name in config.edit.directions):
        return None
    path = jacobian_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(
            f"edit.directions names Jacobian directions, but {path} is not complete; run the jacobian "
            "stage first (hmine run does, before the edit stage)"
        )
    return open_group(path)


def _per_image_units(name, jacobian_group, run_steps, config, all_seeds):
    """For a Jacobian direction: units (seed, step, ...), scale units (seed, step) and which
    of ``all_seeds`` have one, each indexed like ``all_seeds``; None for any other direction."""
    import xarray as xr

    from hmine.directions import projection_std
    from hmine.stages.jacobian import JACOBIAN_PREFIX, JacobianDirection

    if not name.startswith(JACOBIAN_PREFIX):
        return None
    units, analysed_seeds = JacobianDirection.parse(name).units(jacobian_group, run_steps)
    h = xr.open_zarr(samples_path(config), consolidated=False)["h"]
    scale_units = projection_std(units, h)  # the std of the data along each image's vector, per step
    position = {int(seed): i for i, seed in enumerate(analysed_seeds)}
    all_units = np.zeros((len(all_seeds), *units.shape[1:]), dtype=np.float32)
    all_scale_units = np.zeros((len(all_seeds), units.shape[1]), dtype=np.float64)
    has_direction = np.zeros(len(all_seeds), dtype=bool)
    for i, seed in enumerate(all_seeds):
        if int(seed) in position:
            all_units[i], all_scale_units[i] = units[position[int(seed)]], scale_units[position[int(seed)]]
            has_direction[i] = True
    return all_units, all_scale_units, has_direction


def read_effects(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / EFFECTS_TABLE)
