"""hmine.regeneration and hmine.branching: edited images as rows, without redundant U-Net passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmine.branching import BranchedForward, supports_branching
from hmine.editing import edit_steps_from, regenerate_with_delta
from hmine.hooks import HSpaceHook, h_shape
from hmine.models import load_model
from hmine.regeneration import first_edited_step, regenerate, rows_per_call, unedited_states
from hmine.sampling import Sampler

SEEDS = list(range(16))
BATCH = 16  # the branched call runs 8 rows down: at fewer, CPU kernels change with the batch size


@pytest.fixture(scope="module")
def sampler():
    return Sampler(load_model(), num_inference_steps=4, eta=[0.0, 1.0, 0.5, 0.0])


@pytest.fixture(scope="module")
def deltas(sampler):
    shape = h_shape(sampler.model.unet)
    generator = torch.Generator().manual_seed(3)
    return 0.5 * torch.randn((3, 4, *shape), generator=generator)


def _images(sampler, seeds, deltas, index, **kwargs) -> np.ndarray:
    out = {}
    for rows, images in regenerate(sampler, seeds, deltas, index, **kwargs):
        out.update(zip(rows.tolist(), images))
    return np.stack([out[r] for r in range(len(seeds))])


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("window", [(None, None), (None, 500), (300, 700)])
def test_a_zero_delta_reproduces_the_sampler_bit_for_bit(sampler, asymmetric, window):
    reference = sampler.sample(SEEDS, record_h=False).images.numpy()
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), *window)
    zero = torch.zeros((1, 4, *h_shape(sampler.model.unet)))
    images = _images(sampler, SEEDS, zero, [0] * len(SEEDS), edit_steps=edit_steps, asymmetric=asymmetric, batch_size=BATCH)
    np.testing.assert_array_equal(images, reference)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_edited_rows_equal_the_plain_sampler_and_do_not_depend_on_their_grouping(sampler, deltas, asymmetric):
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), None, 700)
    # the plain sampler: one batch per delta, two U-Net passes per asymmetric step
    reference = np.stack(
        [regenerate_with_delta(sampler, SEEDS, deltas[d], t_edit_max=700, asymmetric=asymmetric) for d in range(3)]
    )
    # all 48 rows, shuffled, so every call mixes seeds and deltas
    order = np.random.default_rng(0).permutation(48)
    seeds = [SEEDS[r % 16] for r in order]
    index = [r // 16 for r in order]
    images = _images(sampler, seeds, deltas, index, edit_steps=edit_steps, asymmetric=asymmetric, batch_size=BATCH)
    for position, r in enumerate(order):
        np.testing.assert_array_equal(images[position], reference[r // 16, r % 16], err_msg=f"row {r}")
    assert np.abs(reference[0] - reference[1]).max() > 1e-2  # the deltas do edit


def test_shared_start_states_are_the_unedited_trajectory(sampler):
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), None, 300)
    first = first_edited_step(edit_steps)
    assert first == 2  # timesteps 750 and 500 run unedited
    states = unedited_states(sampler, SEEDS, first, BATCH)
    trajectory = sampler.sample(SEEDS, record_h=False, return_trajectory=True).trajectory
    np.testing.assert_array_equal(states.numpy(), trajectory[:, first].numpy())
    np.testing.assert_array_equal(unedited_states(sampler, SEEDS[:3], 0, BATCH).numpy(), trajectory[:3, 0].numpy())


@pytest.mark.parametrize("position", ["before", "middle", "after"])
def test_the_branched_forward_gives_both_eps_of_two_passes(sampler, position):
    unet = sampler.model.unet
    assert supports_branching(unet)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, *sampler.model.sample_shape), generator=generator)
    t = torch.full((BATCH,), 501)
    delta = torch.randn((BATCH, *h_shape(unet, position)), generator=generator)
    with torch.inference_mode():
        with HSpaceHook(unet, position, record=False) as hook:
            plain = unet(x, t).sample
            hook.delta = delta
            edited = unet(x, t).sample
        with BranchedForward(unet, position) as branched:
            branched.delta = delta
            both = unet(x, t).sample
    assert both.shape[0] == 2 * BATCH
    torch.testing.assert_close(both[:BATCH], plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[BATCH:], edited, rtol=0, atol=1e-5)
    assert (edited - plain).abs().max() > 1e-3


def test_the_branched_forward_on_a_text_conditional_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900])
    text = torch.randn(3, 5, 12)
    with torch.inference_mode():
        with HSpaceHook(unet, "after") as hook:
            unet(x, t, encoder_hidden_states=text)
        delta = torch.randn(hook.recorded[0].shape)
        with HSpaceHook(unet, "after", record=False) as hook:
            plain = unet(x, t, encoder_hidden_states=text).sample
            hook.delta = delta
            edited = unet(x, t, encoder_hidden_states=text).sample
        with BranchedForward(unet, "after") as branched:
            branched.delta = delta
            both = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(both[:3], plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[3:], edited, rtol=0, atol=1e-5)


def test_rows_per_call_and_refusals(sampler, deltas):
    assert rows_per_call(sampler, 64, asymmetric=True) == 32  # each row goes up twice
    assert rows_per_call(sampler, 64, asymmetric=False) == 64
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        rows_per_call(sampler, 0, asymmetric=False)
    with pytest.raises(ValueError, match="one per row"):
        next(regenerate(sampler, [0, 1], deltas, [0], edit_steps=[True] * 4))
    with pytest.raises(ValueError, match="no step is edited"):
        first_edited_step([False] * 4)


def test_auto_batch_size_picks_a_measured_candidate(sampler):
    from hmine.batching import choose_batch_size

    assert choose_batch_size(sampler, candidates=(8, 16), repeats=1) in (8, 16)


def test_an_edit_store_keeps_the_batch_size_it_was_made_with(sampler):
    from hmine.batching import AUTO_CANDIDATES
    from hmine.stages.edit import UNET_BATCH_SIZE, unet_batch_size

    class Store:
        def __init__(self):
            self.attrs = {}

    store = Store()
    assert unet_batch_size(store, sampler, 32) == 32 and store.attrs[UNET_BATCH_SIZE] == 32
    assert unet_batch_size(store, sampler, "auto") == 32  # resumed: the recorded size, not a new one
    measured = Store()
    assert unet_batch_size(measured, sampler, "auto") in AUTO_CANDIDATES
