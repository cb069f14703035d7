"""The stage registry: one declarative entry per stage; everything else is derived from it.

A stage is a plain function ``run(config) -> StageResult`` that reads the outputs of the
stages it ``reads`` and writes one output in the run directory. Its entry here says
what the CLI (subcommands), the config hash (``stage_inputs``), ``hmine status``, the
Prefect flows (one task per stage), the preflight checks and the report need to know:

* **config hash** — the stage's own ``settings`` plus those of every stage it reads,
  transitively: a change invalidates exactly the stages downstream of it;
* **input identity** (:func:`input_identity`) — the config hash, the identities of the
  outputs it reads (a zarr store's uuid, a table's metadata hash) and its other inputs
  (mask files, the PCA solver). The stage records it in its output; the stage's own skip
  check, ``hmine status`` and the Prefect cache key all compare against it;
* **up to date** (:func:`up_to_date`) — the output is complete, records the current
  input identity and its chunks are intact (the chunk check).

Adding a stage is one module with its run function and one :func:`register` call; see
docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hmine.config import RunConfig

INPUT_IDENTITY = "hmine:input_identity"
INPUT_READS = "hmine:input_reads"  # JSON {stage: output identity} of what it read, for `hmine status`


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes
    ----------
    name : str
        The CLI subcommand, the Prefect task's name, the key of its config hash.
    summary : str
        One line for ``hmine --help``.
    run : str
        ``"module:function"``; the function takes the RunConfig and returns a StageResult.
    output : str or None
        The file or zarr store it writes in the run directory (None: writes elsewhere and
        is never cached, like the report).
    settings : callable, optional
        ``settings(config) -> dict``: the stage's own part of the config hash.
    reads : tuple of str
        Stages whose outputs it always reads: their settings join its config hash.
    optional_reads : callable, optional
        ``optional_reads(config) -> tuple`` of stages it reads under some settings only
        (the edit stage reads the Jacobian store for per-image directions): their output
        identity joins its input identity, their settings do not join its config hash.
    extra_inputs : callable, optional
        ``extra_inputs(config) -> dict`` of other inputs' identities (mask files' content).
    intact : callable, optional
        ``intact(config) -> int``: the number of damaged units of a complete output (0 = whole).
    complete : callable, optional
        ``complete(config) -> bool``; by default, a zarr store marked complete or a table
        that reads back whole.
    preflight : tuple of callables
        Checks of the stage's inputs that load no weights (``check(config)``); raise with a
        message naming the field and the fix. The same check listed by several stages runs once.
    report_section : str, optional
        ``"module:function"``, called as ``section(config, run_dir, img_dir) -> html``.
    applies : callable, optional
        ``applies(config) -> bool``: whether the config asks for this stage at all (the invert
        stage needs an ``images:`` section); one that does not is left out of ``hmine status``
        and its run function writes nothing. Always, by default.
    """

    name: str
    summary: str
    run: str
    output: str | None
    settings: Callable[["RunConfig"], dict] | None = None
    reads: tuple[str, ...] = ()
    optional_reads: Callable[["RunConfig"], tuple[str, ...]] | None = None
    extra_inputs: Callable[["RunConfig"], dict] | None = None
    intact: Callable[["RunConfig"], int] | None = None
    complete: Callable[["RunConfig"], bool] | None = None
    preflight: tuple[Callable[["RunConfig"], None], ...] = field(default_factory=tuple)
    report_section: str | None = None
    applies: Callable[["RunConfig"], bool] | None = None

    def output_path(self, config: "RunConfig") -> Path:
        if self.output is None:
            raise ValueError(f"stage {self.name!r} writes no output in the run directory")
        return config.run_dir / self.output

    def run_function(self) -> Callable:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage after those registered so far (its reads must be registered already)."""
    _load_builtin()
    if stage.name in _REGISTRY:
        raise ValueError(f"stage {stage.name!r} is registered already")
    unknown = [r for r in stage.reads if r not in _REGISTRY]
    if unknown:
        raise ValueError(f"stage {stage.name!r} reads {unknown}, which are not registered (register them first)")
    _REGISTRY[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests register exercise stages and remove them again)."""
    if any(name in s.reads for s in _REGISTRY.values()):
        raise ValueError(f"stage {name!r} is read by another stage")
    _REGISTRY.pop(name)


def stages() -> tuple[Stage, ...]:
    """Every registered stage, in run order (a stage after the stages it reads)."""
    _load_builtin()
    return tuple(_REGISTRY.values())


def stage_names() -> tuple[str, ...]:
    return tuple(stage.name for stage in stages())


def stage_applies(config: "RunConfig", name: str) -> bool:
    """Whether ``config`` asks for stage ``name`` (its ``applies`` hook; True without one)."""
    stage = get(name)
    return stage.applies is None or bool(stage.applies(config))


def applicable_stage_names(config: "RunConfig") -> tuple[str, ...]:
    """The stages a whole run of ``config`` runs, in order: those its config asks for.

    ``hmine run``, a deployment's runs, ``hmine status`` and the report all take their
    stage list from here, so a stage the config does not ask for (the invert stage
    without ``images:``) is neither run, logged, listed nor reported as missing.
    """
    return tuple(name for name in stage_names() if stage_applies(config, name))


