"""The embedded default on its own world: the shipped DDPM, the classifier, and directions
checked against the world's ground-truth factors (a smaller N than the demo; thresholds
are set below what the demo-size run measures, see the issue notes)."""

import numpy as np
import pandas as pd
import pytest

from hmine.config import load_config
from hmine.models import load_model
from hmine.sampling import Sampler

pytestmark = pytest.mark.slow  # starts hmine processes or whole runs


def test_embedded_ddpm_loads_through_the_public_loader_and_samples():
    model = load_model("embedded:shapes-ddpm")
    assert model.kind == "pixel" and model.sample_shape == (3, 32, 32)
    out = Sampler(model, num_inference_steps=10).sample([0, 1])
    assert out.images.shape == (2, 3, 32, 32) and out.h.shape == (2, 10, 128, 8, 8)
    assert out.images.abs().max() <= 1.0 + 1e-5  # clip_sample keeps x0 in range


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    from hmine.pipeline import run_stage

    root = tmp_path_factory.mktemp("world")
    config = load_config(
        None,
        [f"output_root={root}", "name=w", "sample.n_samples=256", "sample.batch_size=64",
         "label.attributes=[is_circle, is_red]", "directions.pca_components=4", "directions.top_k=40",
         "directions.conditional={is_circle: [is_red]}",
         "edit.directions=[mean_difference/is_circle, conditional/mean_difference/is_circle|is_red, "
         "mean_difference/is_red, probe/is_red]",
         "edit.n_samples=32", "edit.scales=[-20.0, 20.0, 40.0]"],
    )
    for stage in ("sample", "label", "directions", "edit"):
        run_stage(stage, config)
    return config


def test_labels_recover_the_world_distribution(world_run):
    labels = pd.read_parquet(world_run.run_dir / "labels.parquet")
    circle, red = labels["is_circle"] > 0.5, labels["is_red"] > 0.5
    # the deliberate correlation survives generation (world: 0.80 against 0.33)
    assert red[circle].mean() > red[~circle].mean() + 0.2
    assert 0.15 < circle.mean() < 0.5


def test_probes_decode_the_factors_from_h(world_run):
    import xarray as xr

    from hmine.directions import LinearProbe, direction_by_name, open_directions

    directions = open_directions(world_run.run_dir / "directions.zarr")
    h = xr.open_zarr(world_run.run_dir / "samples.zarr", consolidated=False)["h"]
    labels = pd.read_parquet(world_run.run_dir / "labels.parquet")
    for attribute in ("is_circle", "is_red"):
        # the stage's probes, in 16 principal components per step (measured at N=256:
        # is_circle 0.72-0.94, is_red 0.89-0.98 over the steps with 32)
        accuracy = direction_by_name(directions, f"probe/{attribute}")["probe_accuracy"].values
        assert accuracy.max() >= 0.8, (attribute, accuracy)
        # probes on raw h decode at the last step (measured: 0.98 / 1.00), and better
        # than at the first (0.80 / 0.86): the factor is linearly in h once the image has formed
        raw = LinearProbe().fit(h.isel(step=[0, -1]), labels[attribute])
        first, last = raw.heldout_accuracy_.values
        assert last >= 0.8 and last > first, (attribute, first, last)


def test_the_correlated_pair_leaks_into_raw_directions_and_conditioning_removes_it(world_run):
    from hmine.directions import direction_by_name, open_directions

    directions = open_directions(world_run.run_dir / "directions.zarr")
    unit = lambda name: direction_by_name(directions, name)["direction"].values.reshape(10, -1)  # noqa: E731
    circle, red = unit("mean_difference/is_circle"), unit("mean_difference/is_red")
    conditional = unit("conditional/mean_difference/is_circle|is_red")
    raw_cos = (circle * red).sum(axis=1)
    cond_cos = (conditional * red).sum(axis=1)
    # circles are mostly red, so the raw circle direction points partly along red ...
    assert raw_cos[-3:].min() > 0.1, raw_cos
    # ... and the conditional one does not, at any step
    assert np.abs(cond_cos).max() < 1e-6, cond_cos


