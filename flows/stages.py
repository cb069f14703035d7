"""The stages of the mining pipeline as Prefect tasks and flows.

One task per registered stage (:mod:`hmine.stages`), named after it and taking the
RunConfig: a thin call of the stage's plain function, cached by the stage's input
identity and the identity of its output (see :mod:`flows.caching`); each stage also
resumes partial work on its own, so a crash inside a stage loses at most one batch.
Only failures of network I/O (a hub download) are retried.

With ``runner.kind: dask`` the sample, label, Jacobian and edit stages run as subflows with
prefect-dask's DaskTaskRunner, one task per shard of their work (:mod:`flows.sharding`),
and the directions stage's PCA computes on the cluster's workers.
"""

from __future__ import annotations

import functools
import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.caching import record_stage, results_dir, stage_cache_key
from flows.sharding import dask_cluster, run_on_dask
from hmine.config import RunConfig
from hmine.pipeline import (
    check_stage_names,
    log_stage,
    run_hash,
    run_stage,
    run_summary_markdown,
)
from hmine.sharding import sharded_stage
from hmine.stages import get, up_to_date

# Exceptions worth a retry: the network failed, not the stage. Matched by name, so that
# neither httpx nor huggingface_hub has to be imported here.
NETWORK_ERRORS = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "ConnectionError",
    "ConnectionResetError", "HfHubHTTPError", "LocalEntryNotFoundError", "Timeout",
}


def _is_network_error(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and any(type(e).__name__ in NETWORK_ERRORS for e in _chain(error))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@functools.cache
def stage_task(name: str):
    """The Prefect task of a registered stage (made once per stage and process).

    Its result storage is set per run (:func:`_stage_task_for`): the run directory's
    ``.prefect-results``.
    """
    stage = get(name)

    def run(config: RunConfig) -> dict:
        summary = run_stage(name, config)
        if stage.output is not None:
            record_stage(name, config, summary)  # the key of the output just made: see flows.caching
        return summary

    run.__name__ = run.__qualname__ = name
    run.__doc__ = stage.summary
    if stage.output is None:  # writes elsewhere (the report): cheap, never cached
        return task(name=name, task_run_name=name, cache_policy=NO_CACHE, persist_result=False)(run)
    return task(
        name=name,
        task_run_name=name,
        cache_key_fn=stage_cache_key,
        persist_result=True,
        retries=2,
        retry_delay_seconds=10,
        retry_condition_fn=_is_network_error,
    )(run)


def _stage_task_for(name: str, config: RunConfig):
    """The stage's task with its cache records in ``config``'s run directory."""
    if get(name).output is None:
        return stage_task(name)
    return stage_task(name).with_options(result_storage=results_dir(config))


def _run(stage: str, config: RunConfig) -> dict:
    if config.runner.kind == "dask" and sharded_stage(stage) is not None:
        # no stage-level cache here: an intact complete output costs one check
        return run_on_dask(stage, config)
    if config.runner.kind == "dask" and stage == "directions" and not up_to_date(config, stage):
        with dask_cluster(config):  # PCA's out-of-core path computes on the cluster's workers
            state = _stage_task_for(stage, config)(config, return_state=True)
        return {**state.result(), "cache_hit": state.name == "Cached"}
    state = _stage_task_for(stage, config)(config, return_state=True)
    return {**state.result(), "cache_hit": state.name == "Cached"}


def _run_in_order(config: RunConfig, stages) -> dict:
    """Every stage as its task, in order; each one's time and cache use in run_log.jsonl."""
    results = {}
    for stage in check_stage_names(stages):
        started = time.perf_counter()
        results[stage] = _run(stage, config)
        log_stage(config, stage, results[stage], time.perf_counter() - started)
    return results


def _publish_summary(config: RunConfig, results: dict) -> None:
    """The run's markdown artifact: what each stage did, counts, the report, the matrix."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=run_summary_markdown(config, results),
        key=artifact_key(config),
        description=f"hmine run {config.name} (config {run_hash(config)})",
    )


def artifact_key(config: RunConfig) -> str:
    """The run's artifact key: Prefect allows lowercase letters, digits and dashes."""
    import re

    return "hmine-" + (re.sub(r"[^a-z0-9-]+", "-", config.name.lower()).strip("-") or "run")


@flow(name="hmine-sample")
def sample_flow(config: RunConfig) -> dict:
    """Stage 1: sample images and store per-step h."""
    return _run("sample", config)


@flow(name="hmine-pipeline")
def pipeline_flow(config: RunConfig, stages: list[str]) -> dict:
    """Run the given stages in order, each as its cached task, then publish the run's summary."""
    results = _run_in_order(config, stages)
    _publish_summary(config, results)
    return results


def run_pipeline(config: RunConfig, stages) -> dict:
    """One ``hmine run``: one flow run named after the run and tagged with its config hash
    (``hmine``, ``config:<hash>``), holding one named task run per stage."""
    from prefect import tags

    with tags("hmine", f"config:{run_hash(config)}"):
        run_name = config.name.replace("{", "{{").replace("}", "}}")  # a template to Prefect
        return pipeline_flow.with_options(flow_run_name=run_name)(config, list(stages))