def get(name: str) -> Stage:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(_REGISTRY)}") from None


_BUILTIN_LOADING = []  # non-empty once hmine's own stages are (being) registered


def _load_builtin() -> None:
    if not _BUILTIN_LOADING:
        _BUILTIN_LOADING.append(True)
        importlib.import_module("hmine.stages.builtin")


# --------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------


def _hash(payload) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hashed_stages(name: str) -> list[str]:
    """The stage and every stage it reads, transitively: the settings in its config hash."""
    order, todo = [], [name]
    while todo:
        current = todo.pop()
        if current not in order:
            order.append(current)
            todo.extend(get(current).reads)
    return order


def stage_inputs(config: "RunConfig", name: str) -> dict:
    """Everything that determines a stage's output, as a JSON-able dict."""
    payload: dict = {}
    for stage_name in hashed_stages(name):
        stage = get(stage_name)
        if stage.settings is not None:
            payload.update(stage.settings(config))
    return payload


def stage_hash(config: "RunConfig", name: str) -> str:
    return _hash(stage_inputs(config, name))


def reads_of(config: "RunConfig", name: str) -> tuple[str, ...]:
    """The outputs a stage reads under this config: its reads and the optional ones it needs."""
    stage = get(name)
    optional = stage.optional_reads(config) if stage.optional_reads else ()
    return (*stage.reads, *[r for r in optional if r not in stage.reads])


def output_identity(config: "RunConfig", name: str) -> str | None:
    """A string naming a stage's complete output (a store's uuid, a table's metadata
    hash), None when it is missing, partial or damaged beyond its own checks."""
    from hmine.stores import store_uuid, table_meta

    path = get(name).output_path(config)
    if path.suffix == ".parquet":
        meta = table_meta(path)
        return None if meta is None else _hash(meta)
    return store_uuid(path)


def input_identity(config: "RunConfig", name: str) -> str:
    """The identity of everything a stage's output is made from (see the module doc).

    A stage that reads nothing and has no other inputs (the sample stage) has its config
    hash as identity.
    """
    return _identity(config, name, _read_identities(config, name))


def _read_identities(config: "RunConfig", name: str) -> dict:
    return {r: output_identity(config, r) for r in reads_of(config, name)}


def _identity(config: "RunConfig", name: str, reads: dict) -> str:
    stage = get(name)
    config_hash = stage_hash(config, name)
    extra = stage.extra_inputs(config) if stage.extra_inputs else {}
    if not reads and not extra:
        return config_hash
    return _hash({"config": config_hash, "reads": reads, "extra": extra})


def identity_record(config: "RunConfig", name: str) -> dict:
    """What a stage records in its output's attributes (or table metadata): its input
    identity, the identities of the outputs it read, so that ``hmine status`` can name
    the input that changed, and the software that wrote it
    (:func:`hmine.runtime.software_record`)."""
    from hmine.runtime import software_record

    reads = _read_identities(config, name)
    return {INPUT_IDENTITY: _identity(config, name, reads), INPUT_READS: json.dumps(reads, sort_keys=True),
            **software_record()}


def changed_reads(config: "RunConfig", name: str) -> list[str]:
    """The stages whose outputs changed since a stage's output was made from them."""
    from hmine.stores import open_group, table_meta

    path = get(name).output_path(config)
    attrs = (table_meta(path) or {}) if path.suffix == ".parquet" else open_group(path).attrs
    recorded = json.loads(attrs.get(INPUT_READS, "{}"))
    return [r for r in reads_of(config, name) if recorded.get(r) != output_identity(config, r)]


def recorded_identity(config: "RunConfig", name: str) -> str | None:
    """The input identity a stage's output records (None when it has none)."""
    from hmine.stores import CONFIG_HASH, open_group, store_state, table_meta

    path = get(name).output_path(config)
    if path.suffix == ".parquet":
        meta = table_meta(path) or {}
        return meta.get(INPUT_IDENTITY)
    if store_state(path) not in ("partial", "complete"):
        return None
    attrs = open_group(path).attrs
    return attrs.get(INPUT_IDENTITY, attrs.get(CONFIG_HASH))  # stores that read nothing: the config hash


def is_complete(config: "RunConfig", name: str) -> bool:
    from hmine.stores import store_state, table_meta

    stage = get(name)
    if stage.complete is not None:
        return stage.complete(config)
    path = stage.output_path(config)
    if path.suffix == ".parquet":
        return table_meta(path) is not None
    return store_state(path) == "complete"


def damaged_count(config: "RunConfig", name: str) -> int:
    """Damaged units (batches, entries; 1 for a store written whole) of a complete output."""
    stage = get(name)
    return stage.intact(config) if stage.intact is not None else 0


def up_to_date(config: "RunConfig", name: str) -> bool:
    """The output is complete, made from exactly the current inputs, and whole (chunk check)."""
    return (
        is_complete(config, name)
        and recorded_identity(config, name) == input_identity(config, name)
        and damaged_count(config, name) == 0
    )
