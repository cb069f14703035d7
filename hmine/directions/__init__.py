"""Directions in h-space: PCA, mean difference, linear probes and conditional projections.

Every function here takes h as an :class:`xarray.DataArray` with dims
``("sample", "step", "channel", "y", "x")`` — coords ``sample`` (seeds) and ``step``
(timestep values) — as the sample stage stores it; it may be dask-backed (opened lazily
from zarr) and float16. Arithmetic is always done in float64 (float32 for the probes'
design matrices), never in float16.

Methods
-------
* :class:`StepwisePCA` — unsupervised principal directions, one PCA per step
  (``mode="per_step"``) or one over the whole trajectory (``mode="all_steps"``), in
  memory or out of core with dask, whichever fits the memory budget; exact on both
  paths to a measured angle (:func:`top_eigenpairs`).
* :func:`mean_difference_direction` — Haas et al.'s supervised direction: the mean h of
  the top-k samples by an attribute score minus the mean of the bottom-k.
* :class:`LinearProbe` — the normal vector of a logistic-regression boundary for a
  binarised attribute, in h coordinates, with held-out accuracy.
* :func:`conditional_direction` — InterFaceGAN/Haas conditioning: v0 with the span of
  other directions projected away, v = v0 - Nᵀ(NNᵀ)⁻¹N v0, per step; ``conditional="all"``
  conditions every attribute on all the others (:func:`all_others`).
* :func:`regression_directions` — the joint ridge regression of h on every attribute's
  score at once, per step: an attribute's coefficient vector is its change of h with the
  other attributes held fixed.
* :func:`fit_directions` — all of the above into one :class:`xarray.Dataset`, the
  direction stage's output; :func:`write_directions` / :func:`open_directions` store it.

Scale convention (one for every method)
---------------------------------------
Each method first yields a *raw* direction (a PCA axis, a mean difference, a probe normal)
whose length means something different per method. Every stored direction is therefore
brought to the same form by :func:`normalise_direction`:

* ``u_t`` — a unit vector at every step t (norm 1 over ``(channel, y, x)``);
* ``scale_unit_t`` — the standard deviation over samples (ddof=1, like scikit-learn's
  variances) of the data projected on it, ``std_n <h_{n,t} - mean_t, u_t>``.

An edit at scale ``s`` adds ``s * scale_unit_t * u_t`` to h at step t, so a scale of 1
moves h by one standard deviation of the data along the direction at that step, for every
method. For a per-step PCA axis ``scale_unit_t`` is the square root of its explained
variance. A whole-trajectory PCA axis (unit norm over all steps together) is stored in the
same per-step form: its step slices are normalised one by one. A step whose raw slice is
zero (e.g. a conditional direction lying inside the projected span) gets ``u_t = 0`` and
``scale_unit_t = 0``: editing along it does nothing.

Store layout (``directions.zarr``, zarr v3)
-------------------------------------------
=============================  ===================================  ==========================
variable                       dims                                 meaning
=============================  ===================================  ==========================
``direction``                  (direction, step, channel, y, x)     unit vectors u_t
``scale_unit``                 (direction, step)                    std of data along u_t
``explained_variance_ratio``   (direction, step)                    PCA only, NaN otherwise
``probe_accuracy``             (direction, step)                    probes only, NaN otherwise
``pca_angle_bound``            (direction, step)                    PCA only: measured bound
                                                                    (degrees) on the angle to
                                                                    the exact axis
``pca_residual``               (direction, step)                    PCA only: eigensolver
                                                                    residual, relative
``pca_iterations``             (direction, step)                    PCA only: data passes
=============================  ===================================  ==========================

The root attributes ``hmine:pca_solver``, ``hmine:pca_tol_degrees``,
``hmine:pca_oversamples``, ``hmine:pca_max_iter``, ``hmine:pca_degenerate_gap`` and
``hmine:pca_random_state`` record the PCA eigensolver and its settings
(:func:`top_eigenpairs`); ``hmine:pca_solvers`` the path per method.

Coords on ``direction``: ``name`` (e.g. ``"pca/3"``, ``"probe/is_circle"``,
``"conditional/probe/is_circle|is_red"``, ``"regression/is_red"``), ``method`` (one of :data:`METHODS`),
``attribute`` (``""`` for PCA) and ``component`` (-1 unless PCA).

xarray makes a variable named like a dimension a coordinate, so ``direction`` is a
(non-index) coordinate of the dataset, and ``ds.sel(direction=...)`` fails because
xarray tries to build an index from it. Select by position — ``ds.isel(direction=mask)``
with a numpy mask — or by name with :func:`direction_by_name`.

Modules
-------
=====================================  =============================================================
:mod:`~hmine.directions.plumbing`      input checks, label alignment, h as (samples, features)
:mod:`~hmine.directions.eigen`         the exact eigensolver :func:`top_eigenpairs` and its settings
:mod:`~hmine.directions.rows`          one step as rows: read once or streamed, the memory estimate
:mod:`~hmine.directions.pca`           :class:`StepwisePCA`
:mod:`~hmine.directions.supervised`    :func:`mean_difference_direction`, :class:`LinearProbe`
:mod:`~hmine.directions.conditional`   :func:`conditional_direction`
:mod:`~hmine.directions.regression`    :func:`regression_directions`
:mod:`~hmine.directions.scale`         the scale convention: :func:`projection_std`,
                                       :func:`normalise_direction`, :func:`normalise_directions`
:mod:`~hmine.directions.store`         :class:`Direction`, the dataset and its zarr store
:mod:`~hmine.directions.fit`           :func:`fit_directions`
=====================================  =============================================================

Every name above is importable from :mod:`hmine.directions` itself. Measurements behind
the defaults are in ``docs/directions.md``.
"""

