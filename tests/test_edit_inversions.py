"""The edit stage on inverted images (edit.source: inversions), on a tiny pixel model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from test_inversion import _stage_config
from test_label_stage import LeftBrightLabeller

from hmine.config import ConfigError, load_config
from hmine.directions import open_directions
from hmine.inversion.edits import edit_inverted, inversion_from_store
from hmine.stages import up_to_date
from hmine.stages.directions import directions_path, run_directions_stage
from hmine.stages.edit import STRIPS_DIR, run_edit_stage, strip_filename
from hmine.stages.invert import make_inversion_sampler, run_invert_stage
from hmine.stages.label import run_label_stage
from hmine.stages.sample import run_sample_stage

SETTINGS = [
    "sample.n_samples=12", "sample.batch_size=4", "label.attributes=[is_left_bright]", "directions.pca_components=2",
    "directions.top_k=4", "directions.regression=false", "edit.source=inversions", "edit.n_samples=5",
    "edit.scales=[-4,4]", "edit.batch_size=16", "edit.strip_samples=3",
]  # fmt: skip


def _run(model_dir, root, *extra):
    config = _stage_config(model_dir, root, *SETTINGS, *extra)
    labeller = LeftBrightLabeller()
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, labeller=labeller, show_progress=False)
    run_directions_stage(config)
    run_invert_stage(config, show_progress=False)
    return config, labeller


@pytest.mark.parametrize(
    ("method", "extra"),
    [("edit_friendly", ["edit.asymmetric=true"]), ("ddim", ["edit.t_edit=300"])],
)
def test_the_stage_edits_inverted_images_as_edit_inverted_does(tiny_pixel_model_dir, tmp_path, method, extra):
    config, labeller = _run(tiny_pixel_model_dir, tmp_path, f"invert.method={method}", *extra)
    result = run_edit_stage(config, labeller=labeller, show_progress=False)
    assert result.computed == result.total == 2  # mean_difference and probe of is_left_bright
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    inversions = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)
    assert [str(i) for i in edits["sample"].values] == [str(i) for i in inversions["sample"].values]
    assert edits["sample"].attrs["long_name"] == "image id"
    directions = open_directions(directions_path(config))
    inversion = inversion_from_store(inversions)
    sampler = make_inversion_sampler(config)
    scales = [float(s) for s in edits["scale"].values]
    for name in [str(n) for n in edits["direction"].values]:
        images = edits["images"].sel(direction=name).values
        # scale 0: the stored regenerated images, bit for bit
        np.testing.assert_array_equal(images[scales.index(0.0)], inversions["x0"].values)
        expected = edit_inverted(
            sampler, inversion, directions, name, scales,
            t_edit=config.edit.t_edit, t_edit_max=config.edit.t_edit_max, asymmetric=config.edit.asymmetric,
        )
        # the stage's packed rows against the plain loop of regenerate_inverted
        np.testing.assert_array_equal(images, expected, err_msg=name)
        assert np.abs(images[-1] - images[scales.index(0.0)]).max() > 1e-3  # the edit does edit
        assert (config.run_dir / STRIPS_DIR / strip_filename(name)).exists()
    effects = pd.read_parquet(config.run_dir / "edit_effects.parquet")
    assert set(effects["direction"]) == set(edits["direction"].values)
    assert set(effects["attribute"]) == {"is_left_bright", "brightness"}  # the labeller's scores of the edited images
    zero = effects[effects["scale"] == 0.0]
    assert (zero["mean_change"] == 0).all()
    probe = effects[(effects["direction"] == "probe/is_left_bright") & (effects["attribute"] == "is_left_bright")]
    scores = labeller.score(edits["images"].sel(direction="probe/is_left_bright", scale=4.0).values)
    np.testing.assert_allclose(probe.loc[probe["scale"] == 4.0, "mean_score"], scores["is_left_bright"].mean())
    _check_report_names_inverted_images(config, method, tmp_path / "img")


def _check_report_names_inverted_images(config, method, img):
    """The report's edit section calls the edited rows inverted images (with the method), not samples."""
    from hmine.report import edit_section

    img.mkdir()
    text = edit_section(config, config.run_dir, img)
    said = {"edit_friendly": "edit-friendly DDPM inversion", "ddim": "DDIM inversion"}[method]
    assert "the first 5 inverted images of <code>inversions.zarr</code>" in text and f"inverted with {said}" in text
    assert "edited inverted images on the far side" in text and "One inverted image along every edited direction" in text
    assert "(rows: inverted images, columns: scales" in text
    assert "sample" not in text.replace("not samples", ""), text


