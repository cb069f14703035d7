"""h-space directions from prompt pairs (issue 18, item 2) on a tiny SD-layout model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from hmine.prompt_directions import prompt_pair_direction
from hmine.prompts import TextConfig

STEPS = 3
PROMPT_A, PROMPT_B = "a circle", "a large red circle"


@pytest.fixture(scope="module")
def sampler(tiny_sd_dir):
    from hmine.models import load_model
    from hmine.sampling import Sampler

    text = TextConfig(prompts=[PROMPT_A], guidance_scale=5.0)
    return Sampler(load_model(str(tiny_sd_dir)), num_inference_steps=STEPS, torch_threads=1, text=text)


def _pipeline_h(pipe, seeds, prompt):
    """h of the conditional branch at every step, from diffusers' own pipeline (the reference)."""
    from hmine.hooks import HSpaceHook

    with HSpaceHook(pipe.unet, "after") as hook, torch.no_grad():
        pipe(prompt=[prompt] * len(seeds), guidance_scale=5.0, num_inference_steps=STEPS, output_type="latent",
             generator=[torch.Generator().manual_seed(s) for s in seeds])
    return torch.stack([h[len(seeds):] for h in hook.recorded], dim=1).double()


def test_prompt_pair_direction_is_the_mean_h_difference_over_the_same_seeds(sampler, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    seeds = [0, 1, 2, 3, 4]
    direction = prompt_pair_direction(sampler, seeds, PROMPT_A, PROMPT_B, batch_size=2)
    assert direction.dims == ("step", "channel", "y", "x") and direction.shape == (STEPS, 16, 4, 4)
    assert list(direction["step"].values) == [int(t) for t in sampler.timesteps]
    assert direction.attrs["prompt_b"] == PROMPT_B and direction.attrs["n_seeds"] == 5
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    expected = (_pipeline_h(pipe, seeds, PROMPT_B) - _pipeline_h(pipe, seeds, PROMPT_A)).mean(dim=0).numpy()
    assert np.abs(direction.values - expected).max() <= 1e-5
    assert np.abs(expected).max() > 1e-2  # the prompts do move h
    # reversed prompts, reversed direction; one prompt, no direction
    np.testing.assert_allclose(prompt_pair_direction(sampler, seeds, PROMPT_B, PROMPT_A, batch_size=5).values,
                               -direction.values, atol=1e-6)
    assert np.abs(prompt_pair_direction(sampler, seeds[:2], PROMPT_A, PROMPT_A).values).max() == 0


def test_prompt_pair_direction_takes_the_scale_convention(sampler):
    from hmine.directions import normalise_direction

    seeds = [5, 6, 7]
    out = sampler.sample(seeds)
    h = xr.DataArray(out.h.numpy(), dims=("sample", "step", "channel", "y", "x"),
                     coords={"sample": seeds, "step": np.asarray(sampler.timesteps, dtype=np.int64)})
    unit, scale = normalise_direction(prompt_pair_direction(sampler, seeds, PROMPT_A, PROMPT_B), h)
    norms = np.sqrt((unit.values**2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    assert scale.dims == ("step",) and (scale.values > 0).all()


def test_prompt_pair_direction_refuses_bad_input(sampler, tiny_sd_dir):
    with pytest.raises(ValueError, match="at least one seed"):
        prompt_pair_direction(sampler, [], PROMPT_A, PROMPT_B)
    with pytest.raises(ValueError, match=r"^prompt pair: the prompt .* over the tokenizer's limit"):
        prompt_pair_direction(sampler, [0], PROMPT_A, " ".join(["red"] * 30))


def _pair_run(tiny_sd_dir, root, *extra):
    import json

    from tiny_sd import PROMPTS

    from hmine.config import load_config

    pairs = {"pairs": {"is_left_bright": ["a circle", "a large red circle"], "blueness": ["a square", "a blue square"]},
             "n_seeds": 5}  # fmt: skip
    return load_config(None, [
        f"model.id={tiny_sd_dir}", f"output_root={root}", "name=pairs", "sample.n_samples=8", "sample.batch_size=4",
        f"sample.num_inference_steps={STEPS}", "sample.torch_threads=1",
        f"sample.text={json.dumps({'prompts': PROMPTS, 'guidance_scale': 5.0})}", "label.attributes=[is_left_bright]",
        "directions.pca_components=2", "directions.top_k=3", "directions.regression=false",
        f"directions.prompt_pairs={json.dumps(pairs)}", "edit.n_samples=3", "edit.scales=[-2,2]", "edit.batch_size=2",
        "edit.strip_samples=2", "edit.directions=[prompt_pair/is_left_bright]", *extra,
    ])  # fmt: skip


def test_the_directions_stage_stores_prompt_pair_directions_the_edit_stage_edits(tiny_sd_dir, tmp_path):
    from test_label_stage import LeftBrightLabeller, run_through_edit

    from hmine.directions import normalise_directions, open_directions
    from hmine.models import load_model
    from hmine.sampling import Sampler
    from hmine.stages.directions import directions_path
    from hmine.stores import open_group

    config = _pair_run(tiny_sd_dir, tmp_path)
    run_through_edit(config, LeftBrightLabeller())
    ds = open_directions(directions_path(config))
    names = list(ds["name"].values)
    assert names[-2:] == ["prompt_pair/is_left_bright", "prompt_pair/blueness"]
    assert list(ds["method"].values[-2:]) == ["prompt_pair"] * 2 and "mean_difference/is_left_bright" in names
    # the library's direction on the run's first 5 seeds, scaled by the run's h
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    sampler = Sampler(load_model(str(tiny_sd_dir)), num_inference_steps=STEPS, torch_threads=1,
                      text=TextConfig(prompts=["a red circle"], guidance_scale=5.0))  # fmt: skip
    seeds = h["sample"].values[:5].tolist()
    raws = [prompt_pair_direction(sampler, seeds, a, b) for a, b in [("a circle", "a large red circle"),
                                                                     ("a square", "a blue square")]]  # fmt: skip
    for i, (unit, scale) in enumerate(normalise_directions(raws, h)):
        stored = ds.isel(direction=len(names) - 2 + i)
        assert np.abs(stored["direction"].values - unit.values).max() <= 1e-6
        np.testing.assert_allclose(stored["scale_unit"].values, scale.values, rtol=1e-6)
    assert np.linalg.norm(raws[0].values) > 1e-2  # the prompts do move h
    # the edit stage edits it like any direction: the named rows differ from scale 0
    edits = open_group(config.run_dir / "edits.zarr")
    images = edits["images"][...]
    assert images.shape[:2] == (1, 3) and np.abs(images[0, 0] - images[0, 1]).max() > 1e-3
    # the hash: prompt pairs join it only when set
    without = config.model_copy(update={"directions": config.directions.model_copy(update={"prompt_pairs": None})})
    assert "prompt_pairs" not in without.stage_inputs("directions")["directions"]
    assert config.stage_hash("directions") != without.stage_hash("directions")


def test_prompt_pairs_that_cannot_be_sampled_are_refused_naming_the_field(tiny_sd_dir, tiny_pixel_model_dir, tmp_path):
    from hmine.config import ConfigError
    from hmine.preflight import check_run_inputs

    with pytest.raises(ConfigError, match=r"pair name 'a/b' must be letters"):
        _pair_run(tiny_sd_dir, tmp_path, 'directions.prompt_pairs={"pairs": {"a/b": ["x", "y"]}}')
    with pytest.raises(ConfigError, match=r"pair 'same': the two prompts are the same"):
        _pair_run(tiny_sd_dir, tmp_path, 'directions.prompt_pairs={"pairs": {"same": ["x", "x"]}}')
    world = "label.attributes=[is_red]"  # the world labeller scores it: the preflight reaches the pairs
    refusals = [
        (_pair_run(tiny_sd_dir, tmp_path, world, 'directions.prompt_pairs={"pairs": {"p": ["a", "b"]}, "n_seeds": 9}'),
         r"directions.prompt_pairs.n_seeds is 9 but the run has 8 samples; lower it"),
        (_pair_run(tiny_sd_dir, tmp_path, world, 'directions.prompt_pairs={"pairs": {"long": ["a", "' + "red " * 30 + '"]}}'),
         r"directions.prompt_pairs.pairs.long: the prompt 'red red .*' is \d+ tokens, over the tokenizer's limit"),
        (_pair_run(tiny_sd_dir, tmp_path, world, f"model.id={tiny_pixel_model_dir}", "sample.text=null"),
         r"directions.prompt_pairs needs a text-conditional model and sample.text"),
    ]  # fmt: skip
    for config, message in refusals:
        with pytest.raises(ValueError, match=message) as caught:
            check_run_inputs(config, ["sample", "directions"])
        assert "\n" not in str(caught.value)
        assert not (config.run_dir / "directions.zarr").exists()
