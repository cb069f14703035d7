"""One step of h as (samples, features) rows: read once into memory, or streamed from the store.

Every per-step fit of :func:`~hmine.directions.fit_directions` (the per-step PCA, every
attribute's mean difference, probe and principal subspace, the regression's cross
products) works on a :class:`StepRows` through passes over float64 row blocks, so that
one read of the step serves them all and no fit needs a float64 copy of the matrix.

* **In memory** (``load=True``): the step is read once, chunk by chunk, into a float32
  matrix when h's dtype converts to float32 exactly (float16, the store's), else float64;
  each pass converts one block of rows at a time to float64. Since float16 and float32
  values are exact in float32, the arithmetic is the float64 arithmetic of the old
  per-fit float64 copies, in a quarter of the memory (half of it for a float64 h).
* **Streamed** (``load=False``): each pass reads the step's chunks from the (lazy) store
  one block at a time; nothing of size samples x features is held. Used when the
  in-memory matrix and its working set (:func:`step_memory_bytes`) would not fit the
  memory budget.

Both compute the same float64 sums; only the row blocks differ (fixed-size in memory,
the store's chunks when streamed), so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xarray as xr

from hmine.directions.plumbing import _dask_h, _is_dask, _n_features

#: Bytes of one float64 row block a pass works on (the store's chunks set the block when
#: streaming): large enough for BLAS to run at speed, small next to the matrix.
BLOCK_BYTES = 32 * 2**20

#: Allowance for the resident memory of an in-memory step fit beyond the formula's arrays
#: (the BLAS/LAPACK workspaces, scikit-learn's solver copies of the (samples x components)
#: design, allocator slack), as a fraction of the loaded matrix plus a constant. Not yet
#: fitted at scale: ``benchmarks/bench_directions.py`` prints peak RSS beside the budget
#: (one run so far, N = 1,000: 2.46 GiB of a 4 GiB budget); see :func:`step_memory_bytes`.
CALIBRATION_FRACTION = 0.10
CALIBRATION_BYTES = 64 * 2**20


def loaded_dtype(h: xr.DataArray) -> np.dtype:
    """float32 when h's values are exact in float32 (float16, float32, small ints), else float64."""
    return np.dtype(np.float32) if np.can_cast(h.dtype, np.float32, casting="safe") else np.dtype(np.float64)


def _smallest_basis(n_features: int, k: int) -> int:
    """The fewest Krylov basis columns a thick restart allows: k Ritz vectors and two blocks."""
    from hmine.directions.eigen import PCA_OVERSAMPLES

    return k + 2 * min(k + PCA_OVERSAMPLES, n_features)


@dataclass(frozen=True)
class StepPlan:
    """How one step's fits run: in memory (``load``) or streamed, the estimated peak and the Krylov basis cap."""

    load: bool
    estimate_bytes: int
    max_basis: int
    budget_bytes: int
    minimum_bytes: int  # the estimate with the smallest Krylov basis
    resident_bytes: int = 0  # held throughout, in the estimates (a loaded copy of the whole h)

    @property
    def within_budget(self) -> bool:
        return self.estimate_bytes <= self.budget_bytes

    def describe(self) -> str:
        """The plan in words, as the directions store records it (``hmine:directions_path``)."""
        path = "one read per step, in memory" if self.load else "streamed from the store, one read per pass"
        if self.resident_bytes:
            path = "h loaded whole (one read of the store); " + path
        return (
            f"{path}; estimated peak {self.estimate_bytes / 2**30:.2f} GiB of a "
            f"{self.budget_bytes / 2**30:.2f} GiB budget{'' if self.within_budget else ' (over it)'}"
        )


