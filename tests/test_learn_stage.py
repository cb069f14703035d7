"""The learn stage on the embedded model: a classifier target and a CLIP target (tiny random CLIP), both kinds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hmine.config import load_config
from hmine.learning.apply import images_of, regenerate_learned
from hmine.learning.store import learned_delta, load_block_editor
from hmine.stages import up_to_date
from hmine.stages.learn import block_path, learned_damaged, learned_path, run_learn_stage
from hmine.stages.sample import make_sampler, run_sample_stage
from hmine.stores import open_group


def _config(root, tiny_clip_dir, *extra):
    targets = [
        {"name": "red", "attribute": "is_red", "leakage_attributes": ["is_circle"]},
        {"name": "smile", "kind": "clip", "source": "a shape", "target": "a red shape", "clip_model_id": str(tiny_clip_dir)},
    ]
    return load_config(None, [
        f"output_root={root}", "name=l", "sample.n_samples=6", "sample.batch_size=6", "sample.num_inference_steps=3",
        "label.attributes=[is_red, is_circle]", f"learn.targets={json.dumps(targets)}", "learn.steps=2",
        "learn.batch_size=2", "learn.n_train=3", "learn.checkpoint_every=1", "learn.time_embedding_dim=8", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir):
    config = _config(tmp_path_factory.mktemp("learn"), tiny_clip_dir)
    run_sample_stage(config, show_progress=False)
    result = run_learn_stage(config, show_progress=False)
    return config, result


@pytest.fixture
def own_run(run, tmp_path):
    base, _ = run
    shutil.copytree(base.run_dir, tmp_path / "stores" / base.name)
    return base.model_copy(update={"output_root": tmp_path / "stores"})


def _trained_delta(config, target):
    """Δh of the newest checkpoint of a target's delta_h training, at every step."""
    from safetensors.torch import load_file

    work = config.run_dir / "learn" / target / "delta_h"
    folder = work / "checkpoints" / json.loads((work / "latest.json").read_text())["checkpoint"]
    return load_file(str(folder / "model.safetensors"))["delta"]


