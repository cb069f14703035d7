"""Prefect integration: the flows run offline against the session's temporary server."""


import xarray as xr

from hmine.config import load_config


def test_sample_flow_runs_then_is_served_from_cache(tiny_pixel_model_dir, tmp_path):
    from flows.stages import sample_flow

    config = load_config(
        None,
        [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=flow",
         "sample.n_samples=6", "sample.batch_size=3", "sample.num_inference_steps=2"],
    )
    first = sample_flow(config.model_dump_json())
    assert first["computed"] == 2 and not first["cache_hit"]
    second = sample_flow(config.model_dump_json())
    assert second["computed"] == 0
    third = sample_flow(config.model_dump_json())
    assert third["cache_hit"]
    ds = xr.open_zarr(first["path"], consolidated=False)
    assert ds.attrs["hmine:complete"] and ds["h"].shape[0] == 6
