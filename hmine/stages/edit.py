"""Edit stage: apply directions to stored samples at several scales, and measure the effect.

The directions are those of ``directions.zarr``, per-image Jacobian directions
(``jacobian/...``) and the learn stage's learned edits (``learned/<target>``,
``learned-block-mean/<target>`` at coefficients of the trained edit, ``learned-block/<target>``
through its delta block; :mod:`hmine.learning.edit_directions`) and, for a text-conditional
model, SEGA's concepts of ``edit.sega`` (``sega/<concept>``: the seeds sampled again with the
concept at |scale| times its guidance, reversed below 0; :mod:`hmine.sega_edits`); the edited images are the
run's samples or, with ``edit.source: inversions``, its inverted real images. The edited
steps are those of the window [``edit.t_edit``, ``edit.t_edit_max``]; ``edit.t_edit: auto``
chooses t_edit by Asyrp's rule and ``edit.t_boost`` adds Asyrp's quality boosting (steps
below it unedited, at eta ``edit.interval.boost_eta`` with fresh seeded noise):
:mod:`hmine.interval`, the chosen steps and the distance curves recorded in the store's
``hmine:edit_interval``.

Outputs in the run directory:

``edits.zarr``
    ``images`` with dims (direction, scale, sample, color, height, width): each of the
    first ``edit.n_samples`` samples regenerated from its seed with the direction added
    to h at the given scale (scale 0 is the sample stage's ``x0``, which an unedited
    regeneration reproduces bit for bit). With ``edit.source: inversions`` the first
    ``edit.n_samples`` inverted images of ``inversions.zarr`` instead (the ``sample``
    coordinate holds their image ids): regenerated from x_T (DDIM inversion) or with their
    stored z_t and residual (edit-friendly), scale 0 their stored regenerated ``x0``
    (:class:`hmine.inversion.edits.InvertedNoise`). With quality boosting scale 0 is the
    boosted unedited regeneration instead, so every change is measured against images made
    the same way. ``done`` (direction,) marks directions whose
    images are all written — the stage resumes per direction. The images are computed by
    :mod:`hmine.regeneration` at a U-Net batch size fixed for the store (``edit.batch_size``,
    recorded in ``hmine:unet_batch_size``).
``edit_strips/<direction>.png``
    rows are samples, columns the scales from the most negative to the most positive.
``edit_effects.parquet``
    one row per (direction, scale, attribute): the mean attribute score of the edited
    images, its mean change against the unedited images (also in stds of the unedited
    scores, ``mean_change_std``) and, for binary attributes, the fraction of samples whose
    decision (score > threshold) flipped each way and changed at all (``changed_decision``)
    — the analogue of Haas et al. Table I (diagonal: intended effect; off-diagonal:
    leakage); :mod:`hmine.effects`. :mod:`hmine.strength` reads it at matched strength.
    The scores are the labeller's of the edited images, for inverted images too; the
    decision thresholds are the directions' (``directions.threshold``; ``median``: of the
    label stage's scores of the samples). For text-driven edits (a CLIP learn target, a
    CLIP-labelled direction, a SEGA concept) ``s_dir`` and ``s_dir_std``: CLIP's directional
    similarity and its std (:mod:`hmine.text_effects`; NaN for the other edits).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.chunk_checks import CHUNK_CHECKED_ARRAYS
from hmine.config import RunConfig
from hmine.edit_names import is_plain, parse_edit, term_names
from hmine.learning.edit_directions import BLOCK_PREFIX, learned_prefix
from hmine.per_image import JACOBIAN_PREFIX, JacobianDirection, per_image_units
from hmine.sega_edits import is_sega, sega_scale_images
from hmine.stages.sample import StageResult, make_sampler, samples_path
from hmine.stores import (
    CONFIG_HASH,
    STORE_UUID,
    ArraySpec,
    open_group,
    store_state,
    table_meta,
)

logger = logging.getLogger(__name__)

EDITS_STORE = "edits.zarr"
EFFECTS_TABLE = "edit_effects.parquet"
STRIPS_DIR = "edit_strips"
UNET_BATCH_SIZE = "hmine:unet_batch_size"
EDIT_INTERVAL = "hmine:edit_interval"
SUPERVISED_METHODS = ("mean_difference", "probe", "conditional", "regression")


_CHECKED_ARRAYS = CHUNK_CHECKED_ARRAYS[EDITS_STORE]


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
    (:class:`hmine.per_image.JacobianDirection`), checked against ``jacobian_group``,
    the Jacobian stage's store; ``learned/``, ``learned-block-mean/`` and ``learned-block/``
    name the learn stage's results (:mod:`hmine.learning.edit_directions`), ``sega/`` the
    concepts of ``edit.sega`` (:mod:`hmine.sega_edits`, checked by ``check_sega_edits``); an
    entry may also combine them or take one global at t (:mod:`hmine.edit_names`).
    """
    names = [str(n) for n in directions["name"].values]
    if requested:
        named = term_names(requested)  # the directions of combinations and of names global at t too
        special = (n for n in named if not n.startswith(JACOBIAN_PREFIX) and not learned_prefix(n) and not is_sega(n))
        unknown = [n for n in special if n not in names]
        if unknown:
            raise ValueError(f"edit.directions names {unknown}, which directions.zarr lacks; it has {names}")
        for name in (n for n in named if n.startswith(JACOBIAN_PREFIX)):
            JacobianDirection.parse(name).check_against(jacobian_group)
        return list(requested)
    methods = [str(m) for m in directions["method"].values]
    return [n for n, m in zip(names, methods) if m in SUPERVISED_METHODS]


