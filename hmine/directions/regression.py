"""Joint regression directions: h regressed on every attribute score at once, per step.

At every step t, h_t (samples, features) is regressed on the scores of all attributes
together, ``h_t ≈ c_t + S B_t`` with S (samples, attributes), by ridge regression
(:class:`sklearn.linear_model.Ridge`, intercept fitted, so both sides are centred):

    B_t = (S_cᵀ S_c + alpha I)⁻¹ S_cᵀ H_c,t

Row a of B_t (the coefficient of attribute a for every feature) is how h_t changes per
unit of a's score with the other attributes' scores held fixed: a direction for a with
its correlated attributes accounted for in the fit, not projected away afterwards. A
mean difference of a, by contrast, also moves h along every attribute correlated with a.
With alpha → 0 this is ordinary least squares; a small alpha only guards against
(nearly) collinear scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from hmine.directions.plumbing import VECTOR_DIMS, _check_h, _wrap, align_labels
from hmine.directions.rows import StepRows


def regression_directions(h: xr.DataArray, scores: pd.DataFrame, *, alpha: float = 1e-3) -> dict[str, xr.DataArray]:
    """Each attribute's column of the joint ridge regression of h on all scores, per step.

    Parameters
    ----------
    h : xarray.DataArray (sample, step, channel, y, x)
    scores : pandas.DataFrame
        Indexed by seed, one score column per attribute; every column is a regressor.
    alpha : float, default=1e-3
        Ridge penalty on the coefficients, in the units of the scores' sum of squares
        (a sample's binary-like score varies by ~0.25, so n samples give ~n/4).

    Returns
    -------
    dict of str to xarray.DataArray (step, channel, y, x)
        Per attribute, in the columns' order: the raw (unnormalised) coefficient vector
        B_t[a] at every step, float64, in h per unit of score.
    """
    h = _check_h(h)
    attributes = [str(c) for c in scores.columns]
    design = _checked_design(h, scores, alpha)
    n_steps = h.sizes["step"]
    shape = (h.sizes["channel"], h.sizes["y"], h.sizes["x"])
    coefficients = np.empty((len(attributes), n_steps, *shape))
    for t in range(n_steps):
        coefficients[:, t] = regression_of_rows(StepRows(h, t, load=False), design, alpha).reshape(len(attributes), *shape)
    return {
        a: _wrap(
            coefficients[i], VECTOR_DIMS, h, name="regression",
            attrs={"method": "regression", "attribute": a, "alpha": float(alpha), "regressors": ",".join(attributes)},
        )  # fmt: skip
        for i, a in enumerate(attributes)
    }


def _checked_design(h: xr.DataArray, scores: pd.DataFrame, alpha: float) -> np.ndarray:
    """The scores as a float64 (samples, attributes) design in ``h.sample`` order, checked."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    attributes = [str(c) for c in scores.columns]
    if not attributes:
        raise ValueError("scores have no columns: regression needs at least one attribute")
    design = align_labels(scores, h).to_numpy(dtype=np.float64)
    constant = [a for a, sd in zip(attributes, design.std(axis=0)) if not sd > 0]
    if constant:
        raise ValueError(f"attributes {constant} have the same score for every sample; they cannot be regressed on")
    return design


def regression_of_rows(rows: StepRows, design: np.ndarray, alpha: float) -> np.ndarray:
    """B = (S_cᵀS_c + alpha I)⁻¹ S_cᵀ H_c for one step's rows: (attributes, features), one pass.

    What :class:`sklearn.linear_model.Ridge` (intercept fitted, Cholesky solver) computes,
    without a float64 copy of the rows: S_cᵀH and the column sums of H come from one pass
    over row blocks, and S_cᵀH_c = S_cᵀH - (S_cᵀ1) meanᵀ.
    """
    centred = design - design.mean(axis=0)
    sums = rows.cross(np.column_stack([centred, np.ones(rows.n)]))  # (attributes + 1, features)
    cross = sums[:-1] - np.outer(centred.sum(axis=0), sums[-1] / rows.n)
    gram = centred.T @ centred + alpha * np.eye(design.shape[1])
    return np.linalg.solve(gram, cross)
