"""Growing a run: more samples of the same config extend the run instead of starting another.

``sample.n_samples`` is part of the sample stage's hash, so raising it makes every stage
downstream stale, but not part of what an existing ``samples.zarr`` must match to be
reused: the seeds ``seed_start, seed_start + 1, ...`` of a smaller run are the first
samples of a larger one. The sample stage grows its store
(:func:`hmine.stages.sample.grow_sample_store`) and records in it which earlier store it
was grown from and how many of that store's rows it kept bit for bit
(:data:`hmine.stores.LINEAGE`), so that a stage downstream can keep what it computed from
those rows (the label stage does; the others compute again from the grown stores).
Lowering ``sample.n_samples`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from hmine.stores import CONFIG_HASH, LINEAGE, StoreConfigMismatch, open_group

if TYPE_CHECKING:
    from hmine.config import RunConfig


def growth_key(stage_inputs: dict) -> dict:
    """A stage's inputs (:func:`hmine.stages.stage_inputs`, as JSON) without
    ``sample.n_samples``: what must stay the same for a store to grow instead of being refused."""
    sample = {k: v for k, v in stage_inputs.get("sample", {}).items() if k != "n_samples"}
    return {**stage_inputs, "sample": sample}


def recorded_stage_config(attrs) -> dict | None:
    """The stage inputs an output records (``hmine:stage_config``), None when it has none."""
    try:
        return json.loads(attrs["hmine:stage_config"])
    except (KeyError, TypeError, ValueError):
        return None


def samples_to_grow(config: "RunConfig", attrs, path: Path) -> int | None:
    """How many samples the store with ``attrs`` holds, if ``config`` asks for more of the
    same samples (the store grows); None if it is the config's own store.

    ``sample.n_samples`` is in the sample stage's hash (so everything downstream goes
    stale when it changes) but not in what a store must match to be reused: the seeds
    ``seed_start, seed_start + 1, ...`` of a smaller run are the first samples of a larger
    one. Raises :class:`~hmine.stores.StoreConfigMismatch` for fewer samples (a run only
    grows) and for any other change.
    """
    found, expected = attrs.get(CONFIG_HASH), config.stage_hash("sample")
    if found == expected:
        return None
    recorded = recorded_stage_config(attrs)
    current = json.loads(json.dumps(config.stage_inputs("sample")))
    if recorded is not None and growth_key(recorded) == growth_key(current):
        held = int(recorded["sample"]["n_samples"])
        if config.sample.n_samples > held:
            return held
        raise StoreConfigMismatch(
            f"{path} holds {held} samples and sample.n_samples={config.sample.n_samples} would drop some; a run "
            f"only grows: set sample.n_samples to {held} or more, or use another run name (name: in the config)"
        )
    raise StoreConfigMismatch(
        f"{path} was written by config {found}, not {expected}; "
        "use another run name (name: in the config) or delete the store to start over"
    )


def unchanged_rows(attrs, grown_from: str | None) -> int:
    """How many leading samples of the store with ``attrs`` are those of the complete store
    with uuid ``grown_from`` (the one a downstream output was made from), bit for bit: all
    of them if it is that store, the rows every growth since kept otherwise, 0 if it is
    not in the store's lineage (another store, or one repaired since)."""
    if grown_from is None:
        return 0
    lineage = list(attrs.get(LINEAGE) or [])
    first = next((i for i, entry in enumerate(lineage) if entry.get("uuid") == grown_from), None)
    if first is None:
        return 0
    return min(int(entry["unchanged"]) for entry in lineage[first:])


def describe_growth(config: "RunConfig", path: Path) -> str | None:
    """For ``hmine status``: what a run of ``config`` does with the samples store (grow,
    refuse to shrink), or None when it is not a question of the sample count."""
    attrs = open_group(path).attrs
    try:
        held = samples_to_grow(config, attrs, path)
    except StoreConfigMismatch as error:
        return "refused: a run only grows (see hmine run)" if "only grows" in str(error) else None
    if held is None:
        return None
    return f"holds {held} samples, sample.n_samples={config.sample.n_samples}: a rerun grows it"
