import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from hmine.config import load_config
from hmine.stages.sample import run_sample_stage
from hmine.stores import StoreConfigMismatch, open_group

ROOT = Path(__file__).resolve().parents[1]


def _config(model_dir, root, name="run", **sample):
    overrides = [f"model.id={model_dir}", f"output_root={root}", f"name={name}"]
    overrides += [f"sample.{k}={json.dumps(v)}" for k, v in {"n_samples": 10, "batch_size": 4, "num_inference_steps": 3, **sample}.items()]
    return load_config(None, overrides)


def test_store_layout_reads_with_plain_xarray(tiny_pixel_model_dir, tmp_path):
    config = _config(tiny_pixel_model_dir, tmp_path, seed_start=100, eta=1.0)
    result = run_sample_stage(config, show_progress=False)
    ds = xr.open_zarr(result.path, consolidated=False)
    assert ds["h"].dims == ("sample", "step", "channel", "y", "x")
    assert ds["h"].shape == (10, 3, 16, 8, 8) and ds["h"].dtype == np.float16
    assert ds["x0"].dims == ("sample", "color", "height", "width")
    assert list(ds["sample"].values) == list(range(100, 110))
    assert list(ds["step"].values) == [666, 333, 0]
    assert "step_index" in ds.coords
    assert ds["h"].encoding["chunks"][:2] == (4, 1)
    attrs = ds.attrs
    assert attrs["hmine:complete"] and attrs["hmine:h_position"] == "after"
    assert attrs["hmine:eta"] == 1.0 and attrs["hmine:num_inference_steps"] == 3
    assert attrs["hmine:config_hash"] == config.stage_hash("sample")
    assert bool(ds["done"].all())


def test_store_values_equal_a_direct_sampler_run(tiny_pixel_model_dir, tmp_path):

    from hmine.models import load_model
    from hmine.sampling import Sampler

    config = _config(tiny_pixel_model_dir, tmp_path, h_dtype="float32", n_samples=5)
    run_sample_stage(config, show_progress=False)
    ds = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)
    out = Sampler(load_model(str(tiny_pixel_model_dir)), num_inference_steps=3).sample([3, 4])
    np.testing.assert_allclose(ds["h"].sel(sample=[3, 4]).values, out.h.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["x0"].sel(sample=[3, 4]).values, out.images.numpy(), rtol=1e-4, atol=1e-5)


def test_rerun_skips_and_other_config_is_refused(tiny_pixel_model_dir, tmp_path):
    config = _config(tiny_pixel_model_dir, tmp_path)
    first = run_sample_stage(config, show_progress=False)
    assert first.computed == 3
    again = run_sample_stage(config, show_progress=False)
    assert again.computed == 0 and again.skipped == 3
    with pytest.raises(StoreConfigMismatch, match="another run name"):
        run_sample_stage(_config(tiny_pixel_model_dir, tmp_path, eta=1.0), show_progress=False)


def test_partial_store_resumes_only_missing_batches(tiny_pixel_model_dir, tmp_path):
    config = _config(tiny_pixel_model_dir, tmp_path)
    run_sample_stage(config, show_progress=False)
    group = open_group(config.run_dir / "samples.zarr", mode="r+")
    reference = group["h"][...]
    group["done"][4:8] = False
    del group.attrs["hmine:complete"]
    result = run_sample_stage(config, show_progress=False)
    assert result.computed == 1 and result.skipped == 2
    np.testing.assert_array_equal(open_group(config.run_dir / "samples.zarr")["h"][...], reference)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_chunk_is_detected_and_redone(tiny_pixel_model_dir, tmp_path, damage):
    config = _config(tiny_pixel_model_dir, tmp_path)
    run_sample_stage(config, show_progress=False)
    path = config.run_dir / "samples.zarr"
    reference = open_group(path)["h"][...]
    uuid_before = open_group(path).attrs["hmine:store_uuid"]
    chunk = path / "h" / "c" / "1" / "2" / "0" / "0" / "0"
    assert chunk.exists()
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:20])
    # a complete store is re-verified on rerun: the stage must not trust the mark
    result = run_sample_stage(config, show_progress=False)
    assert result.repaired == 1 and result.computed == 1
    group = open_group(path)
    np.testing.assert_array_equal(group["h"][...], reference)
    assert group.attrs["hmine:store_uuid"] != uuid_before