def plan_step(
    n: int, n_features: int, itemsize: int, k: int, budget_bytes: int, *, dense_rows: int = 0, resident_bytes: int = 0
) -> StepPlan:
    """How one step's fits run within ``budget_bytes``.

    In memory (``load``) when the loaded matrix with the smallest working set fits
    (:func:`step_memory_bytes`), else streamed; either way the Krylov basis (thick
    restarts beyond it) gets the columns the budget leaves, so the estimate stays within
    the budget when the smallest working set does (else the plan is streamed with the
    smallest basis and :attr:`StepPlan.within_budget` is False). ``dense_rows``: rows a
    fit holds as a float32 (rows, features) matrix of its own (a raw-coordinate probe's
    training rows); ``resident_bytes``: held throughout (a loaded copy of the whole h).
    """
    smallest = _smallest_basis(n_features, k)
    dense = dense_rows * n_features * 4 + resident_bytes
    for load in (True, False):
        estimate = dense + step_memory_bytes(n, n_features, itemsize, k=k, basis_columns=smallest, load=load)
        if estimate <= budget_bytes:
            break
    minimum, columns = estimate, smallest + max(0, budget_bytes - estimate) // (24 * n_features + 8 * n)
    estimate = dense + step_memory_bytes(n, n_features, itemsize, k=k, basis_columns=columns, load=load)
    return StepPlan(load, int(estimate), int(columns), int(budget_bytes), int(minimum), int(resident_bytes))


