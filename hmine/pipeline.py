"""The ordered list of stages and their status in a run directory.

Each stage is a plain function ``run_<stage>_stage(config)`` in :mod:`hmine.stages`; the
Prefect flows in ``flows/`` wrap the same functions. :func:`stage_status` reads a run
directory and says, per stage, ``complete``, ``partial`` (with counts), ``missing``,
``stale`` (written by a config whose hash differs from the current one) or ``damaged``
(work marked done whose chunk files are missing or truncated; a rerun redoes it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hmine.config import RunConfig
from hmine.stores import (
    CONFIG_HASH,
    DIRECTIONS_UUID,
    JACOBIAN_UUID,
    STAGE_HASH,
    open_group,
    store_damage,
    store_state,
    store_uuid,
)

STAGE_OUTPUTS = {
    "sample": "samples.zarr",
    "label": "labels.parquet",
    "directions": "directions.zarr",
    # before the edit stage, which can apply per-image Jacobian directions
    "jacobian": "jacobian.zarr",
    "edit": "edits.zarr",
}
STAGES = (*STAGE_OUTPUTS, "report")


@dataclass
class StageStatus:
    stage: str
    state: str  # complete | partial | missing | stale | damaged
    detail: str = ""

    def line(self) -> str:
        return f"{self.stage:<11} {self.state:<9} {self.detail}".rstrip()


def _zarr_status(stage: str, path: Path, expected_hash: str | None) -> StageStatus:
    from hmine.stages.edit import effects_measured_from

    state = store_state(path)
    if state in ("missing", "debris"):
        return StageStatus(stage, "missing", str(path.name) if state == "missing" else "crashed during creation")
    if state == "corrupt":
        return StageStatus(stage, "damaged", f"{store_damage(path)}; rerun to write the store again")
    group = open_group(path)
    written_by = group.attrs.get(STAGE_HASH, group.attrs.get(CONFIG_HASH))
    if expected_hash is not None and written_by != expected_hash:
        return StageStatus(stage, "stale", f"written by config {written_by}")
    for upstream, key in (("directions", DIRECTIONS_UUID), ("jacobian", JACOBIAN_UUID)):
        made_from = group.attrs.get(key)
        if made_from is not None and made_from != store_uuid(path.with_name(STAGE_OUTPUTS[upstream])):
            return StageStatus(stage, "stale", f"made from {upstream} directions that have since been recomputed")
    damaged = _damaged_count(stage, group, path)
    if damaged and "done" not in group:
        return StageStatus(stage, "damaged", "lost chunk files; rerun to write it again")
    if damaged:
        done = int(group["done"][...].sum())
        return StageStatus(stage, "damaged", f"{damaged}/{done} done entries lost chunks; rerun to redo them")
    if state == "complete" and stage == "edit" and not effects_measured_from(path):
        return StageStatus(stage, "partial", "edits done, effects table not measured from them; rerun")
    if state == "complete":
        return StageStatus(stage, "complete", f"{path.name}")
    if "done" in group:
        done = group["done"][...]
        return StageStatus(stage, "partial", f"{int(done.sum())}/{done.size} done")
    return StageStatus(stage, "partial", "")


def _damaged_count(stage: str, group, path: Path) -> int:
    """Done entries of a chunk-checked store (sample, edit, jacobian) whose chunks are damaged."""
    from hmine.stores import CHUNK_CHECKED_ARRAYS, all_chunks_intact, damaged_entries

    arrays = CHUNK_CHECKED_ARRAYS.get(STAGE_OUTPUTS[stage])
    if arrays is None:
        return 0
    if stage == "jacobian":
        from hmine.stages.jacobian import checked_arrays

        arrays = checked_arrays(group)
    if "done" not in group:  # written in one go: whole, or to be written again
        return 0 if store_state(path) != "complete" or all_chunks_intact(path, arrays) else 1
    return len(damaged_entries(group, path, arrays))


def stage_status(run_dir: Path, config: RunConfig | None = None) -> list[StageStatus]:
    """Status of every stage in ``run_dir``; staleness needs the current ``config``."""
    run_dir = Path(run_dir)
    if config is None and (run_dir / "config.json").exists():
        try:
            config = read_run_config(run_dir / "config.json")
        except ValueError as error:  # the stores still have a state worth showing
            logging.getLogger(__name__).warning("%s; stale stages are not detected", error)
    statuses = []
    for stage, output in STAGE_OUTPUTS.items():
        expected = config.stage_hash(stage) if config is not None else None
        if output.endswith(".parquet"):
            statuses.append(_table_status(stage, run_dir / output, expected))
        else:
            statuses.append(_zarr_status(stage, run_dir / output, expected))
    return statuses


def _table_status(stage: str, path: Path, expected_hash: str | None) -> StageStatus:
    from hmine.stores import table_meta

    meta = table_meta(path)
    parts = path.with_name(path.stem + ".parts")
    if meta is None and path.exists():
        return StageStatus(stage, "damaged", f"{path.name} does not read back whole; rerun to write it again")
    if meta is None:
        if parts.exists():
            return StageStatus(stage, "partial", f"{len(list(parts.glob('part-*.parquet')))} batches done")
        return StageStatus(stage, "missing", path.name)
    if expected_hash is not None and meta.get(CONFIG_HASH) != expected_hash:
        return StageStatus(stage, "stale", f"written by config {meta.get(CONFIG_HASH)}")
    samples_uuid = meta.get("hmine:samples_uuid")
    if samples_uuid is not None and samples_uuid != store_uuid(path.with_name(STAGE_OUTPUTS["sample"])):
        return StageStatus(stage, "stale", "made from samples that have since been written again")
    return StageStatus(stage, "complete", path.name)


def check_run_dir(config: RunConfig) -> None:
    """Refuse a run directory whose samples were drawn under another config.

    Downstream stages are recomputed when their config changes, but samples are the
    expensive data every other output stands on: they are never mixed or overwritten.
    """
    from hmine.stores import StoreConfigMismatch

    path = config.run_dir / STAGE_OUTPUTS["sample"]
    if store_state(path) in ("partial", "complete"):
        found = open_group(path).attrs.get(CONFIG_HASH)
        if found != config.stage_hash("sample"):
            raise StoreConfigMismatch(
                f"{path} was written by config {found}, not {config.stage_hash('sample')}; "
                "use another run name (name: in the config) or delete the store to start over"
            )


def read_run_config(path: Path) -> RunConfig:
    """The config a run directory was last run with; a one-line ConfigError if it is unreadable."""
    from pydantic import ValidationError

    from hmine.config import ConfigError

    try:
        return RunConfig.model_validate(json.loads(Path(path).read_text()))
    except (ValidationError, json.JSONDecodeError) as error:
        first = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise ConfigError(
            f"{path} is not a readable run config ({first}); pass the run's YAML with --config"
        ) from None


def write_run_config(config: RunConfig) -> Path:
    """Save the run's config beside its stores (reloads to an equal object)."""
    from hmine.stores import write_bytes_atomic

    path = config.run_dir / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, config.model_dump_json(indent=2).encode())
    return path


