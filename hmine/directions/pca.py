"""Principal directions of h: :class:`StepwisePCA`, per step or over the whole trajectory."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import xarray as xr
from sklearn.base import BaseEstimator

from hmine.directions.eigen import PCA_MAX_ITER, PCA_OVERSAMPLES, PCA_TOL_DEGREES, Eigenpairs, top_eigenpairs
from hmine.directions.plumbing import VECTOR_DIMS, _check_h, _dask_matrix, _n_features, _wrap
from hmine.directions.rows import StepRows, loaded_dtype, plan_step

logger = logging.getLogger(__package__)  # "hmine.directions", as before the split into modules

@dataclass(frozen=True)
class _PCAFit:
    components: np.ndarray  # (k, features), unit rows, sign fixed
    explained_variance: np.ndarray  # (k,)
    explained_variance_ratio: np.ndarray  # (k,)
    mean: np.ndarray  # (features,)
    eigenpairs: Eigenpairs


def _pca_of_rows(rows: StepRows, k: int, *, mask: np.ndarray | None = None, **solver) -> _PCAFit:
    """Exact top-k PCA of the (masked) rows of a :class:`StepRows`, in float64.

    The rows are centred on their float64 mean inside every pass, block by block; the
    first pass also sums the total variance. ``solver``: :func:`top_eigenpairs`' settings.
    """
    mean = rows.mean(mask)
    total_variance: list[float] = []
    pairs = top_eigenpairs(rows.covariance_product(mean, mask, total_variance), rows.n_features, k, **solver)
    return _PCAFit(_fix_signs(pairs.vectors.T), pairs.values, pairs.values / total_variance[0], mean, pairs)


def _fix_signs(components: np.ndarray) -> np.ndarray:
    """Make each row's largest-magnitude entry positive (scikit-learn's svd_flip rule).

    SVD solvers return singular vectors up to sign; a rule that looks only at the vector
    itself makes in-memory and dask results (and reruns) agree.
    """
    rows = np.arange(components.shape[0])
    signs = np.sign(components[rows, np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def _align_signs_to_reference(vectors: np.ndarray) -> np.ndarray:
    """Flip u_t where <u_ref, u_t> < 0, per component; the reference is the first step.

    ``vectors`` has shape (component, step, features). The first step in ``step`` order
    (the noisiest timestep for a denoising trajectory) is the reference, as in Haas et
    al.'s direction plotter: every step then points the same way as the reference, so a
    positive edit scale means the same thing along the whole trajectory.
    """
    dots = np.einsum("ktf,kf->kt", vectors, vectors[:, 0])
    return vectors * np.where(dots < 0, -1.0, 1.0)[:, :, None]


class StepwisePCA(BaseEstimator):
    """Principal directions of h, per step or over the whole trajectory.

    Every fit is exact to a measured tolerance: :func:`top_eigenpairs` (block Krylov
    iteration on the covariance, in float64) runs until the residuals bound each
    component's angle to the exact principal axis, the one an exact SVD such as
    ``PCA(svd_solver="full")`` gives, by ``tol_degrees``; the bound is kept in
    ``angle_bound_``. The covariance products run in memory, on one read of each fit's
    matrix (float32 for a float16 or float32 h, exact; float64 products block by block,
    :class:`~hmine.directions.rows.StepRows`), when its measured working set
    (:func:`~hmine.directions.rows.step_memory_bytes`) fits ``memory_budget_bytes``;
    otherwise out of core with dask straight from the (lazy) data, one pass over it per
    Krylov block instead of holding it.

    Parameters
    ----------
    n_components : int, default=8
        Principal directions kept (per step in ``per_step`` mode).
    mode : {"per_step", "all_steps"}, default="per_step"
        ``per_step``: one PCA per step over the samples' flattened (channel, y, x)
        vectors. ``all_steps``: one PCA over the flattened (step, channel, y, x) vectors.
    memory_budget_bytes : int, default=2**30
        Above this, the dask path is used; it also caps the Krylov basis there (half of
        it for the basis and its image).
    tol_degrees : float, default=PCA_TOL_DEGREES
        Largest angle bound accepted for any component (or degenerate cluster).
    n_oversamples : int, default=PCA_OVERSAMPLES
        Columns per Krylov block beyond ``n_components``.
    max_iter : int, default=PCA_MAX_ITER
        Krylov blocks (data passes) per fit before giving up with a warning.
    random_state : int, default=0
        Seed of the random start block.

    Attributes
    ----------
    components_ : xarray.DataArray (component, step, channel, y, x)
        Principal axes. ``per_step``: unit norm at every step, signs aligned across steps
        to the first step (see Notes). ``all_steps``: unit norm over the whole vector.
    explained_variance_ : xarray.DataArray (component, step) or (component,)
        Variance of the data along each axis (divided by n_samples - 1, like sklearn).
    explained_variance_ratio_ : xarray.DataArray, same dims
        ``explained_variance_`` over the total variance (of the step, or of all steps).
    mean_ : xarray.DataArray (step, channel, y, x)
        Per-feature mean that was subtracted.
    angle_bound_ : xarray.DataArray, same dims as ``explained_variance_``
        Degrees: the measured bound on each axis's angle to the exact one (for axes
        whose variances are within :data:`PCA_DEGENERATE_GAP` of each other, on their
        common subspace's), see :class:`Eigenpairs`.
    residual_ : xarray.DataArray, same dims
        ‖Cv − λv‖ / λ₁ per axis: the residual the bound is computed from.
    subspace_angle_bound_ : xarray.DataArray (step,) or 0-d
        Degrees: the bound for the span of all ``n_components`` axes.
    n_iter_ : xarray.DataArray (step,) or 0-d
        Krylov blocks, i.e. passes over the data after the mean's.
    converged_ : bool
        Whether every fit met ``tol_degrees``.
    n_samples_ : int
    solver_ : {"memory", "dask"}
        The path the fit took.
    svd_solver_ : str
        The eigensolver: ``"block_krylov"``.
    memory_required_bytes_ : int
        The estimate that chose the path.

    Notes
    -----
    Signs: each step's axes first get scikit-learn's ``svd_flip`` convention (largest
    entry positive), then in ``per_step`` mode component k at step t is flipped when its
    inner product with component k at the first step is negative. Axes are matched across
    steps by index, not by similarity: when two axes swap order between steps the
    alignment cannot pair them.
    """

    def __init__(
        self,
        *,
        n_components: int = 8,
        mode: str = "per_step",
        memory_budget_bytes: int = 2**30,
        tol_degrees: float = PCA_TOL_DEGREES,
        n_oversamples: int = PCA_OVERSAMPLES,
        max_iter: int = PCA_MAX_ITER,
        random_state: int = 0,
    ):
        self.n_components = n_components
        self.mode = mode
        self.memory_budget_bytes = memory_budget_bytes
        self.tol_degrees = tol_degrees
        self.n_oversamples = n_oversamples
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, h: xr.DataArray, y=None) -> StepwisePCA:
        """Fit the principal axes of ``h``.

        Parameters
        ----------
        h : xarray.DataArray (sample, step, channel, y, x)
        y : ignored

        Returns
        -------
        self
        """
        h = _check_h(h)
        n_features = self._check_sizes(h)
        self._choose_path(h.sizes["sample"], n_features, loaded_dtype(h).itemsize)
        fit_one = self._fit_in_memory if self.solver_ == "memory" else self._fit_with_dask
        if self.mode == "per_step":
            fits = [fit_one(h, t) for t in range(h.sizes["step"])]
            vectors = _align_signs_to_reference(np.stack([f.components for f in fits], axis=1))
            mean = np.stack([f.mean for f in fits])
        else:
            fits = [fit_one(h, None)]
            vectors, mean = fits[0].components, fits[0].mean
        self._set_fitted(h, fits, vectors, mean)
        return self

    def _check_sizes(self, h: xr.DataArray) -> int:
        """Features per fit, after checking ``mode`` and ``n_components`` against ``h``."""
        if self.mode not in ("per_step", "all_steps"):
            raise ValueError(f"mode must be 'per_step' or 'all_steps', got {self.mode!r}")
        n, n_steps = h.sizes["sample"], h.sizes["step"]
        per_step_features = _n_features(h)
        n_features = per_step_features if self.mode == "per_step" else n_steps * per_step_features
        k = int(self.n_components)
        if not 1 <= k <= min(n, n_features):
            raise ValueError(
                f"n_components={k} must be between 1 and min(n_samples={n}, n_features={n_features})"
            )
        return n_features

    def _choose_path(self, n: int, n_features: int, itemsize: int) -> None:
        """In memory when a fit's loaded matrix and working set fit the budget."""
        plan = plan_step(n, n_features, itemsize, int(self.n_components), self.memory_budget_bytes)
        self.memory_required_bytes_, self._max_basis = plan.estimate_bytes, plan.max_basis
        self.solver_ = "memory" if plan.load else "dask"
        logger.info(
            "PCA (%s, %d x %d): %s path (needs ~%.2f GiB, budget %.2f GiB)",
            self.mode, n, n_features, self.solver_,
            self.memory_required_bytes_ / 2**30, self.memory_budget_bytes / 2**30,
        )  # fmt: skip

    def _set_fitted(self, h: xr.DataArray, fits: list[_PCAFit], vectors: np.ndarray, mean: np.ndarray) -> None:
        """The fitted attributes, from the fits (one per step, or one) and their stacked axes."""
        k, n_steps = int(self.n_components), h.sizes["step"]
        vector_shape = (h.sizes["channel"], h.sizes["y"], h.sizes["x"])
        component = {"component": np.arange(k)}
        if self.mode == "per_step":
            stat_dims, step_dims = ("component", "step"), ("step",)

            def stat(get):
                return np.stack([get(f) for f in fits], axis=-1)

        else:
            stat_dims, step_dims = ("component",), ()

            def stat(get):
                return np.asarray(get(fits[0]))

        def wrap(get, dims, name, extra=None):
            return _wrap(stat(get), dims, h, extra=extra, name=name)

        self.components_ = _wrap(
            vectors.reshape(k, n_steps, *vector_shape), ("component", *VECTOR_DIMS), h,
            extra=component, name="components",
        )  # fmt: skip
        self.explained_variance_ = wrap(lambda f: f.explained_variance, stat_dims, "explained_variance", component)
        self.explained_variance_ratio_ = wrap(
            lambda f: f.explained_variance_ratio, stat_dims, "explained_variance_ratio", component
        )
        self.angle_bound_ = wrap(lambda f: f.eigenpairs.angle_bounds, stat_dims, "angle_bound", component)
        self.residual_ = wrap(lambda f: f.eigenpairs.residuals, stat_dims, "residual", component)
        self.subspace_angle_bound_ = wrap(lambda f: f.eigenpairs.subspace_angle_bound, step_dims, "subspace_angle_bound")
        self.n_iter_ = wrap(lambda f: f.eigenpairs.iterations, step_dims, "n_iter")
        self.converged_ = all(f.eigenpairs.converged for f in fits)
        self.mean_ = _wrap(mean.reshape(n_steps, *vector_shape), VECTOR_DIMS, h, name="mean")
        self.n_samples_ = h.sizes["sample"]
        self.svd_solver_ = "block_krylov"

    def _solver_settings(self) -> dict:
        return {
            "n_oversamples": self.n_oversamples,
            "tol_degrees": self.tol_degrees,
            "max_iter": self.max_iter,
            "seed": self.random_state,
        }

    def _fit_in_memory(self, h: xr.DataArray, step: int | None) -> _PCAFit:
        return self._fit_rows(StepRows(h, step, load=True))

    def _fit_rows(self, rows: StepRows, max_basis: int | None = None) -> _PCAFit:
        """One fit on a step's rows (in memory or streamed), its Krylov basis capped at ``max_basis`` columns."""
        max_basis = self._max_basis if max_basis is None else max_basis
        return _pca_of_rows(rows, int(self.n_components), max_basis=max_basis, **self._solver_settings())

    def _fit_from_steps(self, h: xr.DataArray, fits: list[_PCAFit], solver: str) -> StepwisePCA:
        """A per-step fit from one :meth:`_fit_rows` per step, made by the caller on rows it shares."""
        h = _check_h(h)
        n_features = self._check_sizes(h)
        if self.mode != "per_step" or len(fits) != h.sizes["step"]:
            raise ValueError("_fit_from_steps needs mode='per_step' and one fit per step")
        self._choose_path(h.sizes["sample"], n_features, loaded_dtype(h).itemsize)
        self.solver_ = solver
        vectors = _align_signs_to_reference(np.stack([f.components for f in fits], axis=1))
        self._set_fitted(h, fits, vectors, np.stack([f.mean for f in fits]))
        return self

    def _fit_with_dask(self, h: xr.DataArray, step: int | None) -> _PCAFit:
        import dask

        matrix = _dask_matrix(h, step)
        n, n_features = matrix.shape
        # The mean is computed first and subtracted as a constant, so each later pass
        # over the data is a single read (no mean recomputed inside every pass).
        mean = matrix.mean(axis=0).compute()
        centred = matrix - mean
        root = math.sqrt(n - 1)
        total_variance = []

        def product(block):
            # z and w in one compute: each block of data is read once and serves both
            z = centred @ block / root
            w = centred.T @ z / root
            if total_variance:
                return dask.compute(z, w)
            # the first pass also sums the squares for the total variance
            z, w, sum_of_squares = dask.compute(z, w, (centred**2).sum())
            total_variance.append(float(sum_of_squares) / (n - 1))
            return z, w

        # the basis and its image (16 bytes per feature and column) get half the budget
        max_basis = self.memory_budget_bytes // (2 * 16 * n_features)
        pairs = top_eigenpairs(product, n_features, self.n_components, max_basis=max_basis, **self._solver_settings())
        variance = pairs.values
        return _PCAFit(_fix_signs(pairs.vectors.T), variance, variance / total_variance[0], mean, pairs)
