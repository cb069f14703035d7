"""Cache keys for whole stages: the stage's config hash plus the identity of its output.

A stage's Prefect result is reused only when its output is complete and is the same
output (same ``hmine:store_uuid`` for a zarr store, same metadata for a table) the
result was computed for; a deleted, repaired or partial output gives a key that matches
nothing, so the stage body runs and resumes from the output's own done-marks. The flows
pass, as the config hash, the stage's hash joined with the identities of the outputs it
reads (``flows.stages.STAGE_READS``), so new inputs are a new key too.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from hmine.stores import store_uuid, table_meta


def output_identity(path: Path) -> str | None:
    """A string naming a complete stage output, None when it is missing or partial."""
    path = Path(path)
    if path.suffix == ".parquet":
        meta = table_meta(path)
        if meta is None:
            return None
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return store_uuid(path)


def stage_cache_key(stage: str, config_hash: str, output_path: Path, intact: bool = True) -> str:
    """The key; ``intact=False`` (an output found damaged) gives a key that matches nothing."""
    identity = output_identity(output_path) if intact else None
    if identity is None:
        identity = "pending-" + uuid.uuid4().hex  # never matches a stored result
    return f"hmine-{stage}-{config_hash}-{identity}"
