"""Running the registered stages as plain functions, and their status in a run directory.

The stages and everything about them come from the registry (:mod:`hmine.stages`);
:func:`run_stages` runs them without Prefect, ``flows.stages.pipeline_flow`` with it
(the library never imports ``flows``). :func:`stage_status` reads a run directory and
says, per stage, ``complete``, ``partial`` (with counts), ``missing``, ``stale`` (made
from other inputs than the current ones: another config, or upstream outputs written
since) or ``damaged`` (chunks or files lost or failing their checksums; a rerun redoes
them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hmine.config import RunConfig
from hmine.identity import config_hash
from hmine.stores import CONFIG_HASH, STAGE_HASH, open_group, store_state


@dataclass
class StageStatus:
    stage: str
    state: str  # complete | partial | missing | stale | damaged
    detail: str = ""

    def line(self) -> str:
        return f"{self.stage:<11} {self.state:<9} {self.detail}".rstrip()


def stage_status(run_dir: Path, config: RunConfig | None = None) -> list[StageStatus]:
    """Status of every stage with an output in ``run_dir``, as the stages themselves decide
    (:mod:`hmine.stages`); staleness needs the current ``config`` (default: the run's
    ``config.json``)."""
    from hmine.stages import stages

    run_dir = Path(run_dir)
    if config is None and (run_dir / "config.json").exists():
        try:
            config = read_run_config(run_dir / "config.json")
        except ValueError as error:  # the stores still have a state worth showing
            logging.getLogger(__name__).warning("%s; stale stages are not detected", error)
    known = config is not None
    if not known:  # only the paths are needed: the chunk checks read the stores themselves
        config = RunConfig.model_construct(name=run_dir.name, output_root=run_dir.parent)
    elif config.run_dir.resolve() != run_dir.resolve():
        config = config.model_copy(update={"name": run_dir.name, "output_root": run_dir.parent})
    if known:
        config = pin_revisions(config, resolve=False)  # the commits the run is pinned to
    from hmine.stages import stage_applies

    return [
        _status(config, stage.name, known) for stage in stages()
        if stage.output is not None and stage_applies(config, stage.name)
    ]


def _status(config: RunConfig, name: str, known: bool) -> StageStatus:
    from hmine.stages import (
        damaged_count,
        get,
        input_identity,
        is_complete,
        recorded_identity,
    )

    path = get(name).output_path(config)
    missing = _missing_or_partial(name, path)
    if missing is not None:
        return missing
    if known and recorded_identity(config, name) != input_identity(config, name):
        return StageStatus(name, "stale", _why_stale(config, name, path))
    damaged = damaged_count(config, name)
    if damaged:
        return StageStatus(name, "damaged", f"{damaged} done units lost or damaged chunks; rerun to redo them")
    if is_complete(config, name):
        return StageStatus(name, "complete", path.name)
    if name == "edit" and store_state(path) == "complete":
        return StageStatus(name, "partial", "edits done, effects table not measured from them; rerun")
    if path.suffix != ".parquet" and "done" in open_group(path):
        done = open_group(path)["done"][...]
        return StageStatus(name, "partial", f"{int(done.sum())}/{done.size} done")
    return StageStatus(name, "partial", "")


def _missing_or_partial(name: str, path: Path) -> StageStatus | None:
    """The status of an output that is not there to compare: missing, crashed, damaged whole."""
    from hmine.stores import store_damage, table_meta

    if path.suffix == ".parquet":
        if table_meta(path) is not None:
            return None
        if path.exists():
            return StageStatus(name, "damaged", f"{path.name} does not read back whole; rerun to write it again")
        parts = path.with_name(path.stem + ".parts")  # work in progress of a table written in batches
        if parts.exists():
            return StageStatus(name, "partial", f"{len(list(parts.glob('part-*.parquet')))} batches done")
        return StageStatus(name, "missing", path.name)
    state = store_state(path)
    if state == "missing":
        return StageStatus(name, "missing", path.name)
    if state == "debris":
        return StageStatus(name, "missing", "crashed during creation")
    if state == "corrupt":
        return StageStatus(name, "damaged", f"{store_damage(path)}; rerun to write the store again")
    return None


def _why_stale(config: RunConfig, name: str, path: Path) -> str:
    from hmine.stores import table_meta

    attrs = (table_meta(path) or {}) if path.suffix == ".parquet" else open_group(path).attrs
    written_by = attrs.get(STAGE_HASH, attrs.get(CONFIG_HASH))
    if name == "sample":
        from hmine.stages.growth import describe_growth

        growth = describe_growth(config, path)  # more samples asked for (or fewer)
        if growth is not None:
            return growth
    if written_by != config.stage_hash(name):
        return f"written by config {written_by}"
    from hmine.stages import changed_reads, get

    changed = changed_reads(config, name)
    if changed:
        outputs = " and ".join(get(r).output for r in changed)
        return f"made from {outputs}, written again since; rerun"
    return "made from other inputs (e.g. mask files) than the current ones; rerun"


def check_run_dir(config: RunConfig) -> None:
    """Refuse a run directory whose samples were drawn under another config.

    Downstream stages are recomputed when their config changes, but samples are the
    expensive data every other output stands on: they are never mixed or overwritten.
    More samples of the same config grow the run; fewer are refused
    (:func:`hmine.stages.growth.samples_to_grow`).
    """
    from hmine.stages.growth import samples_to_grow

    path = config.run_dir / "samples.zarr"
    if store_state(path) in ("partial", "complete"):
        samples_to_grow(config, open_group(path).attrs, path)


PINS = "pins.json"


def pin_revisions(config: RunConfig, resolve: bool = True) -> RunConfig:
    """``config`` with every hub model whose revision is not set pinned to a commit hash.

    The first run resolves the revision (``main``) to the commit it points to and records
    it in ``<run>/pins.json``; later runs of the run directory reuse that commit, so an
    upstream push changes nothing under a run (a new run name resolves again). An explicit
    ``model.revision`` / ``label.clip_revision`` wins and is used as given. With
    ``resolve=False`` only recorded pins are applied (``hmine status``: no network).
    """
    from hmine.models import is_hub_id, resolve_hub_revision

    path = config.run_dir / PINS
    pins = json.loads(path.read_text()) if path.exists() else {}
    wanted = {"model.revision": (config.model.id, config.model.revision)}
    if config.label.labeller == "clip":
        wanted["label.clip_revision"] = (config.label.clip_model_id, config.label.clip_revision)
    updates, changed = {}, False
    for field, (model_id, revision) in wanted.items():
        if revision is not None or not is_hub_id(model_id):
            continue
        pin = pins.get(field)
        if pin is None or pin.get("id") != model_id:
            if not resolve:
                continue
            pin = {"id": model_id, "requested": "main", "commit": resolve_hub_revision(model_id)}
            pins[field], changed = pin, True
            logging.getLogger(__name__).info("pinned %s (main) to commit %s", model_id, pin["commit"])
        updates[field] = pin["commit"]
    if changed:
        from hmine.stores import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, pins)
    if not updates:
        return config
    data = config.model_dump()
    for field, commit in updates.items():
        section, key = field.split(".")
        data[section][key] = commit
    return RunConfig.model_validate(data)


def prepare_run(config: RunConfig) -> RunConfig:
    """What every run does first, holding the run directory's lock: pin hub revisions,
    refuse samples of another config, save the (pinned) config; returns it."""
    config = pin_revisions(config)
    check_run_dir(config)
    write_run_config(config)
    return config


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
    from hmine.stages import get

    return summarise(get(stage).run_function()(config))


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


def log_stage(config: RunConfig, stage: str, summary: dict, seconds: float) -> None:
    """Append one stage's time and cache use to the run's ``run_log.jsonl`` and log it.

    ``cache_hit`` is the summary's own (Prefect's "Cached" state, or without Prefect: the
    stage found its output up to date and computed nothing), so the command line, the
    run log and Prefect agree.
    """
    record = {
        "stage": stage,
        "seconds": round(seconds, 2),
        "computed": summary.get("computed", 0),
        "skipped": summary.get("skipped", 0),
        "cache_hit": bool(summary.get("cache_hit", False)),
    }
    append_log_record(config.run_dir / RUN_LOG, record)
    logging.getLogger("hmine.pipeline").info(
        "%s: %s in %.1f s (%d computed, %d skipped)", stage,
        "cached" if record["cache_hit"] else "ran", seconds, record["computed"], record["skipped"],
    )


def run_hash(config: RunConfig) -> str:
    """One hash of a run's whole config: the config hashes of all its stages (Prefect's tag)."""
    from hmine.stages import stage_names

    return config_hash({stage: config.stage_hash(stage) for stage in stage_names()})


def run_summary_markdown(config: RunConfig, results: dict) -> str:
    """A short markdown summary of one run: per stage what it did, the outputs' sizes, the
    report's path and, when the edit stage measured it, the attribute-change matrix."""
    lines = [f"# hmine run `{config.name}`", "", f"Config hash `{run_hash(config)}`, run directory "
             f"`{config.run_dir.resolve()}`.", "", "| stage | computed | skipped | cached | seconds |",
             "|---|---:|---:|---|---:|"]
    for stage, result in results.items():
        lines.append(f"| {stage} | {result.get('computed', 0)} | {result.get('skipped', 0)} | "
                     f"{'yes' if result.get('cache_hit') else 'no'} | {result.get('seconds', 0)} |")
    counts = _output_counts(config)
    if counts:
        lines += ["", "Outputs: " + ", ".join(f"{value} {what}" for what, value in counts.items()) + "."]
    report = config.report_root / config.name / "index.html"
    if "report" in results and report.exists():
        lines += ["", f"Report: `{report.resolve()}`"]
    effects = config.run_dir / "edit_effects.parquet"
    if effects.exists():
        lines += ["", *_matrix_markdown(config, effects)]
    return "\n".join(lines) + "\n"


