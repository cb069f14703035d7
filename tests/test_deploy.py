"""``hmine deploy``: a served Prefect deployment with an interval schedule whose runs are
ordinary, idempotent ``hmine run``s, against the test session's Prefect server.

Two scheduled runs of the deployment (state Scheduled, due 5 s apart, as its interval
schedule lays them out) are created through Prefect's client, as ``prefect deployment
run`` does, and the served process executes them. The server's own scheduling cannot be
used here: the session's server is a temporary one (no scheduler service), and on this
stack, prefect 3.8.8 with SQLAlchemy 2.1.9 (the only version the registry has), the
server function every scheduler calls, ``models.deployments.schedule_runs``, fails with
"Can't evaluate bulk DML statement" (checked through ``POST /deployments/{id}/schedule``).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hmine.config import load_config
from hmine.stages import applicable_stage_names, get

pytestmark = pytest.mark.slow


async def _deployment(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(f"hmine-pipeline/{name}")
        except ObjectNotFound:
            return None


async def _schedule_two_runs(deployment_id):
    """Two runs in state Scheduled, due now and 5 s later, as the interval schedule lays them out."""
    import datetime

    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    now = datetime.datetime.now(datetime.timezone.utc)
    async with get_client() as client:
        for k in range(2):
            when = now + datetime.timedelta(seconds=5 * k)
            await client.create_flow_run_from_deployment(
                deployment_id, state=Scheduled(scheduled_time=when), idempotency_key=f"scheduled {when.isoformat()}")


async def _runs(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=10)
        view = []
        # a run or task run is read while the server is still creating it: its state may not be set yet
        for run in runs:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
            view.append({"name": run.name, "state": run.state.type.value if run.state else None,
                         "state_name": run.state.name if run.state else None,
                         "tags": set(run.tags), "tasks": [(t.name, t.state.name if t.state else None) for t in tasks]})
        return view


def test_a_scheduled_deployment_runs_the_config_and_then_computes_nothing(prefect_api_url, tmp_path):
    from hmine.pipeline import run_hash

    config_file = tmp_path / "nightly.yaml"
    config_file.write_text(
        f"name: sched\noutput_root: {tmp_path / 'stores'}\nreport_root: {tmp_path / 'reports'}\n"
        "sample: {n_samples: 8, batch_size: 4, num_inference_steps: 3}\n"
        "label: {attributes: [is_circle, is_red]}\n"
        "directions: {pca_components: 2, top_k: 2, probe_components: 3, regression: false}\n"
        "jacobian: {n_samples: 0}\n"
        "edit: {n_samples: 4, scales: [-10.0, 10.0], directions: [probe/is_red], batch_size: 8}\n"
    )
    config = load_config(config_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_api_url,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("PREFECT_LOGGING_TO_API_ENABLED", None)
    # refused at once: no server to keep the schedule, or a bad schedule
    no_server = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "hmine.cli", "deploy", str(config_file), "--interval", "5"],
                         env=no_server, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs a Prefect server" in out.stderr

    serving = subprocess.Popen(
        [sys.executable, "-m", "hmine.cli", "deploy", str(config_file), "--interval", "5", "--name", "sched-test"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        deployment = None
        while deployment is None and time.monotonic() < deadline and serving.poll() is None:
            time.sleep(1)
            deployment = asyncio.run(_deployment("sched-test"))
        assert deployment is not None, serving.stdout.read() if serving.poll() is not None else "no deployment"
        assert deployment.schedules[0].schedule.interval.total_seconds() == 5
        assert {"hmine", f"config:{run_hash(config)}"} <= set(deployment.tags)
        assert deployment.parameters == {"config_path": str(config_file.resolve()), "overrides": []}

        asyncio.run(_schedule_two_runs(deployment.id))
        deadline = time.monotonic() + 480
        runs = []
        while time.monotonic() < deadline and serving.poll() is None:
            runs = asyncio.run(_runs(deployment.id))
            if len(runs) == 2 and all(r["state"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
                break
            time.sleep(2)
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            output, _ = serving.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serving.kill()
            output, _ = serving.communicate()
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"], (runs, output[-3000:])

    stages = list(applicable_stage_names(config))  # a run takes the stages its config asks for
    cached = [s for s in stages if get(s).output is not None and get(s).output_path(config).exists()]
    assert {"sample", "label", "directions", "edit"} <= set(cached)
    first, second = runs
    assert first["name"] == second["name"] == "sched"  # named after the run
    assert f"config:{run_hash(config)}" in second["tags"]
    assert first["tasks"] == [(s, "Completed") for s in stages]
    assert second["tasks"] == [(s, "Cached" if s in cached else "Completed") for s in stages]
    # the second scheduled run computed nothing
    log = [json.loads(line) for line in (config.run_dir / "run_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == stages * 2
    assert sum(r["computed"] for r in log[len(stages):] if r["stage"] != "report") == 0
    assert all(r["cache_hit"] for r in log[len(stages):] if r["stage"] in cached)
    assert (tmp_path / "reports" / "sched" / "index.html").exists()