def test_edits_change_the_images_and_measure_every_attribute(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet")
    assert {"is_circle", "is_red", "size", "p_square"} <= set(effects["attribute"])
    import xarray as xr

    edits = xr.open_zarr(world_run.run_dir / "edits.zarr", consolidated=False)["images"]
    change = abs(edits - edits.sel(scale=0.0)).mean(dim=["sample", "color", "height", "width"])
    assert (change.sel(scale=[-20.0, 20.0]).values > 0.01).all()


def test_a_mean_difference_direction_flips_its_attribute(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    # measured on these 256 samples / 32 edits: 0.80 of the non-red samples turn red at +20
    assert effects.loc[("mean_difference/is_red", 20.0, "is_red"), "flip_to_positive"] >= 0.7


def test_the_report_table_of_flip_rates_reads_the_effects(world_run):
    from hmine.report import best_flip_rates

    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet")
    flips = best_flip_rates(effects)
    assert set(flips.index) == {"mean_difference/is_circle", "conditional/mean_difference/is_circle|is_red",
                                "mean_difference/is_red", "probe/is_red"}
    row = flips.loc["conditional/mean_difference/is_circle|is_red"]
    assert row["attribute"] == "is_circle"
    by_key = effects.set_index(["direction", "scale", "attribute"])
    # negative scales count positives turning negative, positive scales the reverse
    assert row["-20"] == by_key.loc[("conditional/mean_difference/is_circle|is_red", -20.0, "is_circle"), "flip_to_negative"]
    assert row["+40"] == by_key.loc[("conditional/mean_difference/is_circle|is_red", 40.0, "is_circle"), "flip_to_positive"]
    assert row["best flip rate"] == max(row["-20"], row["+20"], row["+40"]) and row["at scale"] in (-20.0, 20.0, 40.0)


def test_a_probe_direction_flips_its_attribute(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    # measured on these 256 samples / 32 edits: 0.70 of the non-red samples turn red at +40
    # (the demo, 1,024 samples / 64 edits: 0.85)
    assert effects.loc[("probe/is_red", 40.0, "is_red"), "flip_to_positive"] >= 0.5


def test_the_conditional_direction_at_least_halves_the_leakage(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    raw = abs(effects.loc[("mean_difference/is_circle", 20.0, "is_red"), "mean_change"])
    conditional = abs(effects.loc[("conditional/mean_difference/is_circle|is_red", 20.0, "is_red"), "mean_change"])
    # measured: +0.51 raw against +0.13 conditional; the intended effect stays positive (+0.15)
    assert conditional <= 0.5 * raw, (raw, conditional)
    assert effects.loc[("conditional/mean_difference/is_circle|is_red", 20.0, "is_circle"), "mean_change"] > 0


def _flip_rates(config, direction, attribute, scale, asymmetric, n=32):
    """Share of the first n samples on the far side of `attribute` whose decision flips."""
    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import delta_for, regenerate_with_delta
    from hmine.labelling import make_labeller
    from hmine.stages.sample import make_sampler

    labels = pd.read_parquet(config.run_dir / "labels.parquet")
    positive = labels[attribute] > 0.5
    seeds = labels.index[positive if scale < 0 else ~positive][:n].tolist()
    selected = direction_by_name(open_directions(config.run_dir / "directions.zarr"), direction)
    delta = delta_for(selected["direction"].values, selected["scale_unit"].values, scale)
    images = regenerate_with_delta(make_sampler(config), seeds, delta, asymmetric=asymmetric)
    after = make_labeller(config.label).score(images)[attribute].to_numpy() > 0.5
    return float((after != (scale < 0)).mean())


@pytest.mark.parametrize("direction, attribute, scale", [("probe/is_circle", "is_circle", -10.0), ("probe/is_red", "is_red", 20.0)])
def test_the_asymmetric_step_makes_probe_edits_flip_their_attribute(world_run, direction, attribute, scale):
    # Asyrp's step keeps the original eps in the direction term, so the edit is not half
    # undone there. Measured on these 256 samples (32 edited): is_circle at -10 std 0.69
    # symmetric against 0.97 asymmetric, is_red at +20 std 0.72 against 1.00 (the demo,
    # 1,024 samples / 64 edited: every probe >= 0.94 asymmetric)
    symmetric = _flip_rates(world_run, direction, attribute, scale, asymmetric=False)
    asymmetric = _flip_rates(world_run, direction, attribute, scale, asymmetric=True)
    assert asymmetric >= 0.8 and asymmetric > symmetric + 0.1, (symmetric, asymmetric)


def test_localised_jacobian_edits_stay_mostly_inside_the_shape(world_run, tmp_path):
    """The embedded model, shape masks at t=100, edits at that step only (the demo's
    settings). Measured on seeds 0 and 1: share of the change of eps inside the mask
    0.96 / 0.96 for the localised direction, 0.72 / 0.61 for the masked singular vector;
    of the final pixel change 0.69 / 0.66 against 0.54 / 0.39."""
    import shutil

    import xarray as xr

    from hmine.stages.jacobian import run_jacobian_stage

    # the Jacobian stage reads the samples only: a copy of them keeps the shared run as it is
    shutil.copytree(world_run.run_dir / "samples.zarr", tmp_path / world_run.name / "samples.zarr")
    config = world_run.model_copy(
        update={"output_root": tmp_path, "jacobian": world_run.jacobian.model_copy(update={
            "n_samples": 2, "k": 1, "steps": [100], "mask": "shape", "edit_window": "analysed_step",
            "localised_rank": 32, "edit_scales": [-15.0, 0.0, 15.0]})}
    )
    run_jacobian_stage(config, show_progress=False)
    jac = xr.open_zarr(config.run_dir / "jacobian.zarr", consolidated=False)
    pixel = jac["inside_mask_fraction"].to_pandas().T  # rows: variant
    eps = jac["inside_mask_eps_fraction"].to_pandas().T
    assert (eps.loc["localised"] > 0.85).all() and (eps.loc["localised"] > eps.loc["masked"]).all()
    assert (pixel.loc["localised"] > 0.55).all() and (pixel.loc["localised"] > pixel.loc["masked"]).all()
