"""Exact PCA at any size: StepwisePCA and the probes' PCA against an exact SVD (float64).

The data have a flat spectrum (singular values 1/sqrt(i), built exactly) and more than
1,000 samples, where a randomized solver with a few power iterations is off by degrees.
The all-steps test's reference is the construction itself (:func:`exact_pca`: its axes,
variances and mean are known), not an SVD that cost more than the fit it checked; where an
angle bound (~1e-13 degrees) is checked, or on a subset of the rows, the reference is an
exact SVD of the data as stored.
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from hmine.directions import (
    H_DIMS,
    LinearProbe,
    StepwisePCA,
    _split,
    fit_directions,
    top_eigenpairs,
)

TOLERANCE_DEGREES = 0.01
SPATIAL = (32, 8, 8)  # 2,048 features
N_SAMPLES = 1500
K = 8
TIED = (4, 5)  # components whose singular values are planted equal: defined only as a pair


def _flat_spectrum_parts(n, spatial, tied, seed):
    rng = np.random.default_rng(seed)
    d = int(np.prod(spatial))
    rank = min(n - 1, d)
    left = rng.normal(size=(n, rank))
    left = np.linalg.qr(left - left.mean(axis=0))[0]  # orthonormal, orthogonal to the ones vector
    right = np.linalg.qr(rng.normal(size=(d, rank)))[0]
    singular_values = 1.0 / np.sqrt(np.arange(1, rank + 1))
    if tied:
        singular_values[list(tied)] = singular_values[tied[0]]
    return (left * singular_values) @ right.T + rng.normal(size=d), singular_values, right


def flat_spectrum(n=N_SAMPLES, spatial=SPATIAL, *, tied=TIED, seed=0) -> np.ndarray:
    """(n, features) data whose centred singular values are exactly 1/sqrt(i), with one tie, plus an offset."""
    return _flat_spectrum_parts(n, spatial, tied, seed)[0]


def exact_pca(n=N_SAMPLES, spatial=SPATIAL, *, tied=TIED, seed=0):
    """``flat_spectrum``'s data and its exact PCA, with scikit-learn's attribute names.

    The centred data are ``left @ diag(s) @ right.T`` with orthonormal ``left`` (orthogonal
    to the ones vector) and ``right``: that is their SVD, so the principal axes are the first
    columns of ``right`` (each up to sign; a tied pair only as a plane) and the variances
    ``s**2 / (n - 1)``, to float64 rounding of the QR factors (checked: within 1e-11 degrees
    and 1e-14 relative of ``PCA(svd_solver="full")``; the means are equal).
    """
    from types import SimpleNamespace

    matrix, singular_values, right = _flat_spectrum_parts(n, spatial, tied, seed)
    variances = singular_values**2 / (n - 1)
    return matrix, SimpleNamespace(
        components_=right[:, :K].T,
        explained_variance_=variances[:K],
        explained_variance_ratio_=variances[:K] / variances.sum(),
        mean_=matrix.mean(axis=0),
    )


def as_h(matrix: np.ndarray, spatial=SPATIAL, step=500, chunk=128) -> xr.DataArray:
    n = matrix.shape[0]
    array = matrix.reshape(n, 1, *spatial)
    return xr.DataArray(
        da.from_array(array, chunks=(chunk, 1, *spatial)),
        dims=H_DIMS,
        coords={"sample": np.arange(n), "step": [step]},
    )


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between the lines of two unit vectors, accurate near 0 (no arccos)."""
    sign = 1.0 if a @ b >= 0 else -1.0
    return float(np.degrees(2 * np.arcsin(np.linalg.norm(a - sign * b) / 2)))


