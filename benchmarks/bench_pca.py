"""hmine's exact PCA against the randomized solvers it replaced and against an exact SVD.

One PCA of one step's (samples x features) matrix, top k axes, float64, three ways in
memory: ``hmine`` (StepwisePCA's in-memory path: block Krylov iteration to a measured
angle), ``randomized`` (what the in-memory path used above rank 1,000:
``PCA(svd_solver="randomized", iterated_power=4)``) and ``full``
(``PCA(svd_solver="full")``, the exact reference). Out of core from a zarr store, two
ways: ``hmine`` (StepwisePCA's dask path) and ``svd_compressed`` (what that path used:
``dask.array.linalg.svd_compressed`` with ``n_power_iter=4``).

The methods run interleaved in one process, in rotated order, ``--repeats`` rounds,
after one untimed warm-up each; data generation, loading and the reference are outside
the timed region. Per method the table gives the median wall time, the median over
rounds of its time over hmine's in the same round (paired ratio) with its min-max
spread, and the accuracy against ``full``: the largest principal angle of the top-k
subspace, the largest angle between matching axes and the largest relative error of
the explained variance. hmine's row also shows its Krylov iterations (data passes after
the mean's) and its own measured angle bound.

    python benchmarks/bench_pca.py                                  # demo store if present, plus generated data
    python benchmarks/bench_pca.py --sizes 1024x4096 2048x8192 --repeats 5 --k 8 --threads 1
    python benchmarks/bench_pca.py --store stores/demo/samples.zarr --step 200 --sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

DEFAULT_STORE = Path(__file__).resolve().parents[1] / "stores" / "demo" / "samples.zarr"


def flat_matrix(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian samples with covariance eigenvalues 1/i (singular values ~ 1/sqrt(i)), plus an offset."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1)) + rng.standard_normal(d)


def as_h(matrix: np.ndarray, step: int = 0):
    import xarray as xr

    from hmine.directions import H_DIMS

    n, d = matrix.shape
    return xr.DataArray(matrix.reshape(n, 1, d, 1, 1), dims=H_DIMS, coords={"sample": np.arange(n), "step": [step]})


def angles(components: np.ndarray, reference) -> tuple[float, float]:
    """(largest principal angle, largest angle between matching axes), degrees."""
    from scipy.linalg import subspace_angles

    subspace = float(np.degrees(subspace_angles(components.T, reference.components_.T).max()))
    per_axis = []
    for ours, exact in zip(components, reference.components_):
        sign = 1.0 if ours @ exact >= 0 else -1.0
        per_axis.append(np.degrees(2 * np.arcsin(np.linalg.norm(ours - sign * exact) / 2)))
    return subspace, float(max(per_axis))


def run_interleaved(methods: dict, repeats: int) -> dict:
    """{name: (times, result of the first timed round)}; one warm-up each, then rotated rounds."""
    names = list(methods)
    for name in names:
        methods[name]()
    times = {name: [] for name in names}
    results = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            result = methods[name]()
            times[name].append(time.perf_counter() - started)
            results.setdefault(name, result)
    return {name: (times[name], results[name]) for name in names}


def print_table(title: str, runs: dict, reference, extra: dict) -> None:
    base = runs["hmine"][0]
    print(f"\n{title}")
    print(
        f"{'method':<15} {'median s':>9} {'x hmine (median, min-max)':>27} {'subspace deg':>13} "
        f"{'axis deg':>9} {'var rel err':>11}  notes"
    )
    for name, (times, (components, variance)) in runs.items():
        ratios = [t / b for t, b in zip(times, base)]
        subspace, per_axis = angles(components, reference)
        error = float(np.max(np.abs(variance / reference.explained_variance_ - 1)))
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(
            f"{name:<15} {statistics.median(times):>9.3f} {ratio:>27} {subspace:>13.1e} "
            f"{per_axis:>9.1e} {error:>11.1e}  {extra.get(name, '')}"
        )


def in_memory(matrix: np.ndarray, k: int, repeats: int, title: str) -> None:
    from sklearn.decomposition import PCA

    from hmine.directions import StepwisePCA

    h = as_h(matrix)
    fitted = {}

    def hmine():
        pca = StepwisePCA(n_components=k, memory_budget_bytes=2**40).fit(h)
        fitted["hmine"] = pca
        return pca.components_.values.reshape(k, -1), pca.explained_variance_.values[:, 0]

    def sklearn(**settings):
        def fit():
            pca = PCA(n_components=k, random_state=0, **settings).fit(matrix)
            return pca.components_, pca.explained_variance_

        return fit

    reference = PCA(n_components=k, svd_solver="full").fit(matrix)
    runs = run_interleaved(
        {"hmine": hmine, "randomized": sklearn(svd_solver="randomized", iterated_power=4), "full": sklearn(svd_solver="full")},
        repeats,
    )
    pca = fitted["hmine"]
    notes = {"hmine": f"{int(pca.n_iter_[0])} iterations, bound {float(pca.angle_bound_.max()):.1e} deg"}
    print_table(title, runs, reference, notes)


def out_of_core(store: Path, step: int, k: int, repeats: int, title: str) -> None:
    import dask
    import dask.array as da
    import xarray as xr
    from sklearn.decomposition import PCA

    from hmine.directions import StepwisePCA, _dask_matrix

    h = xr.open_zarr(store, consolidated=False)["h"]
    position = int(np.flatnonzero(h["step"].values == step)[0]) if step in h["step"].values else 0
    h = h.isel(step=[position])
    n = h.sizes["sample"]
    matrix = np.asarray(h.values, dtype=np.float64).reshape(n, -1)
    # just under what the in-memory path needs: the dask path, with room for its whole Krylov basis
    budget = matrix.size * 8 * 3 - 1
    fitted = {}

    def hmine():
        pca = StepwisePCA(n_components=k, memory_budget_bytes=budget).fit(h)
        assert pca.solver_ == "dask"
        fitted["hmine"] = pca
        return pca.components_.values.reshape(k, -1), pca.explained_variance_.values[:, 0]

    def svd_compressed():
        # the dask path before, as it was: mean first, svd_compressed with QR power
        # iterations, then the total variance (for the ratios) in a pass of its own
        data = _dask_matrix(h, 0)
        mean = data.mean(axis=0).compute()
        centred = data - mean
        _, singular_values, components = da.linalg.svd_compressed(
            centred, k, iterator="QR", n_power_iter=4, seed=0, compute=True, coerce_signs=False
        )
        total_variance = (centred**2).sum() / (n - 1)
        singular_values, components, _ = dask.compute(singular_values, components, total_variance)
        return components, singular_values**2 / (n - 1)

    reference = PCA(n_components=k, svd_solver="full").fit(matrix)
    runs = run_interleaved({"hmine": hmine, "svd_compressed": svd_compressed}, repeats)
    pca = fitted["hmine"]
    notes = {"hmine": f"{int(pca.n_iter_[0])} iterations, bound {float(pca.angle_bound_.max()):.1e} deg"}
    print_table(title, runs, reference, notes)


def write_store(matrix: np.ndarray, root: Path) -> Path:
    """A samples-like zarr store (sample, step, channel, y, x) with one step, float16 as the sample stage writes."""
    import dask.array as da
    import xarray as xr

    from hmine.directions import H_DIMS

    n, d = matrix.shape
    array = da.from_array(matrix.astype(np.float16).reshape(n, 1, d, 1, 1), chunks=(64, 1, d, 1, 1))
    h = xr.DataArray(array, dims=H_DIMS, coords={"sample": np.arange(n), "step": [0]}, name="h")
    path = root / "samples.zarr"
    h.to_dataset().to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["1024x4096", "2048x4096", "2048x8192"], help="NxD of generated data")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="a samples.zarr; skipped if absent")
    parser.add_argument("--step", type=int, default=200, help="timestep of the store to use")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    print(f"k={args.k} repeats={args.repeats} threads={args.threads} numpy={np.__version__}")
    if args.store.exists():
        import xarray as xr

        h = xr.open_zarr(args.store, consolidated=False)["h"]
        position = int(np.flatnonzero(h["step"].values == args.step)[0]) if args.step in h["step"].values else 0
        matrix = np.asarray(h.isel(step=position).values, dtype=np.float64).reshape(h.sizes["sample"], -1)
        step = int(h["step"].values[position])
        in_memory(matrix, args.k, args.repeats, f"in memory: {args.store}, step {step}, {matrix.shape[0]} x {matrix.shape[1]}")
        out_of_core(args.store, step, args.k, args.repeats, f"out of core: {args.store}, step {step}")
    else:
        print(f"no store at {args.store}: generated data only")
    for size in args.sizes:
        n, d = (int(v) for v in size.lower().split("x"))
        matrix = flat_matrix(n, d)
        in_memory(matrix, args.k, args.repeats, f"in memory: generated, covariance spectrum 1/i, {n} x {d}")
    if not args.store.exists() and args.sizes:
        n, d = (int(v) for v in args.sizes[0].lower().split("x"))
        with tempfile.TemporaryDirectory() as root:
            store = write_store(flat_matrix(n, d), Path(root))
            out_of_core(store, 0, args.k, args.repeats, f"out of core: generated zarr store (float16), {n} x {d}")


if __name__ == "__main__":
    main()
