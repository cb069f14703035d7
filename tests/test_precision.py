"""model.precision: the U-Net under autocast below float32, the DDIM arithmetic in float32."""

from __future__ import annotations

import numpy as np
import pytest

from hmine.config import load_config
from hmine.models import load_model
from hmine.sampling import Sampler


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_bfloat16_is_close_to_float32_but_not_the_same(model):
    seeds = list(range(8))
    full = Sampler(model, num_inference_steps=4).sample(seeds)
    half = Sampler(model, num_inference_steps=4, precision="bfloat16").sample(seeds)
    assert half.images.dtype == full.images.dtype  # x_t and the steps stay float32
    difference = (half.images - full.images).abs()
    assert 0 < difference.max() < 0.5 and difference.mean() < 0.05
    relative_h = ((half.h.float() - full.h.float()).norm() / full.h.float().norm()).item()
    assert 0 < relative_h < 0.05


def test_the_regenerated_edits_follow_the_precision(model):
    import torch

    from hmine.hooks import h_shape
    from hmine.regeneration import regenerate

    sampler = Sampler(model, num_inference_steps=4, precision="bfloat16")
    zero = torch.zeros((1, 4, *h_shape(model.unet)))
    rows = [(r, im) for r, im in regenerate(sampler, list(range(8)), zero, [0] * 8, edit_steps=[True] * 4, batch_size=8)]
    images = np.concatenate([im for _, im in rows])
    np.testing.assert_array_equal(images, sampler.sample(list(range(8)), record_h=False).images.numpy())


def test_precision_joins_the_sample_hash_only_below_float32():
    default = load_config(None, [])
    explicit = load_config(None, ["model.precision=float32"])
    half = load_config(None, ["model.precision=bfloat16"])
    assert default.stage_hash("sample") == explicit.stage_hash("sample")
    assert half.stage_hash("sample") != default.stage_hash("sample")
    assert half.stage_hash("edit") != default.stage_hash("edit")  # downstream follows
    with pytest.raises(ValueError, match="precision"):
        load_config(None, ["model.precision=int8"])
    with pytest.raises(ValueError, match="model.precision"):
        Sampler(load_model(), precision="float64")
