"""SEGA concepts combined in one edit (``sega/a - 0.5*sega/b``): both concepts at once, each at its signed scale."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from test_label_stage import LeftBrightLabeller, run_through_edit
from test_sega_edits import _overrides

from hmine.config import load_config

ENTRIES = ["sega/is_left_bright - 0.5*sega/square", "sega/is_left_bright"]


@pytest.fixture(scope="module")
def combined_run(tiny_sd_dir, tmp_path_factory):
    config = load_config(None, _overrides(tiny_sd_dir, tmp_path_factory.mktemp("sega-combined"), directions=ENTRIES))
    run_through_edit(config, LeftBrightLabeller())
    return config


def test_a_combination_of_concepts_is_sega_with_all_of_them(combined_run, tiny_sd):
    from hmine.sega import Sega, SegaConcept, sample_sega
    from hmine.stages.sample import make_sampler
    from hmine.stores import open_group

    config = combined_run
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    seeds = edits["sample"].values.tolist()
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:5]
    sampler, sega = make_sampler(config, tiny_sd), config.edit.sega
    combined, alone = (edits["images"].sel(direction=e) for e in ENTRIES)
    np.testing.assert_array_equal(combined.sel(scale=0.0).values, x0)
    for scale in (-1.5, 1.0, 2.0):
        # by hand: one SEGA run with both concepts, is_left_bright at the scale, square at -0.5 x the scale
        both = (SegaConcept(**sega.scaled("is_left_bright", scale)), SegaConcept(**sega.scaled("square", -0.5 * scale)))
        expected = sample_sega(sampler, seeds, Sega(concepts=both, momentum_scale=sega.momentum_scale,
                                                    momentum_beta=sega.momentum_beta)).images.numpy()  # fmt: skip
        stored = combined.sel(scale=scale).values
        assert np.abs(stored - expected).max() <= 1e-5, scale
        assert np.abs(stored - alone.sel(scale=scale).values).max() > 1e-3  # the second concept changes the edit
