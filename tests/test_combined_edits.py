"""Combinations (``a - 0.5*b``) and directions global at t (``a@t333``) in the edit stage (hmine.edit_names)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import test_edit_stage

from hmine.combined_edits import combined_unit
from hmine.config import ConfigError, load_config
from hmine.directions import direction_by_name, open_directions, projection_std
from hmine.edit_names import EditTerm, parse_edit, term_names
from hmine.editing import regenerate_with_delta
from hmine.stages.directions import directions_path
from hmine.stages.edit import run_edit_stage
from hmine.stages.sample import make_sampler
from hmine.stores import open_group

run, own_run = test_edit_stage.run, test_edit_stage.own_run  # fixtures: a tiny run up to its edits, and a copy of it


def _unit(ds, name):
    selected = direction_by_name(ds, name)
    return selected["direction"].values.astype(np.float64), selected["scale_unit"].values.astype(np.float64)


def test_parsing_terms_weights_and_steps():
    assert parse_edit("probe/is_red") == [EditTerm("probe/is_red")]
    assert parse_edit("-0.5*learned-block/x + probe/a@t500 - 2e-1*pca/0") == [
        EditTerm("learned-block/x", -0.5), EditTerm("probe/a", 1.0, 500), EditTerm("pca/0", -0.2)]  # fmt: skip
    # a Jacobian direction's @t is its own ("global at t" of hmine.per_image)
    assert parse_edit("jacobian/localised/0@t100 + pca/1") == [EditTerm("jacobian/localised/0@t100"), EditTerm("pca/1")]
    assert term_names(["a + b", "b - 0.5*c@t3"]) == ["a", "b", "c"]


def test_an_entry_is_about_its_first_terms_attribute():
    from hmine.strength import direction_attribute

    assert direction_attribute("probe/is_red - 0.5*probe/is_circle") == "is_red"  # was is_circle: the last term's
    assert direction_attribute("conditional/mean_difference/is_red|is_circle@t500") == "is_red"
    assert direction_attribute("sega/is_left_bright - 0.5*sega/square") == "is_left_bright"
    assert direction_attribute("probe/is_red") == "is_red"


@pytest.mark.parametrize(
    "entry, message",
    [
        ("probe/a +0.5*pca/0", "is not a direction or a combination"),
        ("probe/a + ", "is not a direction or a combination"),
        ("probe/a@t5x", "is not a direction or a combination"),
        ("sega/glasses + probe/a", "SEGA concept"),
        ("sega/glasses@t500", "SEGA concept"),
    ],
)
def test_a_malformed_entry_is_refused_by_the_config_in_one_line(entry, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [f"output_root={tmp_path}", f"edit.directions=[{entry!r}]"])
    assert "edit.directions" in str(error.value) and len(str(error.value).strip().splitlines()) == 1


def test_combined_unit_sums_global_and_per_image_terms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(4, 3, 2, 2, 2))  # global; per image (4 samples)
    sa, sb = rng.uniform(1, 2, size=3), rng.uniform(1, 2, size=(4, 3))
    has_b = np.array([True, False, True, True])
    parts = {"a": (a, sa, np.ones(4, bool)), "b": (b, sb, has_b)}
    unit, scale_unit, has = combined_unit(parse_edit("a - 0.5*b"), parts.__getitem__, [30, 20, 10])
    expected = sa[:, None, None, None] * a - 0.5 * sb[..., None, None, None] * b
    np.testing.assert_allclose(unit, expected, rtol=1e-6)
    assert scale_unit.shape == (4, 3) and (scale_unit == 1).all() and (has == has_b).all()
    unit, scale_unit, _ = combined_unit(parse_edit("2*a@t20"), parts.__getitem__, [30, 20, 10])
    np.testing.assert_allclose(unit, np.broadcast_to(2 * sa[1] * a[1], a.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="is not one of the sampler's timesteps"):
        combined_unit(parse_edit("a@t25"), parts.__getitem__, [30, 20, 10])
    zero_at_10 = {"a": (a * np.array([1, 1, 0])[:, None, None, None], sa, np.ones(4, bool))}
    with pytest.raises(ValueError, match="is zero at that step"):
        combined_unit(parse_edit("a@t10"), zero_at_10.__getitem__, [30, 20, 10])


def test_a_step_that_is_not_a_timestep_is_refused_alike_by_the_preflight_and_the_edit():
    # one check (edit_names.at_step_index) for the edit stage's preflight and the edit / hmine.Run's terms
    from hmine.edit_names import check_at_steps

    ones = (np.ones((3, 2, 2, 2)), np.ones(3), np.ones(4, bool))
    parts = {"a": ones, "b": ones}
    message = r"^edit\.directions names a@t25, but 25 is not one of the sampler's timesteps \[30, 20, 10\]; pick one of them$"
    with pytest.raises(ValueError, match=message):
        check_at_steps(["b", "b + 0.5*a@t25"], [30, 20, 10])
    with pytest.raises(ValueError, match=message):
        combined_unit(parse_edit("b + 0.5*a@t25"), parts.__getitem__, [30, 20, 10])
    check_at_steps(["b + 0.5*a@t20", "jacobian/masked/0@t25"], [30, 20, 10])  # a timestep; a Jacobian's @t is its name


def test_combinations_and_global_at_t_edit_by_the_sum_of_their_deltas(own_run):
    """The stage's images of each entry at scale 4 against regenerate_with_delta of the
    deltas computed by hand from the stored directions (and the Jacobian store)."""
    from hmine.stages.jacobian import run_jacobian_stage

    base, labeller = own_run
    entries = ["probe/is_left_bright - 0.5*pca/0", "pca/1@t333", "jacobian/masked/0 + 2*pca/0", "probe/is_left_bright"]
    config = base.model_copy(update={
        "jacobian": base.jacobian.model_copy(update={"n_samples": 3, "k": 2, "steps": [333]}),
        "edit": base.edit.model_copy(update={"directions": entries}),
    })  # fmt: skip
    run_jacobian_stage(config, show_progress=False)
    run_edit_stage(config, labeller=labeller, show_progress=False)

    edits = open_group(config.run_dir / "edits.zarr")
    assert [str(n) for n in edits["direction"][...]] == entries and edits["done"][...].all()
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:8]
    ds = open_directions(directions_path(config))
    sampler = make_sampler(config)
    steps = [int(t) for t in sampler.timesteps]
    seeds = list(range(8))  # the first edit.n_samples samples
    probe, pca0, pca1 = (_unit(ds, n) for n in ("probe/is_left_bright", "pca/0", "pca/1"))

    def delta(unit, scale_unit):
        return scale_unit.reshape(*scale_unit.shape, 1, 1, 1) * unit

    # a - 0.5*b: the sum of the two deltas
    combined = 4.0 * (delta(*probe) - 0.5 * delta(*pca0))
    expected = regenerate_with_delta(sampler, seeds, torch.from_numpy(combined.astype(np.float32)))
    np.testing.assert_allclose(edits["images"][0, 2], expected, atol=1e-5)
    alone = np.asarray(edits["images"][3, 2])
    assert np.abs(alone - expected).max() > 1e-3  # the second term does change the edit
    # global at t: step 333's vector and scale unit at every step
    j = steps.index(333)
    at_t = 4.0 * np.broadcast_to(pca1[1][j] * pca1[0][j], pca1[0].shape)
    expected = regenerate_with_delta(sampler, seeds, torch.from_numpy(at_t.astype(np.float32)))
    np.testing.assert_allclose(edits["images"][1, 2], expected, atol=1e-5)
    per_step = regenerate_with_delta(sampler, seeds, torch.from_numpy((4.0 * delta(*pca1)).astype(np.float32)))
    assert np.abs(per_step - expected).max() > 1e-3  # not the per-step direction
    # a per-image Jacobian term plus a global one: the analysed samples (first 3) only
    np.testing.assert_array_equal(edits["edited"][2], [True] * 3 + [False] * 5)
    jac = open_group(config.run_dir / "jacobian.zarr")
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    units = np.zeros((3, len(steps), *jac["vectors"].shape[3:]), dtype=np.float32)
    units[:, j] = jac["vectors"][:, 0, 0]
    per_image = projection_std(units, h)[..., None, None, None] * units  # (sample, step, ...)
    hand = 4.0 * (per_image + 2.0 * delta(*pca0)[None])
    expected = regenerate_with_delta(sampler, seeds[:3], torch.from_numpy(hand.astype(np.float32)))
    np.testing.assert_allclose(edits["images"][2, 2, :3], expected, atol=1e-5)
    np.testing.assert_array_equal(edits["images"][2, 2, 3:], x0[3:])  # samples without the Jacobian term: as sampled
    for d in range(len(entries)):
        np.testing.assert_array_equal(edits["images"][d, 1], x0)  # scale 0: exact
    # the Python API takes the same entries and makes the same images
    import hmine
    from hmine.pipeline import write_run_config

    write_run_config(config)
    api = hmine.open_run(config.run_dir)
    for d, entry in enumerate(entries[:3]):
        image = api.edit(1, entry, [4.0]).values[0]
        np.testing.assert_allclose(image, edits["images"][d, 2, 1], rtol=1e-5, atol=1e-5)  # float32 sums in another order


@pytest.mark.parametrize(
    "entry, message",
    [("probe/is_left_bright - 0.5*pca/7", r"directions.zarr lacks"), ("pca/0@t334", "not one of the sampler's timesteps")],
)
def test_a_bad_term_is_refused_before_anything_is_written(own_run, entry, message):
    base, labeller = own_run
    config = base.model_copy(update={"edit": base.edit.model_copy(update={"directions": [entry]})})
    before = sorted(p.name for p in config.run_dir.iterdir())
    with pytest.raises(ValueError, match=message):
        run_edit_stage(config, labeller=labeller, show_progress=False)
    if "lacks" in message:  # refused in the preflight: the run directory is as it was
        assert sorted(p.name for p in config.run_dir.iterdir()) == before


def test_the_terms_of_a_combination_decide_which_stages_the_edits_read(tmp_path):
    from hmine.stages import get

    def reads(entry):
        return get("edit").optional_reads(load_config(None, [f"output_root={tmp_path}", f"edit.directions=[{entry!r}]"]))

    assert reads("probe/is_red") == ()
    assert reads("probe/is_red - 0.5*learned/red") == ("learn",)
    assert reads("pca/0@t500 + jacobian/masked/0") == ("jacobian",)
