"""A run's stored per-step PCA axes against the exact PCA, step by step.

Fits ``sklearn.decomposition.PCA(svd_solver="full")`` in float64 on every step of the run's
stored h (the data the directions stage fitted) and prints, per step, the largest principal
angle between the stored top-k subspace and the exact one, the largest angle between
matching axes and the largest relative error of the explained-variance ratios, then the
maxima. Loads all of h: meant for demo-sized runs (1,024 x 10 x 8,192 float16: 170 MB).

    nice -n 10 env OMP_NUM_THREADS=1 python scripts/pca_exactness.py stores/demo --k 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def step_errors(h: np.ndarray, axes: np.ndarray, ratios: np.ndarray) -> tuple[float, float, float]:
    """(subspace angle, largest axis angle, in degrees; largest relative variance-ratio error) of
    ``axes`` (k, D) and ``ratios`` (k,) against the exact PCA of ``h`` (N, D)."""
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    exact = PCA(len(axes), svd_solver="full").fit(h)
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    subspace = float(np.degrees(subspace_angles(axes.T, exact.components_.T)).max())
    cosines = np.clip(np.abs(np.sum(axes * exact.components_, axis=1)), 0.0, 1.0)
    axis = float(np.degrees(np.arccos(cosines)).max())
    ratio = float(np.max(np.abs(ratios - exact.explained_variance_ratio_) / exact.explained_variance_ratio_))
    return subspace, axis, ratio


def main(argv=None) -> int:
    from hmine.stores import open_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--k", type=int, default=8, help="the first k per-step components (pca/0 .. pca/k-1)")
    args = parser.parse_args(argv)
    directions = open_group(args.run_dir / "directions.zarr")
    samples = open_group(args.run_dir / "samples.zarr")
    names = [str(n) for n in directions["name"][...]]
    rows = [names.index(f"pca/{k}") for k in range(args.k)]
    axes = np.asarray(directions["direction"][...])[rows].astype(np.float64)
    ratios = np.asarray(directions["explained_variance_ratio"][...])[rows].astype(np.float64)
    h = np.asarray(samples["h"][...])
    worst = np.zeros(3)
    for i, step in enumerate(np.asarray(directions["step"][...]).tolist()):
        errors = step_errors(h[:, i].reshape(len(h), -1).astype(np.float64), axes[:, i].reshape(args.k, -1), ratios[:, i])
        worst = np.maximum(worst, errors)
        print(f"t={step}: subspace {errors[0]:.1e} deg, axis {errors[1]:.1e} deg, variance ratio {errors[2]:.1e}", flush=True)
    print(f"max: subspace {worst[0]:.1e} deg, axis {worst[1]:.1e} deg, variance ratio {worst[2]:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