from hmine.directions.conditional import conditional_direction
from hmine.directions.eigen import (
    PCA_DEGENERATE_GAP,
    PCA_MAX_ITER,
    PCA_OVERSAMPLES,
    PCA_SOLVER,
    PCA_TOL_DEGREES,
    CovarianceProduct,
    Eigenpairs,
    top_eigenpairs,
)
from hmine.directions.fit import all_others, fit_directions
from hmine.directions.pca import StepwisePCA
from hmine.directions.plumbing import H_DIMS, VECTOR_DIMS, align_labels
from hmine.directions.regression import regression_directions
from hmine.directions.rows import StepPlan, StepRows, plan_step, step_memory_bytes
from hmine.directions.scale import normalise_direction, normalise_directions, projection_std
from hmine.directions.store import (
    METHODS,
    Direction,
    IncompleteStoreError,
    build_direction_dataset,
    direction_by_name,
    open_directions,
    write_directions,
)
from hmine.directions.supervised import LinearProbe, mean_difference_direction

# private helpers that tests and benchmarks import from here
from hmine.directions.pca import _fix_signs as _fix_signs
from hmine.directions.plumbing import _check_h as _check_h
from hmine.directions.plumbing import _dask_matrix as _dask_matrix
from hmine.directions.supervised import _split as _split

__all__ = [
    "H_DIMS",
    "METHODS",
    "PCA_DEGENERATE_GAP",
    "PCA_MAX_ITER",
    "PCA_OVERSAMPLES",
    "PCA_SOLVER",
    "PCA_TOL_DEGREES",
    "VECTOR_DIMS",
    "CovarianceProduct",
    "Direction",
    "Eigenpairs",
    "IncompleteStoreError",
    "LinearProbe",
    "StepPlan",
    "StepRows",
    "StepwisePCA",
    "align_labels",
    "all_others",
    "build_direction_dataset",
    "conditional_direction",
    "direction_by_name",
    "fit_directions",
    "mean_difference_direction",
    "normalise_direction",
    "normalise_directions",
    "open_directions",
    "plan_step",
    "projection_std",
    "regression_directions",
    "step_memory_bytes",
    "top_eigenpairs",
    "write_directions",
]
