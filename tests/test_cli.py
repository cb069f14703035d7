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


def _write_config(folder, model_dir):
    path = folder / "run.yaml"
    path.write_text(
        f"name: cli\noutput_root: {folder / 'stores'}\nmodel:\n  id: {model_dir}\n"
        "sample:\n  n_samples: 6\n  batch_size: 3\n  num_inference_steps: 2\n"
    )
    return path


@pytest.fixture
def config_file(tmp_path, tiny_pixel_model_dir):
    return _write_config(tmp_path, tiny_pixel_model_dir)


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_pixel_model_dir):
    """The run ``hmine sample config_file`` makes, made once: tests of what follows a sample
    (status, refusals) start from a copy (:func:`_copy_of`), not a sampling process each."""
    folder = tmp_path_factory.mktemp("cli-sampled")
    out = _run(["sample", str(_write_config(folder, tiny_pixel_model_dir)), "--no-prefect"], folder)
    assert out.returncode == 0, out.stderr
    return folder / "stores" / "cli"


def _copy_of(sampled_run, tmp_path):
    """``sampled_run`` where ``config_file`` puts its run (a run directory may be moved)."""
    import shutil

    run_dir = tmp_path / "stores" / "cli"
    shutil.copytree(sampled_run, run_dir)
    return run_dir


def test_sample_then_status(config_file, tmp_path):
    run_dir = tmp_path / "stores" / "cli"
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 2 and "does not exist" in status.stderr
    status = _run(["status", str(config_file)], tmp_path)  # the config in place of the run directory
    assert status.returncode == 2 and "not a run directory" in status.stderr and "--config" in status.stderr
    assert "missing" not in status.stdout
    out = _run(["sample", str(config_file), "--no-prefect"], tmp_path)
    assert out.returncode == 0, out.stderr
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 0
    assert "sample" in status.stdout and "complete" in status.stdout


def test_status_reports_partial_and_stale(config_file, sampled_run, tmp_path):
    from hmine.stores import open_group

    run_dir = _copy_of(sampled_run, tmp_path)
    group = open_group(run_dir / "samples.zarr", mode="r+")
    group["done"][3:] = False
    del group.attrs["hmine:complete"]
    status = _run(["status", str(run_dir)], tmp_path)
    assert "partial" in status.stdout and "3/6" in status.stdout
    changed = tmp_path / "changed.yaml"
    changed.write_text(config_file.read_text().replace("num_inference_steps: 2", "num_inference_steps: 3"))
    status = _run(["status", str(run_dir), "--config", str(changed)], tmp_path)
    assert "stale" in status.stdout


def test_status_reports_a_lost_chunk_as_damaged(sampled_run, tmp_path):
    run_dir = _copy_of(sampled_run, tmp_path)
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


def test_other_config_on_same_run_dir_is_refused(config_file, sampled_run, tmp_path):
    _copy_of(sampled_run, tmp_path)
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


def test_a_cluster_address_without_a_lasting_prefect_server_is_refused(config_file, tmp_path):
    """Workers of an existing cluster keep the first server's address; a temporary one exits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [*HMINE, "sample", str(config_file), "--dask", "tcp://127.0.0.1:9"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: runner.address tcp://127.0.0.1:9") and "PREFECT_API_URL" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "stores").exists()  # refused before anything is written


def _broken_model(tiny_pixel_model_dir, tmp_path, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pixel_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    elif damage == "no scheduler config":
        (model / "scheduler_config.json").unlink()
    return model


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        ("missing model folder", ["model.id=./no-such-model"], "model.id"),
        ("truncated weights", [], "not a readable safetensors file"),
        ("no scheduler config", [], "scheduler_config.json"),
        ("unknown attribute", ["label.attributes=[is_smiling]"], "label.attributes"),
        ("mask of the wrong size", ["jacobian.mask=files", "jacobian.n_samples=2"], "mask for sample 1 has shape (8, 8)"),
    ],
)
def test_bad_input_is_refused_in_one_line_with_nothing_written(
    config_file, tmp_path, tiny_pixel_model_dir, case, overrides, expected
):
    import numpy as np

    if case in ("truncated weights", "no scheduler config"):
        overrides = [f"model.id={_broken_model(tiny_pixel_model_dir, tmp_path, case)}"]
    if case == "mask of the wrong size":
        masks = tmp_path / "masks"
        masks.mkdir()
        np.save(masks / "0.npy", np.ones((16, 16), dtype=np.float32))
        np.save(masks / "1.npy", np.ones((8, 8), dtype=np.float32))
        overrides = [*overrides, f"jacobian.mask_dir={masks}"]
    out = _run(["run", str(config_file), "--no-prefect", *[a for o in overrides for a in ("--set", o)]], tmp_path)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "stores").exists()


def test_yaml_errors_and_an_unreadable_run_config_are_one_line(config_file, sampled_run, tmp_path):
    out = _run(["run", str(config_file), "--no-prefect", "--set", "name=[unclosed"], tmp_path)
    assert out.returncode == 2 and "--set 'name=[unclosed'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("sample:\n  n_samples: [1, 2\n")
    out = _run(["run", str(broken), "--no-prefect"], tmp_path)
    assert out.returncode == 2 and "not valid YAML at line" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    two = tmp_path / "two.yaml"
    two.write_text("sample:\n  n_samples: 0\n  batch_size: 0\n")
    out = _run(["run", str(two), "--no-prefect"], tmp_path)
    assert out.returncode == 2 and "sample.n_samples" in out.stderr and "sample.batch_size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "stores").exists()

    # a run directory whose config.json is unreadable still shows its stages
    run_dir = _copy_of(sampled_run, tmp_path)
    (run_dir / "config.json").write_text('{"sample": {"n_samples": 0')
    status = _run(["status", str(run_dir)], tmp_path)
    assert status.returncode == 0 and "complete" in status.stdout
    assert "config.json is not a readable run config" in status.stderr
