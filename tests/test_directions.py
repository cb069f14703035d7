"""Directions: PCA against scikit-learn on both paths, supervised directions, scale, store."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from hmine.directions import (
    H_DIMS,
    Direction,
    IncompleteStoreError,
    LinearProbe,
    StepwisePCA,
    build_direction_dataset,
    conditional_direction,
    direction_by_name,
    fit_directions,
    mean_difference_direction,
    normalise_direction,
    open_directions,
    write_directions,
)

STEPS = (900, 500, 0)
SPATIAL = (8, 4, 4)  # channel, y, x -> 128 features per step
STDS = np.array([10.0, 7.0, 5.0, 3.0])  # planted component stds: a clear gap above the noise


def as_h(array: np.ndarray, *, steps=STEPS, chunk=50, first_seed=1000) -> xr.DataArray:
    """A dask-backed h like the one xr.open_zarr gives: chunks (batch, 1, C, H, W)."""
    n = array.shape[0]
    return xr.DataArray(
        da.from_array(array, chunks=(chunk, 1, *array.shape[2:])),
        dims=H_DIMS,
        coords={
            "sample": np.arange(first_seed, first_seed + n),
            "step": np.asarray(steps, dtype=np.int64),
            "step_index": ("step", np.arange(len(steps))),
        },
    )


def planted(n=200, *, steps=STEPS, spatial=SPATIAL, noise=0.1, seed=0, dtype=np.float32) -> np.ndarray:
    """Rank-4 structure per step (shared latents, step-specific bases), noise and an offset."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(spatial))
    latents = rng.normal(size=(n, len(STDS))) * STDS
    base = rng.normal(size=(len(STDS), d))
    out = np.empty((n, len(steps), d))
    for t in range(len(steps)):
        basis = np.linalg.qr((base + 0.5 * rng.normal(size=base.shape)).T)[0].T
        out[:, t] = latents @ basis + noise * rng.normal(size=(n, d)) + rng.normal(size=d)
    return out.reshape(n, len(steps), *spatial).astype(dtype)


def max_angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(subspace_angles(a.T, b.T)))


def sklearn_reference(matrix: np.ndarray, k: int) -> PCA:
    return PCA(n_components=k, svd_solver="full").fit(matrix.astype(np.float64))


@pytest.fixture(scope="module")
def data():
    return planted()


