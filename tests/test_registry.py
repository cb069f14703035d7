"""The stage registry: a stage added as one module and one entry is picked up everywhere.

The exercise stage below reads ``samples.zarr`` and writes a table (the norm of h per
sample and step). Registered here and nowhere else, it must be run by ``hmine run``
(plain and through the Prefect flow), shown by ``hmine status`` and the report, and
cached like every stage — and the library must not import the flows.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmine.stages import Stage, register, unregister

ROOT = Path(__file__).parents[1]


def run_h_norms_stage(config):
    """Norm of h per (sample, step): the whole exercise stage."""
    import time

    import xarray as xr

    from hmine.stages import INPUT_IDENTITY, input_identity, up_to_date
    from hmine.stages.sample import StageResult
    from hmine.stores import write_table

    started = time.perf_counter()
    path = config.run_dir / "h_norms.parquet"
    if up_to_date(config, "h_norms"):
        return StageResult(path, 1, 0, 1, 0, time.perf_counter() - started)
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    norms = np.sqrt((h.astype("float32") ** 2).sum(["channel", "y", "x"])).to_pandas()
    norms.columns = [str(c) for c in norms.columns]
    write_table(norms, path, {"hmine:config_hash": config.stage_hash("h_norms"), INPUT_IDENTITY: input_identity(config, "h_norms")})
    return StageResult(path, 1, 1, 0, 0, time.perf_counter() - started)


def h_norms_section(config, run_dir, img):
    table = pd.read_parquet(run_dir / "h_norms.parquet")
    return f"<h2>H_norms stage</h2><p>mean norm of h: {table.to_numpy().mean():.3f}</p>"


@pytest.fixture
def exercise_stage():
    stage = register(Stage(
        name="h_norms",
        summary="exercise: the norm of h per sample and step",
        run=f"{__name__}:run_h_norms_stage",
        output="h_norms.parquet",
        settings=lambda config: {"h_norms": {"version": 1}},
        reads=("sample",),
        report_section=f"{__name__}:h_norms_section",
    ))
    yield stage
    unregister("h_norms")


def _config(tmp_path, tiny_pixel_model_dir):
    from hmine.config import load_config

    return load_config(None, [
        f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path / 'stores'}", f"report_root={tmp_path / 'reports'}",
        "name=exercise", "sample.n_samples=4", "sample.batch_size=2", "sample.num_inference_steps=2",
    ])


def test_a_registered_stage_is_run_shown_and_reported_without_other_edits(exercise_stage, tmp_path, tiny_pixel_model_dir, capsys):
    from hmine.cli import main
    from hmine.pipeline import stage_status
    from hmine.stages import stage_names

    config = _config(tmp_path, tiny_pixel_model_dir)
    assert stage_names()[-1] == "h_norms"
    config_file = tmp_path / "exercise.yaml"
    config_file.write_text(json.dumps(json.loads(config.model_dump_json())))
    assert main(["sample", str(config_file), "--no-prefect"]) == 0
    assert main(["h_norms", str(config_file), "--no-prefect"]) == 0  # its CLI subcommand
    table = pd.read_parquet(config.run_dir / "h_norms.parquet")
    assert table.shape == (4, 2) and (table.to_numpy() > 0).all()
    status = {s.stage: s.state for s in stage_status(config.run_dir)}
    assert status["h_norms"] == "complete" and status["sample"] == "complete"
    # a samples store written again makes it stale, as for every stage that reads it
    from hmine.stores import open_group

    open_group(config.run_dir / "samples.zarr", mode="r+").attrs["hmine:store_uuid"] = "written-again"
    assert {s.stage: s.state for s in stage_status(config.run_dir)}["h_norms"] == "stale"
    assert main(["report", str(config_file), "--no-prefect"]) == 0
    page = (tmp_path / "reports" / "exercise" / "index.html").read_text()
    assert "H_norms stage" in page and "mean norm of h" in page
    capsys.readouterr()


def test_a_registered_stage_runs_as_its_own_cached_prefect_task(exercise_stage, tmp_path, tiny_pixel_model_dir):
    from flows.stages import pipeline_flow

    config = _config(tmp_path, tiny_pixel_model_dir)
    first = pipeline_flow(config, ["sample", "h_norms"])
    assert first["h_norms"]["computed"] == 1 and not first["h_norms"]["cache_hit"]
    # the first run recorded its result under the key of the output it made: the first rerun is served
    again = pipeline_flow(config, ["sample", "h_norms"])
    assert again["h_norms"]["computed"] == 0 and again["h_norms"]["cache_hit"]
    third = pipeline_flow(config, ["sample", "h_norms"])
    assert third["h_norms"]["cache_hit"] and third["sample"]["cache_hit"]
    records = [json.loads(line) for line in (config.run_dir / "run_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["sample", "h_norms"] * 3


def test_the_config_hash_of_a_stage_covers_the_stages_it_reads(exercise_stage, tmp_path, tiny_pixel_model_dir):
    from hmine.stages import stage_inputs

    config = _config(tmp_path, tiny_pixel_model_dir)
    assert set(stage_inputs(config, "h_norms")) == {"model", "sample", "h_norms"}
    changed = config.model_copy(update={"sample": config.sample.model_copy(update={"eta": 1.0})})
    assert changed.stage_hash("h_norms") != config.stage_hash("h_norms")
    assert changed.stage_hash("jacobian") != config.stage_hash("jacobian")


def test_registering_a_stage_that_reads_an_unknown_one_is_refused():
    with pytest.raises(ValueError, match="reads .*not registered"):
        register(Stage(name="orphan", summary="", run="x:y", output="o.parquet", reads=("nowhere",)))
    with pytest.raises(ValueError, match="registered already"):
        register(Stage(name="sample", summary="", run="x:y", output="o.parquet"))


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_flows():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imports(path) if m == "flows" or m.startswith("flows."))
        for path in (ROOT / "hmine").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v and not k.endswith("cli.py")} == {}


def test_no_import_cycle_between_modules_at_import_time():
    """Module-level imports of hmine and flows form no cycle (imports inside functions are lazy)."""
    graph = {}
    for path in [*(ROOT / "hmine").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top.add(node.module)
            elif isinstance(node, ast.Import):
                top |= {alias.name for alias in node.names}
        graph[module] = {m for m in top if m.split(".")[0] in ("hmine", "flows")}
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [module])}")
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for imported in graph[module]:
            visit(imported, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


def test_no_module_over_500_lines_and_no_function_over_80():
    """Issue 17's size limits, for hmine/ and flows/ (tests are exempt)."""
    too_long = []
    for path in [*(ROOT / "hmine").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        if len(text.splitlines()) > 500:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == [], "split these by concern:\n" + "\n".join(too_long)


def test_a_whole_run_takes_only_the_stages_its_config_asks_for(tmp_path):
    """The invert stage applies only with an images: section: without one, `hmine run`,
    deployments, status and the report leave it out (the run log of a plain run used to
    start with an empty 'invert' record and the report showed it as not run)."""
    from hmine.config import load_config
    from hmine.stages import applicable_stage_names, stage_names

    plain = load_config(None, [f"output_root={tmp_path}", "name=plain"])
    with_images = load_config(None, [f"output_root={tmp_path}", "name=real", "images.world.n=4"])
    assert "invert" in stage_names()
    assert "invert" not in applicable_stage_names(plain)
    assert "invert" in applicable_stage_names(with_images)
    others = [s for s in applicable_stage_names(with_images) if s != "invert"]
    assert list(applicable_stage_names(plain)) == others  # in registry order
    assert {"sample", "label", "directions", "jacobian", "edit", "report"} <= set(others)
