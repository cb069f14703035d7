"""Directions within the memory budget (issue 21, item 2): one read per step, the plan, both paths agree."""

from __future__ import annotations

from collections import Counter

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.linear_model import LogisticRegression, Ridge

from hmine.directions import H_DIMS, LinearProbe, StepRows, fit_directions, plan_step
from hmine.directions.regression import regression_of_rows
from hmine.directions.rows import step_memory_bytes
from hmine.directions.supervised import _split

STEPS = (900, 500, 0)
SPATIAL = (6, 4, 4)  # 96 features per step


class CountingArray:
    """An array-like that counts the reads of each (sample chunk, step) dask asks it for."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: Counter = Counter()

    def __getitem__(self, key):
        out = self.array[key]
        if out.size:  # dask's empty probes for metadata read nothing
            step = key[1] if isinstance(key[1], int) else key[1].start  # dask fuses h[:, t] into the read
            self.reads[(key[0].start, step)] += 1
        return out


def world(n=240, seed=0):
    """Two attributes along planted per-step directions plus shared structure and noise, float16 like the store."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SPATIAL))
    latents = rng.normal(size=(n, 2))
    axes = rng.normal(size=(len(STEPS), 6, d))
    factors = rng.normal(size=(n, len(STEPS), 4)) * np.array([6.0, 4.0, 3.0, 2.0])
    array = np.einsum("na,tad->ntd", latents, axes[:, :2]) * 2 + np.einsum("ntf,tfd->ntd", factors, axes[:, 2:])
    array += rng.normal(size=array.shape)
    labels = pd.DataFrame(1 / (1 + np.exp(-2 * latents)), columns=["a", "b"], index=pd.Index(np.arange(n) + 100, name="seed"))
    return array.reshape(n, len(STEPS), *SPATIAL).astype(np.float16), labels


def as_h(data, chunk=40) -> xr.DataArray:
    return xr.DataArray(
        da.from_array(data, chunks=(chunk, 1, *SPATIAL)), dims=H_DIMS,
        coords={"sample": np.arange(data.shape[0]) + 100, "step": np.asarray(STEPS, dtype=np.int64)},
    )  # fmt: skip


def fit(h, labels, budget, **settings):
    return fit_directions(
        h, labels, pca_components=3, top_k=40, conditional="all", memory_budget_bytes=budget, random_state=0, **settings
    )


def fitted_budget(array) -> int:
    """A budget that loads each step (raw-coordinate probes' rows too), but not the whole h."""
    n, d = array.shape[0], int(np.prod(SPATIAL))
    loaded = step_memory_bytes(n, d, 4, k=16, basis_columns=16 + 2 * 24, load=True) + n * d * 4
    return loaded + array.nbytes  # less than twice h past the smallest working set: no whole-h copy


def test_each_step_is_read_once_for_all_its_fits():
    array, labels = world()
    counting = CountingArray(array)
    ds = fit(as_h(counting), labels, fitted_budget(array))
    assert ds.attrs["hmine:directions_path"].startswith("one read per step, in memory")
    chunks = {(start, t) for start in range(0, array.shape[0], 40) for t in range(len(STEPS))}
    assert set(counting.reads) == chunks
    # one read for the PCA, mean differences, probes and regression of the step, one for the scales
    assert set(counting.reads.values()) == {2}


def test_a_small_lazy_h_is_read_once_in_all():
    array, labels = world()
    counting = CountingArray(array)
    ds = fit(as_h(counting), labels, 2**30)
    assert ds.attrs["hmine:directions_path"].startswith("h loaded whole")
    assert set(counting.reads.values()) == {1}