def test_new_inversions_make_the_edits_stale_and_sample_hashes_do_not_move(tiny_pixel_model_dir, tmp_path):
    from PIL import Image

    config, labeller = _run(tiny_pixel_model_dir, tmp_path)
    run_edit_stage(config, labeller=labeller, show_progress=False)
    assert up_to_date(config, "edit")
    again = run_edit_stage(config, labeller=labeller, show_progress=False)
    assert again.computed == 0
    # an image added to the folder: new inversions, so the edits of the first five are stale
    Image.new("RGB", (16, 16), "blue").save(config.images.folder / "a_first.png")
    labels = pd.read_csv(config.images.labels)
    pd.concat([labels, pd.DataFrame({"file": ["a_first.png"], "smiling": [0]})]).to_csv(config.images.labels, index=False)
    run_invert_stage(config, show_progress=False)
    assert not up_to_date(config, "edit")
    redone = run_edit_stage(config, labeller=labeller, show_progress=False)
    assert redone.computed == 2
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    assert str(edits["sample"].values[0]) == "a_first.png"
    x0 = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)["x0"].values[:5]
    np.testing.assert_array_equal(edits["images"].isel(direction=0).sel(scale=0.0).values, x0)
    # the source joins the edit hash only when set: edits of samples keep their hash
    samples = config.model_copy(update={"edit": config.edit.model_copy(update={"source": "samples"})})
    assert "source" not in samples.stage_inputs("edit")["edit"]
    assert "source" in config.stage_inputs("edit")["edit"]
    assert samples.stage_hash("edit") != config.stage_hash("edit")
    assert samples.stage_hash("edit") == load_config(None, [
        f"model.id={config.model.id}", f"output_root={config.output_root}", f"report_root={config.report_root}",
        "sample.num_inference_steps=3", f"images.folder={config.images.folder}", f"images.labels={config.images.labels}",
        "invert.batch_size=2", *[s for s in SETTINGS if s != "edit.source=inversions"],
    ]).stage_hash("edit")


def test_inverted_edits_are_refused_with_the_fix(tiny_pixel_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="edit.source is 'inversions' but there is no images"):
        load_config(None, ["edit.source=inversions"])
    with pytest.raises(ConfigError, match="Jacobian directions, which exist for samples only"):
        _stage_config(tiny_pixel_model_dir, tmp_path / "a", "edit.source=inversions", "edit.directions=[jacobian/0/0]")
    config = _stage_config(tiny_pixel_model_dir, tmp_path / "b", *SETTINGS, "edit.n_samples=6")
    labeller = LeftBrightLabeller()
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, labeller=labeller, show_progress=False)
    run_directions_stage(config)
    with pytest.raises(FileNotFoundError, match="run the invert stage first"):
        run_edit_stage(config, labeller=labeller, show_progress=False)
    run_invert_stage(config, show_progress=False)
    with pytest.raises(ValueError, match="edit.n_samples is 6 but .* has 5 inverted images; lower edit.n_samples"):
        run_edit_stage(config, labeller=labeller, show_progress=False)


def test_the_readmes_edit_your_own_images_config_edits_the_folders_images(tiny_pixel_model_dir, tiny_clip_dir, tmp_path):
    """README "Edit your own images" added to "On a real model" (local models, fewer samples)."""
    from test_faults import _readme_yaml
    from test_inversion import _image_folder

    from hmine.config import RunConfig

    own = _readme_yaml("Edit your own images")
    assert own["edit"]["source"] == "inversions" and own["edit"]["directions"] == ["probe/smiling"]
    config = _readme_yaml("On a real model") | own
    folder = _image_folder(tmp_path)  # five 16x16 PNGs, two in a subfolder, and labels.csv with 'smiling'
    config["images"] = {"folder": str(folder), "labels": str(tmp_path / "labels.csv")}
    config["model"].update(id=str(tiny_pixel_model_dir), device="cpu")
    config["label"]["clip_model_id"] = str(tiny_clip_dir)
    config["sample"].update(n_samples=12, batch_size=4, num_inference_steps=2)
    config["directions"].update(top_k=3, pca_components=2, probe_components=4)
    config["edit"]["n_samples"] = 5
    config.update(output_root=str(tmp_path / "stores"), report_root=str(tmp_path / "reports"))
    config = RunConfig.model_validate(config)
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, show_progress=False)
    run_directions_stage(config)
    run_invert_stage(config, show_progress=False)
    assert run_edit_stage(config, show_progress=False).computed == 1
    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    inversions = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)
    assert [str(i) for i in edits["sample"].values] == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
    np.testing.assert_array_equal(edits["images"].sel(direction="probe/smiling", scale=0.0).values, inversions["x0"].values)
    assert float(inversions["reconstruction_error"].max()) <= 1e-4  # edit-friendly: scale 0 is the image itself
    assert (config.run_dir / STRIPS_DIR / strip_filename("probe/smiling")).exists()
