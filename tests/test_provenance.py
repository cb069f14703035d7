"""Pinned provenance: software versions in every output, the device a store was begun on,
hub revisions pinned to a commit on first use."""

import json

import pytest

from hmine.config import load_config


def _config(model_dir, tmp_path, *overrides):
    return load_config(None, [f"model.id={model_dir}", f"output_root={tmp_path}", "name=prov",
                              "sample.n_samples=4", "sample.batch_size=2", "sample.num_inference_steps=2",
                              *overrides])


def test_stores_record_versions_device_and_dtype(tiny_pixel_model_dir, tmp_path):
    from importlib import metadata

    import torch

    from hmine.stages import identity_record
    from hmine.stages.sample import run_sample_stage
    from hmine.stores import open_group

    config = _config(tiny_pixel_model_dir, tmp_path)
    attrs = open_group(run_sample_stage(config, show_progress=False).path).attrs
    versions = json.loads(attrs["hmine:versions"])
    assert versions["torch"] == metadata.version("torch") and versions["diffusers"] == metadata.version("diffusers")
    assert versions["transformers"] == metadata.version("transformers")
    assert versions["hmine"] == metadata.version("hmine")
    assert versions["cuda"] == (torch.version.cuda or "none")
    assert attrs["hmine:source_dirty"] in (True, False, "unknown")
    assert (attrs["hmine:device"], attrs["hmine:dtype"]) == ("cpu", "float32")
    # every other stage's output records the same, through its identity record
    record = identity_record(config, "label")
    assert record["hmine:versions"] == attrs["hmine:versions"] and "hmine:source_dirty" in record


def test_resuming_a_store_on_another_device_is_refused(tiny_pixel_model_dir, tmp_path):
    from hmine.stages.sample import prepare_sample_stage, run_sample_stage, sample_batches
    from hmine.stores import StoreConfigMismatch, open_group

    config = _config(tiny_pixel_model_dir, tmp_path)
    prepare_sample_stage(config)
    sample_batches(config, [0])
    group = open_group(config.run_dir / "samples.zarr", mode="r+")
    group.attrs["hmine:device"] = "cuda:NVIDIA H200"  # as if begun on a GPU
    with pytest.raises(StoreConfigMismatch, match=r"begun on cuda:NVIDIA H200, not cpu .*model.device=cpu"):
        run_sample_stage(config, show_progress=False)
    assert open_group(config.run_dir / "samples.zarr")["done"][...].tolist() == [True, True, False, False]
    group.attrs["hmine:device"] = "cpu"  # back on the device it was begun on: it resumes
    assert run_sample_stage(config, show_progress=False).computed == 1
    # a complete store is read on any device: nothing is added to it
    group.attrs["hmine:device"] = "cuda:NVIDIA H200"
    assert run_sample_stage(config, show_progress=False).computed == 0


def _fake_hub_model(cache, model_dir, model_id, commits):
    """A hub model in a huggingface_hub cache, as a download leaves it: one snapshot per commit."""
    import shutil

    folder = cache / f"models--{model_id.replace('/', '--')}"
    for commit in commits:
        snapshot = folder / "snapshots" / commit
        shutil.copytree(model_dir, snapshot)
        (snapshot / "model_index.json").write_text(json.dumps(
            {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}))
    (folder / "refs").mkdir()
    return folder / "refs" / "main"


@pytest.mark.slow
def test_a_hub_revision_is_pinned_to_its_commit_on_first_use(tiny_pixel_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from hmine.stores import open_group

    first, second = "1a" * 20, "2b" * 20
    main = _fake_hub_model(tmp_path / "hub", tiny_pixel_model_dir, "someone/tiny-ddpm", [first, second])
    main.write_text(first)
    config_file = tmp_path / "hub.yaml"
    config_file.write_text(f"name: hub\noutput_root: {tmp_path / 'stores'}\nmodel: {{id: someone/tiny-ddpm}}\n"
                           "sample: {n_samples: 4, batch_size: 2, num_inference_steps: 2}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}

    def sample(*extra):
        return subprocess.run([sys.executable, "-m", "hmine.cli", "sample", str(config_file), "--no-prefect", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    out = sample()
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "stores" / "hub"
    assert json.loads((run_dir / "pins.json").read_text()) == {
        "model.revision": {"id": "someone/tiny-ddpm", "requested": "main", "commit": first}}
    assert json.loads((run_dir / "config.json").read_text())["model"]["revision"] == first
    assert open_group(run_dir / "samples.zarr").attrs["hmine:model_revision"] == first

    main.write_text(second)  # upstream moves main: the run keeps its commit, nothing is resampled
    out = sample()
    assert out.returncode == 0, out.stderr
    assert "'computed': 0" in out.stdout
    assert json.loads((run_dir / "config.json").read_text())["model"]["revision"] == first
    from hmine.pipeline import stage_status

    # `hmine status RUN --config hub.yaml` applies the run's pins (no network): not stale
    assert stage_status(run_dir, load_config(config_file))[0].state == "complete"

    # an explicit revision wins: another commit is another sample config, refused on this run
    out = sample("--set", f"model.revision={second}")
    assert out.returncode == 2 and "samples.zarr was written by config" in out.stderr
    # and a new run resolves main afresh
    out = sample("--set", "name=hub2")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "stores" / "hub2" / "config.json").read_text())["model"]["revision"] == second


def test_a_local_models_identity_sees_its_config_files_but_not_its_card(tmp_path):
    """A scheduler config changes what the same weights sample (clip_sample, prediction_type):
    stores made before must not be reused. A model card changes nothing."""
    import shutil

    from hmine.identity import model_identity, weights_fingerprint
    from hmine.models import embedded_model_path

    folder = tmp_path / "model"
    shutil.copytree(embedded_model_path("embedded:shapes-ddpm"), folder)
    before = model_identity(str(folder), None)
    assert before == model_identity("embedded:shapes-ddpm", None) != ""
    (folder / "MODEL_CARD.md").write_text("edited card")
    (folder / "h.zarr").mkdir()
    (folder / "h.zarr" / "zarr.json").write_text("{}")  # what a run may write below the folder
    (folder / "stores" / "run").mkdir(parents=True)
    (folder / "stores" / "run" / "config.json").write_text("{}")
    assert model_identity(str(folder), None) == before
    scheduler = folder / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler.read_text())
    settings["clip_sample"] = not settings.get("clip_sample", True)
    scheduler.write_text(json.dumps(settings))
    assert model_identity(str(folder), None) != before
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    assert weights_fingerprint(folder) == ""  # config files alone identify no model
