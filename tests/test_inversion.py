"""Inversion (DDIM, edit-friendly DDPM) and regeneration from it, on tiny local models and the embedded one."""

from __future__ import annotations

import pytest
import torch

from hmine.editing import edit_steps_from
from hmine.inversion import Inversion, invert, regenerate_inverted, regenerate_inverted_with_delta
from hmine.models import load_model
from hmine.sampling import Sampler, noise_for_seed

REPRODUCTION_TOL = 1e-4  # max abs, [-1, 1] pixel units, float32 (issue 14)


@pytest.fixture(scope="module")
def pixel(tiny_pixel_model_dir):
    return load_model(str(tiny_pixel_model_dir))


@pytest.fixture(scope="module")
def latent(tiny_scaled_latent_model_dir):
    return load_model(str(tiny_scaled_latent_model_dir))


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth images in [-1, 1]: upsampled noise, so they look like images, not like x_T
    coarse = torch.rand((n, 3, size // 4, size // 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _seed_inversion(sampler, seeds, etas):
    draws = [noise_for_seed(s, sampler.model.sample_shape, sampler.num_inference_steps) for s in seeds]
    return Inversion(
        method="edit_friendly",
        x_T=torch.stack([d[0] for d in draws]),
        z=torch.stack([d[1] for d in draws]),
        etas=etas,
        timesteps=sampler.timesteps.clone(),
    )


@pytest.mark.parametrize("eta", [1.0, [1.0, 0.0, 0.5, 1.0]])
def test_regeneration_from_a_seeds_noise_is_the_samplers_own_edit(pixel, eta):
    """Fed a seed's x_T and z, the regeneration is the sampler, bit for bit: no edit, an edit,
    the asymmetric step and a window."""
    sampler = Sampler(pixel, num_inference_steps=4, eta=eta)
    seeds = [3, 4]
    inversion = _seed_inversion(sampler, seeds, sampler.etas)
    base = sampler.sample(seeds)
    again = regenerate_inverted(sampler, inversion)
    assert torch.equal(again.images, base.images) and torch.equal(again.h, base.h)
    delta = 2.0 * torch.randn(base.h.shape[1:], generator=torch.Generator().manual_seed(0))
    window = edit_steps_from(sampler.timesteps.tolist(), 300, 800)
    for kwargs in ({}, {"asymmetric": True}, {"edit_steps": window}, {"edit_steps": window, "asymmetric": True}):
        ours = regenerate_inverted(sampler, inversion, delta_h=delta, **kwargs)
        theirs = sampler.sample(seeds, delta_h=delta, **kwargs)
        assert torch.equal(ours.images, theirs.images), kwargs
        assert torch.equal(ours.h, theirs.h), kwargs
        assert (ours.images - base.images).abs().max() > 1e-3, kwargs  # the edit did something
    per_sample = torch.stack([delta, -delta])  # (batch, step, ...) deltas too
    assert torch.equal(
        regenerate_inverted(sampler, inversion, delta_h=per_sample).images,
        sampler.sample(seeds, delta_h=per_sample).images,
    )


def test_edit_friendly_reproduces_pixel_images(pixel):
    sampler = Sampler(pixel, num_inference_steps=5, eta=1.0)
    images = _images(3, 16)
    inversion = invert(sampler, images, "edit_friendly", seeds=[0, 1, 2])
    assert inversion.z.shape == (3, 5, 3, 16, 16) and inversion.x_T.shape == (3, 3, 16, 16)
    assert inversion.h.shape[:2] == (3, 5)
    regenerated = regenerate_inverted(sampler, inversion)
    assert (regenerated.images - images).abs().max() <= REPRODUCTION_TOL
    assert torch.equal(regenerated.images, inversion.images)  # the inversion's trajectory is the regeneration's
    assert torch.equal(regenerated.h, inversion.h)
    assert float(inversion.reconstruction_error.max()) <= REPRODUCTION_TOL
    # the last step is deterministic here (a_prev = 1); on a random U-Net its fixed point is
    # found to rounding, so almost nothing is left for the residual
    assert inversion.residual is not None and float(inversion.residual_max.max()) < 1e-5
    # x_T and z are the image's: another seed gives other noise maps that also reproduce it
    other = invert(sampler, images, "edit_friendly", seeds=[7, 8, 9])
    assert (other.z - inversion.z).abs().max() > 0.1
    assert float(other.reconstruction_error.max()) <= REPRODUCTION_TOL


def test_edit_friendly_reproduces_latent_images_through_the_scaled_vqvae(latent):
    sampler = Sampler(latent, num_inference_steps=5, eta=1.0)
    images = _images(2, 16, seed=1)
    inversion = invert(sampler, images, "edit_friendly", seeds=[0, 1])
    # the target is the quantized latent times scaling_factor (0.5 here)
    raw = latent.vqvae.encode(images).latents
    assert torch.allclose(inversion.target, latent.vqvae.quantize(raw)[0] * 0.5, atol=1e-6)
    regenerated = regenerate_inverted(sampler, inversion)
    best = latent.decode(inversion.target)  # what the autoencoder can give back of the input
    assert (regenerated.images - best).abs().max() <= REPRODUCTION_TOL
    assert float(inversion.target_error.max()) <= REPRODUCTION_TOL
    # the VQ autoencoder's own error is recorded, not hidden
    assert torch.allclose(inversion.reconstruction_error, (best - images).abs().flatten(1).amax(1), atol=1e-4)


def test_edit_friendly_reproduces_the_embedded_models_world_images():
    from hmine import world

    sampler = Sampler(load_model(), num_inference_steps=10, eta=1.0)
    images = torch.from_numpy(world.generate(4, 123).images)
    inversion = invert(sampler, images, "edit_friendly", seeds=[0, 1, 2, 3])
    regenerated = regenerate_inverted(sampler, inversion)
    assert (regenerated.images - images).abs().max() <= REPRODUCTION_TOL
    # the trained last step removes detail it cannot put back: the residual carries it
    assert 1e-4 < float(inversion.residual_max.max()) < 0.05


def test_inverting_a_sample_regenerates_it_and_edits_it_in_the_same_space(pixel):
    """A sampled image inverted edit-friendly regenerates exactly; its edit is the sampler's
    edit of other noise maps, so only the scale-0 image is equal (the edits agree in distribution)."""
    sampler = Sampler(pixel, num_inference_steps=4, eta=1.0)
    sample = sampler.sample([11, 12])
    inversion = invert(sampler, sample.images, "edit_friendly", seeds=[0, 1])
    assert (regenerate_inverted(sampler, inversion).images - sample.images).abs().max() <= REPRODUCTION_TOL
    delta = torch.zeros_like(sample.h[0])
    zero = regenerate_inverted_with_delta(sampler, inversion, delta, asymmetric=True)
    assert abs(zero - sample.images.numpy()).max() <= REPRODUCTION_TOL


def test_ddim_inversion_regenerates_from_x_T_and_records_its_error(pixel):
    sampler = Sampler(pixel, num_inference_steps=10, eta=0.0)
    images = _images(2, 16, seed=2)
    inversion = invert(sampler, images, "ddim")
    assert inversion.z is None and inversion.residual is None and inversion.etas == [0.0] * 10
    regenerated = regenerate_inverted(sampler, inversion)
    assert torch.equal(regenerated.images, inversion.images)
    error = (regenerated.images - images).abs().flatten(1).amax(1)
    assert torch.equal(inversion.reconstruction_error, error)
    assert torch.equal(invert(sampler, images, "ddim").x_T, inversion.x_T)  # deterministic


def test_ddim_inversion_is_exact_when_eps_does_not_depend_on_x(pixel):
    """The inverse step is the sampler's DDIM step solved for x_t: with an eps that depends on
    t only (so eps at the less noisy x is eps at x_t) the round trip is exact to rounding."""
    sampler = Sampler(pixel, num_inference_steps=10, eta=0.0)
    table = {int(t): torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(int(t))) for t in sampler.timesteps}
    sampler.eps = lambda output, t, x: table[int(t)].expand_as(x)
    images = _images(2, 16, seed=4)
    inversion = invert(sampler, images, "ddim")
    assert float(inversion.reconstruction_error.max()) < 1e-4
    assert (inversion.x_T - images).abs().max() > 0.5  # x_T is far from the image


def test_ddim_refinement_changes_x_T(pixel):
    sampler = Sampler(pixel, num_inference_steps=5, eta=0.0)
    images = _images(1, 16, seed=3)
    plain = invert(sampler, images, "ddim")
    refined = invert(sampler, images, "ddim", refine=3)
    assert not torch.equal(plain.x_T, refined.x_T)


def test_bad_arguments_are_refused(pixel):
    sampler = Sampler(pixel, num_inference_steps=4, eta=1.0)
    images = _images(2, 16)
    with pytest.raises(ValueError, match="eta > 0"):
        invert(sampler, images, "edit_friendly", eta=0.0)
    with pytest.raises(ValueError, match="one seed per image"):
        invert(sampler, images, "edit_friendly", seeds=[0])
    with pytest.raises(ValueError, match="method"):
        invert(sampler, images, "null_text")
    with pytest.raises(ValueError, match="shape"):
        invert(sampler, _images(1, 32), "ddim")
    inversion = invert(sampler, images, "ddim")
    with pytest.raises(ValueError, match="num_inference_steps"):
        regenerate_inverted(Sampler(pixel, num_inference_steps=5), inversion)


# -- the invert stage -------------------------------------------------------------------------


def _image_folder(root, n=5, size=16):
    import pandas as pd
    from PIL import Image

    folder = root / "images"
    images = _images(n, size, seed=5)
    names = [f"{'sub/' if k % 2 else ''}im{k}.png" for k in range(n)]
    for name, image in zip(names, images):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image.numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype("uint8")).save(path)
    pd.DataFrame({"file": names, "smiling": [k % 2 for k in range(n)]}).to_csv(root / "labels.csv", index=False)
    return folder