def step_memory_bytes(n: int, n_features: int, itemsize: int, *, k: int, basis_columns: int, load: bool = True) -> int:
    """Estimated peak bytes of one step's fits on top of the process's baseline.

    The loaded (samples, features) matrix (when ``load``), three float64 row blocks (the
    converted block, its selected and centred rows, a product temporary), the Krylov
    basis with its image and Ritz temporaries (24 bytes per feature and column), the
    projections Z (8 bytes per sample and column) and the measured rest
    (:data:`CALIBRATION_FRACTION` of the matrix plus :data:`CALIBRATION_BYTES`).
    """
    block_rows = max(1, BLOCK_BYTES // (8 * n_features))
    matrix = n * n_features * itemsize if load else 0
    blocks = 3 * min(block_rows, n) * n_features * 8
    krylov = basis_columns * (24 * n_features + 8 * n)
    return int(matrix * (1 + CALIBRATION_FRACTION) + blocks + krylov + max(k, 1) * n * 8 * 4 + CALIBRATION_BYTES)


def _load_matrix(h: xr.DataArray, step: int | None, dtype: np.dtype) -> np.ndarray:
    """h's step (all steps when None) as an in-memory (samples, features) matrix, read chunk by chunk.

    Converting chunk by chunk into the preallocated matrix never holds a second copy
    (``h.values`` of a lazy h would build a float16 one first).
    """
    n = h.sizes["sample"]
    block = h if step is None else h.isel(step=step)
    n_features = block.size // n
    out = np.empty((n, n_features), dtype=dtype)
    data = block.data
    if _is_dask(h):
        starts = np.cumsum((0, *data.chunks[0]))
    else:
        starts = np.arange(0, n + 1, max(1, BLOCK_BYTES // (8 * n_features)))
        starts = np.append(starts, n) if starts[-1] != n else starts
    for start, stop in zip(starts[:-1], starts[1:]):
        out[start:stop] = np.asarray(data[start:stop]).reshape(stop - start, n_features)
    return out


class StepRows:
    """One step of h (or all steps, flattened) as rows, passed over in float64 blocks.

    Parameters
    ----------
    h : xarray.DataArray (sample, step, channel, y, x), checked
    step : int or None
        Position along ``step``; None: every step, flattened (step, channel, y, x).
    load : bool
        Read the step into memory once (see the module docs), or stream it from h's
        chunks on every pass.
    """

    def __init__(self, h: xr.DataArray, step: int | None, *, load: bool):
        self.n = h.sizes["sample"]
        self.n_features = _n_features(h) * (1 if step is not None else h.sizes["step"])
        self.step = step
        if load:
            self.matrix = _load_matrix(h, step, loaded_dtype(h))
            self._lazy = None
            rows = max(1, BLOCK_BYTES // (8 * self.n_features))
            self._starts = np.append(np.arange(0, self.n, rows), self.n)
        else:
            import dask.array as da

            self.matrix = None
            data = _dask_h(h)
            block = data[:, step] if step is not None else data
            self._lazy = block.reshape(self.n, -1) if isinstance(block, da.Array) else block
            self._starts = np.cumsum((0, *self._lazy.chunks[0]))

    @property
    def block_rows(self) -> int:
        return int(np.diff(self._starts).max())

    def blocks(self, mask: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sample positions, float64 rows) per block; with a boolean ``mask``, its rows only.

        Every yielded block is a fresh array the caller may change in place.
        """
        for start, stop in zip(self._starts[:-1], self._starts[1:]):
            positions = np.arange(start, stop)
            if mask is not None:
                positions = positions[mask[start:stop]]
                if len(positions) == 0:
                    continue
            if self.matrix is not None:
                block = self.matrix[start:stop]
            else:
                block = np.asarray(self._lazy[start:stop].compute())
            if mask is not None and len(positions) < stop - start:
                block = block[positions - start]
            yield positions, np.array(block, dtype=np.float64)

    def mean(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Float64 mean of the (masked) rows."""
        total, count = np.zeros(self.n_features), 0
        for positions, block in self.blocks(mask):
            total += block.sum(axis=0)
            count += len(positions)
        return total / count

    def means(self, masks: list[np.ndarray]) -> list[np.ndarray]:
        """Float64 means of the rows of each boolean mask, in one pass."""
        totals = [np.zeros(self.n_features) for _ in masks]
        for positions, block in self.blocks():
            for total, mask in zip(totals, masks):
                chosen = mask[positions]
                if chosen.all():
                    total += block.sum(axis=0)
                elif chosen.any():
                    total += block[chosen].sum(axis=0)
        return [total / int(mask.sum()) for total, mask in zip(totals, masks)]

    def covariance_product(self, mean: np.ndarray, mask: np.ndarray | None = None, total_variance: list | None = None):
        """:data:`~hmine.directions.CovarianceProduct` of the (masked) rows centred on ``mean``.

        With ``total_variance`` (an empty list), the first product also appends the
        rows' total variance (sum of squares of the centred rows over count - 1).
        """
        count = self.n if mask is None else int(mask.sum())
        root = math.sqrt(count - 1)

        def product(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            z = np.empty((count, basis.shape[1]))
            w = np.zeros((self.n_features, basis.shape[1]))
            squares, filled = 0.0, 0
            for positions, block in self.blocks(mask):
                block -= mean
                part = block @ basis / root
                z[filled : filled + len(positions)] = part
                filled += len(positions)
                w += block.T @ part
                if total_variance is not None and not total_variance:
                    squares += float(np.vdot(block, block))
            if total_variance is not None and not total_variance:
                total_variance.append(squares / (count - 1))
            return z, w / root

        return product

    def project(self, axes: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """(samples, k) projections of every row minus ``offset`` on the rows of ``axes`` (k, features)."""
        out = np.empty((self.n, axes.shape[0]))
        shift = offset @ axes.T
        for positions, block in self.blocks():
            out[positions] = block @ axes.T - shift
        return out

    def cross(self, weights: np.ndarray) -> np.ndarray:
        """weightsᵀ X: (columns of ``weights``, features), weights (samples, columns)."""
        out = np.zeros((weights.shape[1], self.n_features))
        for positions, block in self.blocks():
            out += weights[positions].T @ block
        return out

    def dense(self, dtype=np.float32, index: np.ndarray | None = None) -> np.ndarray:
        """The rows at sorted positions ``index`` (all rows when None) as a matrix in ``dtype``.

        All rows of a matrix loaded in ``dtype`` are a view of it; otherwise a copy is
        gathered block by block.
        """
        if index is None and self.matrix is not None:
            return self.matrix.astype(dtype, copy=False)
        mask = None
        if index is not None:
            mask = np.zeros(self.n, dtype=bool)
            mask[index] = True
        out = np.empty((self.n if index is None else len(index), self.n_features), dtype=dtype)
        filled = 0
        for positions, block in self.blocks(mask):
            out[filled : filled + len(positions)] = block
            filled += len(positions)
        return out