def _template(names, scales, seeds, image_shape) -> tuple[list, dict]:
    inverted = seeds.dtype.kind not in "iu"  # image ids of inverted images, else seeds
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
        ArraySpec(
            "sample", (len(seeds),), (len(seeds),), "str" if inverted else "int64", ("sample",),
            {"long_name": "image id" if inverted else "seed"}, None, False,
        ),
    ]
    coords = {"direction": np.array(names, dtype=object), "scale": np.array(scales), "sample": seeds}
    return arrays, coords


def run_edit_stage(config: RunConfig, *, model=None, labeller=None, show_progress: bool = True) -> StageResult:
    """Edit the first ``edit.n_samples`` samples with each selected direction and scale.

    The three steps of the sharded stage (:mod:`hmine.stages.edit_shards`) in one process:
    prepare, every direction left, finish.
    """
    from hmine.stages.edit_shards import edit_directions, finish_edit_stage, prepare_edit_stage

    plan = prepare_edit_stage(config, model=model, labeller=labeller)
    source = plan.state.source
    computed = edit_directions(config, plan.todo, plan.identity, source=source, show_progress=show_progress)
    return finish_edit_stage(config, plan, len(computed))


@dataclass
class EditSource:
    """What the edit stage regenerates: rows keyed by ``keys``, from ``noise_source``'s trajectories.

    Samples: the keys are seeds and the trajectories the seeds' own (``noise_source`` None);
    inverted images: the keys index the first images of ``inversions.zarr`` and
    ``noise_source`` is their :class:`~hmine.inversion.edits.InvertedNoise`.
    ``originals`` are the scale-0 images (the stored ``x0``). ``interval`` is the resolved
    editing interval (:func:`with_interval`, which also puts boosting into ``sampler`` and
    ``noise_source``).
    """

    sampler: object
    keys: list[int]
    originals: np.ndarray
    noise_source: object | None = None
    interval: object | None = None


