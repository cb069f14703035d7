"""The hmine command line, run as users run it (subprocesses, --no-prefect for speed)."""

import os
import subprocess
import sys

import pytest

from hmine.runtime import RunLock

HMINE = [sys.executable, "-m", "hmine.cli"]


def _run(args, cwd, check=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(HMINE + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def config_file(tmp_path, tiny_pixel_model_dir):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"name: cli\noutput_root: {tmp_path / 'stores'}\nmodel:\n  id: {tiny_pixel_model_dir}\n"
        "sample:\n  n_samples: 6\n  batch_size: 3\n  num_inference_steps: 2\n"
    )
    return path


def test_sample_then_status(config_file, tmp_path):
    run_dir = tmp_path / "stores" / "cli"
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 2 and "does not exist" in status.stderr
    out = _run(["sample", str(config_file), "--no-prefect"], tmp_path)
    assert out.returncode == 0, out.stderr
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 0
    assert "sample" in status.stdout and "complete" in status.stdout


def test_status_reports_partial_and_stale(config_file, tmp_path):
    from hmine.stores import open_group

    run_dir = tmp_path / "stores" / "cli"
    assert _run(["sample", str(config_file), "--no-prefect"], tmp_path).returncode == 0
    group = open_group(run_dir / "samples.zarr", mode="r+")
    group["done"][3:] = False
    del group.attrs["hmine:complete"]
    status = _run(["status", str(run_dir)], tmp_path)
    assert "partial" in status.stdout and "3/6" in status.stdout
    changed = tmp_path / "changed.yaml"
    changed.write_text(config_file.read_text().replace("num_inference_steps: 2", "num_inference_steps: 3"))
    status = _run(["status", str(run_dir), "--config", str(changed)], tmp_path)
    assert "stale" in status.stdout


def test_status_reports_a_lost_chunk_as_damaged(config_file, tmp_path):
    run_dir = tmp_path / "stores" / "cli"
    assert _run(["sample", str(config_file), "--no-prefect"], tmp_path).returncode == 0
    chunks = sorted((run_dir / "samples.zarr" / "x0" / "c").rglob("*"))
    next(c for c in chunks if c.is_file()).unlink()
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 0
    line = next(line for line in status.stdout.splitlines() if line.startswith("sample"))
    assert "damaged" in line and "rerun" in line, status.stdout


def test_bad_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: bad\noutput_root: {tmp_path / 'stores'}\nsample:\n  n_samples: 0\n")
    out = _run(["run", str(bad), "--no-prefect"], tmp_path)
    assert out.returncode == 2
    assert "sample.n_samples" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "stores").exists()


def test_other_config_on_same_run_dir_is_refused(config_file, tmp_path):
    assert _run(["sample", str(config_file), "--no-prefect"], tmp_path).returncode == 0
    out = _run(["sample", str(config_file), "--no-prefect", "--set", "sample.eta=1.0"], tmp_path)
    assert out.returncode == 2 and "another run name" in out.stderr


def test_second_run_on_a_locked_run_dir_is_refused_at_once(config_file, tmp_path):
    run_dir = tmp_path / "stores" / "cli"
    with RunLock(run_dir):
        out = _run(["sample", str(config_file), "--no-prefect"], tmp_path)
    assert out.returncode == 2 and "in use by process" in out.stderr
    # released by its holder: a later run gets it
    assert _run(["sample", str(config_file), "--no-prefect"], tmp_path).returncode == 0


def test_dask_flag_sets_the_runner(tmp_path):
    from hmine.cli import _run_stages, build_parser, dask_overrides
    from hmine.config import load_config

    args = build_parser().parse_args(["run", "c.yaml", "--dask", "localhost:8786"])
    runner = load_config(None, dask_overrides(args.dask)).runner
    assert (runner.kind, runner.address) == ("dask", "localhost:8786")
    runner = load_config(None, ["runner.address=null", *dask_overrides("local")]).runner
    assert (runner.kind, runner.address) == ("dask", None)
    args = build_parser().parse_args(["sample", str(tmp_path / "c.yaml"), "--no-prefect", "--dask", "local"])
    with pytest.raises(ValueError, match="drop --no-prefect"):
        _run_stages(args, ("sample",))  # main() prints it as an error, exit status 2