def _stage_config(model_dir, root, *extra):
    from hmine.config import load_config

    folder = _image_folder(root)
    return load_config(None, [
        f"model.id={model_dir}", f"output_root={root / 'stores'}", f"report_root={root / 'reports'}",
        "sample.num_inference_steps=3", f"images.folder={folder}", f"images.labels={root / 'labels.csv'}",
        "invert.batch_size=2", *extra,
    ])


@pytest.mark.parametrize("method", ["edit_friendly", "ddim"])
def test_invert_stage_writes_the_sample_schema_and_regenerates(tiny_pixel_model_dir, tmp_path, method):
    import numpy as np
    import xarray as xr

    from hmine.stages import up_to_date
    from hmine.stages.invert import make_inversion_sampler, run_invert_stage

    config = _stage_config(tiny_pixel_model_dir, tmp_path, f"invert.method={method}")
    result = run_invert_stage(config, show_progress=False)
    assert (result.total, result.computed) == (3, 3) and up_to_date(config, "invert")
    ds = xr.open_zarr(result.path, consolidated=False)
    assert ds["h"].dims == ("sample", "step", "channel", "y", "x") and ds["h"].shape == (5, 3, 16, 8, 8)
    assert list(ds["sample"].values) == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
    assert list(ds["step"].values) == [666, 333, 0]
    assert ds["labels"].sel(attribute="smiling").values.tolist() == [0, 0, 0, 1, 1]
    assert ds.attrs["hmine:method"] == method and ("z" in ds) == (method == "edit_friendly")
    # what is stored regenerates the stored image through the library
    sampler = make_inversion_sampler(config)
    inversion = Inversion(
        method=method,
        x_T=torch.from_numpy(ds["x_T"].values),
        z=torch.from_numpy(ds["z"].values) if "z" in ds else None,
        etas=__import__("json").loads(ds.attrs["hmine:etas"]),
        timesteps=torch.tensor(ds["step"].values),
        residual=torch.from_numpy(ds["residual"].values) if "residual" in ds else None,
    )
    regenerated = regenerate_inverted(sampler, inversion).images.numpy()
    np.testing.assert_allclose(regenerated, ds["x0"].values, rtol=1e-4, atol=1e-4)  # other batches: rounding
    errors = np.abs(ds["x0"].values - ds["input"].values).reshape(5, -1).max(1)
    np.testing.assert_allclose(ds["reconstruction_error"].values, errors, atol=1e-6)
    if method == "edit_friendly":
        assert errors.max() <= REPRODUCTION_TOL
    # a rerun does nothing
    again = run_invert_stage(config, show_progress=False)
    assert again.computed == 0 and again.skipped == 3