def with_interval(config: RunConfig, source: EditSource, labeller=None) -> EditSource:
    """``source`` with the edit window resolved (:func:`hmine.interval.resolve_interval`) and,
    with quality boosting, a boosting sampler and noise source (:func:`hmine.interval.with_boosting`)."""
    from hmine.interval import resolve_interval, with_boosting

    edit = config.edit
    measured = "auto" in (edit.t_edit, edit.t_boost)  # the curves are measured on the run's first samples
    seeds = open_group(samples_path(config))["sample"][: edit.interval.n_samples].tolist() if measured else []
    interval = resolve_interval(source.sampler, edit, seeds, labeller)
    sampler, noise_source = with_boosting(source.sampler, source.noise_source, interval.t_boost, edit.interval.boost_eta)
    return replace(source, sampler=sampler, noise_source=noise_source, interval=interval)


def edited_ids(config: RunConfig) -> np.ndarray:
    """The ``sample`` coordinate of the edits: the first ``edit.n_samples`` seeds, or image ids."""
    n = config.edit.n_samples
    if config.edit.source == "inversions":
        path = _complete_inversions(config)
        ids = open_group(path)["sample"][...][:n]
        what, where = "inverted images", str(path)
    else:
        ids, what, where = open_group(samples_path(config))["sample"][...][:n], "samples", "the run"
    if len(ids) < n:
        raise ValueError(f"edit.n_samples is {n} but {where} has {len(ids)} {what}; lower edit.n_samples")
    return ids


def _complete_inversions(config: RunConfig) -> Path:
    from hmine.stages.invert import inversions_path

    path = inversions_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(
            f"edit.source is 'inversions' but {path} is not complete; run the invert stage first "
            "(hmine run does, before the edit stage)"
        )
    return path


def edit_compiles(config: RunConfig) -> bool:
    """Whether the edits run the U-Net under ``model.compile``: :func:`open_source` compiles
    the samples' sampler; inverted images are regenerated by the (eager) inversion sampler."""
    return config.model.compile and config.edit.source == "samples"


def open_source(config: RunConfig, model=None) -> EditSource:
    """The sampler, row keys, scale-0 images and trajectories of the first ``edit.n_samples``."""
    n = config.edit.n_samples
    if config.edit.source == "samples":
        samples = open_group(samples_path(config))
        return EditSource(make_sampler(config, model, compiled=True), samples["sample"][:n].tolist(), samples["x0"][:n])
    import xarray as xr

    from hmine.inversion.edits import InvertedNoise, inversion_from_store
    from hmine.stages.invert import make_inversion_sampler

    inversion = inversion_from_store(xr.open_zarr(_complete_inversions(config), consolidated=False), slice(0, n))
    sampler = make_inversion_sampler(config, model)
    originals = inversion.images.numpy()
    return EditSource(sampler, list(range(len(originals))), originals, InvertedNoise(sampler, inversion))


def _edit(config: RunConfig, group, source: EditSource, directions, jacobian_group, names, scales, todo) -> None:
    """Regenerate the edited rows of each direction in ``todo`` at every scale; write its strip.

    Scale 0 is the stored ``x0``, copied; so is every sample a per-image direction does
    not have. The rest are rows of :func:`hmine.regeneration.regenerate`, which shares the
    unedited steps before the edit window across directions and scales (of
    :func:`hmine.learning.apply.regenerate_learned` for a delta block). ``directions`` is
    (directions.zarr, learned.zarr or None).
    """
    from hmine.editing import write_strip
    from hmine.interval import boosted_steps, unedited_images
    from hmine.regeneration import first_edited_step, unedited_states

    edit, sampler, keys = config.edit, source.sampler, source.keys
    directions, learned = directions
    edit_steps = source.interval.edit_steps
    batch_size = unet_batch_size(group, sampler, edit.batch_size)
    if any(boosted_steps(sampler.timesteps.tolist(), source.interval.t_boost)):  # scale 0: boosted, unedited
        source = replace(source, originals=unedited_images(sampler, keys, batch_size, source.noise_source))
    # x_t at the first edited step, once for every direction and scale
    first = first_edited_step(edit_steps)
    starts = dict(zip(keys, unedited_states(sampler, keys, first, batch_size, source.noise_source)))
    strips = config.run_dir / STRIPS_DIR
    strips.mkdir(parents=True, exist_ok=True)
    per_image_source = _per_image_source(config) if jacobian_group is not None else None
    for d in todo:
        if is_sega(names[d]):  # a SEGA concept: sampled again with it at each scale
            has_direction = np.ones(len(keys), dtype=bool)
            _edit_sega(group, d, source, edit.sega, names[d], scales, batch_size)
        else:
            unit, scale_unit, has_direction = _direction_unit(
                config, names[d], directions, learned, jacobian_group, per_image_source, sampler.timesteps, len(keys)
            )
            _edit_direction(
                group, d, source, unit, scale_unit, has_direction, scales, starts, edit_steps, batch_size, edit.asymmetric
            )
        group["edited"][d] = has_direction
        shown_samples = np.flatnonzero(has_direction)[: edit.strip_samples]
        shown = group["images"][d, :, :][:, shown_samples]  # (scale, sample, ...)
        write_strip(np.swapaxes(shown, 0, 1), strips / strip_filename(names[d]), upscale=3)
        group["done"][d] = True


