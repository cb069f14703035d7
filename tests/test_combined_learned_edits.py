"""Learned edits in combinations and global at t: Δh_t, the block's mean and the delta block itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from test_learned_edits import _config

from hmine.directions import direction_by_name, open_directions
from hmine.editing import edit_steps_from
from hmine.learning.apply import images_of, regenerate_learned
from hmine.learning.store import learned_delta, load_block_editor
from hmine.regeneration import regenerate
from hmine.stages.directions import directions_path, run_directions_stage
from hmine.stages.edit import EDITS_STORE, run_edit_stage
from hmine.stages.label import run_label_stage
from hmine.stages.learn import block_path, learned_path, run_learn_stage
from hmine.stages.sample import make_sampler, run_sample_stage

ENTRIES = ["learned/red + 0.5*probe/is_red", "learned-block/red - 0.5*learned/red", "learned-block/red@t{t}",
           "learned-block-mean/red@t{t} - learned/red"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("combined-learned"))
    t = int(make_sampler(config).timesteps[1])  # a step the learn stage trained (its window is every step)
    entries = [e.format(t=t) for e in ENTRIES]
    config = config.model_copy(update={"edit": config.edit.model_copy(update={"directions": entries})})
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, show_progress=False)
    run_directions_stage(config)
    run_learn_stage(config, show_progress=False)
    run_edit_stage(config, show_progress=False)
    return config, t


def test_learned_combinations_and_global_at_t_are_the_sums_of_their_edits(run):
    config, t = run
    edits = xr.open_zarr(config.run_dir / EDITS_STORE, consolidated=False)
    assert bool(edits["done"].all())
    sampler = make_sampler(config)
    seeds = [int(s) for s in edits["sample"].values]
    j = [int(s) for s in sampler.timesteps].index(t)
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), config.edit.t_edit, config.edit.t_edit_max)
    learned = open_directions(learned_path(config))
    probe = direction_by_name(open_directions(directions_path(config)), "probe/is_red")
    block = load_block_editor(block_path(config, "red"), sampler.timesteps.tolist())
    kwargs = {"edit_steps": edit_steps, "asymmetric": config.edit.asymmetric, "batch_size": 4}
    for s, scale in enumerate(float(c) for c in edits["scale"].values):
        if scale == 0:
            continue
        images = edits["images"].isel(scale=s).values  # (direction, sample, ...)
        delta_h = learned_delta(learned, "learned/red", scale)  # (step, C, y, x)
        probe_delta = scale * probe["scale_unit"].values[:, None, None, None] * probe["direction"].values
        # Δh_t + 0.5 probe: one fixed delta, regenerated as the stage does
        fixed = (delta_h + 0.5 * torch.from_numpy(probe_delta.astype(np.float32)))[None]
        expected = images_of(regenerate(sampler, seeds, fixed, [0] * len(seeds), **kwargs), len(seeds))
        np.testing.assert_allclose(images[0], expected, atol=1e-5)
        # block - 0.5 Δh_t at coefficient c: h + c (f(h, t) - 0.5 Δh_t), by a hand-written editor
        unit_delta = learned_delta(learned, "learned/red", 1.0)

        def block_minus_half(h, i, timestep):
            return block(h, i, timestep) - 0.5 * unit_delta[i].to(h)

        expected = images_of(regenerate_learned(sampler, seeds, block_minus_half, [scale] * len(seeds), **kwargs), len(seeds))
        np.testing.assert_allclose(images[1], expected, atol=1e-5)
        alone = images_of(regenerate_learned(sampler, seeds, block, [scale] * len(seeds), **kwargs), len(seeds))
        assert np.abs(alone - expected).max() > 1e-4  # the Δh_t term does change the edit
        # the block global at t: f(h, t) with the time input of step j at every step
        expected = images_of(regenerate_learned(sampler, seeds, lambda h, i, timestep: block(h, j, sampler.timesteps[j]),
                                                [scale] * len(seeds), **kwargs), len(seeds))  # fmt: skip
        np.testing.assert_allclose(images[2], expected, atol=1e-5)
        assert np.abs(alone - expected).max() > 1e-4
        # the block's mean edit at step j, at every step, minus Δh_t
        mean = learned_delta(learned, "learned-block-mean/red", scale)
        fixed = (mean[j].expand_as(mean) - delta_h)[None]
        expected = images_of(regenerate(sampler, seeds, fixed, [0] * len(seeds), **kwargs), len(seeds))
        np.testing.assert_allclose(images[3], expected, atol=1e-5)