# -- PCA ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget, solver", [(2**30, "memory"), (1, "dask")])
def test_per_step_pca_matches_sklearn(data, budget, solver):
    k = 4
    pca = StepwisePCA(n_components=k, memory_budget_bytes=budget).fit(as_h(data))
    assert pca.solver_ == solver
    assert pca.components_.dims == ("component", "step", "channel", "y", "x")
    assert pca.explained_variance_.dims == ("component", "step")
    assert pca.n_samples_ == len(data)
    np.testing.assert_array_equal(pca.components_["step"].values, STEPS)
    for t in range(len(STEPS)):
        matrix = data[:, t].reshape(len(data), -1)
        reference = sklearn_reference(matrix, k)
        ours = pca.components_.isel(step=t).values.reshape(k, -1)
        assert max_angle(ours, reference.components_) < 1e-3
        np.testing.assert_allclose(pca.explained_variance_.isel(step=t), reference.explained_variance_, rtol=1e-5)
        np.testing.assert_allclose(
            pca.explained_variance_ratio_.isel(step=t), reference.explained_variance_ratio_, rtol=1e-5
        )
        np.testing.assert_allclose(pca.mean_.isel(step=t).values.reshape(-1), reference.mean_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("budget, solver", [(2**30, "memory"), (1, "dask")])
def test_all_steps_pca_matches_sklearn_on_flattened_matrix(data, budget, solver):
    k = 4
    half = data.astype(np.float16)  # the store's dtype; the math must still be float64
    pca = StepwisePCA(n_components=k, mode="all_steps", memory_budget_bytes=budget).fit(as_h(half))
    assert pca.solver_ == solver
    assert pca.explained_variance_.dims == ("component",)
    reference = sklearn_reference(half.reshape(len(half), -1), k)
    ours = pca.components_.values.reshape(k, -1)
    assert max_angle(ours, reference.components_) < 1e-3
    np.testing.assert_allclose(pca.explained_variance_, reference.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(pca.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-9)


def test_both_paths_give_the_same_signed_components(data):
    memory = StepwisePCA(n_components=4).fit(as_h(data))
    out_of_core = StepwisePCA(n_components=4, memory_budget_bytes=1).fit(as_h(data))
    np.testing.assert_allclose(memory.components_.values, out_of_core.components_.values, atol=1e-6)


@pytest.mark.parametrize("budget", [2**30, 1])
def test_signs_are_aligned_to_the_first_step(budget):
    # Rank-1 steps whose largest entries swap places between steps: the per-step
    # largest-entry-positive rule alone would point step 1 against step 0.
    rng = np.random.default_rng(3)
    d = int(np.prod(SPATIAL))
    rest = 0.05 * rng.normal(size=d - 2)
    axes = []
    for first, second in [(0.6, -0.55), (0.55, -0.6), (0.5, -0.62)]:
        u = np.concatenate([[first, second], rest])
        axes.append(u / np.linalg.norm(u))
    latent = rng.normal(size=(150, 1)) * 5
    array = np.stack([latent * u + 0.01 * rng.normal(size=(150, d)) for u in axes], axis=1)
    pca = StepwisePCA(n_components=1, memory_budget_bytes=budget).fit(as_h(array.reshape(150, 3, *SPATIAL)))
    components = pca.components_.values.reshape(1, 3, d)
    reference = components[0, 0]
    assert all(components[0, t] @ reference >= 0 for t in range(3))
    for t, u in enumerate(axes):  # step 0 follows svd_flip (largest entry positive); the rest follow step 0
        assert components[0, t] @ u > 0.999


def test_pca_rejects_too_many_components(data):
    with pytest.raises(ValueError, match="n_components"):
        StepwisePCA(n_components=500).fit(as_h(data))


# -- supervised raw directions --------------------------------------------------------


def test_mean_difference_equals_hand_computation(data):
    h = as_h(data)
    rng = np.random.default_rng(1)
    values = rng.uniform(size=len(data))
    seeds = h["sample"].values
    order = rng.permutation(len(data))  # labels arrive in another order than h
    scores = pd.Series(values[order], index=pd.Index(seeds[order], name="seed"), name="is_circle")
    direction = mean_difference_direction(h, scores, top_k=10)
    ranked = np.argsort(values)
    expected = data[ranked[-10:]].astype(np.float64).mean(0) - data[ranked[:10]].astype(np.float64).mean(0)
    assert direction.dims == ("step", "channel", "y", "x")
    np.testing.assert_allclose(direction.values, expected, rtol=1e-12, atol=1e-12)
    assert direction.attrs["attribute"] == "is_circle"
    with pytest.raises(ValueError, match="top_k"):
        mean_difference_direction(h, scores, top_k=101)


def test_missing_seeds_are_named(data):
    h = as_h(data)
    scores = pd.Series(np.linspace(0, 1, len(data)), index=pd.Index(h["sample"].values, name="seed"))
    with pytest.raises(ValueError, match="1003"):
        mean_difference_direction(h, scores.drop(1003), top_k=5)


def separable(n=300, *, steps=(900, 0), spatial=(4, 2, 2), seed=0):
    """Two classes on either side of a planted normal per step (margin 3 noise stds)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(spatial))
    labels = rng.integers(0, 2, size=n)
    normals = rng.normal(size=(len(steps), d))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    array = (2 * labels - 1)[:, None, None] * 3.0 * normals + rng.normal(size=(n, len(steps), d)) + 2.0
    h = as_h(array.reshape(n, len(steps), *spatial).astype(np.float32), steps=steps)
    seeds = pd.Index(h["sample"].values, name="seed")
    scores = pd.Series(np.where(labels == 1, 0.9, 0.1), index=seeds, name="is_circle")
    return h, scores, normals


def test_probe_finds_the_planted_normal():
    h, scores, normals = separable()
    probe = LinearProbe().fit(h, scores)
    assert probe.coef_.dims == ("step", "channel", "y", "x")
    assert probe.heldout_accuracy_.dims == ("step",)
    assert (probe.heldout_accuracy_.values > 0.9).all()
    assert probe.stratified_ and probe.n_heldout_ == 75
    for t in range(2):
        coef = probe.coef_.isel(step=t).values.reshape(-1)
        assert coef @ normals[t] / np.linalg.norm(coef) > 0.95
    # the intercept is in uncentred h coordinates: it reproduces the held-out decisions
    x = h.isel(step=0).values.reshape(len(scores), -1).astype(np.float64)
    decision = x @ probe.coef_.isel(step=0).values.reshape(-1) + float(probe.intercept_.isel(step=0))
    assert ((decision > 0) == (scores.values > 0.5)).mean() > 0.9


def test_probe_over_all_steps():
    h, scores, _ = separable()
    probe = LinearProbe(per_step=False).fit(h, scores)
    assert probe.heldout_accuracy_.dims == () and float(probe.heldout_accuracy_) > 0.9
    assert probe.coef_.dims == ("step", "channel", "y", "x")


def test_probe_refuses_a_single_class():
    h, scores, _ = separable()
    with pytest.raises(ValueError, match=r"'is_circle' has no positive samples at threshold 0.95"):
        LinearProbe(threshold=0.95).fit(h, scores)


# -- conditional directions -----------------------------------------------------------


def vector(rng, steps=STEPS, spatial=(4, 2, 2)):
    return xr.DataArray(
        rng.normal(size=(len(steps), *spatial)), dims=("step", "channel", "y", "x"), coords={"step": list(steps)}
    )


def cosines(a: xr.DataArray, b: xr.DataArray) -> np.ndarray:
    x, y = a.values.reshape(a.sizes["step"], -1), b.values.reshape(b.sizes["step"], -1)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def test_conditional_direction_is_orthogonal_to_the_others():
    rng = np.random.default_rng(5)
    v0, others = vector(rng), [vector(rng), vector(rng)]
    v = conditional_direction(v0, others)
    for other in others:
        assert np.abs(cosines(v, other)).max() < 1e-8
    # dependent others (a repeated direction) still give the projection
    w = conditional_direction(v0, [others[0], 2 * others[0], others[1]])
    np.testing.assert_allclose(w.values, v.values, atol=1e-12)
    # all steps flattened together: orthogonal over the whole vector
    flat = conditional_direction(v0, others, per_step=False)
    for other in others:
        assert abs(flat.values.ravel() @ other.values.ravel()) / np.linalg.norm(flat) / np.linalg.norm(other) < 1e-8


def test_conditional_direction_keeps_v0_when_others_are_orthogonal():
    rng = np.random.default_rng(6)
    v0, other = vector(rng), vector(rng)
    flat_v0 = v0.values.reshape(3, -1)
    flat = other.values.reshape(3, -1)
    flat -= ((flat * flat_v0).sum(1) / (flat_v0**2).sum(1))[:, None] * flat_v0  # orthogonal per step
    orthogonal = other.copy(data=flat.reshape(other.shape))
    np.testing.assert_allclose(conditional_direction(v0, [orthogonal]).values, v0.values, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(conditional_direction(v0, []).values, v0.values)


def test_conditional_direction_inside_the_span_is_zero():
    rng = np.random.default_rng(7)
    a, b = vector(rng), vector(rng)
    with pytest.warns(RuntimeWarning, match="span"):
        v = conditional_direction(a + 0.5 * b, [a, b])
    assert np.abs(v.values).max() == 0.0


# -- the scale convention -------------------------------------------------------------


def test_scale_unit_is_the_std_of_the_projected_data(data):
    h = as_h(data)
    raw = vector(np.random.default_rng(8), spatial=SPATIAL) * 7.0
    unit, scale_unit = normalise_direction(raw, h)
    assert scale_unit.dims == ("step",)
    x = data.astype(np.float64).reshape(len(data), len(STEPS), -1)
    u = unit.values.reshape(len(STEPS), -1)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-12)
    projected = np.einsum("ntd,td->nt", x - x.mean(0), u)
    np.testing.assert_allclose(scale_unit.values, projected.std(0, ddof=1), rtol=1e-6)
    # in memory the same
    np.testing.assert_allclose(normalise_direction(raw, h.compute())[1].values, scale_unit.values, rtol=1e-12)


def test_pca_scale_unit_is_the_root_of_explained_variance(data):
    h = as_h(data)
    pca = StepwisePCA(n_components=2).fit(h)
    _, scale_unit = normalise_direction(pca.components_.isel(component=1, drop=True), h)
    np.testing.assert_allclose(scale_unit.values, np.sqrt(pca.explained_variance_.isel(component=1).values), rtol=1e-6)


# -- the dataset and its store --------------------------------------------------------


def small_dataset() -> xr.Dataset:
    rng = np.random.default_rng(9)
    steps = xr.DataArray(np.array([900, 0]), dims="step")
    units = []
    for _ in range(2):
        v = vector(rng, steps=(900, 0))
        units.append(v / np.sqrt((v**2).sum(("channel", "y", "x"))))
    scale = xr.DataArray([1.5, 2.5], dims="step", coords={"step": steps.values})
    return build_direction_dataset(
        [
            Direction("pca/0", "pca", units[0], scale, component=0, explained_variance_ratio=scale / 10),
            Direction("conditional/probe/is_circle|is_red", "conditional", units[1], scale * 2, attribute="is_circle"),
        ]
    )


def test_write_and_open_round_trip(tmp_path):
    ds = small_dataset()
    path = tmp_path / "directions.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unstable-spec warning for the string coords
        write_directions(ds, path)
    assert not (tmp_path / "directions.zarr.tmp").exists()
    reopened = xr.open_zarr(path, consolidated=False)
    assert dict(reopened.sizes) == {"direction": 2, "step": 2, "channel": 4, "y": 2, "x": 2}
    assert reopened["direction"].dims == ("direction", "step", "channel", "y", "x")
    assert [str(v) for v in reopened["name"].values] == ["pca/0", "conditional/probe/is_circle|is_red"]
    assert [str(v) for v in reopened["method"].values] == ["pca", "conditional"]
    assert [str(v) for v in reopened["attribute"].values] == ["", "is_circle"]
    assert reopened["component"].values.tolist() == [0, -1]
    assert reopened["step"].values.tolist() == [900, 0]
    np.testing.assert_array_equal(reopened["direction"].values, ds["direction"].values)
    np.testing.assert_array_equal(reopened["scale_unit"].values, ds["scale_unit"].values)
    np.testing.assert_array_equal(reopened["explained_variance_ratio"].values, [[0.15, 0.25], [np.nan, np.nan]])
    assert np.isnan(reopened["probe_accuracy"].values).all()

    opened = open_directions(path)
    assert opened.attrs["hmine:complete"] is True
    one = direction_by_name(opened, "conditional/probe/is_circle|is_red")
    np.testing.assert_array_equal(one["direction"].values, ds["direction"].values[1])
    assert opened.isel(direction=(opened["method"] == "pca").values).sizes["direction"] == 1
    with pytest.raises(KeyError, match="probe/nope"):
        direction_by_name(opened, "probe/nope")

    # rewriting (e.g. what was opened) replaces the store whole
    write_directions(opened.isel(direction=[1]), path)
    assert open_directions(path)["name"].values.astype(str).tolist() == ["conditional/probe/is_circle|is_red"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["directions.zarr"]


def test_open_refuses_a_store_without_the_complete_mark(tmp_path):
    path = tmp_path / "directions.zarr"
    with pytest.raises(FileNotFoundError):
        open_directions(path)
    write_directions(small_dataset(), path)
    del zarr.open_group(str(path), mode="r+").attrs["hmine:complete"]
    with pytest.raises(IncompleteStoreError, match="hmine:complete"):
        open_directions(path)


def test_dataset_refuses_repeated_names_and_unknown_methods():
    ds = small_dataset()
    unit = ds["direction"].isel(direction=0, drop=True)
    scale = ds["scale_unit"].isel(direction=0, drop=True)
    with pytest.raises(ValueError, match="unique"):
        build_direction_dataset([Direction("a", "pca", unit, scale), Direction("a", "pca", unit, scale)])
    with pytest.raises(ValueError, match="method"):
        build_direction_dataset([Direction("a", "jacobian", unit, scale)])


# -- everything at once ---------------------------------------------------------------


def two_attribute_world(n=160, seed=0):
    """h with two planted attribute directions per step, and their scores by seed."""
    rng = np.random.default_rng(seed)
    steps, spatial = (900, 500, 0), (4, 2, 2)
    d = int(np.prod(spatial))
    circle, red = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
    a, b = rng.normal(size=(2, len(steps), d))
    array = (
        3.0 * (2 * circle - 1)[:, None, None] * a / np.linalg.norm(a, axis=1, keepdims=True)
        + 3.0 * (2 * red - 1)[:, None, None] * b / np.linalg.norm(b, axis=1, keepdims=True)
        + rng.normal(size=(n, len(steps), d))
    )
    h = as_h(array.reshape(n, len(steps), *spatial).astype(np.float16), steps=steps, chunk=40)
    labels = pd.DataFrame(
        {"is_circle": np.where(circle, 0.8, 0.2) + 0.01 * rng.uniform(size=n), "is_red": np.where(red, 0.7, 0.1)},
        index=pd.Index(h["sample"].values, name="seed"),
    ).sample(frac=1.0, random_state=1)
    return h, labels


@pytest.mark.parametrize("budget", [2**30, 1])
def test_fit_directions_names_and_layout(budget, tmp_path):
    h, labels = two_attribute_world()
    ds = fit_directions(
        h,
        labels,
        pca_components=3,
        pca_modes=["per_step", "all_steps"],
        attributes=["is_circle", "is_red"],
        top_k=30,
        probe_C=1.0,
        conditional={"is_circle": ["is_red"]},
        memory_budget_bytes=budget,
        random_state=0,
    )
    # the joint regression directions (on by default) come last: the others keep their places
    assert ds["name"].values.tolist() == [
        "pca/0", "pca/1", "pca/2", "pca_all/0", "pca_all/1", "pca_all/2",
        "mean_difference/is_circle", "mean_difference/is_red", "probe/is_circle", "probe/is_red",
        "conditional/mean_difference/is_circle|is_red", "conditional/probe/is_circle|is_red",
        "regression/is_circle", "regression/is_red",
    ]  # fmt: skip
    assert ds["method"].values.tolist() == ["pca"] * 3 + ["pca_all"] * 3 + ["mean_difference"] * 2 + [
        "probe"
    ] * 2 + ["conditional"] * 2 + ["regression"] * 2
    assert ds["component"].values.tolist() == [0, 1, 2, 0, 1, 2] + [-1] * 8
    assert ds["attribute"].values.tolist()[6:] == ["is_circle", "is_red"] * 2 + ["is_circle"] * 2 + ["is_circle", "is_red"]
    assert ds.attrs["hmine:regression_alpha"] == 1e-3
    assert ds["direction"].dims == ("direction", "step", "channel", "y", "x")
    assert ds["step"].values.tolist() == [900, 500, 0]
    expected_solver = "memory" if budget > 1 else "dask"
    assert ds.attrs["hmine:pca_solvers"].count(expected_solver) == 2
    norms = np.sqrt((ds["direction"] ** 2).sum(("channel", "y", "x")))
    np.testing.assert_allclose(norms.values, 1.0, rtol=1e-12)
    assert (ds["scale_unit"].values > 0).all()
    evr, accuracy = ds["explained_variance_ratio"].values, ds["probe_accuracy"].values
    assert np.isfinite(evr[:6]).all() and np.isnan(evr[6:]).all()
    assert np.isfinite(accuracy[8:10]).all() and (accuracy[8:10] > 0.9).all()
    assert np.isnan(np.delete(accuracy, [8, 9], axis=0)).all()
    # each conditional direction is orthogonal, at every step, to is_red's direction of its method
    for method in ["mean_difference", "probe"]:
        red = direction_by_name(ds, f"{method}/is_red")["direction"]
        conditional = direction_by_name(ds, f"conditional/{method}/is_circle|is_red")["direction"]
        assert np.abs(cosines(conditional, red)).max() < 1e-8
    write_directions(ds, tmp_path / "d.zarr")
    assert open_directions(tmp_path / "d.zarr")["name"].values.astype(str).tolist() == ds["name"].values.tolist()


def test_fit_directions_names_missing_seeds():
    h, labels = two_attribute_world(n=40)
    with pytest.raises(ValueError, match="lack 2 of h's 40 samples"):
        fit_directions(h, labels.drop([1005, 1007]), pca_components=2, top_k=5)


def test_principal_subspace_probe_finds_the_direction_the_data_varies_along():
    # More features than samples, as in h: the class shows along u (the classes overlap
    # there), a second factor w varies independently of it, and isotropic noise fills the
    # other dimensions. The raw probe separates the training set perfectly through the
    # noise dimensions, which the data never moves along; the probe fitted in the top
    # principal components (span{u, w}) recovers u.
    rng = np.random.default_rng(3)
    n, spatial = 200, (32, 8, 8)
    d = int(np.prod(spatial))
    labels = rng.integers(0, 2, size=n)
    u, w = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    signal = (2 * labels - 1) * 2.0 + rng.normal(scale=2.0, size=n)
    nuisance = rng.normal(scale=3.0, size=n)
    array = signal[:, None] * u + nuisance[:, None] * w + rng.normal(scale=0.3, size=(n, d))
    h = as_h(array.reshape(n, 1, *spatial).astype(np.float32), steps=(500,))
    scores = pd.Series(np.where(labels == 1, 0.9, 0.1), index=pd.Index(h["sample"].values, name="seed"))

    def cosine_with_u(probe):
        coef = probe.coef_.values.reshape(-1)
        return abs(coef @ u) / np.linalg.norm(coef)

    raw = LinearProbe().fit(h, scores)
    principal = LinearProbe(n_components=2).fit(h, scores)
    assert principal.n_components_ == 2 and raw.n_components_ is None
    assert raw.train_accuracy_.values[0] == 1.0 and cosine_with_u(raw) < 0.5
    assert cosine_with_u(principal) > 0.9
    assert principal.heldout_accuracy_.values[0] >= raw.heldout_accuracy_.values[0]
    # the intercept is in uncentred h coordinates, as for the raw probe
    x = h.isel(step=0).values.reshape(n, -1).astype(np.float64)
    decision = x @ principal.coef_.isel(step=0).values.reshape(-1) + float(principal.intercept_.isel(step=0))
    assert ((decision > 0) == (labels == 1)).mean() > 0.8


def test_probe_refuses_zero_components():
    h, scores, _ = separable()
    with pytest.raises(ValueError, match="n_components must be >= 1"):
        LinearProbe(n_components=0).fit(h, scores)

