"""Growing a run (issue 20, item 2): raising sample.n_samples appends the new seeds to
samples.zarr and labels only the new samples; the grown run equals a fresh run of the
final size bit for bit; lowering it is refused; a grow killed anywhere resumes; every
stage downstream is stale until it is computed again from the grown stores."""

import json

import numpy as np
import pandas as pd
import pytest
from test_label_stage import LeftBrightLabeller

from hmine.config import load_config
from hmine.stages.label import labels_path, run_label_stage
from hmine.stages.sample import run_sample_stage
from hmine.stores import GROWING, LINEAGE, STORE_UUID, StoreConfigMismatch, open_group, store_state

BATCH, LABEL_BATCH, FINAL = 4, 3, 16  # 4 sample batches in the end; label batches cut across them


def _config(model_dir, root, name, n):
    return load_config(
        None,
        [f"model.id={model_dir}", f"output_root={root}", f"name={name}", f"sample.n_samples={n}",
         f"sample.batch_size={BATCH}", "sample.num_inference_steps=3", "sample.eta=1.0",
         f"label.batch_size={LABEL_BATCH}", "label.attributes=[is_left_bright]",
         "directions.pca_components=2", "directions.top_k=3", "directions.regression=false"],
    )


@pytest.fixture(scope="module")
def fresh(tiny_pixel_model_dir, tmp_path_factory):
    """A fresh run of the final size: what every grown run must equal."""
    config = _config(tiny_pixel_model_dir, tmp_path_factory.mktemp("fresh"), "fresh", FINAL)
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, labeller=LeftBrightLabeller(), show_progress=False)
    return config


def _small_run(model_dir, root, n, labelled=True):
    config = _config(model_dir, root, "grown", n)
    run_sample_stage(config, show_progress=False)
    if labelled:
        run_label_stage(config, labeller=LeftBrightLabeller(), show_progress=False)
    return config


def assert_same_samples(grown, fresh):
    """Every array of samples.zarr: values bit for bit, shape, chunks, dtype; the same identity."""
    a, b = open_group(grown.run_dir / "samples.zarr"), open_group(fresh.run_dir / "samples.zarr")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in b.array_keys():
        assert (a[name].shape, a[name].chunks, a[name].dtype) == (b[name].shape, b[name].chunks, b[name].dtype), name
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    for key in ("hmine:config_hash", "hmine:input_identity", "hmine:stage_hash", "hmine:stage_config", "hmine:complete"):
        assert a.attrs[key] == b.attrs[key], key
    assert GROWING not in a.attrs


def assert_same_labels(grown, fresh):
    pd.testing.assert_frame_equal(pd.read_parquet(labels_path(grown)), pd.read_parquet(labels_path(fresh)), check_exact=True)


@pytest.mark.parametrize(
    ("n_old", "sampled", "labelled"),
    [
        (8, 2, 4),  # 2 -> 4 batches: batches 2, 3 sampled; label rows 0-5 (2 of 6 label batches) kept
        (6, 3, 5),  # the old last batch held 2 of 4 samples: sampled again whole; label rows 0-2 kept
    ],
)
def test_a_grown_run_equals_a_fresh_run_bit_for_bit(tiny_pixel_model_dir, tmp_path, fresh, n_old, sampled, labelled):
    from hmine.pipeline import check_run_dir

    small = _small_run(tiny_pixel_model_dir, tmp_path, n_old)
    old_uuid = open_group(small.run_dir / "samples.zarr").attrs[STORE_UUID]
    grown = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL)
    check_run_dir(grown)  # what `hmine run` checks first: more samples of the same config are no mismatch
    result = run_sample_stage(grown, show_progress=False)
    assert (result.total, result.computed, result.skipped) == (4, sampled, 4 - sampled)
    labeller = LeftBrightLabeller()
    label = run_label_stage(grown, labeller=labeller, show_progress=False)
    assert labeller.calls == label.computed == labelled and label.total == 6  # only what the growth changed
    assert_same_samples(grown, fresh)
    assert_same_labels(grown, fresh)
    attrs = open_group(grown.run_dir / "samples.zarr").attrs
    assert attrs[STORE_UUID] != old_uuid
    assert [(e["uuid"], e["n_samples"], e["unchanged"]) for e in attrs[LINEAGE]] == [(old_uuid, n_old, n_old - n_old % BATCH)]


