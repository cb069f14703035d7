"""Conditional directions: a direction with the span of others projected away, per step."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import xarray as xr

from hmine.directions.plumbing import VECTOR_DIMS, _check_same_steps, _vector_values

#: A conditional direction's step slice shorter than this fraction of v0's is rounding
#: noise left after removing a span that contains v0; it is set to zero, not normalised.
_DEGENERATE_RELATIVE_NORM = 1e-10


def _project_out(v: np.ndarray, span: np.ndarray) -> np.ndarray:
    """v minus its orthogonal projection on the row span of ``span`` (m, features).

    Least squares instead of solving (NNᵀ)a = Nv: same result when N has full row rank,
    and still the projection when the other directions are (nearly) dependent.
    """
    if span.shape[0] == 0:
        return v.copy()
    residual = v
    # A second pass removes what rounding left inside the span, so the result is
    # orthogonal to every row to ~1e-16 relative instead of ~cond(N) * 1e-16.
    for _ in range(2):
        coefficients = np.linalg.lstsq(span.T, residual, rcond=None)[0]
        residual = residual - span.T @ coefficients
    return residual


def conditional_direction(v0: xr.DataArray, others: Sequence[xr.DataArray], *, per_step: bool = True) -> xr.DataArray:
    """v0 with the span of ``others`` projected away: v = v0 - Nᵀ(NNᵀ)⁻¹N v0.

    Parameters
    ----------
    v0 : xarray.DataArray (step, channel, y, x)
        The direction to condition (raw or unit; the result keeps v0's scale).
    others : sequence of xarray.DataArray (step, channel, y, x)
        Directions whose span is removed; N stacks them as rows.
    per_step : bool, default=True
        Project each step's flattened (channel, y, x) slices separately (the result is
        orthogonal to every other direction at every step), or the whole flattened
        (step, channel, y, x) vectors at once.

    Returns
    -------
    xarray.DataArray (step, channel, y, x)
        Float64, with v0's coordinates. A step slice that lies inside the span (what is
        left is under 1e-10 of v0's norm there) is returned as zeros, with a warning.
    """
    v = _vector_values(v0, "v0")
    rows = []
    for i, other in enumerate(others):
        _check_same_steps(v0, other, f"others[{i}]")
        rows.append(_vector_values(other, f"others[{i}]"))
    if any(r.shape != v.shape for r in rows):
        raise ValueError(f"every other direction must have v0's shape {v.shape}")
    span = np.stack(rows) if rows else np.zeros((0, *v.shape))
    n_steps = v.shape[0]

    if per_step:
        flat_v = v.reshape(n_steps, -1)
        flat_span = span.reshape(len(rows), n_steps, flat_v.shape[1])
        result = np.stack([_project_out(flat_v[t], flat_span[:, t]) for t in range(n_steps)])
        before = np.linalg.norm(flat_v, axis=1)
        after = np.linalg.norm(result, axis=1)
        degenerate = after <= _DEGENERATE_RELATIVE_NORM * before
        result[degenerate] = 0.0
    else:
        result = _project_out(v.reshape(-1), span.reshape(len(rows), v.size))
        degenerate = np.array([np.linalg.norm(result) <= _DEGENERATE_RELATIVE_NORM * np.linalg.norm(v)])
        if degenerate[0]:
            result[:] = 0.0
    if degenerate.any() and np.linalg.norm(v) > 0:
        warnings.warn(
            f"conditional direction: v0 lies in the span of the other directions at "
            f"{int(degenerate.sum())} step(s); those steps are zero",
            RuntimeWarning,
            stacklevel=2,
        )
    attrs = {**v0.attrs, "method": "conditional"}
    return xr.DataArray(
        result.reshape(v.shape), dims=VECTOR_DIMS, coords=v0.transpose(*VECTOR_DIMS).coords, name=v0.name, attrs=attrs
    )