def test_invert_stage_redoes_a_damaged_batch_and_follows_the_images(tiny_pixel_model_dir, tmp_path):
    import numpy as np
    import xarray as xr

    from hmine.pipeline import stage_status
    from hmine.stages.invert import run_invert_stage

    config = _stage_config(tiny_pixel_model_dir, tmp_path)
    path = run_invert_stage(config, show_progress=False).path
    before = xr.open_zarr(path, consolidated=False)["h"].values
    chunk = path / "h" / "c" / "1" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")  # a damaged chunk of batch 1
    status = {s.stage: s for s in stage_status(config.run_dir, config)}
    assert status["invert"].state == "damaged"
    redone = run_invert_stage(config, show_progress=False)
    assert redone.computed == 1 and redone.repaired == 1
    np.testing.assert_array_equal(xr.open_zarr(path, consolidated=False)["h"].values, before)
    # a new image makes a new store with it
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(config.images.folder / "new.png")
    import pandas as pd

    labels = pd.read_csv(config.images.labels)
    pd.concat([labels, pd.DataFrame({"file": ["new.png"], "smiling": [1]})]).to_csv(config.images.labels, index=False)
    grown = run_invert_stage(config, show_progress=False)
    assert grown.computed == 3 and "new.png" in xr.open_zarr(path, consolidated=False)["sample"].values