def test_a_second_growth_keeps_the_labels_of_the_first_store(tiny_pixel_model_dir, tmp_path, fresh):
    """4 -> 8 samples (not labelled) -> 16: the table from the 4-sample store keeps its rows 0-2."""
    _small_run(tiny_pixel_model_dir, tmp_path, 4)
    run_sample_stage(_config(tiny_pixel_model_dir, tmp_path, "grown", 8), show_progress=False)
    grown = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL)
    assert run_sample_stage(grown, show_progress=False).computed == 2
    labeller = LeftBrightLabeller()
    run_label_stage(grown, labeller=labeller, show_progress=False)
    assert labeller.calls == 5
    assert_same_samples(grown, fresh)
    assert_same_labels(grown, fresh)


def test_earlier_labels_of_another_label_batch_size_or_a_repaired_store_are_not_kept(tiny_pixel_model_dir, tmp_path, fresh):
    small = _small_run(tiny_pixel_model_dir, tmp_path, 8)
    grown = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL)
    run_sample_stage(grown, show_progress=False)
    other_batch = grown.model_copy(update={"label": grown.label.model_copy(update={"batch_size": 2})})
    labeller = LeftBrightLabeller()
    run_label_stage(other_batch, labeller=labeller, show_progress=False)
    assert labeller.calls == 8  # every batch: rows labelled at batch size 3 are not kept at 2

    # a repaired store: its redone batch is not checked against the old one, nothing is kept
    small = _small_run(tiny_pixel_model_dir, tmp_path / "again", 8)
    grown = _config(tiny_pixel_model_dir, tmp_path / "again", "grown", FINAL)
    run_sample_stage(grown, show_progress=False)
    chunk = small.run_dir / "samples.zarr" / "x0" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    assert run_sample_stage(grown, show_progress=False).repaired == 1
    assert open_group(grown.run_dir / "samples.zarr").attrs[LINEAGE] == []
    labeller = LeftBrightLabeller()
    run_label_stage(grown, labeller=labeller, show_progress=False)
    assert labeller.calls == 6
    assert_same_samples(grown, fresh)
    assert_same_labels(grown, fresh)


def test_lowering_n_samples_is_refused_and_changes_nothing(tiny_pixel_model_dir, tmp_path):
    from hmine.pipeline import check_run_dir, stage_status

    small = _small_run(tiny_pixel_model_dir, tmp_path, 8, labelled=False)
    store = small.run_dir / "samples.zarr"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    fewer = _config(tiny_pixel_model_dir, tmp_path, "grown", 4)
    message = r"holds 8 samples and sample.n_samples=4 would drop some; a run only grows: set sample.n_samples to 8 or more"
    with pytest.raises(StoreConfigMismatch, match=message):
        check_run_dir(fewer)
    with pytest.raises(StoreConfigMismatch, match=message):
        run_sample_stage(fewer, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    status = {s.stage: s for s in stage_status(small.run_dir, fewer)}["sample"]
    assert status.state == "stale" and "only grows" in status.detail
    # more samples under another sample config are still another run's samples
    other = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL).model_copy()
    other = other.model_copy(update={"sample": other.sample.model_copy(update={"seed_start": 1})})
    with pytest.raises(StoreConfigMismatch, match="another run name"):
        check_run_dir(other)


def _kill_after_begin(monkeypatch):
    import hmine.stages.sample as sample_stage

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_stage, "finish_growth", killed)


def _kill_after_resizing(monkeypatch):
    import hmine.stores as stores

    def killed(*args, **kwargs):  # the arrays are resized; the seed coordinate is not written yet
        raise KeyboardInterrupt

    monkeypatch.setattr(stores, "_create_array", killed)


def _kill_after_one_new_batch(monkeypatch):
    import hmine.stages.sample as sample_stage

    real = sample_stage.sample_batches

    def killed(config, batches, **kwargs):
        real(config, batches[:1], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_stage, "sample_batches", killed)


@pytest.mark.parametrize("kill", [_kill_after_begin, _kill_after_resizing, _kill_after_one_new_batch])
def test_an_interrupted_growth_never_looks_complete_and_resumes(tiny_pixel_model_dir, tmp_path, fresh, monkeypatch, kill):
    from flows.caching import stage_key
    from hmine.pipeline import stage_status
    from hmine.stages import output_identity, up_to_date

    small = _small_run(tiny_pixel_model_dir, tmp_path, 8)
    grown = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL)
    with monkeypatch.context() as patch:
        kill(patch)
        with pytest.raises(KeyboardInterrupt):
            run_sample_stage(grown, show_progress=False)
    store = grown.run_dir / "samples.zarr"
    assert store_state(store) == "partial"
    for config in (small, grown):  # nothing reads the half-grown store as complete, under either config
        assert output_identity(config, "sample") is None and stage_key("sample", config) is None
        assert not up_to_date(config, "sample") and not up_to_date(config, "label")
    assert {s.stage: s.state for s in stage_status(grown.run_dir, grown)}["sample"] == "partial"
    result = run_sample_stage(grown, show_progress=False)
    assert result.computed == (1 if kill is _kill_after_one_new_batch else 2)
    labeller = LeftBrightLabeller()
    run_label_stage(grown, labeller=labeller, show_progress=False)
    assert labeller.calls == 4  # the lineage survives the kill: the earlier labels are kept
    assert_same_samples(grown, fresh)
    assert_same_labels(grown, fresh)


