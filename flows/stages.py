"""The stages of the mining pipeline as Prefect tasks and flows.

One task per registered stage (:mod:`hmine.stages`), named after it and taking the
RunConfig: a thin call of the stage's plain function, cached by the stage's input
identity and the identity of its output (see :mod:`flows.caching`); each stage also
resumes partial work on its own, so a crash inside a stage loses at most one batch.
Only failures of network I/O (a hub download) are retried.

With ``runner.kind: dask`` the sample stage runs as a subflow with prefect-dask's
DaskTaskRunner: the flow prepares the store, submits one task per shard of the batches
left, waits for them all, then marks the store complete in its own process.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.caching import record_stage, results_dir, stage_cache_key
from hmine.config import RunConfig
from hmine.pipeline import (
    check_stage_names,
    log_stage,
    run_hash,
    run_stage,
    run_summary_markdown,
    summarise,
)
from hmine.runtime import hmine_home
from hmine.stages import get

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


# The store's done-marks are the truth about which batches exist (stack-notes section 3,
# pattern A), so a shard is never served from Prefect's cache: rerun, it skips its done
# batches by itself, and a deleted or repaired store can never be reported as "Cached".
@task(name="sample_shard", task_run_name="sample-shard-{shard}", cache_policy=NO_CACHE, persist_result=False)
def sample_shard_task(config_json: str, batches: list[int], shard: int) -> list[int]:
    """Sample one shard of batches into the prepared store (runs on a Dask worker)."""
    from hmine.stages.sample import sample_batches

    return sample_batches(RunConfig.model_validate_json(config_json), batches)


def dask_task_runner(config: RunConfig):
    """prefect-dask's task runner for ``config.runner``: the cluster at its address, or a
    LocalCluster of single-threaded worker processes with scratch space in hmine's home.

    Whatever torch thread count a worker starts with (Dask's nanny sets
    ``OMP_NUM_THREADS=1``), the sampler runs every call with :data:`hmine.threads.MODEL_THREADS`,
    as a local run does, so the store holds the same bits on either runner.
    """
    from prefect_dask import DaskTaskRunner

    runner = config.runner
    if runner.address:
        return DaskTaskRunner(address=runner.address)
    scratch = hmine_home() / "dask"
    scratch.mkdir(parents=True, exist_ok=True)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runner.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "local_directory": str(scratch),
            "dashboard_address": None,
        },
    )


@contextmanager
def _api_url_for_workers():
    """Make tasks on other processes report to this process's Prefect server.

    Without an API URL every Dask worker process would start its own temporary server
    (stack-notes section 4, checked: three servers for a 2-worker LocalCluster). The
    URL of the server this flow talks to travels with each submitted task's serialized
    settings. A cluster on other machines needs a server they can reach: export
    ``PREFECT_API_URL`` (see the README).
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    url = str(FlowRunContext.get().client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _worker_count(config: RunConfig) -> int:
    from prefect.context import FlowRunContext

    if config.runner.address:
        client = FlowRunContext.get().task_runner.client  # connects to the cluster
        return len(client.scheduler_info()["workers"]) or config.runner.n_workers
    return config.runner.n_workers


@flow(name="hmine-sample-dask")
def sample_dask_flow(config_json: str) -> dict:
    """Stage 1 on Dask: prepare the store, sample its shards on the workers, finish here.

    Called with ``.with_options(task_runner=dask_task_runner(config))``; the cluster is
    only started when there are batches to sample, and stopped when this flow ends.
    """
    from prefect.futures import wait

    from hmine.stages.sample import (
        finish_sample_stage,
        prepare_sample_stage,
        shard_batches,
    )

    config = RunConfig.model_validate_json(config_json)
    # workers may run elsewhere: give them an absolute output path (not in any hash)
    config = RunConfig.model_validate({**config.model_dump(), "output_root": config.output_root.resolve()})
    config_json = config.model_dump_json()
    plan = prepare_sample_stage(config)
    plan.model = None  # loaded here only to build the template; each shard loads its own
    shards = []
    if plan.todo:
        with _api_url_for_workers():
            shards = shard_batches(plan.todo, _worker_count(config) * config.runner.shards_per_worker)
            futures = [sample_shard_task.submit(config_json, batches, i) for i, batches in enumerate(shards)]
            wait(futures)  # every shard ends (its batches are kept) before a failure is raised
            computed = sum(len(future.result()) for future in futures)
    else:
        computed = 0
    return {**summarise(finish_sample_stage(plan, computed)), "shards": len(shards)}


def _run(stage: str, config: RunConfig) -> dict:
    if stage == "sample" and config.runner.kind == "dask":
        # no stage-level cache here: an intact complete store costs one chunk check
        on_dask = sample_dask_flow.with_options(task_runner=dask_task_runner(config))
        result = on_dask(config.model_dump_json())
        return {**result, "cache_hit": result["computed"] == 0 and result["repaired"] == 0}
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
