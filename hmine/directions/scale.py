"""The scale convention shared by every method (see :mod:`hmine.directions`).

A stored direction is a unit vector u_t per step plus ``scale_unit_t``, the std over
samples (ddof=1) of the data projected on it; an edit at scale s adds
``s * scale_unit_t * u_t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from hmine.directions.plumbing import (
    VECTOR_DIMS,
    _check_h,
    _check_same_steps,
    _dask_h,
    _is_dask,
    _vector_values,
    _wrap,
)
from hmine.directions.rows import StepRows


def projection_std(units: np.ndarray, h: xr.DataArray) -> np.ndarray:
    """Std over samples (ddof=1) of h projected on each unit vector, per step: (K, step).

    The scale convention of hmine: ``units`` (K, step, channel, y, x) holds one unit
    vector per step for each of K directions, and an edit at scale s adds
    ``s * std * unit`` to h. One pass over h for all K directions. Centring is not needed: the std of
    <h - mean, u> equals the std of <h, u>, and the projections are float64.
    """
    n_directions, n_steps = units.shape[:2]
    flat = units.reshape(n_directions, n_steps, -1)
    n = h.sizes["sample"]
    if _is_dask(h):
        import dask

        data = _dask_h(h)
        blocks = [data[:, t].reshape(n, -1).astype(np.float64) @ flat[:, t].T for t in range(n_steps)]
        projections = np.stack(dask.compute(*blocks), axis=2)
    else:  # row block by row block: no float64 copy of a step
        origin = np.zeros(flat.shape[2])
        projections = np.stack([StepRows(h, t, load=False).project(flat[:, t], origin) for t in range(n_steps)], axis=2)
    return projections.std(axis=0, ddof=1)


def normalise_directions(raws: Sequence[xr.DataArray], h: xr.DataArray) -> list[tuple[xr.DataArray, xr.DataArray]]:
    """:func:`normalise_direction` for many directions with a single pass over ``h``."""
    h = _check_h(h)
    if not raws:
        return []
    values = []
    for i, raw in enumerate(raws):
        _check_same_steps(raw, h, f"direction {i} and h")
        value = _vector_values(raw, f"direction {i}")
        if value.shape[1:] != (h.sizes["channel"], h.sizes["y"], h.sizes["x"]):
            raise ValueError(f"direction {i} has shape {value.shape}, h's steps are {h.shape[1:]}")
        values.append(value)
    stacked = np.stack(values)  # (K, step, channel, y, x)
    norms = np.sqrt((stacked**2).sum(axis=(2, 3, 4)))
    finite = np.isfinite(norms) & (norms > 0)
    safe_norms = np.where(finite, norms, 1.0)[:, :, None, None, None]
    units = np.where(finite[:, :, None, None, None], stacked / safe_norms, 0.0)
    scales = projection_std(units, h)
    out = []
    for i, raw in enumerate(raws):
        attrs = {**raw.attrs, "norm": "unit per step"}
        unit = _wrap(units[i], VECTOR_DIMS, h, name=raw.name, attrs=attrs)
        scale = _wrap(
            scales[i], ("step",), h, name="scale_unit",
            attrs={"long_name": "std of the data projected on the unit direction"},
        )  # fmt: skip
        out.append((unit, scale))
    return out


def normalise_direction(raw: xr.DataArray, h: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Bring a raw direction to the library's scale convention.

    Parameters
    ----------
    raw : xarray.DataArray (step, channel, y, x)
        Any direction; only its orientation at each step matters.
    h : xarray.DataArray (sample, step, channel, y, x)
        The data that defines the scale.

    Returns
    -------
    unit : xarray.DataArray (step, channel, y, x)
        ``raw`` divided by its norm at every step (zero where the slice is zero).
    scale_unit : xarray.DataArray (step,)
        Std over samples (ddof=1) of ``<h_t - mean_t, unit_t>``: an edit at scale s adds
        ``s * scale_unit_t * unit_t``.
    """
    return normalise_directions([raw], h)[0]
