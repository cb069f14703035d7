"""The sample stage as a Prefect flow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.caching import stage_cache_key
from hmine.config import RunConfig
from hmine.runtime import hmine_home
from hmine.stages.sample import run_sample_stage, samples_path


def _sample_key(context, parameters) -> str:
    config = RunConfig.model_validate_json(parameters["config_json"])
    return stage_cache_key("sample", config.stage_hash("sample"), samples_path(config))


@task(
    name="sample_images",
    cache_key_fn=_sample_key,
    persist_result=True,
    result_storage=hmine_home() / "prefect-results",
)
def sample_images(config_json: str) -> dict:
    """Sample N images with their per-step h into samples.zarr (resumes a partial store)."""
    result = run_sample_stage(RunConfig.model_validate_json(config_json))
    return {"path": str(result.path), "computed": result.computed, "skipped": result.skipped}


@flow(name="hmine-sample")
def sample_flow(config_json: str) -> dict:
    """Stage 1: sample images and store per-step h."""
    state = sample_images(config_json, return_state=True)
    return {**state.result(), "cache_hit": state.name == "Cached"}