def _direction_unit(config, name, directions, learned, jacobian_group, per_image_source, timesteps, n_keys) -> tuple:
    """(unit, scale_unit, has_direction) of an h-space edit: a direction of directions.zarr,
    a per-image Jacobian direction, a learned one, a delta block's editor (scale_unit None), or a
    combination of them (:func:`hmine.combined_edits.combined_unit`)."""
    from hmine.directions import direction_by_name
    from hmine.learning.edit_directions import block_editor_for, learned_unit

    if not is_plain(name):  # a combination or a direction global at t: its terms, each resolved as below
        from hmine.combined_edits import combined_unit

        def resolve(term):
            return _direction_unit(config, term, directions, learned, jacobian_group, per_image_source, timesteps, n_keys)

        return combined_unit(parse_edit(name), resolve, [int(t) for t in timesteps], name)
    everyone = np.ones(n_keys, dtype=bool)
    if name.startswith(BLOCK_PREFIX):
        return block_editor_for(config, name, timesteps), None, everyone
    if learned_prefix(name):
        return (*learned_unit(learned, name), everyone)
    per_image = per_image_units(name, jacobian_group, *per_image_source) if per_image_source else None
    if per_image is None:
        selected = direction_by_name(directions, name)
        return selected["direction"].values, selected["scale_unit"].values, everyone
    return tuple(part[:n_keys] for part in per_image[:3])


def _edit_sega(group, d, source, sega, entry, scales, batch_size) -> None:
    """Write ``images[d]`` of ``entry``, a SEGA concept or a combination of them: scale 0 the stored ``x0``, the others
    :func:`hmine.sega.sega_edit` of the samples' seeds (:mod:`hmine.sega_edits`)."""
    group["images"][d, scales.index(0.0)] = source.originals
    for s, images in sega_scale_images(source.sampler, source.keys, sega, entry, scales, batch_size):
        group["images"][d, s] = images


def _per_image_source(config: RunConfig) -> tuple:
    """The samples' steps, h and seeds, which per-image Jacobian directions are taken from."""
    import xarray as xr

    samples = xr.open_zarr(samples_path(config), consolidated=False)
    return [int(t) for t in samples["step"].values], samples["h"], samples["sample"].values


