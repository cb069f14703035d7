"""Scheduled hmine runs: a Prefect deployment of one config, served by a long-running process.

``hmine deploy CONFIG --cron "0 2 * * *"`` (or ``--interval SECONDS``) creates the
deployment ``hmine-pipeline/<run name>`` with that schedule on the Prefect server at
``PREFECT_API_URL`` and serves it (:meth:`prefect.flows.Flow.serve`): the server's
scheduler creates the runs, this process executes each one as an ordinary, idempotent
``hmine run`` of the config (:func:`scheduled_run`). One run at a time: a run that comes
due while the last one still works waits for it, so two runs never race for the run
directory's lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from flows.stages import _publish_summary, _run_in_order
from hmine.config import load_config
from hmine.pipeline import run_hash


def _run_name() -> str:
    """The flow run's name: the run's own (``name:`` in its config)."""
    from prefect.context import FlowRunContext

    parameters = FlowRunContext.get().parameters
    return load_config(Path(parameters["config_path"]), list(parameters.get("overrides") or [])).name


@flow(name="hmine-pipeline", flow_run_name=_run_name)
def scheduled_run(config_path: str, overrides: list[str] | None = None) -> dict:
    """One ``hmine run`` of the config at ``config_path`` (with ``--set`` overrides): every
    stage as its cached task, resuming what is partial and skipping what is complete."""
    from hmine.pipeline import prepare_run
    from hmine.preflight import check_run_inputs
    from hmine.runtime import RunLock
    from hmine.stages import applicable_stage_names

    hmine_logger = logging.getLogger("hmine")
    if hmine_logger.level == logging.NOTSET:  # as `hmine run`: one INFO line per stage
        hmine_logger.setLevel(logging.INFO)
    config = load_config(Path(config_path), list(overrides or []))
    _tag_with_config_hash(config)
    stages = applicable_stage_names(config)
    check_run_inputs(config, stages)
    with RunLock(config.run_dir):
        config = prepare_run(config)
        results = _run_in_order(config, stages)
    _publish_summary(config, results)
    return results


def _tag_with_config_hash(config) -> None:
    """Tag the flow run with the config's hash now (the file may have changed since it was deployed)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    wanted = {"hmine", f"config:{run_hash(config)}"}
    tags = set(context.flow_run.tags)
    if not wanted <= tags:
        context.client.update_flow_run(context.flow_run.id, tags=sorted(tags | wanted))


def serve_config(config_path: Path, overrides: list[str], *, cron: str | None = None,
                 interval: float | None = None, name: str | None = None) -> None:
    """Create the deployment of one config with its schedule and serve it until stopped."""
    from prefect.deployments.runner import EntrypointType

    config = load_config(config_path, overrides)
    scheduled_run.serve(
        name=name or config.name,
        cron=cron,
        interval=interval,
        parameters={"config_path": str(Path(config_path).resolve()), "overrides": list(overrides)},
        tags=["hmine", f"config:{run_hash(config)}"],
        description=f"hmine run {Path(config_path).resolve()}",
        limit=1,  # one run at a time: a run due while the last one works waits for it
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.deploy.scheduled_run, from any directory
    )
