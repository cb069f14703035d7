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
