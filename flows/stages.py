"""The stages of the mining pipeline as Prefect tasks and flows.

Each task is a thin call of a plain ``hmine.stages`` function, cached by the stage's
config hash and the identity of its output (see :mod:`flows.caching`); each stage also
resumes partial work on its own, so a crash inside a stage loses at most one batch.
"""

from __future__ import annotations

from prefect import flow, task

from flows.caching import stage_cache_key
from hmine.config import RunConfig
from hmine.pipeline import STAGE_OUTPUTS, run_stage
from hmine.runtime import hmine_home


def _stage_key(context, parameters) -> str:
    config = RunConfig.model_validate_json(parameters["config_json"])
    stage = parameters["stage"]
    return stage_cache_key(stage, config.stage_hash(stage), config.run_dir / STAGE_OUTPUTS[stage])


@task(
    name="run_stage",
    task_run_name="{stage}",
    cache_key_fn=_stage_key,
    persist_result=True,
    result_storage=hmine_home() / "prefect-results",
)
def run_stage_task(stage: str, config_json: str) -> dict:
    """Run one stage of the pipeline (it resumes a partial output)."""
    return run_stage(stage, RunConfig.model_validate_json(config_json))


@task(name="build_report")
def build_report_task(config_json: str) -> dict:
    """Write the HTML report; cheap and read-only on the stores, so never cached."""
    return run_stage("report", RunConfig.model_validate_json(config_json))


def _run(stage: str, config_json: str) -> dict:
    if stage == "report":
        return {**build_report_task(config_json), "cache_hit": False}
    state = run_stage_task(stage, config_json, return_state=True)
    return {**state.result(), "cache_hit": state.name == "Cached"}


@flow(name="hmine-sample")
def sample_flow(config_json: str) -> dict:
    """Stage 1: sample images and store per-step h."""
    return _run("sample", config_json)


@flow(name="hmine-pipeline")
def pipeline_flow(config_json: str, stages: list[str]) -> dict:
    """Run the given stages in order, each as a cached task."""
    return {stage: _run(stage, config_json) for stage in stages}
