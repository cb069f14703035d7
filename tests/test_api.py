"""The notebook API (hmine.open_run, Run.edit, Run.sweep, hmine.load_model) on a tiny run.

The run is the demo in miniature: the embedded model and world labeller (so the
directions have the demo's names and docs/notebook.md runs on it unchanged), 16 samples in
batches of 4, 4 steps, the asymmetric step, a Jacobian stage on 2 samples.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hmine
from hmine.config import load_config

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"
EDITED = ["probe/is_red", "pca/0", "jacobian/localised/0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hmine.pipeline import run_stages, write_run_config

    root = tmp_path_factory.mktemp("api")
    config = load_config(
        None,
        [f"output_root={root / 'stores'}", f"report_root={root / 'reports'}", "name=tiny", "sample.n_samples=16",
         "sample.batch_size=4", "sample.num_inference_steps=4", "label.attributes=[is_circle, is_red]",
         "directions.pca_components=2", "directions.top_k=3", "directions.probe_components=4",
         "directions.conditional={is_red: [is_circle]}", f"edit.directions=[{', '.join(EDITED)}]",
         # 6 edited samples: the second batch is regenerated whole, past edit.n_samples
         "edit.n_samples=6", "edit.scales=[-20.0, 20.0]", "edit.asymmetric=true",
         "jacobian.n_samples=2", "jacobian.k=1", "jacobian.steps=[500]", "jacobian.mask=shape",
         "jacobian.localised_rank=4", "jacobian.max_iter=10", "jacobian.edit_scales=[-15.0, 15.0]",
         "jacobian.edit_window=analysed_step"],
    )
    write_run_config(config)  # as `hmine run` does: open_run(run_dir) reads it
    run_stages(config, ("sample", "label", "directions", "jacobian", "edit"))
    return config


@pytest.fixture(scope="module")
def run(tiny_run):
    return hmine.open_run(tiny_run.run_dir)


def test_import_hmine_is_cheap_and_help_lists_the_api():
    code = (
        "import sys, pydoc, hmine\n"
        "assert 'torch' not in sys.modules and 'xarray' not in sys.modules, 'import hmine loaded torch/xarray'\n"
        "assert set(hmine.__all__) <= set(dir(hmine))\n"
        "text = pydoc.render_doc(hmine, renderer=pydoc.plaintext)\n"
        "assert 'torch' not in sys.modules, 'help(hmine) loaded torch'\n"
        "for name in hmine.__all__:\n"
        "    assert name + '(' in text, name\n"
        "print(sorted(hmine.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["Model", "Run", "image_grid", "load_model", "open_run"])
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hmine.nope


def test_every_public_name_and_method_has_a_docstring_with_an_example():
    objects = [getattr(hmine, name) for name in hmine.__all__]
    objects += [hmine.Run.edit, hmine.Run.sweep, hmine.Run.status, hmine.Model.sample, hmine.Model.edit]
    for obj in objects:
        doc = obj.__doc__ or ""
        assert "Examples" in doc and ">>>" in doc, obj.__qualname__


def test_open_run_by_directory_config_and_yaml(tiny_run, run, tmp_path):
    assert run.config == tiny_run and run.path == tiny_run.run_dir
    assert hmine.open_run(tiny_run).path == run.path
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(tiny_run.model_dump_json())  # JSON is YAML
    assert hmine.open_run(yaml).config == tiny_run
    assert run.samples["h"].dims == ("sample", "step", "channel", "y", "x")
    assert run.samples["x0"].dims == ("sample", "color", "height", "width")
    assert list(run.seeds) == list(range(16))
    assert run.labels.index.name == "seed" and {"is_circle", "is_red"} <= set(run.labels.columns)
    assert {"pca/0", "probe/is_red", "conditional/probe/is_red|is_circle"} <= set(run.direction_names)
    assert run.direction_names[-2:] == ["jacobian/masked/0", "jacobian/localised/0"]
    assert set(run.effects["direction"]) == set(EDITED)
    assert (run.status().loc[["sample", "label", "directions", "jacobian", "edit"], "state"] == "complete").all()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hmine.open_run(tmp_path)
    assert "16 samples in batches of 4" in repr(run)


def test_edit_at_scale_zero_is_the_stored_x0_bit_for_bit(run):
    x0 = run.samples["x0"]
    # first batch, a batch cut by edit.n_samples, and the last batch (never edited by the stage)
    for seed in (0, 5, 15):
        edited = run.edit(seed, "probe/is_red", [0])
        assert edited.dims == ("scale", "color", "height", "width") and list(edited["scale"].values) == [0.0]
        np.testing.assert_array_equal(edited.sel(scale=0).values, x0.sel(sample=seed).values)
    np.testing.assert_array_equal(run.edit(1, "jacobian/localised/0", [0]).values[0], x0.sel(sample=1).values)


def test_edit_equals_the_edit_stage_images(run):
    edits = run.edits
    scales = [float(s) for s in edits["scale"].values]
    assert scales == [-20.0, 0.0, 20.0]
    for name in EDITED:
        for seed in (1, 5) if not name.startswith("jacobian/") else (1,):
            mine = run.edit(seed, name, scales)
            stored = edits["images"].sel(direction=name, sample=seed).values
            np.testing.assert_array_equal(mine.values, stored, err_msg=f"{name} seed {seed}")
            assert np.abs(mine.sel(scale=20).values - mine.sel(scale=0).values).max() > 1e-3


def _hand_regenerated(config, seed, delta, *, t_edit=None, t_edit_max=None, asymmetric=True):
    from hmine.editing import regenerate_with_delta
    from hmine.stages.sample import make_sampler

    # the plain sampler (two U-Net passes per asymmetric step) on a whole U-Net batch of the
    # seed: the edit stage's batch size, whose kernels give the stage's bits
    batch = [seed] * config.edit.batch_size
    images = regenerate_with_delta(make_sampler(config), batch, delta, t_edit=t_edit, t_edit_max=t_edit_max, asymmetric=asymmetric)
    return images[0]


def test_combined_directions_add_their_deltas(tiny_run, run):
    from hmine.directions import direction_by_name
    from hmine.editing import delta_for

    red, pca = (direction_by_name(run.directions, n) for n in ("probe/is_red", "pca/0"))
    combined = run.edit(6, {"probe/is_red": 1.0, "pca/0": -0.5}, [8.0])
    delta = delta_for(red["direction"].values, red["scale_unit"].values, 8.0) + delta_for(
        pca["direction"].values, pca["scale_unit"].values, -4.0
    )
    np.testing.assert_array_equal(combined.values[0], _hand_regenerated(tiny_run, 6, delta))
    assert combined.attrs["direction"] == "probe/is_red - 0.5*pca/0"
    # the same combination as (direction, weight) pairs, one of them a dataset
    pairs = run.edit(6, [("probe/is_red", 1.0), (pca, -0.5)], [8.0])
    np.testing.assert_array_equal(pairs.values, combined.values)


def test_vector_directions(run):
    from hmine.directions import direction_by_name

    red = direction_by_name(run.directions, "probe/is_red")
    by_name = run.edit(2, "probe/is_red", [-20.0, 20.0])
    # one direction of run.directions is used as stored: the same bits as its name
    np.testing.assert_array_equal(run.edit(2, red, [-20.0, 20.0]).values, by_name.values)
    # a raw vector is normalised per step and scaled by the std of the run's h along it
    raw = 3.0 * red["direction"].values
    from_vector = run.edit(2, raw, [-20.0, 20.0])
    assert from_vector.attrs["direction"] == "vector"
    np.testing.assert_allclose(from_vector.values, by_name.values, atol=2e-3)
    # a (channel, y, x) vector applies at every step
    step = run.edit(2, red["direction"].values[1], [20.0])
    assert step.shape == (1, 3, 32, 32) and np.abs(step.values[0] - by_name.values[1]).max() > 1e-3
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        run.edit(2, np.ones((5, 5)), [1.0])


def test_window_and_asymmetric_default_to_the_config_and_can_be_overridden(tiny_run, run):
    from hmine.directions import direction_by_name
    from hmine.editing import delta_for

    red = direction_by_name(run.directions, "probe/is_red")
    delta = delta_for(red["direction"].values, red["scale_unit"].values, 20.0)
    windowed = run.edit(9, "probe/is_red", [20.0], window=(500, None), asymmetric=False)
    np.testing.assert_array_equal(windowed.values[0], _hand_regenerated(tiny_run, 9, delta, t_edit=500, asymmetric=False))
    default = run.edit(9, "probe/is_red", [20.0])
    np.testing.assert_array_equal(default.values[0], _hand_regenerated(tiny_run, 9, delta))
    assert np.abs(default.values - windowed.values).max() > 1e-3
    with pytest.raises(ValueError, match="holds none of the sampler's timesteps"):
        run.edit(9, "probe/is_red", [20.0], window=(900, 950))


def test_bad_directions_are_refused_naming_them(run):
    with pytest.raises(ValueError, match=r"no direction 'probe/is_blue'.*it has: pca/0, .*probe/is_red"):
        run.edit(0, "probe/is_blue", [1.0])
    with pytest.raises(ValueError, match="'pca/7'.*pca/1"):
        run.edit(0, {"probe/is_red": 1.0, "pca/7": 1.0}, [1.0])
    with pytest.raises(ValueError, match=r"seed 5 has no direction 'jacobian/localised/0'.*seeds \[0, 1\]"):
        run.edit(5, "jacobian/localised/0", [1.0])
    with pytest.raises(ValueError, match="k=1"):
        run.edit(0, "jacobian/localised/3", [1.0])
    with pytest.raises(ValueError, match="scales is empty"):
        run.edit(0, "pca/0", [])


def test_scales_asked_together_or_alone_give_the_same_bits_and_the_sweep(run):
    together = run.edit(3, "pca/0", [-20.0, 0.0, 20.0])
    for i, scale in enumerate([-20.0, 0.0, 20.0]):
        np.testing.assert_array_equal(run.edit(3, "pca/0", [scale]).values[0], together.values[i])
    fast = together
    sweep = run.sweep(3, ["probe/is_red", "pca/0"], [-20.0, 0.0, 20.0], upscale=2)
    grid = hmine.image_grid(np.stack([fast.values, fast.values]), upscale=2)
    # the labelled grid: the plain grid with a margin for the labels, left and above
    assert sweep.width > grid.width and sweep.height > grid.height
    # the pca/0 row's pixels are those of its edit
    assert np.array_equal(np.asarray(sweep)[-grid.height // 2 :, -grid.width :], np.asarray(grid)[grid.height // 2 :])


def test_load_model_samples_and_edits_like_the_run(tiny_run, run):
    model = hmine.load_model("embedded:shapes-ddpm", num_inference_steps=4)
    q = model.sample([4, 5, 6, 7])  # a batch of the run: its stored images and h
    np.testing.assert_array_equal(q["x0"].values, run.samples["x0"].sel(sample=[4, 5, 6, 7]).values)
    np.testing.assert_array_equal(
        q["h"].values.astype(np.float16), run.samples["h"].sel(sample=[4, 5, 6, 7]).values
    )
    assert list(q["step"].values) == list(run.samples["step"].values)
    from hmine.directions import direction_by_name

    red = direction_by_name(run.directions, "probe/is_red")
    # the run's direction at the run's U-Net batch size: the edit stage's image
    edited = model.edit(5, red, [20.0], batch_size=tiny_run.edit.batch_size, asymmetric=True)
    np.testing.assert_array_equal(edited.values[0], run.edits["images"].sel(direction="probe/is_red", scale=20.0, sample=5).values)
    # a raw vector scaled by scale_unit; at U-Net batch 1, scale 0 is model.sample's batch of one
    alone = model.edit(84, red["direction"].values, [0.0, 1.0], scale_unit=red["scale_unit"].values, batch_size=1)
    np.testing.assert_array_equal(alone.values[0], model.sample(84, record_h=False)["x0"].values[0])


def test_the_notebook_runs_on_the_tiny_run(tiny_run, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", NOTEBOOK.read_text(), flags=re.S)
    assert len(blocks) >= 12
    code = "\n".join(blocks)
    assert '"stores/demo"' in code
    code = code.replace('"stores/demo"', repr(str(tiny_run.run_dir)))
    monkeypatch.chdir(tmp_path)  # the notebook saves sweep.png
    started = time.perf_counter()
    namespace: dict = {}
    exec(compile(code, str(NOTEBOOK), "exec"), namespace)
    seconds = time.perf_counter() - started
    assert seconds < 60, f"the notebook took {seconds:.1f} s"
    assert (tmp_path / "sweep.png").exists()
    assert namespace["sweep"].size[1] > 3 * 32 * 3


def test_image_grid_shapes_and_a_seed_outside_the_run(run):
    x0 = run.samples["x0"][:5].values
    assert hmine.image_grid(x0[0]).size == (36, 36)
    assert hmine.image_grid(x0, columns=2, pad=0).size == (64, 96)  # 3 rows, the last one padded
    assert hmine.image_grid(x0[None, :3], upscale=2).size == (2 * (3 * 34 + 2), 72)
    with pytest.raises(ValueError, match="shape"):
        hmine.image_grid(np.zeros((2, 32, 32)))
    # a seed the run does not have is regenerated with the run's settings (at the edit
    # stage's U-Net batch size, whose kernels round a little differently from a batch of one)
    outside = run.edit(99, "pca/0", [0.0])
    np.testing.assert_allclose(outside.values[0], run.model.sample(99, record_h=False)["x0"].values[0], atol=1e-5)
    assert np.abs(outside.values[0] - run.model.sample(98, record_h=False)["x0"].values[0]).max() > 0.1
