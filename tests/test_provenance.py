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
