"""The ordered list of stages and their status in a run directory.

Each stage is a plain function ``run_<stage>_stage(config)`` in :mod:`hmine.stages`; the
Prefect flows in ``flows/`` wrap the same functions. :func:`stage_status` reads a run
directory and says, per stage, ``complete``, ``partial`` (with counts), ``missing`` or
``stale`` (written by a config whose hash differs from the current one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hmine.config import RunConfig
from hmine.stores import CONFIG_HASH, open_group, store_state

STAGE_OUTPUTS = {"sample": "samples.zarr"}
STAGES = tuple(STAGE_OUTPUTS)


@dataclass
class StageStatus:
    stage: str
    state: str  # complete | partial | missing | stale
    detail: str = ""

    def line(self) -> str:
        return f"{self.stage:<11} {self.state:<9} {self.detail}".rstrip()


def _zarr_status(stage: str, path: Path, expected_hash: str | None) -> StageStatus:
    state = store_state(path)
    if state in ("missing", "debris"):
        return StageStatus(stage, "missing", str(path.name) if state == "missing" else "crashed during creation")
    group = open_group(path)
    if expected_hash is not None and group.attrs.get(CONFIG_HASH) != expected_hash:
        return StageStatus(stage, "stale", f"written by config {group.attrs.get(CONFIG_HASH)}")
    if state == "complete":
        return StageStatus(stage, "complete", f"{path.name}")
    if "done" in group:
        done = group["done"][...]
        return StageStatus(stage, "partial", f"{int(done.sum())}/{done.size} done")
    return StageStatus(stage, "partial", "")


def stage_status(run_dir: Path, config: RunConfig | None = None) -> list[StageStatus]:
    """Status of every stage in ``run_dir``; staleness needs the current ``config``."""
    run_dir = Path(run_dir)
    if config is None and (run_dir / "config.json").exists():
        config = RunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    statuses = []
    for stage, output in STAGE_OUTPUTS.items():
        expected = config.stage_hash(stage) if config is not None else None
        statuses.append(_zarr_status(stage, run_dir / output, expected))
    return statuses


def write_run_config(config: RunConfig) -> Path:
    """Save the run's config beside its stores (reloads to an equal object)."""
    path = config.run_dir / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.model_dump_json(indent=2))
    tmp.replace(path)
    return path


def run_stages(config: RunConfig, stages: tuple[str, ...] = STAGES, *, use_prefect: bool = True) -> dict:
    """Run the given stages in order; with Prefect each stage is a flow run."""
    results = {}
    config_json = config.model_dump_json()
    for stage in stages:
        if stage == "sample":
            if use_prefect:
                from flows.sample import sample_flow

                results[stage] = sample_flow(config_json)
            else:
                from hmine.stages.sample import run_sample_stage

                r = run_sample_stage(config)
                results[stage] = {"path": str(r.path), "computed": r.computed, "skipped": r.skipped}
        else:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return results