def test_the_store_holds_each_targets_learned_directions_in_the_scale_convention(run):
    from hmine.directions import open_directions

    config, result = run
    assert result.computed == 2 and up_to_date(config, "learn")
    ds = open_directions(learned_path(config))
    assert list(ds["name"].values) == ["learned/red", "learned-block-mean/red", "learned/smile", "learned-block-mean/smile"]
    assert set(ds["method"].values) == {"learned"} and list(ds["attribute"].values[:2]) == ["is_red", "is_red"]
    norms = np.sqrt((ds["direction"].values ** 2).sum(axis=(2, 3, 4)))
    np.testing.assert_allclose(norms[ds["scale_unit"].values > 0], 1.0, rtol=1e-6)
    # coefficient 1 gives back the trained Δh_t at every step (all three are trained here)
    for target in ("red", "smile"):
        trained = _trained_delta(config, target)
        assert trained.abs().max() > 0
        torch.testing.assert_close(learned_delta(ds, f"learned/{target}", 1.0), trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(learned_delta(ds, f"learned/{target}", -2.0), -2.0 * trained, rtol=1e-5, atol=1e-6)
    training = json.loads(open_group(learned_path(config)).attrs["hmine:training"])
    assert training["red"]["delta_block"]["steps"] == 2 and training["smile"]["delta_h"]["steps"] == 2


def test_the_delta_block_is_saved_as_safetensors_and_applies_at_any_coefficient(run):
    config, _ = run
    sampler = make_sampler(config)
    editor = load_block_editor(block_path(config, "red"), sampler.timesteps.tolist())
    assert sum(p.numel() for p in editor.parameters()) == 2 * (128 * 128 + 128) + (8 * 128 + 128) + 2 * 128
    seeds = [0, 1, 0, 1]
    steps = [True] * 3
    images = images_of(regenerate_learned(sampler, seeds, editor, [0.0, 0.0, 3.0, -3.0], edit_steps=steps, batch_size=4), 4)
    x0 = open_group(config.run_dir / "samples.zarr")["x0"][:2]
    # coefficient 0: the stored samples (to rounding: CPU kernels differ between the sample stage's batch of 6 and these calls)
    np.testing.assert_allclose(images[:2], x0, atol=1e-5)
    assert np.abs(images[2:] - x0).max() > 1e-4
    with pytest.raises(ValueError, match="timesteps"):
        load_block_editor(block_path(config, "red"), [999, 500])


def test_a_rerun_is_up_to_date_and_a_lost_store_is_rewritten_from_the_checkpoints(own_run):
    config = own_run
    assert run_learn_stage(config, show_progress=False).computed == 0
    before = open_group(learned_path(config))["direction"][...]
    logs = {p: p.read_text() for p in (config.run_dir / "learn").rglob("log.jsonl")}
    shutil.rmtree(learned_path(config))
    assert run_learn_stage(config, show_progress=False).computed == 2
    np.testing.assert_array_equal(open_group(learned_path(config))["direction"][...], before)
    assert {p: p.read_text() for p in logs} == logs  # no training step was run again


def test_a_changed_or_missing_block_file_is_damage_and_the_stage_redoes_it(own_run):
    config = own_run
    assert learned_damaged(config) == 0
    block_path(config, "smile").write_bytes(b"not the block")
    assert learned_damaged(config) == 1 and not up_to_date(config, "learn")
    run_learn_stage(config, show_progress=False)
    assert learned_damaged(config) == 0 and up_to_date(config, "learn")
    load_block_editor(block_path(config, "smile"))


def test_changed_settings_start_the_training_over(own_run):
    config = own_run.model_copy(update={"learn": own_run.learn.model_copy(update={"learning_rate": 0.5})})
    assert config.stage_hash("learn") != own_run.stage_hash("learn") and not up_to_date(config, "learn")
    run_learn_stage(config, show_progress=False)
    from hmine.directions import open_directions

    retrained = _trained_delta(config, "red")  # the store holds the retrained Δh
    torch.testing.assert_close(learned_delta(open_directions(learned_path(config)), "learned/red"), retrained, rtol=1e-5, atol=1e-6)
    assert json.loads((config.run_dir / "learn" / "red" / "delta_h" / "config.json").read_text())["settings"]["learning_rate"] == 0.5


def test_the_stage_does_nothing_without_targets_and_refuses_too_few_samples(own_run, tmp_path, tiny_clip_dir):
    from hmine.stages import stage_applies

    empty = own_run.model_copy(update={"learn": own_run.learn.model_copy(update={"targets": []})})
    assert not stage_applies(empty, "learn") and run_learn_stage(empty).total == 0
    too_many = own_run.model_copy(update={"learn": own_run.learn.model_copy(update={"n_train": 7})})
    with pytest.raises(ValueError, match="learn.n_train is 7 but the run has 6 samples"):
        run_learn_stage(too_many)


def test_a_changed_loss_model_retrains_its_targets_and_only_theirs(own_run, tmp_path):
    """A changed classifier (same settings otherwise) trains the classifier target again; the CLIP target resumes."""
    from safetensors.torch import load_file, save_file

    from hmine.labelling import embedded_classifier_path

    changed = tmp_path / "classifier"
    shutil.copytree(embedded_classifier_path(), changed)
    weights = load_file(str(changed / "model.safetensors"))
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in weights.items()}, str(changed / "model.safetensors"))
    config = own_run.model_copy(update={"label": own_run.label.model_copy(update={"classifier_path": changed})})
    work = config.run_dir / "learn"
    logs = {p: p.read_text() for p in work.rglob("log.jsonl")}
    run_learn_stage(config, show_progress=False)
    for kind in ("delta_h", "delta_block"):
        assert (work / "red" / kind / "log.jsonl").read_text() != logs[work / "red" / kind / "log.jsonl"]  # trained again
        assert (work / "smile" / kind / "log.jsonl").read_text() == logs[work / "smile" / kind / "log.jsonl"]  # resumed