@pytest.mark.parametrize("probe_components", [16, None])
def test_loaded_and_streamed_paths_give_the_same_directions(probe_components):
    array, labels = world()
    h = as_h(array)
    loaded = fit(h, labels, fitted_budget(array), probe_components=probe_components)
    streamed = fit(h, labels, 1, probe_components=probe_components)
    assert streamed.attrs["hmine:directions_path"].startswith("streamed from the store")
    assert "(over it)" in streamed.attrs["hmine:directions_path"]
    assert loaded["name"].values.tolist() == streamed["name"].values.tolist()
    assert len(loaded["name"]) == 3 + 2 + 2 + 4 + 2
    names = loaded["name"].values.tolist()
    probe_based = np.array(["probe" in name for name in names])
    exact, solved = loaded.isel(direction=~probe_based), streamed.isel(direction=~probe_based)
    np.testing.assert_allclose(exact["direction"].values, solved["direction"].values, atol=1e-6)
    np.testing.assert_allclose(loaded["scale_unit"].values, streamed["scale_unit"].values, rtol=1e-2)
    np.testing.assert_allclose(exact["scale_unit"].values, solved["scale_unit"].values, rtol=1e-6)
    # probes: lbfgs stops at its tolerance (1e-4 on the gradient), where rounding-level
    # differences in its input move the normal by a few hundredths of a degree
    u = loaded["direction"].values[probe_based].reshape(probe_based.sum(), len(STEPS), -1)
    v = streamed["direction"].values[probe_based].reshape(probe_based.sum(), len(STEPS), -1)
    degrees = np.degrees(np.arccos(np.clip((u * v).sum(axis=2), -1, 1)))
    assert degrees.max() < 0.5, degrees
    # row blocks differ (one block loaded, the store's chunks streamed): sums round differently,
    # which may move one of the 60 held-out predictions at most
    np.testing.assert_allclose(loaded["probe_accuracy"].values, streamed["probe_accuracy"].values, atol=1 / 60 + 1e-9)


def test_regression_of_rows_equals_ridge():
    array, labels = world(n=120)
    h = as_h(array)
    design = labels.to_numpy()
    step = array[:, 1].reshape(120, -1).astype(np.float64)
    reference = Ridge(alpha=0.5, fit_intercept=True).fit(design, step).coef_.T
    for load in (True, False):
        np.testing.assert_allclose(regression_of_rows(StepRows(h, 1, load=load), design, 0.5), reference, atol=1e-9)


def test_raw_probe_equals_logistic_regression_on_the_centred_training_rows():
    array, labels = world(n=200)
    h = as_h(array)
    probe = LinearProbe(n_components=None, random_state=0).fit(h, labels["a"])
    y = (labels["a"].to_numpy() > 0.5).astype(int)
    train, test, _ = _split(y, 0.25, 0, "a")  # the probe's own split
    for t in range(len(STEPS)):
        x = array[:, t].reshape(200, -1).astype(np.float32)
        centre = x[train].astype(np.float64).mean(axis=0).astype(np.float32)
        model = LogisticRegression(C=1.0, max_iter=probe.max_iter, random_state=0).fit(x[train] - centre, y[train])
        coef = probe.coef_.isel(step=t).values.reshape(-1)
        np.testing.assert_allclose(coef, model.coef_[0], rtol=1e-5, atol=1e-7)
        assert probe.heldout_accuracy_.values[t] == model.score(x[test] - centre, y[test])


def test_the_plan_loads_a_step_that_fits_and_streams_one_that_does_not():
    budget = 4 * 2**30
    fits = plan_step(20_000, 32_768, 4, 16, budget)
    assert fits.load and fits.within_budget
    assert fits.minimum_bytes > 20_000 * 32_768 * 4  # the loaded float32 step is in it
    assert fits.max_basis > 16 + 2 * 24  # the budget left over goes to the Krylov basis
    too_big = plan_step(40_000, 32_768, 4, 16, budget)
    assert not too_big.load and too_big.within_budget
    assert too_big.minimum_bytes < 2**30  # streamed: nothing of size samples x features
    # raw-coordinate probes hold their training rows: 15,000 x 32,768 float32 more
    raw = plan_step(20_000, 32_768, 4, 16, budget, dense_rows=15_000)
    assert not raw.load and raw.minimum_bytes > 15_000 * 32_768 * 4
    over = plan_step(40_000, 32_768, 4, 16, 2**20)
    assert not over.load and not over.within_budget and "(over it)" in over.describe()