def _edit_direction(group, d, source, unit, scale_unit, has_direction, scales, starts, edit_steps, batch_size, asymmetric) -> None:
    """Write ``images[d]``: one row per (scale != 0, sample with the direction), packed across scales.

    ``scale_unit`` None: ``unit`` is a delta block's editor, applied at the scales as coefficients.
    """
    originals = source.originals
    analysed = np.flatnonzero(has_direction)
    edited_scales = [s for s, scale in enumerate(scales) if scale != 0.0]
    for s, scale in enumerate(scales):
        if scale == 0.0 or not analysed.size:
            group["images"][d, s] = originals
    if not analysed.size:
        return
    keys = np.asarray(source.keys)
    row_scale = np.repeat(np.arange(len(edited_scales)), len(analysed))
    row_sample = np.tile(analysed, len(edited_scales))
    if scale_unit is None:  # a delta block (unit is its editor): the scales are its coefficients
        from hmine.learning.apply import regenerate_learned

        coefficients = [scales[edited_scales[k]] for k in row_scale]
        rows = regenerate_learned(source.sampler, keys[row_sample].tolist(), unit, coefficients, edit_steps=edit_steps,
                                  asymmetric=asymmetric, batch_size=batch_size, start_states=starts,
                                  noise_source=source.noise_source)  # fmt: skip
    else:
        rows = _direction_rows(source, unit, scale_unit, analysed, [scales[s] for s in edited_scales], row_sample,
                               starts, edit_steps, batch_size, asymmetric)  # fmt: skip
    slabs: dict[int, np.ndarray] = {}
    remaining = {k: len(analysed) for k in range(len(edited_scales))}
    for done, images in rows:
        for r, image in zip(done, images):
            k = int(row_scale[r])
            slab = slabs.setdefault(k, originals.copy())  # samples without the direction stay unedited
            slab[row_sample[r]] = image
            remaining[k] -= 1
            if remaining[k] == 0:  # a scale is whole: write it and free it
                group["images"][d, edited_scales[k]] = slabs.pop(k)


def _direction_rows(source, unit, scale_unit, analysed, edited, row_sample, starts, edit_steps, batch_size, asymmetric):
    """:func:`hmine.regeneration.regenerate`'s rows of a direction at the ``edited`` scales, scale-major."""
    import torch

    from hmine.editing import delta_for
    from hmine.regeneration import regenerate

    keys = np.asarray(source.keys)
    if unit.ndim == 4:  # one delta per scale, shared by every sample
        deltas = torch.stack([delta_for(unit, scale_unit, scale) for scale in edited])
        delta_index = [k for k in range(len(edited)) for _ in analysed]
    else:  # per image: one delta per (scale, sample)
        deltas = torch.cat([delta_for(unit[analysed], scale_unit[analysed], scale) for scale in edited])
        delta_index = list(range(len(edited) * len(analysed)))
    return regenerate(
        source.sampler,
        keys[row_sample].tolist(),
        deltas,
        delta_index,
        edit_steps=edit_steps,
        asymmetric=asymmetric,
        batch_size=batch_size,
        start_states=starts,
        noise_source=source.noise_source,
    )


def unet_batch_size(group, sampler, setting: int | str) -> int:
    """The U-Net batch size of this edit store: recorded at its creation, measured for ``"auto"``.

    Kept for the store's life, so a resumed stage computes its rows with the same kernels.
    """
    from hmine.batching import choose_batch_size

    recorded = group.attrs.get(UNET_BATCH_SIZE)
    if recorded is not None:
        return int(recorded)
    batch_size = choose_batch_size(sampler) if setting == "auto" else int(setting)
    group.attrs[UNET_BATCH_SIZE] = batch_size
    logger.info("edit stage: U-Net batch size %d%s", batch_size, " (measured)" if setting == "auto" else "")
    return batch_size


def open_jacobian_for_edits(config: RunConfig):
    """The Jacobian stage's store when ``edit.directions`` names Jacobian directions, else None."""
    from hmine.stages.jacobian import jacobian_path

    if not any(name.startswith(JACOBIAN_PREFIX) for name in term_names(config.edit.directions)):
        return None
    path = jacobian_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(
            f"edit.directions names Jacobian directions, but {path} is not complete; run the jacobian "
            "stage first (hmine run does, before the edit stage)"
        )
    return open_group(path)


def read_effects(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / EFFECTS_TABLE)
