"""Stages split into shards of independent work units, for a Dask cluster.

A sharded stage is three plain functions (named in :data:`SHARDED_STAGES`):

``prepare(config) -> ShardPlan``
    In the calling process: check the inputs, create or reopen the output, list the units
    of work left (JSON-able: batch indices, lists of (sample, step) pairs, direction
    indices) and the identity the output was prepared with.
``work(config, units, identity) -> list``
    Anywhere (a Dask worker): compute the given units into the prepared output, skipping
    those already written, and return those computed. It refuses an output whose recorded
    identity is not ``identity``, the one ``prepare`` computed: a worker's ``config`` has
    absolute paths (:func:`worker_config`), which may hash differently from the caller's.
``finish(config, plan, computed) -> StageResult``
    In the calling process: check that every unit is written, then complete the output.

Each unit writes its own chunks or files with its done-mark last, so a shard killed half
way keeps the units it finished and a rerun computes only the rest. A single-process run
is the same three calls with every unit in one ``work`` call, so the two give the same
bits wherever the units do not depend on one another (units are never regrouped:
:func:`shard_batches` only splits the list), on workers that run one shard at a time:
two Jacobian shards running at once as threads of one process gave singular values a few
ulp (up to 6e-8) away from the single-process run's, one at a time in a worker thread the
same bits (measured with the embedded model, torch 2.13 CPU).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hmine.config import RunConfig


@dataclass
class ShardPlan:
    """What a sharded stage's ``prepare`` found.

    Attributes
    ----------
    todo : list
        The units of work left, in order (JSON-able, sent to workers).
    identity : str
        The identity the output was prepared with; ``work`` checks it.
    state : object
        Whatever ``finish`` needs (stays in the calling process).
    """

    todo: list
    identity: str
    state: object = field(default=None, repr=False)


@dataclass(frozen=True)
class ShardedStage:
    """The ``"module:function"`` names of a sharded stage's three steps."""

    prepare: str
    work: str
    finish: str

    def step(self, which: str):
        module, function = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), function)


SHARDED_STAGES = {
    "sample": ShardedStage(
        "hmine.stages.sample:prepare_sample_shards", "hmine.stages.sample:sample_shard", "hmine.stages.sample:finish_sample_shards"
    ),
    "label": ShardedStage(
        "hmine.stages.label:prepare_label_stage", "hmine.stages.label:label_batches", "hmine.stages.label:finish_label_stage"
    ),
    "jacobian": ShardedStage(
        "hmine.stages.jacobian:prepare_jacobian_stage",
        "hmine.stages.jacobian:analyse_groups",
        "hmine.stages.jacobian:finish_jacobian_stage",
    ),
    "edit": ShardedStage(
        "hmine.stages.edit_shards:prepare_edit_stage",
        "hmine.stages.edit_shards:edit_directions",
        "hmine.stages.edit_shards:finish_edit_stage",
    ),
}


def sharded_stage(name: str) -> ShardedStage | None:
    """The sharded steps of stage ``name``; None for a stage that runs whole in one process."""
    return SHARDED_STAGES.get(name)


def shard_batches(batches: list, n_shards: int) -> list[list]:
    """Split units into at most ``n_shards`` contiguous, near-equal, non-empty shards."""
    n_shards = max(1, min(n_shards, len(batches)))
    size, extra = divmod(len(batches), n_shards)
    shards, start = [], 0
    for i in range(n_shards):
        stop = start + size + (i < extra)
        shards.append(list(batches[start:stop]))
        start = stop
    return [shard for shard in shards if shard]


def _absolute(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def _local_id(model_id: str | None) -> str | None:
    """A model id that names an existing local folder, absolute; a hub or embedded id as it is."""
    if model_id is None or model_id.startswith("embedded:") or not Path(model_id).exists():
        return model_id
    return _absolute(model_id)


def worker_config(config: "RunConfig") -> "RunConfig":
    """``config`` with every path absolute (relative ones against this process's directory):
    the output and report roots, a local model folder, the classifier, CLIP model, masks
    and image folders. A worker elsewhere resolves a relative path in its own directory,
    where it names nothing or something else.

    The stage hashes hold some of these paths as written, so a worker does not recompute
    identities from this config: it checks the one its caller prepared (the module doc).
    """
    data = config.model_dump(mode="json")
    data["output_root"] = _absolute(config.output_root)
    data["report_root"] = _absolute(config.report_root)
    data["model"]["id"] = _local_id(config.model.id)
    data["label"]["classifier_path"] = _absolute(config.label.classifier_path)
    data["label"]["clip_model_id"] = _local_id(config.label.clip_model_id)
    data["jacobian"]["mask_dir"] = _absolute(config.jacobian.mask_dir)
    if config.images is not None:
        for key in ("folder", "labels"):
            if key in data["images"]:
                data["images"][key] = _absolute(getattr(config.images, key))
    return type(config).model_validate(data)
