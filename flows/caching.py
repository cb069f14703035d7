"""Prefect cache keys for whole stages: the stage's input identity plus its output's identity.

A stage's Prefect result is reused only when its output is up to date — complete, made
from exactly the current inputs (:func:`hmine.stages.input_identity`: the config hash,
the identities of the outputs it reads, its other inputs) and whole by its chunk check —
and is the same output (same ``hmine:store_uuid`` for a zarr store, same metadata for a
table) the result was computed for. Otherwise the key matches nothing, and the stage
body runs and resumes from the output's own done-marks. The same functions decide the
stage's own skip check and ``hmine status``.
"""

from __future__ import annotations

import uuid


def stage_cache_key(context, parameters) -> str:
    """``cache_key_fn`` of every stage task (the stage is the task's name)."""
    return stage_key(context.task.name, parameters["config"])


def stage_key(stage: str, config) -> str:
    """The cache key of ``stage`` under ``config`` now."""
    from hmine.stages import input_identity, output_identity, up_to_date

    identity = output_identity(config, stage) if up_to_date(config, stage) else None
    if identity is None:
        identity = "pending-" + uuid.uuid4().hex  # never matches a stored result
    return f"hmine-{stage}-{input_identity(config, stage)}-{identity}"
