"""The edit stage in the three steps of a sharded stage (:mod:`hmine.sharding`).

:func:`prepare_edit_stage` checks the inputs, resolves the edit window and prepares
``edits.zarr`` (in the calling process); :func:`edit_directions` edits the given
directions into it (anywhere: a Dask worker); :func:`finish_edit_stage` marks it complete
and measures the effects (in the calling process). The units are direction indices: a
direction's images depend on nothing another direction computes, so a direction edited
on a worker holds the same bits as one edited in the calling process.
:func:`hmine.stages.edit.run_edit_stage` is the three in one process.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmine.chunk_checks import repair_damaged_entries
from hmine.config import RunConfig
from hmine.edit_names import check_at_steps
from hmine.effects import measure_effects
from hmine.learning.edit_directions import open_learned_for_edits
from hmine.models import device_identity
from hmine.sega_edits import check_sega_edits, check_sega_prompts
from hmine.sharding import ShardPlan
from hmine.stages.edit import (
    _CHECKED_ARRAYS,
    EDIT_INTERVAL,
    EDITS_STORE,
    EFFECTS_TABLE,
    EditSource,
    _edit,
    _template,
    edit_compiles,
    edited_ids,
    open_jacobian_for_edits,
    open_source,
    select_directions,
    with_interval,
)
from hmine.stages.sample import StageResult, progress
from hmine.text_effects import with_directional_similarity
from hmine.stores import (
    COMPILED,
    CONFIG_HASH,
    DEVICE,
    STORE_UUID,
    check_same_compile,
    check_same_device,
    kept_compile_note,
    mark_complete,
    open_group,
    prepare_store,
    provenance_attrs,
    store_state,
    write_table,
)

logger = logging.getLogger(__name__)


@dataclass
class EditPlan:
    """What :func:`prepare_edit_stage` found (the ``state`` of its :class:`~hmine.sharding.ShardPlan`)."""

    path: Path
    names: list[str]
    scales: list[float]
    started: float
    labeller: object = None
    source: EditSource | None = None
    repaired: int = 0


def prepare_edit_stage(config: RunConfig, *, model=None, labeller=None) -> ShardPlan:
    """Check the inputs, resolve the edit window, create or reopen ``edits.zarr`` and list
    the directions left. The identity is the store's input identity."""
    from hmine.directions import open_directions
    from hmine.labelling import make_labeller
    from hmine.stages import INPUT_IDENTITY, identity_record, up_to_date
    from hmine.stages.directions import directions_path

    started = time.perf_counter()
    edit, path = config.edit, config.run_dir / EDITS_STORE
    check_sega_edits(config)
    directions = open_directions(directions_path(config))
    jacobian_group = open_jacobian_for_edits(config)
    names = select_directions(directions, edit.directions, jacobian_group)
    open_learned_for_edits(config)  # refuses unknown learned names before anything is written
    seeds = edited_ids(config)
    if jacobian_group is not None and not np.isin(jacobian_group["sample"][...], seeds).any():
        raise ValueError(
            "edit.directions names Jacobian directions, but none of the samples the Jacobian stage "
            f"analysed is among the first edit.n_samples={edit.n_samples}; raise edit.n_samples"
        )
    scales = sorted(set(float(s) for s in edit.scales) | {0.0})
    if up_to_date(config, "edit"):
        logger.info("edit stage: %s is up to date%s", path, kept_compile_note(edit_compiles(config), open_group(path).attrs))
        return ShardPlan([], "", EditPlan(path, names, scales, started))
    record = identity_record(config, "edit")
    numerics = {COMPILED: edit_compiles(config), DEVICE: device_identity(config.model.device)}
    # before t_edit/t_boost 'auto' spends minutes measuring its curves
    _refuse_other_numerics(config, path, record[INPUT_IDENTITY], numerics)
    labeller = labeller or make_labeller(config.label, config.model.device)
    source = with_interval(config, open_source(config, model), labeller)  # an empty window: refused, nothing written
    check_sega_prompts(source.sampler, config)
    check_at_steps(edit.directions, source.sampler.timesteps.tolist())  # 'name@t<step>': one of the sampler's steps
    # the edits depend on the settings and on the very directions they apply: the input
    # identity holds both, and a store made from other inputs is replaced
    arrays, coords = _template(names, scales, seeds, source.originals.shape[1:])
    attrs = provenance_attrs(config.stage_inputs("edit"), record[INPUT_IDENTITY], record)
    group = prepare_store(path, arrays, {**attrs, **numerics}, coords, replace_stale=True)
    damaged = repair_damaged_entries(group, path, _CHECKED_ARRAYS)
    if damaged:
        logger.warning("edit stage: %d directions had missing or truncated chunks; redoing them", len(damaged))
    todo = [i for i, done in enumerate(group["done"][...]) if not done]
    if todo:  # one store, one rounding: no mix of compiled and eager, or of two devices' edits
        _check_same_numerics(config, group.attrs, path, numerics)
    group.attrs[EDIT_INTERVAL] = json.dumps(source.interval.as_json())
    return ShardPlan(todo, record[INPUT_IDENTITY], EditPlan(path, names, scales, started, labeller, source, len(damaged)))