def test_a_crash_before_the_store_is_written_leaves_no_complete_store_with_other_blocks(own_run, monkeypatch):
    """Write, then mark done: a complete learned.zarr never records blocks other than the files beside it."""
    import hmine.directions
    from hmine.learning.store import file_sha256
    from hmine.stores import store_state

    config = own_run.model_copy(update={"learn": own_run.learn.model_copy(update={"block_learning_rate": 0.5})})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the store was written")

    monkeypatch.setattr(hmine.directions, "write_directions", crash)
    with pytest.raises(KeyboardInterrupt):
        run_learn_stage(config, show_progress=False)
    path = learned_path(config)
    if store_state(path) == "complete":  # the old store may stay only with its own blocks
        blocks = json.loads(open_group(path).attrs["hmine:delta_blocks"])
        assert {n: file_sha256(config.run_dir / e["path"]) for n, e in blocks.items()} == {n: e["sha256"] for n, e in blocks.items()}
    monkeypatch.undo()
    run_learn_stage(config, show_progress=False)
    assert up_to_date(config, "learn") and learned_damaged(config) == 0


def test_loading_a_block_that_is_not_the_stores_names_the_file(own_run):
    from hmine.learning.edit_directions import block_editor_for

    config = own_run
    timesteps = make_sampler(config).timesteps.tolist()
    block_editor_for(config, "learned-block/red", timesteps)
    path = block_path(config, "red")
    shutil.copyfile(block_path(config, "smile"), path)  # a valid block, but not the one learned.zarr records
    with pytest.raises(ValueError, match=r"red\.safetensors.*sha256.*learn stage"):
        block_editor_for(config, "learned-block/red", timesteps)


def _preflight(config):
    from hmine.stages import get

    for check in get("learn").preflight:
        check(config)


def _with_targets(config, targets, **label):
    from hmine.learning.config import LearnTarget

    return config.model_copy(update={"learn": config.learn.model_copy(update={"targets": [LearnTarget(**t) for t in targets]}),
                                     "label": config.label.model_copy(update=label)})  # fmt: skip


def test_preflight_refuses_what_the_learn_stage_cannot_train_naming_the_field(run):
    from hmine.prompts import TextConfig

    config, _ = run
    _preflight(config)
    text = config.model_copy(update={"sample": config.sample.model_copy(update={"text": TextConfig(prompts=["a red circle"])})})
    with pytest.raises(ValueError, match=r"^learn.targets .*sample.text.*unconditional"):
        _preflight(text)
    with pytest.raises(ValueError, match=r"^learn.targets\[purple\].attribute is 'is_purple'.*world classifier"):
        _preflight(_with_targets(config, [{"name": "purple", "attribute": "is_purple"}]))
    with pytest.raises(ValueError, match=r"^learn.targets\[red\].leakage_attributes names \['smiling'\]"):
        _preflight(_with_targets(config, [{"name": "red", "attribute": "is_red", "leakage_attributes": ["is_circle", "smiling"]}]))
    with pytest.raises(ValueError, match=r"^learn.targets\[red\].leakage_attributes is unset.*label.attributes.*\['smiling'\]"):
        _preflight(_with_targets(config, [{"name": "red", "attribute": "is_red"}], attributes=["is_red", "smiling"]))
    # a CLIP target has no world attributes to check
    _preflight(_with_targets(config, [{"name": "s", "kind": "clip", "source": "a", "target": "b"}], attributes=["smiling"]))


def test_an_empty_learn_window_names_the_learn_fields(own_run):
    config = own_run.model_copy(update={"learn": own_run.learn.model_copy(update={"t_edit": 999_999})})
    with pytest.raises(ValueError, match=r"learn.t_edit / learn.t_edit_max"):
        run_learn_stage(config, show_progress=False)