def subspace_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle between the row spans of a and b."""
    return float(np.degrees(subspace_angles(a.T, b.T).max()))


@pytest.fixture(scope="module")
def flat():
    # an SVD of the data as stored: the angle bounds below are ~1e-13 degrees, under the
    # ~1e-12 by which the rounded data's axes differ from the construction's (exact_pca)
    matrix = flat_spectrum()
    return matrix, PCA(n_components=K, svd_solver="full").fit(matrix)


@pytest.mark.parametrize(
    "budget, path",
    [
        (2**30, "memory"),
        (2**26, "dask"),  # out of core; the Krylov basis fits half the budget whole
        (1, "dask"),  # out of core with the smallest basis: restarted every few blocks
    ],
)
def test_pca_is_exact_on_a_flat_spectrum_above_a_thousand_samples(flat, budget, path):
    matrix, reference = flat
    pca = StepwisePCA(n_components=K, memory_budget_bytes=budget).fit(as_h(matrix))
    assert pca.solver_ == path
    ours = pca.components_.isel(step=0).values.reshape(K, -1)
    assert subspace_degrees(ours, reference.components_) < TOLERANCE_DEGREES
    for i in range(K):
        if i not in TIED:  # the tied pair has no individual axes, only a plane
            assert angle_degrees(ours[i], reference.components_[i]) < TOLERANCE_DEGREES, i
    pair = list(TIED)
    assert subspace_degrees(ours[pair], reference.components_[pair]) < TOLERANCE_DEGREES
    np.testing.assert_allclose(pca.explained_variance_.isel(step=0), reference.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(
        pca.explained_variance_ratio_.isel(step=0), reference.explained_variance_ratio_, rtol=1e-5
    )
    np.testing.assert_allclose(pca.mean_.isel(step=0).values.reshape(-1), reference.mean_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("budget", [2**30, 1])
def test_the_measured_angle_bounds_hold_and_meet_the_tolerance(flat, budget):
    matrix, reference = flat
    pca = StepwisePCA(n_components=K, memory_budget_bytes=budget).fit(as_h(matrix))
    assert pca.svd_solver_ == "block_krylov" and pca.converged_
    bounds = pca.angle_bound_.isel(step=0).values
    assert bounds.max() <= pca.tol_degrees
    assert float(pca.subspace_angle_bound_.isel(step=0)) <= pca.tol_degrees
    assert (pca.residual_.values > 0).all() and (pca.residual_.values < 1e-6).all()
    ours = pca.components_.isel(step=0).values.reshape(K, -1)
    for i in range(K):
        if i not in TIED:  # each bound is an upper bound of the true angle
            assert angle_degrees(ours[i], reference.components_[i]) <= bounds[i], i
    pair = list(TIED)
    assert bounds[pair[0]] == bounds[pair[1]]  # one bound for the tied plane
    assert subspace_degrees(ours[pair], reference.components_[pair]) <= bounds[pair[0]]
    assert int(pca.n_iter_.isel(step=0)) < pca.max_iter


def test_all_steps_pca_is_exact_out_of_core():
    # two steps of 1,024 features: the flattened vectors have 2,048
    matrix, reference = exact_pca(n=1200, tied=())
    h = xr.DataArray(
        da.from_array(matrix.reshape(1200, 2, 16, 8, 8), chunks=(100, 1, 16, 8, 8)),
        dims=H_DIMS,
        coords={"sample": np.arange(1200), "step": [900, 0]},
    )
    pca = StepwisePCA(n_components=K, mode="all_steps", memory_budget_bytes=1).fit(h)
    assert pca.solver_ == "dask"
    ours = pca.components_.values.reshape(K, -1)
    assert subspace_degrees(ours, reference.components_) < TOLERANCE_DEGREES
    assert max(angle_degrees(a, b) for a, b in zip(ours, reference.components_)) < TOLERANCE_DEGREES
    np.testing.assert_allclose(pca.explained_variance_, reference.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(pca.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-5)
    assert pca.converged_


class CountingReads:
    """An array whose chunk reads are counted, like a zarr store read through dask."""

    reads = 0

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        CountingReads.reads += 1
        return self.array[key]


def test_the_dask_path_reads_each_chunk_once_per_pass():
    matrix = flat_spectrum(n=1200, spatial=(16, 8, 8), tied=())
    n_chunks = 1200 // 100
    array = CountingReads(matrix.reshape(1200, 1, 16, 8, 8))
    h = xr.DataArray(
        da.from_array(array, chunks=(100, 1, 16, 8, 8)), dims=H_DIMS, coords={"sample": np.arange(1200), "step": [0]}
    )
    CountingReads.reads = 0
    with dask.config.set(scheduler="sync"):  # counts in this process
        pca = StepwisePCA(n_components=K, memory_budget_bytes=1).fit(h)
    passes = 1 + int(pca.n_iter_.isel(step=0))  # the mean's, then one per Krylov block
    assert CountingReads.reads <= n_chunks * passes + 1  # + 1: dask may read a sliver for the dtype


def test_too_few_iterations_warn_and_say_so():
    matrix = flat_spectrum(n=300, spatial=(4, 8, 8), tied=())
    with pytest.warns(RuntimeWarning, match="only known to within"):
        pca = StepwisePCA(n_components=K, max_iter=1).fit(as_h(matrix, spatial=(4, 8, 8)))
    assert not pca.converged_ and pca.angle_bound_.values.max() > pca.tol_degrees


def test_a_restarted_basis_reaches_the_same_eigenpairs():
    matrix = flat_spectrum(n=600, spatial=(8, 8, 8), tied=())
    centred = matrix - matrix.mean(axis=0)
    root = np.sqrt(len(matrix) - 1)

    def product(block):
        z = centred @ block / root
        return z, centred.T @ z / root

    free = top_eigenpairs(product, 512, K)
    restarted = top_eigenpairs(product, 512, K, max_basis=1)  # raised to k + 2 blocks
    assert free.converged and restarted.converged
    assert restarted.iterations > free.iterations
    exact = np.linalg.eigh(centred.T @ centred / (len(matrix) - 1))
    top = exact.eigenvectors[:, ::-1][:, :K]
    for pairs in (free, restarted):
        np.testing.assert_allclose(pairs.values, exact.eigenvalues[::-1][:K], rtol=1e-10)
        for i in range(K):
            assert angle_degrees(pairs.vectors[:, i], top[:, i]) <= pairs.angle_bounds[i]


def test_probes_fit_in_the_exact_principal_subspace_of_their_training_samples():
    n, k = 800, 16
    matrix = flat_spectrum(n=n, spatial=(16, 8, 8), tied=())
    rng = np.random.default_rng(1)
    scores = pd.Series(rng.uniform(size=n), index=pd.Index(np.arange(n), name="seed"), name="is_circle")
    probe = LinearProbe(n_components=k).fit(as_h(matrix, spatial=(16, 8, 8)), scores)
    train, _, _ = _split(scores.to_numpy() > 0.5, probe.test_fraction, probe.random_state, "is_circle")
    reference = PCA(n_components=k, svd_solver="full").fit(matrix[train])
    coef = probe.coef_.values.reshape(-1)
    outside = coef - reference.components_.T @ (reference.components_ @ coef)
    # the normal lies in the exact subspace: its part outside is within rounding of 0.01 degrees
    assert np.degrees(np.arcsin(np.linalg.norm(outside) / np.linalg.norm(coef))) < TOLERANCE_DEGREES
    assert probe.pca_angle_bound_ <= 1e-3


def test_the_directions_store_records_the_solver_its_settings_and_the_measured_bounds(tmp_path):
    from hmine.directions import open_directions, write_directions

    matrix = flat_spectrum(n=300, spatial=(4, 8, 8), tied=())
    h = xr.DataArray(
        da.from_array(np.stack([matrix, matrix[::-1] * 2], axis=1).reshape(300, 2, 4, 8, 8), chunks=(100, 1, 4, 8, 8)),
        dims=H_DIMS,
        coords={"sample": np.arange(300), "step": [900, 0]},
    )
    labels = pd.DataFrame({"is_red": np.random.default_rng(2).uniform(size=300)}, index=pd.Index(np.arange(300), name="seed"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every fit converged
        ds = fit_directions(h, labels, pca_components=3, pca_modes=["per_step", "all_steps"], top_k=20, probe_components=4)
    write_directions(ds, tmp_path / "directions.zarr")
    stored = open_directions(tmp_path / "directions.zarr")
    method = stored["method"].values.astype(str)
    pca = np.isin(method, ["pca", "pca_all"])
    for name in ("pca_angle_bound", "pca_residual", "pca_iterations"):
        assert stored[name].dims == ("direction", "step")
        assert np.isfinite(stored[name].values[pca]).all() and np.isnan(stored[name].values[~pca]).all()
    assert stored["pca_angle_bound"].attrs["units"] == "degree"
    assert (stored["pca_angle_bound"].values[pca] <= stored.attrs["hmine:pca_tol_degrees"]).all()
    assert (stored["pca_iterations"].values[pca] >= 1).all()
    # pca_all is one fit over both steps: its statistics repeat over steps
    pca_all = method == "pca_all"
    assert (stored["pca_iterations"].values[pca_all] == stored["pca_iterations"].values[pca_all][:, :1]).all()
    assert "block Krylov" in stored.attrs["hmine:pca_solver"]
    for key in ("pca_tol_degrees", "pca_oversamples", "pca_max_iter", "pca_degenerate_gap", "pca_random_state"):
        assert f"hmine:{key}" in stored.attrs, key
    assert stored.attrs["hmine:probe_pca_angle_bound"] <= stored.attrs["hmine:pca_tol_degrees"]
