"""Label, Jacobian and edit sharded over a Dask cluster equal the single-process run; PCA on
the cluster equals the in-memory fit (issue 20, item 3)."""

import shutil

import numpy as np
import pandas as pd
import pytest

from hmine.config import load_config

pytestmark = pytest.mark.slow  # starts a Dask cluster and runs whole stages

BASE = ["model.id=embedded:shapes-ddpm", "sample.n_samples=6", "sample.batch_size=3", "sample.num_inference_steps=2",
        "label.batch_size=2", "jacobian.n_samples=3", "jacobian.k=2", "jacobian.tol=1e-2", "jacobian.max_iter=30",
        "jacobian.batch_size=2", "jacobian.mask=shape", "jacobian.localised_rank=2", "label.attributes=[is_red]",
        "directions.pca_components=3", "directions.regression=false", "directions.top_k=2",
        "directions.probe_components=2", "edit.n_samples=2", "edit.scales=[-1,1]", "edit.batch_size=4",
        "edit.directions=[pca/0,pca/1,pca/2]"]  # fmt: skip


def _prefix_counts(cluster, prefix: str) -> dict:
    return dict(cluster.scheduler.task_prefixes[prefix].state_counts) if prefix in cluster.scheduler.task_prefixes else {}


def test_label_jacobian_and_edit_on_a_two_worker_cluster_equal_the_single_process_run(tmp_path):
    """Shards on a LocalCluster of 2 single-threaded worker processes against the stages'
    plain functions, bit for bit; a unit computed before the flow (a killed run's finished
    shard) is kept and not computed again.

    Worker processes, as ``--dask local`` starts them: two shards running at once as threads
    of one process (``processes=False``) gave Jacobian results a few ulp away (singular
    values by up to 6e-8), while one shard at a time in a thread other than the main one
    gave the same bits.
    """
    from distributed import LocalCluster

    from flows.stages import run_pipeline
    from hmine.stages.directions import run_directions_stage
    from hmine.stages.edit import run_edit_stage
    from hmine.stages.edit_shards import edit_directions, prepare_edit_stage
    from hmine.stages.jacobian import analyse_groups, prepare_jacobian_stage, run_jacobian_stage
    from hmine.stages.label import label_batches, prepare_label_stage, run_label_stage
    from hmine.stages.sample import run_sample_stage
    from hmine.stores import open_group

    local = load_config(None, [*BASE, f"output_root={tmp_path}", "name=local"])
    run_sample_stage(local, show_progress=False)
    labels = run_label_stage(local, show_progress=False)
    jacobian = run_jacobian_stage(local, show_progress=False)
    run_directions_stage(local)
    edits = run_edit_stage(local, show_progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        config = load_config(None, [*BASE, f"output_root={tmp_path}", "name=dask", "runner.kind=dask",
                                    "runner.shards_per_worker=1", f'runner.address="{cluster.scheduler_address}"'])  # fmt: skip
        shutil.copytree(local.run_dir / "samples.zarr", config.run_dir / "samples.zarr")  # same store, same uuid
        plan = prepare_label_stage(config)
        label_batches(config, plan.todo[1:2], plan.identity)  # one batch done before: kept
        on_dask = run_pipeline(config, ["label"])  # as `hmine label --dask ADDRESS` runs it
        plan = prepare_jacobian_stage(config)
        assert len(plan.todo) == 3  # one group of two batches per sample (batch_size 2, 2 steps)
        analyse_groups(config, plan.todo[2:], plan.identity)
        on_dask |= run_pipeline(config, ["jacobian"])
        directions = run_pipeline(config, ["directions"])["directions"]  # dask's scheduler: the cluster
        plan = prepare_edit_stage(config)
        edit_directions(config, plan.todo[:1], plan.identity)  # the window as the store records it
        on_dask |= run_pipeline(config, ["edit"])
        stages = ("label", "jacobian", "edit")
        ran = {stage: _prefix_counts(cluster, f"{stage}_shard_task") for stage in stages}  # cumulative
        again = run_pipeline(config, list(stages))
    assert (on_dask["label"]["computed"], on_dask["label"]["shards"]) == (2, 2) and labels.computed == 3
    assert (on_dask["jacobian"]["computed"], on_dask["jacobian"]["shards"]) == (4, 2) and jacobian.computed == 6
    assert (on_dask["edit"]["computed"], on_dask["edit"]["shards"]) == (2, 2) and edits.computed == 3
    assert [ran[stage]["memory"] for stage in stages] == [2, 2, 2]  # every shard ran on the cluster
    assert all(result["cache_hit"] and result["shards"] == 0 for result in again.values())

    a, b = pd.read_parquet(labels.path), pd.read_parquet(config.run_dir / "labels.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    a, b = pd.read_parquet(local.run_dir / "edit_effects.parquet"), pd.read_parquet(config.run_dir / "edit_effects.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert directions["computed"] == 1
    for store, required in (("directions.zarr", {"direction"}), ("jacobian.zarr", {"localised_vectors", "inside_mask_fraction"}), ("edits.zarr", {"images"})):
        a, b = open_group(local.run_dir / store), open_group(config.run_dir / store)
        assert b.attrs["hmine:complete"]
        names = sorted(a.array_keys())
        assert names == sorted(b.array_keys()) and required <= set(names)
        differing = [name for name in names if not np.array_equal(a[name][...], b[name][...], equal_nan=a[name].dtype.kind == "f")]
        assert not differing, (store, differing)
    for strips in ("jacobian_strips", "edit_strips"):
        written = sorted(p.name for p in (local.run_dir / strips).iterdir())
        assert written and written == sorted(p.name for p in (config.run_dir / strips).iterdir())


def test_pca_on_the_cluster_equals_the_in_memory_fit_within_0_01_degrees(tmp_path):
    """StepwisePCA's out-of-core path under :func:`flows.sharding.dask_cluster` computes on the
    cluster's workers and equals the in-memory fit."""
    import dask.array as da
    import xarray as xr
    from distributed import LocalCluster

    from flows.sharding import dask_cluster
    from hmine.directions.pca import StepwisePCA

    rng = np.random.default_rng(0)
    n, steps, shape = 240, 2, (6, 4, 4)
    spectrum = 1.0 / np.sqrt(np.arange(1, np.prod(shape) + 1))
    values = (rng.standard_normal((n, steps, int(np.prod(shape)))) * spectrum).reshape(n, steps, *shape)
    dims = ("sample", "step", "channel", "y", "x")
    h = xr.DataArray(da.from_array(values.astype(np.float32), chunks=(60, 1, *shape)), dims=dims)
    in_memory = StepwisePCA(n_components=4).fit(h)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        config = load_config(None, [f"output_root={tmp_path}", "runner.kind=dask",
                                    f'runner.address="{cluster.scheduler_address}"'])  # fmt: skip
        with dask_cluster(config):
            on_cluster = StepwisePCA(n_components=4, memory_budget_bytes=20_000).fit(h)
        tasks = sum(sum(p.state_counts.values()) for p in cluster.scheduler.task_prefixes.values())
    assert in_memory.solver_ == "memory" and on_cluster.solver_ == "dask"
    assert tasks > 0  # the dask path's passes ran on the cluster
    a = in_memory.components_.values.reshape(4, steps, -1)
    b = on_cluster.components_.values.reshape(4, steps, -1)
    cosines = np.abs(np.einsum("kti,kti->kt", a, b)) / (np.linalg.norm(a, axis=2) * np.linalg.norm(b, axis=2))
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    assert angles.max() < 0.01, angles


def test_worker_configs_have_absolute_paths_and_keep_the_stage_hashes_of_the_config(tmp_path, monkeypatch):
    from hmine.sharding import worker_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks").mkdir()
    config = load_config(None, ["output_root=stores", "report_root=reports", "jacobian.mask=files",
                                "jacobian.mask_dir=masks"])  # fmt: skip
    shipped = worker_config(config)
    assert shipped.output_root == tmp_path / "stores" and shipped.report_root == tmp_path / "reports"
    assert shipped.jacobian.mask_dir == tmp_path / "masks"
    assert shipped.model.id == config.model.id  # the embedded model: no path
    assert config.output_root == type(config.output_root)("stores")  # the caller's config is left alone


def test_the_cli_offers_dask_for_every_sharded_stage_and_the_directions_stage():
    from hmine.cli import DASK_STAGES, build_parser
    from hmine.sharding import SHARDED_STAGES

    assert DASK_STAGES == {*SHARDED_STAGES, "directions"}
    args = build_parser().parse_args(["label", "demo.yaml", "--dask", "local"])
    assert args.dask == "local"