def run_stage(stage: str, config: RunConfig) -> dict:
    """Run one stage as a plain function; return a small JSON-able summary."""
    if stage == "report":
        from hmine.report import build_report

        return {"path": str(build_report(config)), "computed": 1, "skipped": 0}
    if stage == "sample":
        from hmine.stages.sample import run_sample_stage as run
    elif stage == "label":
        from hmine.stages.label import run_label_stage as run
    elif stage == "directions":
        from hmine.stages.directions import run_directions_stage as run
    elif stage == "edit":
        from hmine.stages.edit import run_edit_stage as run
    elif stage == "jacobian":
        from hmine.stages.jacobian import run_jacobian_stage as run
    else:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return summarise(run(config))


def summarise(result) -> dict:
    """A stage's StageResult as a small JSON-able dict."""
    return {
        "path": str(result.path),
        "computed": result.computed,
        "skipped": result.skipped,
        "repaired": result.repaired,
        "seconds": round(result.seconds, 2),
    }


RUN_LOG = "run_log.jsonl"


def append_log_record(path: Path, record: dict) -> None:
    """Append one JSON line to a log, starting a new line if the last one was cut short.

    A kill or a full disk can leave a last line without its newline; appending straight
    after it would glue the next record onto the broken one.
    """
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab+") as log:
        if log.tell() > 0:
            log.seek(-1, 2)
            if log.read(1) != b"\n":
                line = b"\n" + line
        log.write(line)
        log.flush()
        os.fsync(log.fileno())


def read_log_records(path: Path) -> list[dict]:
    """The records of a JSON-lines log; lines that do not parse (cut short) are skipped, named."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            logging.getLogger(__name__).warning("%s line %d is damaged (cut short?); it is skipped", path, number)
            continue
        records.append(record)
    return records


def _log_stage(config: RunConfig, stage: str, summary: dict, seconds: float) -> None:
    record = {
        "stage": stage,
        "seconds": round(seconds, 2),
        "computed": summary.get("computed", 0),
        "skipped": summary.get("skipped", 0),
        "cache_hit": bool(summary.get("cache_hit", False)) or summary.get("computed", 1) == 0,
    }
    append_log_record(config.run_dir / RUN_LOG, record)


def run_stages(config: RunConfig, stages: tuple[str, ...] = STAGES, *, use_prefect: bool = True) -> dict:
    """Run the given stages in order, logging each one's time and cache use in run_log.jsonl."""
    import time

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown}; stages are {', '.join(STAGES)}")
    results = {}
    config_json = config.model_dump_json()
    for stage in stages:
        started = time.perf_counter()
        if use_prefect:
            from flows.stages import pipeline_flow

            summary = pipeline_flow(config_json, [stage])[stage]
        else:
            summary = run_stage(stage, config)
        _log_stage(config, stage, summary, time.perf_counter() - started)
        results[stage] = summary
    return results