def test_invert_stage_without_images_writes_nothing_and_is_a_cli_command(tiny_pixel_model_dir, tmp_path):
    from hmine.cli import build_parser
    from hmine.config import load_config
    from hmine.stages import stage_names
    from hmine.stages.invert import run_invert_stage

    config = load_config(None, [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}"])
    result = run_invert_stage(config, show_progress=False)
    assert result.total == 0 and not result.path.exists()
    assert stage_names().index("invert") == stage_names().index("sample") + 1
    assert build_parser().parse_args(["invert", "c.yaml"]).command == "invert"


def test_directions_fitted_on_inversions_with_given_labels(tiny_pixel_model_dir, tmp_path):
    import numpy as np
    import pandas as pd
    import xarray as xr

    from hmine.config import ConfigError, load_config
    from hmine.directions import direction_by_name, fit_directions, open_directions
    from hmine.stages import up_to_date
    from hmine.stages.directions import run_directions_stage
    from hmine.stages.invert import run_invert_stage

    config = _stage_config(
        tiny_pixel_model_dir, tmp_path, "directions.source=inversions", "label.attributes=[smiling]",
        "directions.pca_components=2", "directions.top_k=2", "directions.probe_components=2",
    )
    with pytest.raises(FileNotFoundError, match="hmine invert"):
        run_directions_stage(config)
    run_invert_stage(config, show_progress=False)
    path = run_directions_stage(config).path
    assert up_to_date(config, "directions")
    fitted = open_directions(path)
    ds = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)
    ids = [str(i) for i in ds["sample"].values]
    labels = pd.DataFrame({"smiling": ds["labels"].values[:, 0].astype(float)}, index=ids)
    expected = fit_directions(ds["h"].assign_coords(sample=ids), labels, pca_components=2, attributes=["smiling"],
                              top_k=2, probe_components=2)
    for name in ["mean_difference/smiling", "probe/smiling", "pca/0"]:
        np.testing.assert_allclose(direction_by_name(fitted, name)["direction"].values,
                                   direction_by_name(expected, name)["direction"].values, atol=1e-6)
    # inverting other images makes the directions stale
    from PIL import Image

    Image.new("RGB", (16, 16), "blue").save(config.images.folder / "more.png")
    pd.concat([pd.read_csv(config.images.labels), pd.DataFrame({"file": ["more.png"], "smiling": [0]})]).to_csv(
        config.images.labels, index=False)
    run_invert_stage(config, show_progress=False)
    assert not up_to_date(config, "directions")
    # the sample-fitted hash is unchanged by the new fields, and inversions need images
    plain = load_config(None, [])
    assert "source" not in plain.stage_inputs("directions")["directions"]
    with pytest.raises(ConfigError, match="images"):
        load_config(None, ["directions.source=inversions"])


def test_inverted_world_images_scored_by_the_labeller(tmp_path):
    import numpy as np

    from hmine.config import load_config
    from hmine.labelling import make_labeller
    from hmine.stages.directions import inversion_h_and_labels
    from hmine.stages.invert import run_invert_stage

    config = load_config(None, [
        f"output_root={tmp_path}", "images.world.n=4", "directions.source=inversions",
        "directions.inversion_labels=labeller",
    ])
    run_invert_stage(config, show_progress=False)
    h, labels = inversion_h_and_labels(config)
    assert list(labels.index) == list(h["sample"].values) == [f"world-s0-{i:06d}" for i in range(4)]
    import xarray as xr

    x0 = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)["x0"].values
    np.testing.assert_allclose(labels.to_numpy(), make_labeller(config.label).score(x0).to_numpy())
    given = load_config(None, [f"output_root={tmp_path}", "images.world.n=4", "directions.source=inversions"])
    _, truth = inversion_h_and_labels(given)
    assert set(truth.columns) <= set(labels.columns) and set(np.unique(truth.to_numpy())) <= {0.0, 1.0}


