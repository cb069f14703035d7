"""The edit stage applies the learn stage's results: learned/, learned-block-mean/ and learned-block/ directions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr

from hmine.config import load_config
from hmine.directions import open_directions
from hmine.editing import edit_steps_from
from hmine.learning.apply import images_of, regenerate_learned
from hmine.learning.edit_directions import check_learned_edits
from hmine.learning.store import learned_delta, load_block_editor
from hmine.regeneration import regenerate
from hmine.stages import get, up_to_date
from hmine.stages.directions import run_directions_stage
from hmine.stages.edit import EDITS_STORE, run_edit_stage
from hmine.stages.label import run_label_stage
from hmine.stages.learn import block_path, learned_path, run_learn_stage
from hmine.stages.sample import make_sampler, run_sample_stage
from hmine.stores import open_group

NAMES = ["learned/red", "learned-block-mean/red", "learned-block/red"]


def _config(root, *extra):
    target = {"name": "red", "attribute": "is_red", "leakage_attributes": ["is_circle"]}
    return load_config(None, [
        f"output_root={root}", "name=le", "sample.n_samples=6", "sample.batch_size=6", "sample.num_inference_steps=3",
        "label.attributes=[is_red, is_circle]", f"learn.targets={json.dumps([target])}", "learn.steps=2",
        "learn.batch_size=2", "learn.n_train=3", "learn.checkpoint_every=1", "learn.time_embedding_dim=8",
        "directions.pca_components=2", "edit.n_samples=2", "edit.scales=[-2,1.5]", "edit.batch_size=4",
        f"edit.directions={json.dumps(NAMES)}", *extra,
    ])  # fmt: skip


def run_through_learned_edit(config):
    """Sample, label, directions, learn and edit, in one process; ``config`` back."""
    run_sample_stage(config, show_progress=False)
    run_label_stage(config, show_progress=False)
    run_directions_stage(config)
    run_learn_stage(config, show_progress=False)
    run_edit_stage(config, show_progress=False)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_through_learned_edit(_config(tmp_path_factory.mktemp("learned-edits")))


def test_the_edits_are_the_learning_librarys_own_regenerations(run):
    config = run
    edits = xr.open_zarr(config.run_dir / EDITS_STORE, consolidated=False)
    assert [str(n) for n in edits["direction"].values] == NAMES and bool(edits["done"].all())
    sampler = make_sampler(config)
    seeds = [int(s) for s in edits["sample"].values]
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), config.edit.t_edit, config.edit.t_edit_max)
    learned = open_directions(learned_path(config))
    editor = load_block_editor(block_path(config, "red"), sampler.timesteps.tolist())
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:2]
    for s, scale in enumerate(edits["scale"].values):
        images = edits["images"].isel(scale=s).values  # (direction, sample, ...)
        if scale == 0:
            np.testing.assert_array_equal(images, np.broadcast_to(x0, images.shape))
            continue
        for d, name in enumerate(NAMES[:2]):  # scale = coefficient of the trained Δh_t / of the block's mean edit
            delta = learned_delta(learned, name, float(scale))[None]
            rows = regenerate(sampler, seeds, delta, [0] * len(seeds), edit_steps=edit_steps,
                              asymmetric=config.edit.asymmetric, batch_size=4)  # fmt: skip
            np.testing.assert_allclose(images[d], images_of(rows, len(seeds)), atol=1e-5)
        rows = regenerate_learned(sampler, seeds, editor, [float(scale)] * len(seeds), edit_steps=edit_steps,
                                  asymmetric=config.edit.asymmetric, batch_size=4)  # fmt: skip
        np.testing.assert_allclose(images[2], images_of(rows, len(seeds)), atol=1e-5)
        assert np.abs(images - x0).max() > 1e-4  # the edits change the images


def test_relearning_makes_the_edits_stale(run, tmp_path):
    shutil.copytree(run.run_dir, tmp_path / "stores" / run.name)
    config = run.model_copy(update={"output_root": tmp_path / "stores"})
    assert up_to_date(config, "edit")
    changed = config.model_copy(update={"learn": config.learn.model_copy(update={"learning_rate": 0.5})})
    assert changed.stage_hash("edit") == config.stage_hash("edit")  # learn settings are not edit settings
    run_learn_stage(changed, show_progress=False)
    assert not up_to_date(changed, "edit")
    shutil.rmtree(learned_path(config))  # a lost learned store: the edits cannot be up to date either
    assert not up_to_date(config, "edit")


def test_only_learned_names_read_the_learn_stage(run):
    assert "learn" in get("edit").optional_reads(run)
    plain = run.model_copy(update={"edit": run.edit.model_copy(update={"directions": ["probe/is_red"]})})
    assert "learn" not in get("edit").optional_reads(plain)


def test_unknown_or_unconfigured_learned_names_are_refused(run):
    def with_names(config, names, **learn):
        return config.model_copy(update={"edit": config.edit.model_copy(update={"directions": names}),
                                         "learn": config.learn.model_copy(update=learn)})  # fmt: skip

    check_learned_edits(run)
    with pytest.raises(ValueError, match="learn.targets has no target 'blue'"):
        check_learned_edits(with_names(run, ["learned-block/blue"]))
    with pytest.raises(ValueError, match="learn.targets is empty"):
        check_learned_edits(with_names(run, ["learned/red"], targets=[]))
    with pytest.raises(ValueError, match="learn.delta_block is false"):
        check_learned_edits(with_names(run, ["learned-block-mean/red"], delta_block=False))
    with pytest.raises(ValueError, match="learn.targets has no target 'blue'"):  # the edit stage's preflight checks it
        for check in get("edit").preflight:
            check(with_names(run, ["learned/blue"]))
    with pytest.raises(ValueError, match="learn.targets has no target 'blue'"):  # and so does the stage itself
        run_edit_stage(with_names(run, ["learned/blue"]), show_progress=False)


def test_learned_edits_of_their_own_training_samples_are_refused(run):
    check_learned_edits(run)  # 2 edited + 3 training samples of 6
    overlapping = run.model_copy(update={"edit": run.edit.model_copy(update={"n_samples": 4})})
    with pytest.raises(ValueError, match=r"^edit.n_samples \(4\) \+ learn.n_train \(3\) is above sample.n_samples \(6\)"):
        check_learned_edits(overlapping)
    plain = overlapping.model_copy(update={"edit": overlapping.edit.model_copy(update={"directions": ["probe/is_red"]})})
    check_learned_edits(plain)  # no learned edit: nothing to hold out
