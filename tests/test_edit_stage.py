"""Direction and edit stages on a tiny model, with a simple deterministic labeller."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from test_label_stage import LeftBrightLabeller, run_through_edit

from hmine.config import load_config
from hmine.stages.directions import directions_path, run_directions_stage
from hmine.stages.edit import run_edit_stage
from hmine.stores import open_group


@pytest.fixture(scope="module")
def run(tiny_pixel_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    config = load_config(
        None,
        [f"model.id={tiny_pixel_model_dir}", f"output_root={root}", "name=e", "sample.n_samples=24",
         "sample.batch_size=4", "sample.num_inference_steps=3", "sample.eta=1.0", "label.attributes=[is_left_bright]",
         "directions.pca_components=2", "directions.top_k=6", "edit.n_samples=8", "edit.scales=[-4,4]",
         # two supervised directions edited by default (the regression one, also edited by
         # default, goes through the same code: tests/test_effects.py checks its selection)
         "edit.strip_samples=3", "directions.regression=false"],
    )
    labeller = LeftBrightLabeller()
    run_through_edit(config, labeller)
    return config, labeller


@pytest.fixture
def own_run(run, tmp_path):
    """A copy of the shared run in ``tmp_path`` with its own labeller, for a test that changes the run."""
    base, _ = run
    shutil.copytree(base.run_dir, tmp_path / "stores" / base.name)
    return base.model_copy(update={"output_root": tmp_path / "stores"}), LeftBrightLabeller()


def test_directions_store_has_every_method(run):
    config, _ = run
    ds = xr.open_zarr(directions_path(config), consolidated=False)
    names = [str(n) for n in ds["name"].values]
    assert names == ["pca/0", "pca/1", "mean_difference/is_left_bright", "probe/is_left_bright"]
    assert ds["direction"].dims == ("direction", "step", "channel", "y", "x")
    assert ds.attrs["hmine:config_hash"] == config.stage_hash("directions")


def test_edit_at_scale_zero_reproduces_the_stored_images_exactly(run):
    config, _ = run
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    assert edits["images"].dims == ("direction", "scale", "sample", "color", "height", "width")
    assert list(edits["scale"].values) == [-4.0, 0.0, 4.0]
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:8]
    for d in range(edits.sizes["direction"]):
        np.testing.assert_array_equal(edits["images"].isel(direction=d).sel(scale=0.0).values, x0)
        assert np.abs(edits["images"].isel(direction=d).sel(scale=4.0).values - x0).max() > 1e-3


def test_effects_table_and_strips(run):
    config, _ = run
    effects = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    assert set(effects["direction"]) == {"mean_difference/is_left_bright", "probe/is_left_bright"}
    zero = effects[effects["scale"] == 0.0]
    assert np.allclose(zero["mean_change"], 0.0) and np.allclose(zero["flip_to_positive"].fillna(0), 0.0)
    # scores at scale 0 are the labeller's scores of the stored images; edits move them
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:8]
    expected = LeftBrightLabeller().score(x0)["brightness"].mean()
    brightness = effects[effects["attribute"] == "brightness"].set_index(["direction", "scale"])["mean_score"]
    assert np.isclose(brightness[("probe/is_left_bright", 0.0)], expected)
    edited = effects[(effects["scale"] != 0.0) & (effects["attribute"] == "brightness")]
    assert (edited["mean_change"].abs() > 1e-4).all()
    assert len(list((config.run_dir / "edit_strips").glob("*.png"))) == 2


def test_rerun_skips_and_an_edit_change_keeps_the_directions(run):
    config, labeller = run
    calls = labeller.calls
    assert run_directions_stage(config).computed == 0
    assert run_edit_stage(config, labeller=labeller, show_progress=False).computed == 0
    assert labeller.calls == calls
    before = open_group(directions_path(config)).attrs["hmine:store_uuid"]
    changed = config.model_copy(update={"edit": config.edit.model_copy(update={"scales": [2.0]})})
    assert changed.stage_hash("directions") == config.stage_hash("directions")
    assert changed.stage_hash("edit") != config.stage_hash("edit")
    assert run_directions_stage(changed).computed == 0
    assert open_group(directions_path(config)).attrs["hmine:store_uuid"] == before



@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_edit_chunk_is_detected_and_redone(own_run, damage):
    from hmine.stages import damaged_count

    config, labeller = own_run
    path = config.run_dir / "edits.zarr"
    reference = open_group(path)["images"][...]
    effects_before = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    chunk = path / "images" / "c" / "1" / "2" / "0" / "0" / "0" / "0"  # direction 1, scale +4
    assert chunk.exists() and damaged_count(config, "edit") == 0
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:20])
    assert not damaged_count(config, "edit") == 0
    # the complete mark is not trusted: the damaged direction is redone, to the same images
    result = run_edit_stage(config, labeller=labeller, show_progress=False)
    assert result.repaired == 1 and result.computed == 1 and result.skipped == 1
    assert damaged_count(config, "edit") == 0
    np.testing.assert_array_equal(open_group(path)["images"][...], reference)
    pd.testing.assert_frame_equal(pd.read_parquet(config.run_dir / "edit_effects.parquet"), effects_before)


def test_the_flow_cache_key_of_a_damaged_edit_store_matches_nothing(own_run):
    from flows.caching import stage_key

    config, labeller = own_run
    parameters = ("edit", config)
    key = stage_key(*parameters)
    assert stage_key(*parameters) == key  # an intact store: a stable key, a cache hit
    (config.run_dir / "edits.zarr" / "images" / "c" / "0" / "0" / "0" / "0" / "0" / "0").unlink()
    assert stage_key(*parameters) is None  # not up to date: no key, no cache record
    assert run_edit_stage(config, labeller=labeller, show_progress=False).repaired == 1
    from hmine.stages import input_identity

    assert stage_key(*parameters).startswith(f"hmine-edit-{input_identity(config, 'edit')}-")


def test_a_changed_edit_config_recomputes_the_edits(own_run):
    config, labeller = own_run
    changed = config.model_copy(update={"edit": config.edit.model_copy(update={"scales": [-2.0, 2.0]})})
    result = run_edit_stage(changed, labeller=labeller, show_progress=False)
    assert result.computed == 2
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    assert list(edits["scale"].values) == [-2.0, 0.0, 2.0]
    assert json.loads(edits.attrs["hmine:stage_config"]) == json.loads(json.dumps(changed.stage_inputs("edit"), sort_keys=True))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_directions_chunk_makes_the_stage_write_the_store_again(own_run, damage):
    from hmine.pipeline import stage_status
    from hmine.stages import damaged_count

    config, _ = own_run
    path = directions_path(config)
    reference = xr.open_zarr(path, consolidated=False)["direction"].values
    assert damaged_count(config, "directions") == 0 and run_directions_stage(config).computed == 0
    chunk = path / "direction" / "c" / "1" / "0" / "0" / "0" / "0"
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:20])
    assert not damaged_count(config, "directions") == 0
    assert {s.stage: s.state for s in stage_status(config.run_dir, config)}["directions"] == "damaged"
    result = run_directions_stage(config)
    assert result.computed == 1 and result.repaired == 1
    assert damaged_count(config, "directions") == 0
    np.testing.assert_array_equal(xr.open_zarr(path, consolidated=False)["direction"].values, reference)


def test_edit_steps_from_is_a_closed_window_with_open_ends():
    from hmine.editing import edit_steps_from

    timesteps = [900, 600, 300, 0]
    assert edit_steps_from(timesteps, None) == [True] * 4
    assert edit_steps_from(timesteps, 300) == [True, True, True, False]
    assert edit_steps_from(timesteps, None, 600) == [False, True, True, True]
    assert edit_steps_from(timesteps, 300, 600) == [False, True, True, False]
    with pytest.raises(ValueError, match="holds none of the sampler's timesteps"):
        edit_steps_from(timesteps, 400, 500)


def test_a_reversed_edit_window_is_refused_by_the_config():
    from hmine.config import ConfigError

    with pytest.raises(ConfigError, match="t_edit.*above edit.t_edit_max"):
        load_config(None, ["edit.t_edit=600", "edit.t_edit_max=300"])


def test_a_timestep_window_edits_only_its_steps_and_an_empty_one_writes_nothing(own_run):
    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import delta_for
    from hmine.stages.sample import make_sampler

    config, labeller = own_run
    sampler = make_sampler(config, None)
    timesteps = sampler.timesteps.tolist()
    # the window [t_1, t_1] edits the middle step only
    window = {"t_edit": timesteps[1], "t_edit_max": timesteps[1], "scales": [4.0]}
    windowed = config.model_copy(update={"edit": config.edit.model_copy(update=window)})
    assert run_edit_stage(windowed, labeller=labeller, show_progress=False).computed == 2
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    name = "probe/is_left_bright"
    selected = direction_by_name(open_directions(directions_path(config)), name)
    delta = delta_for(selected["direction"].values, selected["scale_unit"].values, 4.0)
    seeds = edits["sample"].values.tolist()
    middle_only = sampler.sample(seeds, delta_h=delta, edit_steps=[False, True, False], record_h=False)
    every_step = sampler.sample(seeds, delta_h=delta, record_h=False)
    stored = edits["images"].sel(direction=name, scale=4.0).values
    np.testing.assert_array_equal(stored, middle_only.images.numpy())
    assert np.abs(stored - every_step.images.numpy()).max() > 1e-3

    # a window between two timesteps edits nothing: refused before the store is touched
    uuid = open_group(config.run_dir / "edits.zarr").attrs["hmine:store_uuid"]
    empty = {"t_edit": timesteps[1] + 1, "t_edit_max": timesteps[0] - 1}
    assert timesteps[0] - 1 >= timesteps[1] + 1
    empty_window = config.model_copy(update={"edit": config.edit.model_copy(update=empty)})
    with pytest.raises(ValueError, match="edit.t_edit / edit.t_edit_max"):
        run_edit_stage(empty_window, labeller=labeller, show_progress=False)
    assert open_group(config.run_dir / "edits.zarr").attrs["hmine:store_uuid"] == uuid


def test_a_run_killed_between_the_edits_and_their_effects_table_measures_them_on_rerun(own_run, monkeypatch):
    import hmine.stages.edit_shards as edit_stage  # the edit stage's finishing step

    config, labeller = own_run
    changed = config.model_copy(update={"edit": config.edit.model_copy(update={"scales": [-3.0, 3.0]})})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while measuring the effects")

    with monkeypatch.context() as patch:
        patch.setattr(edit_stage, "measure_effects", killed)
        with pytest.raises(KeyboardInterrupt):
            run_edit_stage(changed, labeller=labeller, show_progress=False)
    # the edits are complete, the table is still the previous config's: it is measured again
    rerun = run_edit_stage(changed, labeller=labeller, show_progress=False)
    assert rerun.computed == 0
    effects = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    assert sorted(set(effects["scale"])) == [-3.0, 0.0, 3.0]


def test_scale_zero_is_bit_identical_also_when_the_last_edit_batch_is_cut_short(tiny_pixel_model_dir, tmp_path):
    # the sample stage drew seeds 4..7 as one batch; editing 5 samples must not regenerate
    # seed 4 alone (CPU kernels differ with the batch size, by ~1e-5)
    config = load_config(
        None,
        [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=cut", "sample.n_samples=8",
         "sample.batch_size=4", "sample.num_inference_steps=3", "sample.eta=1.0", "label.attributes=[is_left_bright]",
         "directions.pca_components=2", "directions.top_k=3", "edit.n_samples=5", "edit.scales=[2]",
         "edit.directions=[probe/is_left_bright]"],
    )
    labeller = LeftBrightLabeller()
    run_through_edit(config, labeller)
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:5]
    np.testing.assert_array_equal(edits["images"].isel(direction=0).sel(scale=0.0).values, x0)


def test_per_image_jacobian_directions_go_through_the_edit_stage(own_run, tmp_path):
    """jacobian/<variant>/<k> (per step) and jacobian/<variant>/<k>@t<step> (global at t):
    each analysed sample is edited along its own vector; the others are not edited, and
    the effects are measured on the analysed samples only."""
    import torch

    from hmine.directions import projection_std
    from hmine.editing import regenerate_with_delta
    from hmine.pipeline import stage_status
    from hmine.stages.jacobian import run_jacobian_stage
    from hmine.stages.sample import make_sampler

    base, labeller = own_run  # sample, label and direction stages done
    names = ["jacobian/masked/0", "jacobian/localised/1@t333", "probe/is_left_bright"]
    config = base.model_copy(update={
        "jacobian": base.jacobian.model_copy(update={"n_samples": 3, "k": 2, "steps": [333], "mask": "shape", "localised_rank": 4}),
        "edit": base.edit.model_copy(update={"directions": names}),
    })
    with pytest.raises(FileNotFoundError, match="run the jacobian stage first"):
        run_edit_stage(config, labeller=labeller, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    run_edit_stage(config, labeller=labeller, show_progress=False)

    edits = open_group(config.run_dir / "edits.zarr")
    jac = open_group(config.run_dir / "jacobian.zarr")
    np.testing.assert_array_equal(edits["edited"][0], [True] * 3 + [False] * 5)
    assert edits["edited"][2].all()
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:8]
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    sampler = make_sampler(config)
    run_steps = [int(t) for t in sampler.timesteps]
    for d, (array, k, global_at) in enumerate([("vectors", 0, None), ("localised_vectors", 1, 333)]):
        # by hand: sample 1's own vector, per step (only step 333) or at every step
        vector = jac[array][1, 0, k]
        units = np.zeros((1, len(run_steps), *vector.shape), dtype=np.float32)
        if global_at is None:
            units[0, run_steps.index(333)] = vector
        else:
            units[0, :] = vector
        delta = torch.from_numpy(4.0 * projection_std(units, h)[0].astype(np.float32)[:, None, None, None] * units[0])
        seeds = list(range(4))  # sample 1 in the sample stage's batch of 4
        full = torch.zeros(4, *delta.shape)
        full[1] = delta
        expected = regenerate_with_delta(sampler, seeds, full)[1]
        np.testing.assert_allclose(edits["images"][d, 2, 1], expected, atol=1e-5)
        assert np.abs(edits["images"][d, 2, 1] - x0[1]).max() > 1e-3  # it does edit
        np.testing.assert_array_equal(edits["images"][d, 2, 3:], x0[3:])  # samples without a direction: as sampled
        np.testing.assert_array_equal(edits["images"][d, 1], x0)  # scale 0: exact

    effects = pd.read_parquet(config.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    scores = labeller.score(np.asarray(edits["images"][0, 2, :3]))["is_left_bright"]
    assert effects.loc[("jacobian/masked/0", 4.0, "is_left_bright"), "mean_score"] == pytest.approx(scores.mean())
    assert {s.stage: s.state for s in stage_status(config.run_dir, config)}["edit"] == "complete"
    # the report shows the strips of the Jacobian directions
    from hmine.report import build_report

    page = build_report(config.model_copy(update={"report_root": tmp_path / "reports"}))
    text = page.read_text()
    assert "Edits along per-image Jacobian directions" in text
    assert (page.parent / "img" / "jacobian_masked_0.png").exists() and "img/jacobian_masked_0.png" in text
    # a recomputed Jacobian store makes these edits stale
    open_group(config.run_dir / "jacobian.zarr", mode="r+").attrs["hmine:store_uuid"] = "recomputed"
    status = {s.stage: s for s in stage_status(config.run_dir, config)}["edit"]
    assert status.state == "stale" and "jacobian" in status.detail


@pytest.mark.parametrize(
    "name, message",
    [("jacobian/masked/5", "holds k=2"), ("jacobian/masked/0@t999", "analysed the steps"),
     ("jacobian/sideways/0", "is not a Jacobian direction"), ("jacobian/masked/x", "is not a Jacobian direction"),
     ("jacobian/localised/0", "no localised directions")],
)
def test_bad_jacobian_direction_names_are_refused_with_the_fix(own_run, name, message):
    from hmine.stages.jacobian import run_jacobian_stage

    base, labeller = own_run
    config = base.model_copy(update={
        "jacobian": base.jacobian.model_copy(update={"n_samples": 2, "k": 2, "steps": [333]}),
        "edit": base.edit.model_copy(update={"directions": [name]}),
    })
    run_jacobian_stage(config, show_progress=False)
    before = sorted(p.name for p in config.run_dir.iterdir())
    with pytest.raises(ValueError, match=message):
        run_edit_stage(config, labeller=labeller, show_progress=False)
    assert sorted(p.name for p in config.run_dir.iterdir()) == before


def test_an_edit_store_from_before_the_edited_array_is_resumed_over_every_sample(own_run):
    """A store written before `edited` existed (same config hash) gets the array back on
    resume, meaning 'every sample has the direction': its effects stay measured over all."""
    config, labeller = own_run
    path = config.run_dir / "edits.zarr"
    reference = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    shutil.rmtree(path / "edited")
    (config.run_dir / "edit_effects.parquet").unlink()  # e.g. killed before the table
    again = run_edit_stage(config, labeller=labeller, show_progress=False)
    assert again.computed == 0  # resumed: no direction edited again
    assert open_group(path)["edited"][...].all()
    pd.testing.assert_frame_equal(pd.read_parquet(config.run_dir / "edit_effects.parquet"), reference)


def test_resuming_an_edit_store_on_another_device_is_refused(own_run, monkeypatch):
    """Like samples.zarr (tests/test_provenance.py): model.device is in no hash, but one edit
    store holds one device's rounding; refused before the edit window is resolved."""
    import re

    import hmine.stages.edit_shards
    from hmine.stages.edit_shards import edit_directions, prepare_edit_stage
    from hmine.stores import StoreConfigMismatch

    config, labeller = own_run
    config = config.model_copy(update={"edit": config.edit.model_copy(update={"scales": [-3.0, 3.0]})})  # a new store
    path = config.run_dir / "edits.zarr"
    plan = prepare_edit_stage(config, labeller=labeller)
    edit_directions(config, plan.todo[:1], plan.identity, source=plan.state.source)  # killed after one direction
    group = open_group(path, mode="r+")
    assert group.attrs["hmine:device"] == "cpu"
    group.attrs["hmine:device"] = "cuda:NVIDIA H200"  # as if begun on a GPU
    message = (f"{re.escape(str(path))} was begun on cuda:NVIDIA H200, not cpu \\(model.device=cpu\\): its directions "
               "would mix two devices' numerics; resume it on cuda:NVIDIA H200, or remove it to edit every direction again$")
    with monkeypatch.context() as m:
        m.setattr(hmine.stages.edit_shards, "with_interval", lambda *a, **k: pytest.fail("the window was resolved first"))
        with pytest.raises(StoreConfigMismatch, match=f"^{message}"):
            run_edit_stage(config, labeller=labeller, show_progress=False)
    assert open_group(path)["done"][...].tolist() == [True, False]
    group.attrs["hmine:device"] = "cpu"  # back on the device it was begun on: it resumes
    assert run_edit_stage(config, labeller=labeller, show_progress=False).computed == 1
    group.attrs["hmine:device"] = "cuda:NVIDIA H200"  # a complete store is read on any device
    assert run_edit_stage(config, labeller=labeller, show_progress=False).computed == 0


