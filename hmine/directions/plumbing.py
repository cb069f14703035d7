"""Input checks and labelled-array plumbing shared by every direction method.

h is an :class:`xarray.DataArray` with dims :data:`H_DIMS`, possibly dask-backed and
float16; these helpers check it, turn it into (samples, features) matrices (in memory or
lazily with dask), align label tables and score arrays to its samples, and wrap numpy
results back into DataArrays carrying h's coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

H_DIMS = ("sample", "step", "channel", "y", "x")
VECTOR_DIMS = ("step", "channel", "y", "x")


def _check_h(h) -> xr.DataArray:
    """h in the canonical dim order, after checking what every method relies on."""
    if not isinstance(h, xr.DataArray):
        raise TypeError(f"h must be an xarray.DataArray with dims {H_DIMS}, got {type(h).__name__}")
    if set(h.dims) != set(H_DIMS):
        raise ValueError(f"h must have dims {H_DIMS}, got {h.dims}")
    if h.sizes["sample"] < 2:
        raise ValueError(f"h has {h.sizes['sample']} sample(s); directions need at least 2")
    return h.transpose(*H_DIMS)


def _is_dask(h: xr.DataArray) -> bool:
    return hasattr(h.data, "dask")


def _n_features(h: xr.DataArray) -> int:
    return h.sizes["channel"] * h.sizes["y"] * h.sizes["x"]


def _coords_for(h: xr.DataArray, dims: Sequence[str]) -> dict:
    """h's coordinates that live on a subset of ``dims`` (never on ``sample``), as numpy.

    Non-index coordinates of a lazily opened store (e.g. ``step_index``) are dask-backed;
    they are loaded here so the outputs are plain in-memory arrays.
    """
    coords = {}
    for name, coord in h.coords.items():
        if coord.dims and set(coord.dims) <= set(dims):
            coords[name] = xr.Variable(coord.dims, np.asarray(coord.values), coord.attrs)
    return coords


def _wrap(values: np.ndarray, dims: Sequence[str], h: xr.DataArray, *, extra=None, name=None, attrs=None):
    """A DataArray of ``values`` with ``dims``, carrying h's coordinates on those dims."""
    coords = _coords_for(h, dims)
    coords.update(extra or {})
    return xr.DataArray(values, dims=tuple(dims), coords=coords, name=name, attrs=attrs or {})


def _step_matrix(h: xr.DataArray, step: int | None, dtype) -> np.ndarray:
    """In-memory (samples, features) matrix of one step (or of all steps when None)."""
    n = h.sizes["sample"]
    block = h if step is None else h.isel(step=step)
    return np.asarray(block.values).reshape(n, -1).astype(dtype, copy=False)


def _dask_h(h: xr.DataArray):
    """h's data as a dask array with whole (channel, y, x) blocks, ready to flatten."""
    import dask.array as da

    data = h.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(min(h.sizes["sample"], 256), 1, -1, -1, -1))
    # Flattening (channel, y, x) into features is a cheap blockwise reshape only when
    # each block holds them whole; the store's chunks already do, this guards others.
    return data.rechunk({2: -1, 3: -1, 4: -1})


def _dask_matrix(h: xr.DataArray, step: int | None):
    """Lazy float64 (samples, features) matrix of one step (or all steps when None)."""
    data = _dask_h(h)
    n = h.sizes["sample"]
    block = data if step is None else data[:, step]
    return block.reshape(n, -1).astype(np.float64)


def align_labels(labels: pd.DataFrame, h: xr.DataArray) -> pd.DataFrame:
    """Rows of ``labels`` (indexed by seed) in the order of ``h.sample``.

    Raises
    ------
    ValueError
        When labels lack some of h's samples (the missing seeds are named), when the
        index has duplicate seeds, or when a score is NaN.
    """
    seeds = np.asarray(h["sample"].values)
    if labels.index.has_duplicates:
        dup = labels.index[labels.index.duplicated()].unique()[:10].tolist()
        raise ValueError(f"labels have duplicate seeds {dup}; one row per sample is expected")
    missing = seeds[~np.isin(seeds, np.asarray(labels.index))]
    if len(missing):
        shown = ", ".join(str(s) for s in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"labels lack {len(missing)} of h's {len(seeds)} samples (seeds {shown}); "
            "label every sample of the run (rerun the label stage) before fitting directions"
        )
    aligned = labels.loc[seeds]
    nan = aligned.isna().sum()
    if nan.any():
        bad = {str(k): int(v) for k, v in nan[nan > 0].items()}
        raise ValueError(f"labels have NaN scores (column: count) {bad}; rescore those samples")
    return aligned


def _aligned_scores(h: xr.DataArray, scores) -> tuple[np.ndarray, str]:
    """Scores as float64 in ``h.sample`` order, and the attribute's name.

    A :class:`pandas.Series` is aligned by its seed index; an array-like must already be
    in ``h.sample`` order.
    """
    if isinstance(scores, pd.Series):
        name = "" if scores.name is None else str(scores.name)
        aligned = align_labels(scores.to_frame(name or "score"), h).iloc[:, 0]
        return aligned.to_numpy(dtype=np.float64), name
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(values) != h.sizes["sample"]:
        raise ValueError(f"got {len(values)} scores for {h.sizes['sample']} samples")
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} scores are NaN")
    return values, ""


def _vector_values(v: xr.DataArray, what: str) -> np.ndarray:
    """A direction-shaped DataArray's float64 values in (step, channel, y, x) order."""
    if not isinstance(v, xr.DataArray) or set(v.dims) != set(VECTOR_DIMS):
        dims = getattr(v, "dims", None)
        raise ValueError(f"{what} must be a DataArray with dims {VECTOR_DIMS}, got {dims}")
    return np.asarray(v.transpose(*VECTOR_DIMS).values, dtype=np.float64)


def _check_same_steps(a: xr.DataArray, b: xr.DataArray, what: str) -> None:
    if a.sizes["step"] != b.sizes["step"] or (
        "step" in a.coords and "step" in b.coords and not np.array_equal(a["step"].values, b["step"].values)
    ):
        raise ValueError(f"{what}: step coordinates differ ({a['step'].values} vs {b['step'].values})")