def test_downstream_stages_are_stale_until_computed_from_the_grown_stores(tiny_pixel_model_dir, tmp_path, fresh):
    import shutil

    import xarray as xr

    from flows.caching import stage_key
    from hmine.pipeline import stage_status
    from hmine.stages import up_to_date
    from hmine.stages.directions import directions_path, run_directions_stage

    small = _small_run(tiny_pixel_model_dir, tmp_path, 8)
    run_directions_stage(small)
    keys = {stage: stage_key(stage, small) for stage in ("sample", "label", "directions")}
    assert all(keys.values())
    grown = _config(tiny_pixel_model_dir, tmp_path, "grown", FINAL)

    def states():
        found = {s.stage: s for s in stage_status(grown.run_dir, grown)}
        return {stage: found[stage].state for stage in keys}, found["sample"].detail

    assert states() == ({"sample": "stale", "label": "stale", "directions": "stale"},
                        "holds 8 samples, sample.n_samples=16: a rerun grows it")
    assert all(stage_key(stage, grown) is None for stage in keys)
    run_sample_stage(grown, show_progress=False)
    assert states()[0] == {"sample": "complete", "label": "stale", "directions": "stale"}
    assert stage_key("sample", grown) not in (None, keys["sample"])
    assert not up_to_date(grown, "label") and not up_to_date(grown, "directions")
    run_label_stage(grown, labeller=LeftBrightLabeller(), show_progress=False)
    assert states()[0] == {"sample": "complete", "label": "complete", "directions": "stale"}
    run_directions_stage(grown)
    assert states()[0] == {"sample": "complete", "label": "complete", "directions": "complete"}
    assert up_to_date(grown, "directions")

    # the directions of the grown stores equal a fresh run's (same data, same code)
    fresh_directions = fresh.model_copy(update={"output_root": tmp_path / "fresh"})
    shutil.copytree(fresh.run_dir, fresh_directions.run_dir)  # the shared fresh run stays as it is
    run_directions_stage(fresh_directions)
    a = xr.open_zarr(directions_path(grown), consolidated=False)
    b = xr.open_zarr(directions_path(fresh_directions), consolidated=False)
    assert list(a["name"].values) == list(b["name"].values) and a.sizes["direction"] >= 4
    np.testing.assert_allclose(a["direction"].values, b["direction"].values, rtol=0, atol=1e-5)
    assert json.loads(a.attrs["hmine:input_reads"]).keys() == {"sample", "label"}


@pytest.mark.slow
def test_the_command_line_grows_a_run_and_refuses_to_shrink_it(tiny_pixel_model_dir, tmp_path):
    """As a user does it: `hmine sample`, then again with more samples, then with fewer."""
    import os
    import subprocess
    import sys

    config, more = tmp_path / "run.yaml", tmp_path / "more.yaml"
    for path, n in ((config, 6), (more, 9)):
        path.write_text(
            f"name: cli\noutput_root: {tmp_path / 'stores'}\nmodel:\n  id: {tiny_pixel_model_dir}\n"
            f"sample:\n  n_samples: {n}\n  batch_size: 3\n  num_inference_steps: 2\n"
        )

    def hmine(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "hmine.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    run_dir = tmp_path / "stores" / "cli"
    assert hmine("sample", str(config), "--no-prefect").returncode == 0
    status = hmine("status", str(run_dir), "--config", str(more))
    assert "holds 6 samples, sample.n_samples=9: a rerun grows it" in status.stdout, status.stdout
    grown = hmine("sample", str(more), "--no-prefect")
    assert grown.returncode == 0, grown.stderr
    assert open_group(run_dir / "samples.zarr")["sample"][...].tolist() == list(range(9))
    assert json.loads((run_dir / "config.json").read_text())["sample"]["n_samples"] == 9
    out = hmine("sample", str(config), "--no-prefect")  # 6 again
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "holds 9 samples and sample.n_samples=6 would drop some; a run only grows" in out.stderr