def test_resuming_an_edit_store_with_the_other_compile_setting_is_refused(own_run, monkeypatch, caplog):
    """Like samples.zarr (tests/test_compile.py): model.compile is in no hash, but one edit
    store holds one rounding; a complete one is kept, and the log says how it was computed."""
    import re

    import hmine.compiling
    import hmine.stages.edit_shards
    from hmine.stages.edit_shards import edit_directions, prepare_edit_stage
    from hmine.stores import StoreConfigMismatch

    blocks = hmine.compiling.CompiledBlocks  # dynamo's eager backend: no inductor compile runs
    monkeypatch.setattr(hmine.compiling, "CompiledBlocks", lambda unet, backend: blocks(unet, "eager"))
    config, labeller = own_run
    eager = config.model_copy(update={"edit": config.edit.model_copy(update={"scales": [-2.0, 2.0]})})  # a new store
    compiled = eager.model_copy(update={"model": eager.model.model_copy(update={"compile": True})})
    path = config.run_dir / "edits.zarr"
    plan = prepare_edit_stage(eager, labeller=labeller)
    edit_directions(eager, plan.todo[:1], plan.identity, source=plan.state.source)  # killed after one direction
    assert open_group(path).attrs["hmine:compiled"] is False
    message = (f"{re.escape(str(path))} was begun with model.compile: false: its directions would mix compiled and "
               "eager numerics; resume it with model.compile: false, or remove it to edit every direction again$")
    with monkeypatch.context() as m:  # refused before the edit window is resolved (t_edit 'auto' measures curves)
        m.setattr(hmine.stages.edit_shards, "with_interval", lambda *a, **k: pytest.fail("the window was resolved first"))
        with pytest.raises(StoreConfigMismatch, match=f"^{message}"):
            run_edit_stage(compiled, labeller=labeller, show_progress=False)
    assert open_group(path)["done"][...].tolist() == [True, False]
    assert run_edit_stage(eager, labeller=labeller, show_progress=False).computed == 1  # set back: it resumes
    with caplog.at_level("INFO", logger="hmine.stages.edit_shards"):
        assert run_edit_stage(compiled, labeller=labeller, show_progress=False).computed == 0
    assert "is up to date (computed with model.compile: false, kept: compiling changes float rounding only)" in caplog.text
