"""Prefect as its users see it: ``hmine run`` against a real Prefect server (PREFECT_API_URL set).

One flow run per ``hmine run``, named after the run and tagged with its config hash, one
task run per stage; "Cached" from the first rerun, agreeing with the command line and
run_log.jsonl; no orphaned cache records; hmine's logs and a markdown artifact on the
server. Everything is read back through Prefect's client.
"""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from hmine.config import load_config
from hmine.stages import applicable_stage_names, get, stage_names

pytestmark = pytest.mark.slow

STAGES = list(stage_names())  # every registered stage: the names the command line may print


def _hmine(args, cwd, api_url):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": api_url}
    # as a user's shell: none of the test session's quiet logging settings
    for key in ("PREFECT_LOGGING_TO_API_ENABLED", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "hmine.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _printed(stdout: str) -> dict:
    """The command line's per-stage summaries (``stage: {...}`` lines)."""
    import ast

    found = {}
    for line in stdout.splitlines():
        stage, _, rest = line.partition(": ")
        if stage in STAGES and rest.startswith("{"):
            found[stage] = ast.literal_eval(rest)
    return found


async def _server_view(config_tag: str, artifact_key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort, LogSort, TaskRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[config_tag])),
            sort=FlowRunSort.START_TIME_ASC, limit=20,
        )
        view = []
        for run in runs:
            flow = await client.read_flow(run.flow_id)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                          sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
            tasks.sort(key=lambda t: t.start_time or t.expected_start_time)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                          sort=LogSort.TIMESTAMP_ASC, limit=200, offset=0)
            view.append({"flow": flow.name, "name": run.name, "tags": set(run.tags), "state": run.state.name,
                         "tasks": [(t.name, t.state.name) for t in tasks],
                         "logs": [(log.name, log.message) for log in logs]})
        # by a plain request: with the pinned fastapi, the server refuses the client's explicit
        # nulls, and empty flow-run/task-run filters drop artifacts that belong to no task run
        response = await client._client.post("/artifacts/filter", json={
            "artifacts": {"key": {"any_": [artifact_key]}}, "sort": "CREATED_DESC", "limit": 20, "offset": 0})
        ids = {str(run.id) for run in runs}
        artifacts = [(a["type"], a["data"], a["flow_run_id"]) for a in response.json() if a["flow_run_id"] in ids]
        return view, artifacts, [str(r.id) for r in runs]


def test_hmine_run_on_a_users_prefect_server(prefect_api_url, tmp_path):
    from flows.caching import RESULTS_DIR, stage_key
    from flows.stages import artifact_key
    from hmine.pipeline import run_hash

    config_file = tmp_path / "nightly.yaml"
    config_file.write_text(
        f"name: nightly\noutput_root: {tmp_path / 'stores'}\nreport_root: {tmp_path / 'reports'}\n"
        "sample: {n_samples: 8, batch_size: 4, num_inference_steps: 3}\n"
        "label: {attributes: [is_circle, is_red]}\n"
        "directions: {pca_components: 2, top_k: 2, probe_components: 3, regression: false}\n"
        "jacobian: {n_samples: 1, k: 1, steps: [333], max_iter: 5, localised_rank: 2, edit_scales: [10.0]}\n"
        "edit: {n_samples: 4, scales: [-10.0, 10.0], directions: [probe/is_red, pca/0], batch_size: 8}\n"
    )
    config = load_config(config_file)
    tag = f"config:{run_hash(config)}"
    stages = list(applicable_stage_names(config))  # a run takes the stages its config asks for

    first = _hmine(["run", str(config_file)], tmp_path, prefect_api_url)
    assert first.returncode == 0, first.stderr
    again = _hmine(["run", str(config_file)], tmp_path, prefect_api_url)
    assert again.returncode == 0, again.stderr

    # cached: every stage with an output (not the report; not the invert stage without images)
    cached = [s for s in stages if get(s).output is not None and get(s).output_path(config).exists()]
    assert {"sample", "label", "directions", "jacobian", "edit"} <= set(cached)
    # the command line and run_log.jsonl agree, and the first rerun is served from the cache
    printed = [_printed(first.stdout), _printed(again.stdout)]
    assert list(printed[0]) == stages and list(printed[1]) == stages
    log = [json.loads(line) for line in (config.run_dir / "run_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == stages * 2
    assert [r["cache_hit"] for r in log] == [p[s]["cache_hit"] for p in printed for s in stages]
    assert [s for s in stages if printed[1][s]["cache_hit"]] == cached  # the report is always built
    assert [s for s in stages if printed[0][s]["cache_hit"]] == []
    assert all(printed[1][s]["computed"] == 0 for s in cached)

    # one cache record per cached stage, each for the output now in the run directory
    records = sorted(p.name for p in (config.run_dir / RESULTS_DIR).iterdir())
    assert records == sorted(stage_key(s, config) for s in cached)

    view, artifacts, run_ids = asyncio.run(_server_view(tag, artifact_key(config)))
    assert len(view) == 2, [(v["flow"], v["name"]) for v in view]  # one flow run per `hmine run`
    states = ["Cached" if s in cached else "Completed" for s in stages]
    for run, expected in zip(view, (["Completed"] * len(stages), states)):
        assert (run["flow"], run["name"], run["state"]) == ("hmine-pipeline", "nightly", "Completed")
        assert {"hmine", tag} <= run["tags"]
        assert run["tasks"] == list(zip(stages, expected))
    messages = [message for name, message in view[0]["logs"] if name.startswith("hmine")]
    assert any(m.startswith("sample: ran") for m in messages), view[0]["logs"]
    assert any(m.startswith("sample: cached") for name, m in view[1]["logs"] if name.startswith("hmine"))

    assert len(artifacts) == 2 and {a[2] for a in artifacts} == set(run_ids)  # one per run
    kind, markdown, _ = artifacts[0]  # the newest
    assert kind == "markdown"
    assert "# hmine run `nightly`" in markdown and run_hash(config) in markdown
    assert "8 samples" in markdown and "8 labelled samples" in markdown
    assert f"Report: `{(tmp_path / 'reports' / 'nightly' / 'index.html').resolve()}`" in markdown
    assert "| probe/is_red |" in markdown and "Attribute change at scale 10" in markdown
