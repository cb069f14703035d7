"""The embedded default on its own world: the shipped DDPM, the classifier, and directions
checked against the world's ground-truth factors (a smaller N than the demo; thresholds
are set below what the demo-size run measures, see the issue notes)."""

import numpy as np
import pandas as pd
import pytest

from hmine.config import load_config
from hmine.models import load_model
from hmine.sampling import Sampler


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
         "edit.directions=[probe/is_circle, conditional/probe/is_circle|is_red, probe/is_red]",
         "edit.n_samples=32", "edit.scales=[-3.0, 3.0]"],
    )
    for stage in ("sample", "label", "directions", "edit"):
        run_stage(stage, config)
    return config


def test_labels_recover_the_world_distribution(world_run):
    labels = pd.read_parquet(world_run.run_dir / "labels.parquet")
    circle, red = labels["is_circle"] > 0.5, labels["is_red"] > 0.5
    # the deliberate correlation survives generation: most circles are red, other shapes rarely
    assert red[circle].mean() > 0.6 and red[~circle].mean() < 0.5


def test_probe_directions_flip_the_classifier(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    for attribute in ("is_circle", "is_red"):
        up = effects.loc[(f"probe/{attribute}", 3.0, attribute), "flip_to_positive"]
        down = effects.loc[(f"probe/{attribute}", -3.0, attribute), "flip_to_negative"]
        assert max(up, down) >= 0.7, (attribute, up, down)


def test_conditional_direction_leaks_less_onto_the_correlated_factor(world_run):
    effects = pd.read_parquet(world_run.run_dir / "edit_effects.parquet").set_index(["direction", "scale", "attribute"])
    raw = abs(effects.loc[("probe/is_circle", 3.0, "is_red"), "mean_change"])
    conditional = abs(effects.loc[("conditional/probe/is_circle|is_red", 3.0, "is_red"), "mean_change"])
    assert conditional < raw, (raw, conditional)
