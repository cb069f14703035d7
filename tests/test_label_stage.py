"""Label stage mechanics with a simple deterministic labeller (the real ones have their own tests)."""

import json

import numpy as np
import pandas as pd
import pytest

from hmine.config import load_config
from hmine.stages.label import (
    label_parts_identity,
    labels_path,
    read_labels,
    run_label_stage,
)
from hmine.stages.sample import run_sample_stage
from hmine.stores import table_meta


class LeftBrightLabeller:
    """Scores 'is_left_bright' from the left half's brightness minus the right half's; counts calls."""

    name = "left-bright"
    attributes = ("is_left_bright", "brightness")

    def __init__(self):
        self.calls = 0

    def score(self, images):
        self.calls += 1
        images = np.asarray(images, dtype=np.float64)
        half = images.shape[-1] // 2
        contrast = images[..., :half].mean(axis=(1, 2, 3)) - images[..., half:].mean(axis=(1, 2, 3))
        return pd.DataFrame({"is_left_bright": 1 / (1 + np.exp(-20 * contrast)), "brightness": images.mean(axis=(1, 2, 3))})


def run_through_edit(config, labeller):
    """Sample, label with ``labeller``, fit directions and edit: a small run up to its edits."""
    from hmine.stages.directions import run_directions_stage
    from hmine.stages.edit import run_edit_stage

    run_sample_stage(config, show_progress=False)
    run_label_stage(config, labeller=labeller, show_progress=False)
    run_directions_stage(config)
    run_edit_stage(config, labeller=labeller, show_progress=False)
    return config


@pytest.fixture
def sampled(tiny_pixel_model_dir, tmp_path):
    config = load_config(
        None,
        [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=lab", "sample.n_samples=10",
         "sample.batch_size=4", "sample.num_inference_steps=2", "label.batch_size=3", "label.attributes=[is_left_bright]"],
    )
    run_sample_stage(config, show_progress=False)
    return config


def test_labels_table_is_keyed_by_seed_and_matches_the_labeller(sampled):
    import xarray as xr

    labeller = LeftBrightLabeller()
    run_label_stage(sampled, labeller=labeller, show_progress=False)
    table = pd.read_parquet(labels_path(sampled))
    assert table.index.name == "seed" and list(table.index) == list(range(10))
    x0 = xr.open_zarr(sampled.run_dir / "samples.zarr", consolidated=False)["x0"].values
    expected = LeftBrightLabeller().score(x0)
    np.testing.assert_allclose(table["is_left_bright"].to_numpy(), expected["is_left_bright"].to_numpy())
    meta = table_meta(labels_path(sampled))
    assert meta["hmine:config_hash"] == sampled.stage_hash("label") and meta["hmine:complete"]
    assert read_labels(sampled).equals(table)


def test_rerun_is_skipped_and_a_killed_run_resumes_from_parts(sampled):
    labeller = LeftBrightLabeller()
    run_label_stage(sampled, labeller=labeller, show_progress=False)
    assert labeller.calls == 4
    again = run_label_stage(sampled, labeller=labeller, show_progress=False)
    assert again.computed == 0 and labeller.calls == 4
    # simulate a crash after two of four batches: the table gone, two parts left
    reference = pd.read_parquet(labels_path(sampled))
    labels_path(sampled).unlink()
    parts = sampled.run_dir / "labels.parts"
    parts.mkdir()
    (parts / "identity.json").write_text(json.dumps(label_parts_identity(sampled)))
    for b in range(2):
        reference.iloc[b * 3 : (b + 1) * 3].to_parquet(parts / f"part-{b:06d}.parquet")
    resumed = run_label_stage(sampled, labeller=labeller, show_progress=False)
    assert resumed.computed == 2 and resumed.skipped == 2
    pd.testing.assert_frame_equal(pd.read_parquet(labels_path(sampled)), reference)
    assert not parts.exists()


def test_unknown_attribute_is_refused_before_work(sampled):
    config = sampled.model_copy(update={"label": sampled.label.model_copy(update={"attributes": ["is_smiling"]})})
    with pytest.raises(ValueError, match="is_smiling"):
        run_label_stage(config, labeller=LeftBrightLabeller(), show_progress=False)
    assert not labels_path(config).exists()


def _crash_after_one_part(config, reference):
    parts = config.run_dir / "labels.parts"
    parts.mkdir()
    (parts / "identity.json").write_text(json.dumps(label_parts_identity(config)))
    reference.iloc[: config.label.batch_size].to_parquet(parts / f"part-{0:06d}.parquet")
    return parts


def test_a_rerun_at_another_batch_size_does_not_reuse_parts_that_cover_other_rows(sampled):
    labeller = LeftBrightLabeller()
    run_label_stage(sampled, labeller=labeller, show_progress=False)
    reference = pd.read_parquet(labels_path(sampled))
    labels_path(sampled).unlink()
    _crash_after_one_part(sampled, reference)  # killed after part 0 at batch size 3
    bigger = sampled.model_copy(update={"label": sampled.label.model_copy(update={"batch_size": 4})})
    assert bigger.stage_hash("label") == sampled.stage_hash("label")  # the table's identity is the same
    result = run_label_stage(bigger, labeller=labeller, show_progress=False)
    assert result.computed == 3 and result.skipped == 0  # the old part is not taken for rows 0-3
    pd.testing.assert_frame_equal(pd.read_parquet(labels_path(sampled)), reference)


def test_a_refused_attribute_leaves_the_work_in_progress_alone(sampled):
    labeller = LeftBrightLabeller()
    run_label_stage(sampled, labeller=labeller, show_progress=False)
    reference = pd.read_parquet(labels_path(sampled))
    labels_path(sampled).unlink()
    parts = _crash_after_one_part(sampled, reference)
    before = sorted(p.name for p in parts.iterdir())
    config = sampled.model_copy(update={"label": sampled.label.model_copy(update={"attributes": ["is_smiling"]})})
    with pytest.raises(ValueError, match="is_smiling"):
        run_label_stage(config, labeller=labeller, show_progress=False)
    assert sorted(p.name for p in parts.iterdir()) == before
    assert run_label_stage(sampled, labeller=labeller, show_progress=False).skipped == 1
