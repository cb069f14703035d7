"""Prefect cache records for whole stages, keyed by the stage's input and output identities.

A stage's Prefect result is reused only when its output is up to date — complete, made
from exactly the current inputs (:func:`hmine.stages.input_identity`: the config hash,
the identities of the outputs it reads, its other inputs) and whole by its chunk check —
and is the same output (same ``hmine:store_uuid`` for a zarr store, same metadata for a
table) the record was written for. The same functions decide the stage's own skip check
and ``hmine status``.

Prefect takes a task's cache key *before* the task runs. An output that is not up to
date yet has no key (``None``: Prefect neither looks up nor writes a record), and the
stage body runs and resumes from the output's own done-marks; once it has finished, the
task writes the record under the key of the output it just made (:func:`record_stage`),
so the very first rerun is served from the cache. Records live in the run directory
(``<run_dir>/.prefect-results``) and a stage keeps only its newest one there: a record
whose output was replaced is deleted, never orphaned.
"""

from __future__ import annotations

from pathlib import Path

RESULTS_DIR = ".prefect-results"


def results_dir(config) -> Path:
    """Where a run's Prefect cache records live: inside its run directory, absolute."""
    return (config.run_dir / RESULTS_DIR).resolve()


def stage_cache_key(context, parameters) -> str | None:
    """``cache_key_fn`` of every stage task (the stage is the task's name)."""
    return stage_key(context.task.name, parameters["config"])


def stage_key(stage: str, config, check_chunks: bool = True) -> str | None:
    """The cache key of ``stage``'s output under ``config`` now; None unless it is up to date.

    ``check_chunks=False`` skips the chunk check, for an output its stage has just
    written (and checked) in this process.
    """
    from hmine.stages import (
        damaged_count,
        input_identity,
        is_complete,
        output_identity,
        recorded_identity,
    )

    if not is_complete(config, stage):
        return None
    current = input_identity(config, stage)
    if recorded_identity(config, stage) != current:
        return None
    if check_chunks and damaged_count(config, stage):
        return None
    identity = output_identity(config, stage)
    return None if identity is None else f"hmine-{stage}-{current}-{identity}"


def as_cached(summary: dict) -> dict:
    """What a rerun of a stage whose output is up to date reports: nothing computed."""
    done = summary.get("computed", 0) + summary.get("skipped", 0) + summary.get("repaired", 0)
    return {**summary, "computed": 0, "skipped": done, "repaired": 0, "seconds": 0.0}


def record_stage(stage: str, config, summary: dict) -> str | None:
    """Write the cache record of the output ``stage`` has just made, from inside its task,
    and delete the stage's older records in this run; return the key (None: not complete)."""
    from prefect.context import TaskRunContext

    key = stage_key(stage, config, check_chunks=False)
    if key is None:
        return None
    store = TaskRunContext.get().result_store
    if not store.exists(key):
        store.write(obj=as_cached(summary), key=key)
    folder = results_dir(config)
    for old in folder.glob(f"hmine-{stage}-*"):
        if old.name != key:
            old.unlink(missing_ok=True)
    return key
