"""Label stage: score every sample's image with a labeller into ``labels.parquet``.

One row per sample, indexed by the sample's seed (index name ``seed``), one float column
per attribute score; read it with ``pd.read_parquet(run_dir / "labels.parquet")``.

The table records the stage's input identity (its config hash and the uuid of the samples
store it was computed from, :mod:`hmine.stages`); a rerun with it unchanged does nothing. Work in
progress is kept per batch in ``labels.parts/`` (one parquet file per batch, each
written atomically), so a killed run resumes; the final table is written atomically
last, so a half-written table never looks complete.

When the samples store has grown (:mod:`hmine.stages.growth`), the rows of the earlier
table for samples the growth kept are kept (whole label batches, at the same
``label.batch_size``) and only the new samples are labelled: the table equals that of a
fresh run of the new size bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.config import RunConfig
from hmine.sharding import ShardPlan
from hmine.stages.growth import growth_key, recorded_stage_config, unchanged_rows
from hmine.stages.sample import StageResult, progress, samples_path
from hmine.stores import (
    UnreadableFile,
    open_group,
    read_json,
    store_state,
    table_meta,
    write_json_atomic,
    write_table,
)

logger = logging.getLogger(__name__)

LABELS_TABLE = "labels.parquet"
# The label batch size a table was computed at (not in its identity, which it does not
# change up to rounding): a grown run keeps earlier rows only when computed at the same one.
LABEL_BATCH_SIZE = "hmine:label_batch_size"


def labels_path(config: RunConfig) -> Path:
    return config.run_dir / LABELS_TABLE


def label_parts_identity(config: RunConfig) -> dict:
    """What a run's work in progress (``labels.parts/``) depends on: the stage's input
    identity and the batch size, since part b holds rows [b * batch_size, (b + 1) * batch_size)."""
    from hmine.stages import input_identity

    return {"input": input_identity(config, "label"), "label.batch_size": config.label.batch_size}


def read_labels(config: RunConfig) -> pd.DataFrame:
    """The label table of a run, refusing one that is missing or from another config."""
    path = labels_path(config)
    meta = table_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is missing; run `hmine label` first")
    if meta.get("hmine:config_hash") != config.stage_hash("label"):
        raise ValueError(f"{path} was written by another label config; rerun `hmine label`")
    return pd.read_parquet(path)


def _parts_identity(manifest: Path) -> dict | None:
    """What the work in progress was made from; None when unknown (missing or damaged)."""
    try:
        return read_json(manifest)
    except FileNotFoundError:
        return None
    except UnreadableFile as error:  # e.g. a kill while an older hmine wrote it in place
        logger.warning("label stage: %s; its parts are relabelled", error)
        return None


def kept_label_rows(config: RunConfig, samples_attrs, seeds: np.ndarray) -> pd.DataFrame | None:
    """The leading rows of the run's earlier ``labels.parquet`` that a fresh label run of the
    current samples store computes bit for bit, whole label batches of them; None when none.

    They exist when the store was grown from the one the table was made from (its lineage,
    :func:`hmine.stages.growth.unchanged_rows`), the table was made with the same label
    settings (all but ``sample.n_samples``) at the same ``label.batch_size``, and its seeds
    are the store's first ones.
    """
    from hmine.stages import INPUT_READS

    path, batch = labels_path(config), config.label.batch_size
    meta = table_meta(path)
    if meta is None or meta.get(LABEL_BATCH_SIZE) != batch:
        return None
    recorded = recorded_stage_config(meta)
    if recorded is None or growth_key(recorded) != growth_key(json.loads(json.dumps(config.stage_inputs("label")))):
        return None
    rows = unchanged_rows(samples_attrs, json.loads(meta.get(INPUT_READS, "{}")).get("sample"))
    rows -= rows % batch
    if rows == 0:
        return None
    table = pd.read_parquet(path).iloc[:rows]
    return table if np.array_equal(table.index.to_numpy(), seeds[:rows]) else None


def _write_part(parts: Path, b: int, scores: pd.DataFrame) -> None:
    tmp = parts / f"part-{b:06d}.parquet.tmp"
    scores.to_parquet(tmp)
    tmp.replace(parts / f"part-{b:06d}.parquet")


@dataclass
class LabelPlan:
    """What :func:`prepare_label_stage` found (the ``state`` of its :class:`~hmine.sharding.ShardPlan`)."""

    path: Path
    n_batches: int
    labeller_name: str
    started: float
    labeller: object = None


def run_label_stage(config: RunConfig, *, labeller=None, show_progress: bool = True) -> StageResult:
    """Label every sample of the run's complete samples store.

    The three steps of the sharded stage (:mod:`hmine.sharding`) in one process:
    :func:`prepare_label_stage`, :func:`label_batches` over every batch left,
    :func:`finish_label_stage`.

    Parameters
    ----------
    config : RunConfig
    labeller : object with ``score(images) -> DataFrame``, optional
        Built from ``config.label`` when not given.
    """
    plan = prepare_label_stage(config, labeller=labeller)
    labeller = plan.state.labeller
    computed = label_batches(config, plan.todo, plan.identity, labeller=labeller, show_progress=show_progress)
    return finish_label_stage(config, plan, len(computed))


def prepare_label_stage(config: RunConfig, *, labeller=None) -> ShardPlan:
    """Check the inputs, set up ``labels.parts/`` and list the label batches left.

    Units are batch indices; the identity is that of the parts (:func:`label_parts_identity`,
    as JSON). A table already up to date leaves nothing to do. A given labeller is kept in
    the plan's state; none is built here (the shards build their own).
    """
    from hmine.labelling import labeller_attributes
    from hmine.stages import up_to_date

    started = time.perf_counter()
    out_path = labels_path(config)
    source = samples_path(config)
    if store_state(source) != "complete":
        raise FileNotFoundError(f"{source} is not complete; run the sample stage first")
    if up_to_date(config, "label"):
        logger.info("label stage: %s is up to date", out_path)
        return ShardPlan([], "", LabelPlan(out_path, 0, "", started))
    attributes = labeller.attributes if labeller is not None else labeller_attributes(config.label)
    name = labeller.name if labeller is not None else config.label.labeller
    missing = [a for a in config.label.required_attributes if a not in attributes]
    if missing:  # refused before labels.parts/ is touched
        raise ValueError(
            f"label.attributes names {missing}, which labeller {name!r} does not score; it scores {list(attributes)}"
        )
    batch = config.label.batch_size
    parts = out_path.with_name("labels.parts")
    manifest = parts / "identity.json"
    # parts written at another batch size cover other rows: the batch size is part of
    # their identity (not of the table's, which it does not change)
    parts_identity = label_parts_identity(config)
    if parts.exists() and _parts_identity(manifest) != parts_identity:
        shutil.rmtree(parts)  # parts of another config, samples store or batch size: start over
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, parts_identity)

    group = open_group(source)
    seeds = group["sample"][...]
    n_batches = -(-len(seeds) // batch)
    kept = kept_label_rows(config, group.attrs, seeds)  # a grown run: the earlier table's rows it keeps
    for b in range(0 if kept is None else len(kept) // batch):
        if not (parts / f"part-{b:06d}.parquet").exists():
            _write_part(parts, b, kept.iloc[b * batch : (b + 1) * batch])
    todo = [b for b in range(n_batches) if not (parts / f"part-{b:06d}.parquet").exists()]
    identity = json.dumps(parts_identity, sort_keys=True)
    return ShardPlan(todo, identity, LabelPlan(out_path, n_batches, name, started, labeller))


def label_batches(config: RunConfig, batches: list[int], identity: str, *, labeller=None,
                  show_progress: bool = False) -> list[int]:  # fmt: skip
    """Score the given label batches into ``labels.parts/``; return those computed.

    A batch whose part exists is skipped; each part is written atomically, so batches may
    run in any order, in several processes sharing the filesystem. Refuses parts whose
    identity is not ``identity`` (:func:`prepare_label_stage`'s). Every labeller call runs
    with ``sample.torch_threads`` torch threads (:mod:`hmine.threads`), so a batch's scores
    are the same bits in any process.
    """
    from hmine.labelling import make_labeller
    from hmine.threads import model_threads

    if not batches:
        return []
    parts = labels_path(config).with_name("labels.parts")
    if json.dumps(_parts_identity(parts / "identity.json"), sort_keys=True) != identity:
        raise RuntimeError(f"{parts} was set up for other inputs; rerun the label stage to prepare it again")
    todo = [b for b in dict.fromkeys(batches) if not (parts / f"part-{b:06d}.parquet").exists()]
    if not todo:
        return []
    labeller = labeller or make_labeller(config.label)
    group = open_group(samples_path(config))
    seeds, batch = group["sample"][...], config.label.batch_size
    for b in progress(todo, "label", "batch", show_progress):
        region = slice(b * batch, min(len(seeds), (b + 1) * batch))
        with model_threads(config.sample.torch_threads):
            scores = labeller.score(np.asarray(group["x0"][region], dtype=np.float32))
        scores.index = pd.Index(seeds[region], name="seed")
        _write_part(parts, b, scores)
    return todo


def finish_label_stage(config: RunConfig, plan: ShardPlan, computed: int) -> StageResult:
    """Write ``labels.parquet`` from the parts once every batch is there (atomically, last)."""
    from hmine.stages import identity_record

    state = plan.state
    out_path = state.path
    if not plan.identity:  # up to date
        return StageResult(out_path, 1, 0, 1, 0, time.perf_counter() - state.started)
    parts = out_path.with_name("labels.parts")
    missing = [b for b in range(state.n_batches) if not (parts / f"part-{b:06d}.parquet").exists()]
    if missing:
        raise RuntimeError(f"label stage: batches {missing} of {parts} are not labelled; rerun to resume them")
    seeds = open_group(samples_path(config))["sample"][...]
    table = pd.concat([pd.read_parquet(parts / f"part-{b:06d}.parquet") for b in range(state.n_batches)])
    if not np.array_equal(table.index.to_numpy(), seeds):
        raise RuntimeError(
            f"the label parts in {parts} do not cover the samples one row per seed, in order; "
            "delete that folder and rerun `hmine label`"
        )
    write_table(
        table,
        out_path,
        {
            "hmine:config_hash": config.stage_hash("label"),
            **identity_record(config, "label"),
            "hmine:labeller": state.labeller_name,
            LABEL_BATCH_SIZE: config.label.batch_size,
            "hmine:stage_config": json.dumps(config.stage_inputs("label"), sort_keys=True),
        },
    )
    shutil.rmtree(parts)
    seconds = time.perf_counter() - state.started
    logger.info("label stage: %d of %d batches labelled in %.1f s", computed, state.n_batches, seconds)
    return StageResult(out_path, state.n_batches, computed, state.n_batches - computed, 0, seconds)
