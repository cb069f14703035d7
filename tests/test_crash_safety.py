"""Crash safety of `hmine run` on the embedded model: SIGKILL at random moments, then a
rerun, must give what an uninterrupted run gives; a second run on a busy run directory
is refused at once; a run directory of another config is refused without writing."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmine.stores import open_group

pytestmark = pytest.mark.slow  # starts hmine processes or whole runs

CONFIG = """
name: {name}
output_root: {root}
report_root: {root}/reports
sample: {{n_samples: 32, batch_size: 8, num_inference_steps: 10}}
label: {{attributes: [is_circle, is_red]}}
directions: {{pca_components: 2, top_k: 8, conditional: {{is_circle: [is_red]}}}}
edit: {{directions: [probe/is_circle], n_samples: 8, scales: [-2.0, 2.0], strip_samples: 2}}
jacobian: {{n_samples: 1, k: 2, steps: [600], mask: shape, max_iter: 8, edit_scales: [-2.0, 2.0]}}
"""


def _write_config(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, root=tmp_path / "stores"))
    return path


def _hmine(args, tmp_path, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hmine.cli", *args]
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _outputs(run_dir: Path) -> dict:
    samples, edits, jac = (open_group(run_dir / n) for n in ("samples.zarr", "edits.zarr", "jacobian.zarr"))
    directions = open_group(run_dir / "directions.zarr")
    return {
        "h": samples["h"][...],
        "x0": samples["x0"][...],
        "labels": pd.read_parquet(run_dir / "labels.parquet"),
        "directions": directions["direction"][...],
        "edits": edits["images"][...],
        "singular_values": jac["singular_values"][...],
        "effects": pd.read_parquet(run_dir / "edit_effects.parquet"),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reference")
    out = _hmine(["run", str(_write_config(tmp_path, "ref")), "--no-prefect"], tmp_path)
    assert out.returncode == 0, out.stderr
    return _outputs(tmp_path / "stores" / "ref"), tmp_path


def test_kill_at_random_moments_then_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    expected, _ = reference
    config = _write_config(tmp_path, "killed")
    rng = random.Random(os.getpid())
    for _ in range(2):
        proc = _hmine(["run", str(config), "--no-prefect"], tmp_path, wait=False)
        time.sleep(rng.uniform(4.0, 16.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = _hmine(["run", str(config), "--no-prefect"], tmp_path)
    assert out.returncode == 0, out.stderr
    got = _outputs(tmp_path / "stores" / "killed")
    np.testing.assert_array_equal(got["h"], expected["h"])  # bit for bit
    np.testing.assert_array_equal(got["x0"], expected["x0"])
    pd.testing.assert_frame_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["directions"], expected["directions"], atol=1e-6)
    np.testing.assert_allclose(got["edits"], expected["edits"], atol=1e-5)
    np.testing.assert_allclose(got["singular_values"], expected["singular_values"], rtol=1e-4)
    pd.testing.assert_frame_equal(got["effects"], expected["effects"], atol=1e-5)


def test_report_references_only_existing_images_and_names_every_stage(reference):
    import re

    _, tmp_path = reference
    page = tmp_path / "stores" / "reports" / "ref" / "index.html"
    text = page.read_text()
    sources = re.findall(r'src="([^"]+)"', text)
    assert len(sources) >= 5
    for src in sources:
        assert (page.parent / src).is_file(), src
    for stage in ("Sample stage", "Label stage", "Directions stage", "Edit stage", "Jacobian stage", "Provenance"):
        assert stage in text
    assert "Not run" not in text


def test_a_second_run_on_a_busy_run_dir_is_refused_at_once(tmp_path):
    from hmine.runtime import RunLock

    config = _write_config(tmp_path, "busy")
    big = ["--no-prefect", "--set", "sample.n_samples=4000"]
    proc = _hmine(["run", str(config), *big], tmp_path, wait=False)
    lock = tmp_path / "stores" / "busy" / ".lock"
    try:
        deadline = time.time() + 60
        while not (lock.exists() and lock.read_text().strip() == str(proc.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert lock.read_text().strip() == str(proc.pid)
        started = time.time()
        second = _hmine(["sample", str(config), *big], tmp_path)
        assert second.returncode == 2 and f"in use by process {proc.pid}" in second.stderr
        assert time.time() - started < 30
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder does not keep the lock
    RunLock(lock.parent).acquire().release()


def test_run_dir_of_another_config_is_refused_without_writing(reference, tmp_path):
    import shutil

    _, ref_root = reference
    run_dir = tmp_path / "stores" / "ref"
    shutil.copytree(ref_root / "stores" / "ref", run_dir)  # the shared run stays as it is
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before
    out = _hmine(["run", str(_write_config(tmp_path, "ref")), "--no-prefect", "--set", "sample.eta=1.0"], tmp_path)
    assert out.returncode == 2 and "another run name" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_status_of_a_finished_run_and_of_recomputed_directions(reference, tmp_path):
    import shutil

    from hmine.pipeline import stage_status

    _, ref_root = reference
    run_dir = tmp_path / "ref"
    shutil.copytree(ref_root / "stores" / "ref", run_dir)
    # every stage complete, also those whose stores are keyed on more than their settings
    # (edit: the directions' uuid; jacobian: the masks' content)
    assert {s.stage: s.state for s in stage_status(run_dir)} == dict.fromkeys(
        ("sample", "label", "directions", "edit", "jacobian"), "complete"
    )
    # directions recomputed since the edits were made: the edits are stale
    directions = open_group(run_dir / "directions.zarr", mode="r+")
    directions.attrs["hmine:store_uuid"] = "recomputed"
    status = {s.stage: s for s in stage_status(run_dir)}
    assert status["edit"].state == "stale" and "directions" in status["edit"].detail
    assert status["jacobian"].state == "complete"
    # samples written again since the labels were made: the labels are stale
    samples = open_group(run_dir / "samples.zarr", mode="r+")
    samples.attrs["hmine:store_uuid"] = "rewritten"
    status = {s.stage: s for s in stage_status(run_dir)}
    assert status["label"].state == "stale" and "samples" in status["label"].detail


def test_status_of_edits_whose_effects_table_is_missing(reference, tmp_path):
    import shutil

    from hmine.pipeline import stage_status

    _, ref_root = reference
    run_dir = tmp_path / "ref"
    shutil.copytree(ref_root / "stores" / "ref", run_dir)
    (run_dir / "edit_effects.parquet").unlink()  # killed between the edits and their table
    status = {s.stage: s for s in stage_status(run_dir)}
    assert status["edit"].state == "partial" and "effects" in status["edit"].detail


def test_a_report_is_swapped_in_whole_and_never_replaces_other_files(reference, tmp_path, monkeypatch):
    import json
    import shutil

    import hmine.report
    from hmine.config import RunConfig

    _, ref_root = reference
    config = RunConfig.model_validate(json.loads((ref_root / "stores" / "ref" / "config.json").read_text()))
    reports = tmp_path / "reports"
    shutil.copytree(ref_root / "stores" / "reports" / "ref", reports / "ref")
    config = config.model_copy(update={"report_root": reports})
    before = (reports / "ref" / "index.html").read_text()

    def fails_half_way(config, run_dir, out):
        (out / "index.html").write_text("half a page")
        raise KeyError("a column the labels lack")

    with monkeypatch.context() as patch:
        patch.setattr(hmine.report, "_build_sections_into", fails_half_way)
        with pytest.raises(KeyError):
            hmine.report.build_report(config)
    assert (reports / "ref" / "index.html").read_text() == before  # the old report, whole
    assert sorted(p.name for p in reports.iterdir()) == ["ref"]  # no half-built folder left
    page = hmine.report.build_report(config)
    assert page == reports / "ref" / "index.html" and "Jacobian stage" in page.read_text()

    # a report folder that holds something else (e.g. the run's stores) is never replaced
    (reports / "ref" / "samples.zarr").mkdir()
    with pytest.raises(ValueError, match="not an hmine report"):
        hmine.report.build_report(config)
    assert (reports / "ref" / "samples.zarr").is_dir()


def test_the_report_of_a_run_with_missing_or_crashed_stages(reference, tmp_path):
    import json
    import shutil

    from hmine.config import RunConfig
    from hmine.report import build_report

    _, ref_root = reference
    run_dir = tmp_path / "stores" / "ref"
    shutil.copytree(ref_root / "stores" / "ref", run_dir)
    config = RunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    config = config.model_copy(update={"output_root": tmp_path / "stores", "report_root": tmp_path / "reports"})
    shutil.rmtree(run_dir / "jacobian.zarr")
    (run_dir / "jacobian.zarr").mkdir()  # a crash while the store was being created
    (run_dir / "edit_effects.parquet").unlink()
    text = build_report(config).read_text()
    assert text.count("Not run (or not complete)") == 2 and "Label stage" in text
    # no samples: nothing to report on, said in one line, and no report folder left
    shutil.rmtree(run_dir / "samples.zarr")
    shutil.rmtree(tmp_path / "reports")
    with pytest.raises(FileNotFoundError, match="run the sample stage first"):
        build_report(config)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == []
