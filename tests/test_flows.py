"""Prefect integration: the flows run offline against the session's temporary server."""


from pathlib import Path

import xarray as xr

from hmine.config import load_config


def test_sample_flow_runs_then_is_served_from_cache(tiny_pixel_model_dir, tmp_path):
    from flows.stages import sample_flow

    config = load_config(
        None,
        [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=flow",
         "sample.n_samples=6", "sample.batch_size=3", "sample.num_inference_steps=2"],
    )
    first = sample_flow(config)
    assert first["computed"] == 2 and not first["cache_hit"]
    second = sample_flow(config)  # the first rerun is served from the cache
    assert second["computed"] == 0 and second["cache_hit"]
    third = sample_flow(config)
    assert third["cache_hit"]
    ds = xr.open_zarr(first["path"], consolidated=False)
    assert ds.attrs["hmine:complete"] and ds["h"].shape[0] == 6
    before = ds["h"].values

    # a chunk lost after a cached run is not served from the cache: the stage redoes it
    (Path(first["path"]) / "h" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    fourth = sample_flow(config)
    assert not fourth["cache_hit"] and fourth["computed"] == 1
    after = xr.open_zarr(first["path"], consolidated=False)["h"].values
    assert (after == before).all()


def test_sample_flow_on_a_dask_cluster_equals_the_serial_store(tiny_pixel_model_dir, tmp_path):
    """The sample stage's shards as Prefect tasks on Dask workers (DaskTaskRunner).

    The cluster is in-process (worker threads), so its tasks report to this session's
    Prefect server; the flow reaches it by address, as ``hmine sample --dask ADDRESS``.
    """
    import numpy as np
    from distributed import LocalCluster

    from flows.stages import sample_flow
    from hmine.stages.sample import (
        prepare_sample_stage,
        run_sample_stage,
        sample_batches,
    )
    from hmine.stores import open_group

    base = [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}",
            "sample.n_samples=10", "sample.batch_size=2", "sample.num_inference_steps=3"]
    reference = run_sample_stage(load_config(None, [*base, "name=serial"]), show_progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        config = load_config(None, [*base, "name=dask", "runner.kind=dask", "runner.shards_per_worker=2",
                                    f'runner.address="{cluster.scheduler_address}"'])
        prepare_sample_stage(config)
        sample_batches(config, [3])  # a partial store: the flow resumes it
        first = sample_flow(config)
        shard_runs = dict(cluster.scheduler.task_prefixes["sample_shard_task"].state_counts)
        again = sample_flow(config)
    assert (first["computed"], first["skipped"], first["shards"]) == (4, 1, 2)
    assert shard_runs.get("memory") == 2  # both shards ran on the cluster's worker
    assert (again["computed"], again["shards"]) == (0, 0)
    a, b = open_group(reference.path), open_group(first["path"])
    assert b.attrs["hmine:complete"]
    for name in ("h", "x0", "done", "sample", "step"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
