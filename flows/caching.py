"""Cache keys for whole stages: the stage's config hash plus the identity of its store.

A stage's Prefect result is reused only when its output store is complete and is the same
store (same ``hmine:store_uuid``) the result was computed for; a deleted, repaired or
partial store gives a key that matches nothing, so the stage body runs and resumes from
the store's own done-marks.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from hmine.stores import store_uuid


def stage_cache_key(stage: str, config_hash: str, store_path: Path) -> str:
    identity = store_uuid(Path(store_path))
    if identity is None:
        identity = "pending-" + uuid.uuid4().hex  # never matches a stored result
    return f"hmine-{stage}-{config_hash}-{identity}"
