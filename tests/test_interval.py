"""Asyrp's editing interval (t_edit / t_boost auto) and quality boosting (hmine.interval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from test_label_stage import LeftBrightLabeller, run_through_edit

from hmine.config import ConfigError, EditConfig, load_config
from hmine.editing import edit_steps_from
from hmine.interval import (
    BoostedNoise,
    boosted_steps,
    distance_curves,
    embedding_for,
    first_timestep_reaching,
    resolve_interval,
    unedited_images,
    with_boosting,
)
from hmine.learning.apply import images_of
from hmine.models import load_model
from hmine.regeneration import SeedNoise, regenerate
from hmine.sampling import Sampler
from hmine.stages.edit import EDIT_INTERVAL
from hmine.stages.sample import make_sampler
from hmine.stores import open_group

SEEDS = [3, 7, 11, 20]


@pytest.fixture(scope="module")
def sampler(tiny_pixel_model_dir):
    return Sampler(load_model(str(tiny_pixel_model_dir)), num_inference_steps=5)


def test_the_edit_hash_is_unchanged_unless_the_interval_is_used():
    base = load_config(None)
    # the edit section as hashed before t_boost and edit.interval existed
    assert base.stage_inputs("edit")["edit"] == {
        "directions": [], "n_samples": 64, "scales": [-2.0, -1.0, 0.0, 1.0, 2.0], "t_edit": None, "t_edit_max": None,
        "asymmetric": False,
    }  # fmt: skip
    explicit = load_config(None, ["edit.t_boost=null", "edit.interval.boost_eta=1.0", "edit.interval.distance=features"])
    assert explicit.stage_hash("edit") == base.stage_hash("edit")
    changed = [["edit.t_boost=100"], ["edit.t_edit=auto"], ["edit.interval.boost_eta=0.5"], ["edit.t_boost=auto"]]
    hashes = {load_config(None, c).stage_hash("edit") for c in changed}
    assert base.stage_hash("edit") not in hashes and len(hashes) == len(changed)
    assert load_config(None, ["edit.t_edit=auto"]).stage_inputs("edit")["edit"]["interval"]["edit_threshold"] == 0.33


def test_bad_interval_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"edit\.t_boost \(300\) is above edit\.t_edit \(200\)"):
        load_config(None, ["edit.t_edit=200", "edit.t_boost=300"])
    with pytest.raises(ConfigError, match=r"edit\.t_edit"):
        load_config(None, ["edit.t_edit=sometimes"])
    with pytest.raises(ValueError, match="chosen by the edit stage"):
        edit_steps_from([900, 0], "auto")


def _hand_curves(sampler, seeds):
    """d(x0, P_t) and d(x0, x_t) / mean pairwise d(x0_a, x0_b), mean |pixel difference|, written out."""
    out = sampler.sample(seeds, record_h=False, return_trajectory=True)
    x0 = out.images.double().numpy()
    prediction, state = [], []
    for i, t in enumerate(sampler.timesteps):
        x = out.trajectory[:, i]
        with torch.no_grad():
            eps = sampler.model.unet(x, t.expand(len(seeds))).sample
        a_t = float(sampler.scheduler.alphas_cumprod[int(t)])
        p = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).double().numpy()
        prediction.append(np.mean([np.abs(x0[n] - p[n]).mean() for n in range(len(seeds))]))
        state.append(np.mean([np.abs(x0[n] - x[n].double().numpy()).mean() for n in range(len(seeds))]))
    pairs = [np.abs(x0[a] - x0[b]).mean() for a in range(len(seeds)) for b in range(a + 1, len(seeds))]
    return np.array(prediction) / np.mean(pairs), np.array(state) / np.mean(pairs)


def test_auto_t_edit_and_t_boost_follow_a_hand_computation_of_the_rule(sampler):
    timesteps = [int(t) for t in sampler.timesteps]
    prediction, state = _hand_curves(sampler, SEEDS)
    curves = distance_curves(sampler, SEEDS, *embedding_for("pixels", None))
    np.testing.assert_allclose(curves.to_prediction, prediction, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(curves.to_state, state, rtol=1e-5, atol=1e-8)
    # thresholds between the values of two steps, so the rule has one answer: the smallest
    # timestep whose distance reaches the threshold
    edit_threshold = float(np.sort(prediction)[2:4].mean())
    boost_threshold = float(np.sort(state)[1:3].mean())
    expected_edit = min(t for t, d in zip(timesteps, prediction) if d >= edit_threshold)
    expected_boost = min(t for t, d in zip(timesteps, state) if d >= boost_threshold)
    assert first_timestep_reaching(timesteps, prediction, edit_threshold) == expected_edit
    rule = {"distance": "pixels", "edit_threshold": edit_threshold, "boost_threshold": boost_threshold, "n_samples": 4}
    edit = EditConfig(t_edit="auto", t_boost="auto", interval=rule)
    interval = resolve_interval(sampler, edit, SEEDS + [99], labeller=None)  # only the first n_samples measure
    assert (interval.t_edit, interval.t_boost) == (expected_edit, expected_boost)
    assert interval.edit_steps == [t >= max(expected_edit, expected_boost) for t in timesteps]
    with pytest.raises(ValueError, match="edit_threshold"):
        resolve_interval(sampler, EditConfig(t_edit="auto", interval={**rule, "edit_threshold": 1e6}), SEEDS)


def test_the_feature_distance_is_the_world_classifiers(tmp_path):
    from hmine.labelling import make_labeller
    from hmine.quality import ClassifierFeatures

    config = load_config(None, ["sample.num_inference_steps=3", "sample.torch_threads=1"])
    world_sampler, labeller = make_sampler(config), make_labeller(config.label)
    curves = distance_curves(world_sampler, SEEDS, *embedding_for("features", labeller))
    features = ClassifierFeatures(labeller.model)
    final = features(world_sampler.sample(SEEDS, record_h=False).images).numpy()
    unit = np.mean([np.linalg.norm(final[a] - final[b]) for a in range(4) for b in range(a + 1, 4)])
    assert curves.unit == pytest.approx(unit, rel=1e-6)
    assert curves.to_prediction[-1] < 0.05 < curves.to_prediction[0]  # P_t of the last step is nearly x0
    with pytest.raises(ValueError, match="interval.distance: pixels"):
        embedding_for("features", LeftBrightLabeller())


def _edit(sampler, noise_source=None, seeds=SEEDS, t_edit=500):
    h_shape = sampler.sample([0], record_h=True).h.shape[1:]
    delta = torch.randn((1, *h_shape), generator=torch.Generator().manual_seed(5))
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), t_edit)
    rows = regenerate(sampler, seeds, delta, [0] * len(seeds), edit_steps=edit_steps, asymmetric=True, batch_size=4,
                      noise_source=noise_source)  # fmt: skip
    return images_of(rows, len(seeds))


def test_boosting_at_eta_0_or_t_boost_0_is_the_plain_edit_bit_for_bit(sampler):
    plain = _edit(sampler)
    assert with_boosting(sampler, None, 0, 1.0) == (sampler, None)  # no step below 0: nothing changes
    boosting, noise = with_boosting(sampler, None, 400, 0.0)  # steps 200 and 0 boosted at eta 0
    assert isinstance(noise, BoostedNoise) and boosting.etas == sampler.etas
    np.testing.assert_array_equal(_edit(boosting, noise), plain)
    boosting, noise = with_boosting(sampler, None, 400, 1.0)
    assert boosting.etas == [0.0, 0.0, 0.0, 1.0, 1.0] and sampler.etas == [0.0] * 5
    boosted = _edit(boosting, noise)
    assert np.abs(boosted - plain).max() > 1e-3


def test_boosting_regenerates_deterministically_from_the_seed(sampler):
    boosting, noise = with_boosting(sampler, None, 400, 1.0)
    once = _edit(boosting, noise)
    again = with_boosting(sampler, None, 400, 1.0)
    np.testing.assert_array_equal(_edit(*again), once)
    np.testing.assert_array_equal(_edit(boosting, noise, seeds=SEEDS[::-1])[::-1], once)  # other neighbours
    own = SeedNoise(sampler)(SEEDS)[1]
    fresh = noise(SEEDS)[1]
    assert torch.equal(fresh[:3], own[:3]) and not torch.allclose(fresh[3:], own[3:])  # fresh below t_boost only
    assert torch.equal(noise(SEEDS[2:3])[1], fresh[:, 2:3])  # a row's noise is its seed's alone


@pytest.fixture(scope="module")
def boosted_run(tiny_pixel_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("interval")
    settings = [
        f"model.id={tiny_pixel_model_dir}", f"output_root={root}", "name=iv", "sample.n_samples=12", "sample.batch_size=4",
        "sample.num_inference_steps=5", "label.attributes=[is_left_bright]", "directions.pca_components=1",
        "directions.regression=false", "edit.n_samples=4", "edit.scales=[3]", "edit.batch_size=4", "edit.asymmetric=true",
        "edit.directions=[probe/is_left_bright]", "edit.interval.distance=pixels", "edit.interval.n_samples=4",
    ]  # fmt: skip
    base = load_config(None, settings)
    curves = distance_curves(make_sampler(base), range(4), *embedding_for("pixels", None))
    thresholds = [f"edit.interval.edit_threshold={np.sort(curves.to_prediction)[3]}",
                  f"edit.interval.boost_threshold={np.sort(curves.to_state)[2]}"]  # fmt: skip
    config = load_config(None, [*settings, "edit.t_edit=auto", "edit.t_boost=auto", *thresholds])
    labeller = LeftBrightLabeller()
    run_through_edit(config, labeller)
    return config


def test_the_edit_stage_boosts_and_records_its_interval(boosted_run):
    import json

    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import delta_for
    from hmine.stages.directions import directions_path

    config = boosted_run
    sampler = make_sampler(config)
    interval = resolve_interval(sampler, config.edit, range(4))
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    recorded = json.loads(edits.attrs[EDIT_INTERVAL])
    assert (recorded["t_edit"], recorded["t_boost"]) == (interval.t_edit, interval.t_boost)
    assert any(boosted_steps(sampler.timesteps.tolist(), interval.t_boost))
    boosting, noise = with_boosting(sampler, None, interval.t_boost, 1.0)
    seeds = [int(s) for s in edits["sample"].values]
    np.testing.assert_array_equal(edits["images"].sel(scale=0.0).values[0], unedited_images(boosting, seeds, 4, noise))
    assert np.abs(edits["images"].sel(scale=0.0).values[0] - open_group(config.run_dir / "samples.zarr")["x0"][:4]).max() > 1e-3
    selected = direction_by_name(open_directions(directions_path(config)), "probe/is_left_bright")
    delta = delta_for(selected["direction"].values, selected["scale_unit"].values, 3.0)[None]
    rows = regenerate(boosting, seeds, delta, [0] * 4, edit_steps=interval.edit_steps, asymmetric=True, batch_size=4,
                      noise_source=noise)  # fmt: skip
    np.testing.assert_array_equal(edits["images"].sel(scale=3.0).values[0], images_of(rows, 4))