def _output_counts(config: RunConfig) -> dict:
    """Sizes of the outputs present: samples, labelled samples, directions, edited directions."""
    from hmine.stores import store_state, table_meta

    counts = {}
    for what, store, array in (("samples", "samples.zarr", "x0"), ("directions", "directions.zarr", "direction"),
                               ("edited directions", "edits.zarr", "images")):
        path = config.run_dir / store
        if store_state(path) == "complete":
            group = open_group(path)
            if array in group:
                counts[what] = group[array].shape[0]
    labels = config.run_dir / "labels.parquet"
    if table_meta(labels) is not None:
        import pyarrow.parquet as pq

        counts["labelled samples"] = pq.ParquetFile(labels).metadata.num_rows
    return counts


def _matrix_markdown(config: RunConfig, effects_path: Path) -> list[str]:
    import pandas as pd

    from hmine.report import attribute_change_matrix, reported_attributes

    effects = pd.read_parquet(effects_path)
    if not (effects["scale"] > 0).any():
        return []
    scale = float(effects.loc[effects["scale"] > 0, "scale"].max())
    matrix = attribute_change_matrix(effects, reported_attributes(config), scale)
    if not len(matrix):
        return []
    rows = [f"Attribute change at scale {scale:g} (mean change of each attribute's score):", "",
            "| direction | " + " | ".join(matrix.columns) + " |", "|---|" + "---:|" * matrix.shape[1]]
    rows += [f"| {direction} | " + " | ".join(f"{v:+.2f}" for v in row) + " |" for direction, row in matrix.iterrows()]
    return rows


def check_stage_names(stages) -> tuple[str, ...]:
    from hmine.stages import stage_names

    known = stage_names()
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stage {unknown}; stages are {', '.join(known)}")
    return tuple(stages)


def run_stages(config: RunConfig, stages: tuple[str, ...] | None = None) -> dict:
    """Run the given stages (default: all) in order as plain functions, without Prefect,
    logging each one's time in run_log.jsonl. ``flows.stages.pipeline_flow`` is the same
    with each stage a cached Prefect task."""
    import time

    from hmine.stages import applicable_stage_names

    results = {}
    for stage in check_stage_names(applicable_stage_names(config) if stages is None else stages):
        started = time.perf_counter()
        result = run_stage(stage, config)
        results[stage] = {**result, "cache_hit": result["computed"] == 0 and result["repaired"] == 0}
        log_stage(config, stage, results[stage], time.perf_counter() - started)
    return results