def test_editing_a_runs_inversions_with_a_directions_store(tiny_pixel_model_dir, tmp_path):
    import runpy
    import sys

    import numpy as np
    import xarray as xr

    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import delta_for
    from hmine.inversion.edits import edit_run_inversions, inversion_from_store
    from hmine.stages.directions import run_directions_stage
    from hmine.stages.invert import make_inversion_sampler, run_invert_stage

    config = _stage_config(
        tiny_pixel_model_dir, tmp_path, "directions.source=inversions", "label.attributes=[smiling]",
        "directions.pca_components=2", "directions.top_k=2", "directions.probe_components=2", "edit.asymmetric=true",
    )
    run_invert_stage(config, show_progress=False)
    directions = run_directions_stage(config).path
    images = edit_run_inversions(config, directions, "probe/smiling", [-3.0, 0.0, 3.0], n=3, strip=tmp_path / "s.png")
    ds = xr.open_zarr(config.run_dir / "inversions.zarr", consolidated=False)
    assert images.shape == (3, 3, 3, 16, 16) and (tmp_path / "s.png").exists()
    np.testing.assert_array_equal(images[1], ds["x0"].values[:3])  # scale 0: the stored images
    assert np.abs(images[2] - images[1]).max() > 1e-3
    # the edit is regenerate_inverted with the scale convention's delta and the asymmetric step
    chosen = direction_by_name(open_directions(directions), "probe/smiling")
    delta = delta_for(chosen["direction"].values, chosen["scale_unit"].values, 3.0)
    expected = regenerate_inverted(make_inversion_sampler(config), inversion_from_store(ds, slice(0, 3)),
                                   delta_h=delta, asymmetric=True)
    np.testing.assert_allclose(images[2], expected.images.numpy(), atol=1e-6)
    # the script
    config_file = tmp_path / "run.yaml"
    config_file.write_text(__import__("json").dumps(config.model_dump(mode="json")))
    sys_argv = sys.argv
    try:
        sys.argv = ["edit_inverted.py", str(config_file), "--directions", str(directions), "--direction",
                    "probe/smiling", "--n", "2", "--out", str(tmp_path / "script.png")]
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "scripts" / "edit_inverted.py"),
                           run_name="__main__")
        assert done.value.code == 0 and (tmp_path / "script.png").exists()
    finally:
        sys.argv = sys_argv


def test_status_lists_the_invert_stage_only_with_images(tiny_pixel_model_dir, tmp_path):
    from hmine.config import load_config
    from hmine.pipeline import stage_status
    from hmine.stages.invert import run_invert_stage

    plain = load_config(None, [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=plain"])
    assert "invert" not in [s.stage for s in stage_status(plain.run_dir, plain)]
    config = _stage_config(tiny_pixel_model_dir, tmp_path)
    status = {s.stage: s.state for s in stage_status(config.run_dir, config)}
    assert status["invert"] == "missing"
    run_invert_stage(config, show_progress=False)
    assert {s.stage: s.state for s in stage_status(config.run_dir, config)}["invert"] == "complete"


@pytest.mark.parametrize(("steps", "median_floor", "min_floor"), [(10, 20.0, 17.0), (50, 30.0, 28.0)])
def test_ddim_reconstruction_psnr_of_rendered_world_images(steps, median_floor, min_floor):
    """Floors a little under the PSNR measured on world.generate(8, 0) (2026-12-02: 10 steps median
    21.3 dB, min 18.0; 50 steps median 32.0, min 29.1; scripts/inversion_figures.py has the 256-image figures)."""
    from hmine import world
    from hmine.inversion import psnr

    sampler = Sampler(load_model(), num_inference_steps=steps, eta=0.0)
    images = torch.from_numpy(world.generate(8, 0).images)
    values = psnr(invert(sampler, images, "ddim").images, images)
    assert float(values.median()) >= median_floor and float(values.min()) >= min_floor
