"""SEGA concepts as edits of the edit stage (issue 18, item 2): ``edit.directions: [sega/<concept>]``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from test_label_stage import LeftBrightLabeller, run_through_edit
from tiny_sd import PROMPTS

from hmine.config import RunConfig, load_config

STEPS = 4
SEGA = {
    "concepts": {
        # named after the labeller's attribute, so matched strength reads it as a direction about it
        "is_left_bright": {"prompt": "a light background at the left", "warmup_steps": 1, "guidance_scale": 3.0,
                           "threshold": 0.8},
        "square": {"prompt": "a large square", "reverse": True, "warmup_steps": 2, "cooldown_steps": 4,
                   "guidance_scale": 2.0, "threshold": 0.6, "weight": 0.5},
    },
    "momentum_scale": 0.3,
    "momentum_beta": 0.6,
}
DIRECTIONS = ["sega/is_left_bright", "mean_difference/is_left_bright", "sega/square"]


def _overrides(model_dir, root, text=None, sega=SEGA, directions=DIRECTIONS) -> list[str]:
    text = {"prompts": PROMPTS, "guidance_scale": 5.0} if text is None else text
    overrides = [
        f"model.id={model_dir}", f"output_root={root}", "name=sega", "sample.n_samples=12", "sample.batch_size=4",
        f"sample.num_inference_steps={STEPS}", "sample.torch_threads=1", f"sample.text={json.dumps(text)}",
        "label.attributes=[is_left_bright]", "directions.pca_components=2", "directions.top_k=3",
        "directions.regression=false", "edit.n_samples=5", "edit.scales=[-1.5,1,2]", "edit.batch_size=2",
        "edit.strip_samples=2", f"edit.directions={json.dumps(directions)}",
    ]
    return overrides + ([f"edit.sega={json.dumps(sega)}"] if sega is not None else [])


@pytest.fixture(scope="module")
def sega_run(tiny_sd_dir, tmp_path_factory):

    config = load_config(None, _overrides(tiny_sd_dir, tmp_path_factory.mktemp("sega-run")))
    labeller = LeftBrightLabeller()
    run_through_edit(config, labeller)
    return config


def test_the_edit_stage_applies_sega_edit_to_the_samples_seeds(sega_run, tiny_sd):
    from hmine.sega import sega_edit
    from hmine.stages.sample import make_sampler
    from hmine.stores import open_group

    config = sega_run
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    assert list(edits["direction"].values) == DIRECTIONS and bool(edits["done"].all())
    assert list(edits["scale"].values) == [-1.5, 0.0, 1.0, 2.0]
    seeds = edits["sample"].values.tolist()
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:5]
    sampler = make_sampler(config, tiny_sd)
    for name in ("is_left_bright", "square"):
        images = edits["images"].sel(direction=f"sega/{name}")
        np.testing.assert_array_equal(images.sel(scale=0.0).values, x0)  # scale 0: the stored samples
        for scale in (-1.5, 1.0, 2.0):
            # the library's SEGA edit of all five seeds in one call (the stage's calls hold two)
            expected = sega_edit(sampler, seeds, config.edit.sega, name, scale).images.numpy()
            stored = images.sel(scale=scale).values
            assert np.abs(stored - expected).max() <= 1e-5, (name, scale)
            assert np.abs(stored - x0).max() > 1e-2  # the concept changed the images
    # an h-space direction in the same store is edited as before (scale 0 the samples, others not)
    h_space = edits["images"].sel(direction="mean_difference/is_left_bright")
    np.testing.assert_array_equal(h_space.sel(scale=0.0).values, x0)
    assert np.abs(h_space.sel(scale=2.0).values - x0).max() > 1e-3


def test_sega_edits_have_effects_strips_and_matched_strength_like_directions(sega_run):
    from hmine.stages.edit import strip_filename
    from hmine.strength import matched_strength

    config = sega_run
    effects = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    assert set(effects["direction"]) == set(DIRECTIONS)
    own = effects[(effects["direction"] == "sega/is_left_bright") & (effects["attribute"] == "is_left_bright")]
    assert sorted(own["scale"]) == [-1.5, 0.0, 1.0, 2.0] and np.isclose(own[own["scale"] == 0]["mean_change"], 0).all()
    assert (own[own["scale"] != 0]["mean_change"].abs() > 0).all()
    for name in DIRECTIONS:
        assert (config.run_dir / "edit_strips" / strip_filename(name)).is_file()
    strength = matched_strength(effects)
    assert "sega/is_left_bright" in strength.index.get_level_values("direction")
    assert "sega/square" not in strength.index.get_level_values("direction")  # no attribute of that name


def test_edit_sega_joins_the_edit_hash_only_when_set(tiny_sd_dir, tmp_path):
    # existing configs keep their edit hash: the values before edit.sega existed (at 52bfb0b:
    # 69333ffb6a7c4387, d9d0ff922131e4a5), changed since only by the embedded models' identity
    # taking in their config files (hmine.identity.IDENTITY_SUFFIXES)
    assert RunConfig().stage_hash("edit") == "46fd7b01720f93bc"
    assert load_config("configs/demo.yaml").stage_hash("edit") == "994aafe15a39c40d"
    with_sega = load_config(None, _overrides(tiny_sd_dir, tmp_path))
    without = load_config(None, _overrides(tiny_sd_dir, tmp_path, sega=None, directions=DIRECTIONS[1:2]))
    other_prompt = json.loads(json.dumps(SEGA))
    other_prompt["concepts"]["square"]["prompt"] = "a small square"
    changed = load_config(None, _overrides(tiny_sd_dir, tmp_path, sega=other_prompt))
    assert "sega" not in without.stage_inputs("edit")["edit"]
    assert with_sega.stage_inputs("edit")["edit"]["sega"]["concepts"]["square"]["threshold"] == 0.6
    assert with_sega.stage_hash("edit") != changed.stage_hash("edit")
    assert with_sega.stage_hash("directions") == without.stage_hash("directions")  # upstream unchanged


def test_sega_edits_that_cannot_be_applied_are_refused_naming_the_field(tiny_sd_dir, tiny_pixel_model_dir, tmp_path):
    from hmine.preflight import check_run_inputs

    def config(*extra, model=tiny_sd_dir, text=None, sega=SEGA, directions=DIRECTIONS):
        # a world attribute, so that the labeller's preflight passes and the SEGA check is reached
        return load_config(None, _overrides(model, tmp_path, text, sega, directions) + ["label.attributes=[is_red]", *extra])

    unguided = {"prompts": PROMPTS, "guidance_scale": 1.0}
    pixel = [o for o in _overrides(tiny_pixel_model_dir, tmp_path) if not o.startswith("sample.text=")] + ["label.attributes=[is_red]"]
    cases = [
        (config(sega=None), r"^edit\.directions names \['sega/is_left_bright', 'sega/square'\], but there is no edit\.sega"),
        (config(directions=["sega/blue"]), r"^edit\.directions names \['sega/blue'\], which edit\.sega\.concepts lacks"),
        (load_config(None, pixel), r"^edit\.directions names SEGA concepts .* need a text-conditional model: model\.id"),
        (config(text=unguided), r"sample\.text\.guidance_scale is 1; set it to another value"),
        (config("images.world.n=4", "edit.source=inversions"), r"^edit\.source is 'inversions' but SEGA concepts"),
        (config("edit.t_boost=100"), r"^edit\.t_boost is set but SEGA concepts"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            check_run_inputs(bad, ["edit"])
        assert "\n" not in str(error.value)
    check_run_inputs(config(), ["edit"])  # the run's own settings pass


@pytest.mark.parametrize("warmup", [STEPS, 10])
def test_a_concept_warming_up_past_the_last_step_is_refused(tiny_sd_dir, tmp_path, warmup):
    # SEGA applies a concept from step warmup_steps on: at warmup_steps >= the sampler's steps
    # (SEGA's default 10 at 10 steps) the edit would silently be the unedited sample
    from hmine.preflight import check_run_inputs

    def config(square_warmup, directions=DIRECTIONS):
        sega = json.loads(json.dumps(SEGA))
        sega["concepts"]["square"]["warmup_steps"] = square_warmup
        sega["concepts"]["square"].pop("cooldown_steps")
        return load_config(None, _overrides(tiny_sd_dir, tmp_path, sega=sega, directions=directions)
                           + ["label.attributes=[is_red]"])

    message = (rf"^edit\.sega\.concepts\.square\.warmup_steps is {warmup} but sample\.num_inference_steps is {STEPS}: "
               rf"the concept would never be applied; set warmup_steps below {STEPS}")
    with pytest.raises(ValueError, match=message) as error:
        check_run_inputs(config(warmup), ["edit"])
    assert "\n" not in str(error.value)
    check_run_inputs(config(STEPS - 1), ["edit"])  # applied at the last step: passes
    check_run_inputs(config(warmup, directions=DIRECTIONS[:2]), ["edit"])  # a concept no edit names: not checked


def test_an_editing_prompt_over_the_tokenizer_limit_is_refused_before_the_store(sega_run, tiny_sd, tmp_path):
    import shutil

    from hmine.stages.edit import run_edit_stage

    long_prompt = json.loads(json.dumps(SEGA))
    long_prompt["concepts"]["square"]["prompt"] = " ".join(["red"] * 30)
    shutil.copytree(sega_run.run_dir, tmp_path / "sega")
    config = sega_run.model_copy(update={"output_root": tmp_path, "edit": sega_run.edit.model_copy(
        update={"sega": sega_run.edit.sega.model_validate(long_prompt)})})
    before = (tmp_path / "sega" / "edits.zarr" / "zarr.json").read_bytes()
    with pytest.raises(ValueError, match=r"^edit\.sega\.concepts\.square\.prompt: the prompt .* over the tokenizer's limit"):
        run_edit_stage(config, model=tiny_sd, labeller=LeftBrightLabeller(), show_progress=False)
    assert (tmp_path / "sega" / "edits.zarr" / "zarr.json").read_bytes() == before  # nothing written