def test_a_lost_array_folder_is_damage_and_every_batch_is_redone(tiny_pixel_model_dir, tmp_path):
    import shutil

    from hmine.pipeline import stage_status
    from hmine.stages import damaged_count

    config = _config(tiny_pixel_model_dir, tmp_path)
    run_sample_stage(config, show_progress=False)
    path = config.run_dir / "samples.zarr"
    reference = open_group(path)["x0"][...]
    shutil.rmtree(path / "x0")
    assert not damaged_count(config, "sample") == 0
    assert {s.stage: s.state for s in stage_status(config.run_dir, config)}["sample"] == "damaged"
    result = run_sample_stage(config, show_progress=False)
    assert result.repaired == result.computed == result.total
    np.testing.assert_array_equal(open_group(path)["x0"][...], reference)  # bit for bit
    assert damaged_count(config, "sample") == 0


KILLED_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from hmine.config import load_config
    from hmine.stages.sample import run_sample_stage
    config = load_config(None, {overrides!r})
    run_sample_stage(config, show_progress=False)
    """
)


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_pixel_model_dir, tmp_path):
    sample = {"n_samples": 48, "batch_size": 2, "num_inference_steps": 10}
    overrides = [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=killed"]
    overrides += [f"sample.{k}={v}" for k, v in sample.items()]
    script = KILLED_RUN.format(root=str(ROOT), overrides=overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    store = tmp_path / "killed" / "samples.zarr"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(open_group(store)["done"][...].sum())
        except Exception:
            done = 0
        if done >= 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_done = int(open_group(store)["done"][...].sum())
    assert 0 < killed_done < 48, "the kill must land mid-run for this test to mean anything"

    config = load_config(None, overrides)
    resumed = run_sample_stage(config, show_progress=False)
    assert resumed.skipped >= killed_done // 2
    reference = run_sample_stage(_config(tiny_pixel_model_dir, tmp_path, name="clean", **sample), show_progress=False)
    a, b = open_group(store), open_group(reference.path)
    for name in ("h", "x0", "done", "sample", "step"):
        np.testing.assert_array_equal(a[name][...], b[name][...])


def test_three_steps_in_separate_shards_equal_run_sample_stage(tiny_pixel_model_dir, tmp_path):
    from hmine.stages.sample import (
        finish_sample_stage,
        prepare_sample_stage,
        sample_batches,
        shard_batches,
    )

    reference = run_sample_stage(_config(tiny_pixel_model_dir, tmp_path, name="serial"), show_progress=False)
    config = _config(tiny_pixel_model_dir, tmp_path, name="sharded")
    plan = prepare_sample_stage(config)
    assert plan.todo == [0, 1, 2] and plan.model is not None  # loaded to build the template
    shards = shard_batches(plan.todo[::-1], 2)
    assert shards == [[2, 1], [0]]
    # each shard as a worker would run it: its own call, its own model, in reverse order
    assert sample_batches(config, shards[0]) == [2, 1]
    with pytest.raises(RuntimeError, match=r"batches \[0\]"):
        finish_sample_stage(plan)  # a shard is missing: the store must not be marked complete
    assert "hmine:complete" not in open_group(plan.path).attrs
    assert sample_batches(config, shards[1] + [1]) == [0]  # done batches are skipped
    result = finish_sample_stage(plan, 3)
    assert (result.computed, result.skipped, result.total) == (3, 0, 3)
    a, b = open_group(reference.path), open_group(result.path)
    assert b.attrs["hmine:complete"]
    for name in ("h", "x0", "done", "sample", "step", "step_index"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert a.attrs["hmine:config_hash"] == b.attrs["hmine:config_hash"]
    # an existing store is reopened without loading the model
    again = prepare_sample_stage(config)
    assert again.todo == [] and again.model is None


def test_shards_and_sample_batches_guards(tiny_pixel_model_dir, tmp_path):
    from hmine.stages.sample import sample_batches, shard_batches

    assert shard_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_batches([4, 5], 8) == [[4], [5]]
    assert shard_batches([], 4) == []
    config = _config(tiny_pixel_model_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_sample_stage"):
        sample_batches(config, [0])
    run_sample_stage(config, show_progress=False)
    with pytest.raises(StoreConfigMismatch):
        sample_batches(_config(tiny_pixel_model_dir, tmp_path, eta=1.0), [0])
    for outside in (3, -1):
        with pytest.raises(IndexError):
            sample_batches(config, [outside])