def _refuse_other_numerics(config: RunConfig, path: Path, identity: str, numerics: dict) -> None:
    """The check :func:`prepare_edit_stage` makes on the store it reopens, made before the
    edit window is resolved: an ``edits.zarr`` of these inputs with directions left, begun
    with the other ``model.compile`` or on another device, is refused (a store of other
    inputs is replaced)."""
    from hmine.stages import INPUT_IDENTITY

    if store_state(path) not in ("partial", "complete"):
        return
    group = open_group(path)
    if group.attrs.get(INPUT_IDENTITY) == identity and "done" in group and not group["done"][...].all():
        _check_same_numerics(config, group.attrs, path, numerics)


def _check_same_numerics(config: RunConfig, attrs, path: Path, numerics: dict) -> None:
    otherwise = "remove it to edit every direction again"
    check_same_compile(numerics[COMPILED], attrs, path, "directions", otherwise)
    check_same_device(numerics[DEVICE], attrs, path, config.model.device, "directions", otherwise)


def recorded_source(config: RunConfig, group) -> EditSource:
    """The edit source with the window the store records (``hmine:edit_interval``): an
    ``auto`` t_edit or t_boost is the number :func:`prepare_edit_stage` chose, not measured again."""
    recorded = json.loads(group.attrs[EDIT_INTERVAL])
    edit = config.edit.model_copy(update={"t_edit": recorded["t_edit"], "t_boost": recorded["t_boost"]})
    return with_interval(config.model_copy(update={"edit": edit}), open_source(config))


def edit_directions(config: RunConfig, indices: list[int], identity: str, *, source: EditSource | None = None,
                    show_progress: bool = False) -> list[int]:  # fmt: skip
    """Edit the directions ``indices`` (positions along ``direction``) into the prepared
    ``edits.zarr``; return those computed. Directions marked done are skipped; each is
    marked done after its images and strip are written. Refuses a store whose input
    identity is not ``identity``. ``source``: :func:`prepare_edit_stage`'s (default: the
    store's recorded window, :func:`recorded_source`)."""
    from hmine.directions import open_directions
    from hmine.stages import INPUT_IDENTITY
    from hmine.stages.directions import directions_path

    if not indices:
        return []
    path = config.run_dir / EDITS_STORE
    group = open_group(path, mode="r+")
    if group.attrs.get(INPUT_IDENTITY) != identity:
        raise RuntimeError(f"{path} was prepared for other inputs; rerun the edit stage to prepare it again")
    done = group["done"][...]
    todo = [int(d) for d in dict.fromkeys(indices) if not done[d]]
    if not todo:
        return []
    names = [str(name) for name in group["direction"][...]]
    scales = [float(scale) for scale in group["scale"][...]]
    source = source or recorded_source(config, group)
    directions = (open_directions(directions_path(config)), open_learned_for_edits(config))
    jacobian_group = open_jacobian_for_edits(config)
    _edit(config, group, source, directions, jacobian_group, names, scales, progress(todo, "edit", "direction", show_progress))
    return todo


def finish_edit_stage(config: RunConfig, plan: ShardPlan, computed: int) -> StageResult:
    """Check every direction is done, mark ``edits.zarr`` complete and write ``edit_effects.parquet``."""
    from hmine.labelling import decision_thresholds
    from hmine.stages.label import read_labels

    state = plan.state
    names, n = state.names, len(state.names)
    if not plan.identity:  # up to date
        return StageResult(state.path, n, 0, n, 0, time.perf_counter() - state.started)
    group = open_group(state.path, mode="r+")
    missing = [names[d] for d, done in enumerate(group["done"][...]) if not done]
    if missing:
        raise RuntimeError(f"edit stage: directions {missing} of {state.path} are not edited; rerun to resume them")
    mark_complete(group)
    threshold = config.directions.threshold
    labels = read_labels(config) if threshold == "median" else None  # a number needs no labels
    thresholds = decision_thresholds(labels, config.label.attributes, threshold)
    effects = measure_effects(group, names, state.scales, state.labeller, thresholds)
    effects = with_directional_similarity(effects, group, names, state.scales, config)  # S_dir of text-driven edits
    meta = {CONFIG_HASH: group.attrs[CONFIG_HASH], "hmine:edits_uuid": group.attrs[STORE_UUID]}
    write_table(effects, config.run_dir / EFFECTS_TABLE, meta)
    seconds = time.perf_counter() - state.started
    logger.info("edit stage: %d directions edited in %.1f s", len(plan.todo), seconds)
    return StageResult(state.path, n, len(plan.todo), n - len(plan.todo), state.repaired, seconds)
