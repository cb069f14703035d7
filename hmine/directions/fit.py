"""Everything at once: the direction stage's computation, :func:`fit_directions`."""

from __future__ import annotations

import json

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from hmine.directions.conditional import conditional_direction
from hmine.directions.eigen import PCA_DEGENERATE_GAP, PCA_MAX_ITER, PCA_OVERSAMPLES, PCA_SOLVER, PCA_TOL_DEGREES
from hmine.directions.pca import StepwisePCA
from hmine.directions.plumbing import VECTOR_DIMS, _check_h, _is_dask, _n_features, _wrap, align_labels
from hmine.directions.regression import _checked_design, regression_of_rows
from hmine.directions.rows import StepPlan, StepRows, loaded_dtype, plan_step
from hmine.directions.scale import normalise_directions
from hmine.directions.store import Direction, build_direction_dataset
from hmine.directions.supervised import LinearProbe, _top_and_bottom, mean_differences_of_rows

logger = logging.getLogger(__package__)  # "hmine.directions", as before the split into modules


def fit_directions(
    h: xr.DataArray,
    labels: pd.DataFrame,
    *,
    pca_components: int = 8,
    pca_modes: Sequence[str] = ("per_step",),
    attributes: Sequence[str] | None = None,
    top_k: int = 100,
    probe_C: float = 1.0,
    probe_components: int | None = 16,
    conditional: Mapping[str, Sequence[str]] | str | None = None,
    memory_budget_bytes: int = 2**30,
    random_state: int = 0,
    threshold: float | Mapping[str, float] = 0.5,
    probe_test_fraction: float = 0.25,
    regression: bool = True,
    regression_alpha: float = 1e-3,
) -> xr.Dataset:
    """Fit every configured direction of h into one dataset (layout in :mod:`hmine.directions`' docs).

    Directions, in this order:

    * ``pca/<k>`` for mode ``per_step`` and ``pca_all/<k>`` for ``all_steps``;
    * ``mean_difference/<attribute>`` and ``probe/<attribute>`` for every attribute;
    * for every ``attribute -> others`` in ``conditional``, ``conditional/<base>/<attribute>|<o1,o2>``
      for base ``mean_difference`` and ``probe``: the attribute's raw direction with the span
      of the ``others``' directions of the same base removed per step (an edit orthogonal to
      the other probes' normals leaves their linear decisions unchanged);
    * with ``regression``, ``regression/<attribute>`` for every attribute: its column of the
      joint ridge regression of h on all attributes' scores, per step (:mod:`~hmine.directions.regression`).

    Parameters
    ----------
    h : xarray.DataArray (sample, step, channel, y, x)
    labels : pandas.DataFrame
        Indexed by seed, one score column per attribute.
    pca_components : int
        Clipped to min(n_samples - 1, n_features); ``pca_modes``: "per_step", "all_steps".
    attributes : sequence of str, optional
        Label columns to fit supervised directions for; all columns by default.
    top_k : int
        Samples per side of the mean difference; clipped (with a warning) to
        n_samples // 2. The value used is in the ``hmine:top_k`` attribute.
    probe_C, probe_test_fraction, threshold : float (threshold: or one per attribute)
        :class:`LinearProbe` settings.
    probe_components : int or None
        :class:`LinearProbe`'s ``n_components``: probes are fitted in the top principal
        components of each step (None: in raw h coordinates).
    conditional : mapping of str to sequence of str, or "all", optional
        "all": every attribute conditioned on all the others (:func:`all_others`).
    regression, regression_alpha : bool, float
        Whether to fit the joint regression directions, and their ridge penalty.
    memory_budget_bytes : int
        Every path stays within it (:func:`~hmine.directions.rows.plan_step`): each step read once
        for all its fits, or streamed (``hmine:directions_path`` says which).
    random_state : int
        Seeds the PCA solver's start block and the probes' splits.
    """
    h = _check_h(h)
    attributes, conditional, modes = _checked_arguments(labels, attributes, conditional, pca_modes)
    scores = align_labels(labels[attributes], h)
    top_k_used = _clipped_top_k(top_k, h.sizes["sample"])
    probe_settings = {"C": probe_C, "test_fraction": probe_test_fraction, "threshold": threshold,
                      "random_state": random_state, "n_components": probe_components}  # fmt: skip
    probes = _prepared_probes(h, scores, attributes, probe_settings)
    per_step = _per_step_pca(h, modes, pca_components, memory_budget_bytes, random_state)
    h, plan = _directions_plan(h, per_step, probes, memory_budget_bytes)
    alpha = regression_alpha if regression and attributes else None
    fits = _fit_steps(h, plan, per_step, probes, scores, top_k_used, alpha)
    # an all_steps PCA gets what a loaded copy of a lazy h leaves of the budget
    budget_left = memory_budget_bytes - plan.resident_bytes
    raw, solvers = _pca_directions(h, modes, pca_components, budget_left, random_state, per_step)
    probes = {a: probes[a]._finish(h, fits["probe"][a]) for a in attributes}
    raw += _supervised_raws(h, attributes, conditional, fits["mean_difference"], top_k_used, probes)
    raw += _regression_raws(h, attributes, fits["regression"], alpha) if alpha is not None else []
    ds = build_direction_dataset(_normalised(raw, h))
    ds.attrs.update(_dataset_attrs(h.sizes["sample"], top_k_used, threshold, probe_components, solvers, random_state, probes))
    ds.attrs.update({"hmine:regression_alpha": "off" if alpha is None else float(alpha), "hmine:directions_path": plan.describe()})
    return ds


def _clipped_top_k(top_k: int, n: int) -> int:
    """``top_k`` clipped to half the samples, with a warning."""
    top_k_used = min(top_k, n // 2)
    if top_k_used < top_k:
        logger.warning("top_k=%d is more than half of %d samples; using %d", top_k, n, top_k_used)
    return top_k_used


def _per_step_pca(
    h: xr.DataArray, modes: list[str], pca_components: int, budget_bytes: int, random_state: int
) -> StepwisePCA | None:
    """The (unfitted) per-step PCA when ``per_step`` is among the modes, its components clipped."""
    if "per_step" not in modes:
        return None
    k = _pca_components(h, "per_step", pca_components)
    return StepwisePCA(n_components=k, mode="per_step", memory_budget_bytes=budget_bytes, random_state=random_state)


def _directions_plan(
    h: xr.DataArray, per_step: StepwisePCA | None, probes: dict, budget_bytes: int
) -> tuple[xr.DataArray, StepPlan]:
    """h (a loaded copy of a lazy h when it is small next to the budget) and the per-step plan.

    The plan covers the largest principal subspace any fit needs and the float32 rows a
    raw-coordinate probe holds (its training rows). A lazy h is loaded whole when it takes
    at most half of what the plan's smallest working set leaves: one read of the store
    then serves every pass (the scale's, an all_steps PCA's).
    """
    subspaces = [per_step.n_components] if per_step is not None else []
    subspaces += [p.n_components_ for p in probes.values() if p.n_components_ is not None]
    dense_rows = max([p.n_train_ for p in probes.values() if p.n_components_ is None], default=0)
    sizes = (h.sizes["sample"], _n_features(h), loaded_dtype(h).itemsize, max(subspaces, default=1), budget_bytes)
    plan = plan_step(*sizes, dense_rows=dense_rows)
    if _is_dask(h) and plan.load and h.nbytes <= (budget_bytes - plan.minimum_bytes) // 2:
        h = h.compute()  # the caller's lazy h is left as it is
        plan = plan_step(*sizes, dense_rows=dense_rows, resident_bytes=h.nbytes)
    if plan.within_budget:
        logger.info("directions: %s", plan.describe())
    else:
        logger.warning(
            "directions: %s; the smallest working set does not fit directions.memory_budget_gb: raise it%s",
            plan.describe(), " or set directions.probe_components" if dense_rows else "",
        )  # fmt: skip
    return h, plan


def _fit_steps(
    h: xr.DataArray, plan: StepPlan, per_step: StepwisePCA | None, probes: dict, scores: pd.DataFrame, top_k: int,
    alpha: float | None,
) -> dict:
    """Every per-step fit, step by step, on one :class:`StepRows` per step (one read when ``plan.load``).

    The per-step PCA is fitted here when the steps are loaded; streamed, it takes its own
    out-of-core (dask) path in :func:`_pca_directions`. Returns the per-step results:
    ``mean_difference`` (per step, a list over attributes), ``probe`` (per attribute, a list
    over steps) and, unless ``alpha`` is None, ``regression`` (per step, (attributes, features)).
    """
    groups = [_top_and_bottom(scores[a].to_numpy(dtype=float), top_k) for a in probes]
    design = _checked_design(h, scores, alpha) if alpha is not None else None
    fits: dict = {"pca": [], "mean_difference": [], "probe": {a: [] for a in probes}, "regression": []}
    for t in range(h.sizes["step"]):
        rows = StepRows(h, t, load=plan.load)
        if per_step is not None and plan.load:
            fits["pca"].append(per_step._fit_rows(rows, plan.max_basis))
        fits["mean_difference"].append(mean_differences_of_rows(rows, groups))
        for attribute, probe in probes.items():
            fits["probe"][attribute].append(probe._fit_rows(rows, plan.max_basis))
        if design is not None:
            fits["regression"].append(regression_of_rows(rows, design, alpha))
        del rows  # the step's matrix goes before the next one is read
    if per_step is not None and plan.load:
        per_step._fit_from_steps(h, fits["pca"], "memory")
    return fits


def _prepared_probes(h: xr.DataArray, scores: pd.DataFrame, attributes: list[str], settings: dict) -> dict:
    """Each attribute's :class:`LinearProbe`, its labels, split and components prepared (not yet fitted)."""
    probes = {}
    for attribute in attributes:
        own = dict(settings)
        if isinstance(own["threshold"], Mapping):  # one per attribute
            own["threshold"] = float(own["threshold"][attribute])
        probes[attribute] = LinearProbe(**own)
        probes[attribute]._prepare(h, scores[attribute])
    return probes


def _pca_components(h: xr.DataArray, mode: str, pca_components: int) -> int:
    """``pca_components`` clipped to n_samples - 1 and the features of one fit, with a warning."""
    n = h.sizes["sample"]
    n_features = _n_features(h) * (1 if mode == "per_step" else h.sizes["step"])
    k = min(pca_components, n - 1, n_features)
    if k < pca_components:
        method = "pca" if mode == "per_step" else "pca_all"
        logger.warning("%s: %d components asked, %d possible with %d samples", method, pca_components, k, n)
    return k


def _stacked(h: xr.DataArray, attributes: list[str], per_step: list, method: str, attrs: dict) -> dict:
    """Each attribute's (step, channel, y, x) direction from the per-step lists of per-attribute vectors."""
    shape = (h.sizes["step"], h.sizes["channel"], h.sizes["y"], h.sizes["x"])
    return {
        a: _wrap(
            np.stack([step[i] for step in per_step]).reshape(shape), VECTOR_DIMS, h, name=method,
            attrs={"method": method, "attribute": a, **attrs},
        )  # fmt: skip
        for i, a in enumerate(attributes)
    }


def all_others(attributes: Sequence[str]) -> dict[str, list[str]]:
    """``conditional: all``: each attribute conditioned on every other one (nothing for a single attribute)."""
    attributes = list(attributes)
    return {a: [o for o in attributes if o != a] for a in attributes} if len(attributes) > 1 else {}


def _checked_arguments(labels: pd.DataFrame, attributes, conditional, pca_modes):
    """:func:`fit_directions`' attributes, conditional mapping and PCA modes, checked."""
    attributes = list(labels.columns) if attributes is None else list(attributes)
    if isinstance(conditional, str):
        if conditional != "all":
            raise ValueError(f"conditional must be a mapping or 'all', got {conditional!r}")
        conditional = all_others(attributes)
    conditional = {str(k): list(v) for k, v in (conditional or {}).items()}
    absent = [a for a in attributes if a not in labels.columns]
    if absent:
        raise ValueError(f"labels have no column {absent}; they have {list(labels.columns)}")
    for attribute, others in conditional.items():
        unknown = [a for a in [attribute, *others] if a not in attributes]
        if unknown:
            raise ValueError(f"conditional names {unknown}, which are not among the attributes {attributes}")
        if not others or attribute in others:
            raise ValueError(
                f"conditional[{attribute!r}] = {others}: list the other attributes whose directions "
                "are projected away (non-empty, without the attribute itself)"
            )
    modes = list(dict.fromkeys(pca_modes))
    bad_modes = [m for m in modes if m not in ("per_step", "all_steps")]
    if bad_modes:
        raise ValueError(f"pca_modes {bad_modes} are not 'per_step' or 'all_steps'")
    return attributes, conditional, modes


def _pca_directions(
    h: xr.DataArray, modes: list[str], pca_components: int, memory_budget_bytes: int, random_state: int,
    per_step: StepwisePCA,
) -> tuple[list[tuple[dict, xr.DataArray]], dict]:
    """(metadata, raw axis) of every PCA component of every mode, and the path each mode took.

    ``per_step`` is the per-step PCA, already fitted on the steps' one read when they
    were loaded; otherwise it is fitted here on its own (out-of-core) path.
    """
    raw: list[tuple[dict, xr.DataArray]] = []
    solvers = {}
    for mode in modes:
        method = "pca" if mode == "per_step" else "pca_all"
        if mode == "per_step":
            pca = per_step if hasattr(per_step, "components_") else per_step.fit(h)
            k = int(pca.n_components)
        else:
            k = _pca_components(h, mode, pca_components)
            pca = StepwisePCA(
                n_components=k, mode=mode, memory_budget_bytes=memory_budget_bytes, random_state=random_state,
            ).fit(h)  # fmt: skip
        solvers[method] = f"{pca.solver_}/{pca.svd_solver_}"
        for c in range(k):
            meta = {
                "name": f"{method}/{c}", "method": method, "component": c,
                "explained_variance_ratio": pca.explained_variance_ratio_.isel(component=c, drop=True),
                "pca_angle_bound": pca.angle_bound_.isel(component=c, drop=True),
                "pca_residual": pca.residual_.isel(component=c, drop=True),
                "pca_iterations": pca.n_iter_,
            }  # fmt: skip
            raw.append((meta, pca.components_.isel(component=c, drop=True)))
    return raw, solvers


def _supervised_raws(
    h: xr.DataArray, attributes: list[str], conditional: dict[str, list[str]], mean_differences: list, top_k: int,
    probes: dict,
) -> list[tuple[dict, xr.DataArray]]:
    """(metadata, raw direction) of the mean differences (per step, per attribute), the probes and the
    conditional directions."""
    mean_differences = _stacked(h, attributes, mean_differences, "mean_difference", {"top_k": int(top_k)})
    raw: list[tuple[dict, xr.DataArray]] = []
    for attribute in attributes:
        raw.append(
            ({"name": f"mean_difference/{attribute}", "method": "mean_difference", "attribute": attribute},
             mean_differences[attribute])
        )  # fmt: skip
    for attribute in attributes:
        meta = {
            "name": f"probe/{attribute}", "method": "probe", "attribute": attribute,
            "probe_accuracy": probes[attribute].heldout_accuracy_,
        }  # fmt: skip
        raw.append((meta, probes[attribute].coef_))
    for attribute, others in conditional.items():
        # each base direction loses the span of the others' directions of the same method
        # (Haas et al. eq. 12 projects mean differences out of a mean difference)
        for base, v0, span in (
            ("mean_difference", mean_differences[attribute], [mean_differences[o] for o in others]),
            ("probe", probes[attribute].coef_, [probes[o].coef_ for o in others]),
        ):
            name = f"conditional/{base}/{attribute}|{','.join(others)}"
            meta = {"name": name, "method": "conditional", "attribute": attribute}
            raw.append((meta, conditional_direction(v0, span)))
    return raw


def _regression_raws(
    h: xr.DataArray, attributes: list[str], per_step: list[np.ndarray], alpha: float
) -> list[tuple[dict, xr.DataArray]]:
    """(metadata, raw direction) of every attribute's joint regression direction, from the per-step coefficients."""
    settings = {"alpha": float(alpha), "regressors": ",".join(attributes)}
    coefficients = _stacked(h, attributes, per_step, "regression", settings)
    return [
        ({"name": f"regression/{a}", "method": "regression", "attribute": a}, coefficients[a]) for a in attributes
    ]


def _normalised(raw: list[tuple[dict, xr.DataArray]], h: xr.DataArray) -> list[Direction]:
    """The raw directions in the scale convention, with their metadata, in one pass over h."""
    normalised = normalise_directions([r for _, r in raw], h)
    return [Direction(unit=unit, scale_unit=scale, **meta) for (meta, _), (unit, scale) in zip(raw, normalised)]


def _dataset_attrs(
    n: int, top_k_used: int, threshold: float, probe_components, solvers: dict, random_state: int, probes: dict
) -> dict:
    """The direction dataset's root attributes: the fit's settings and the solvers'."""
    attrs = {
        "hmine:n_samples": int(n),
        "hmine:top_k": int(top_k_used),
        "hmine:threshold": json.dumps(dict(threshold)) if isinstance(threshold, Mapping) else float(threshold),
        "hmine:probe_components": "raw h" if probe_components is None else int(probe_components),
        "hmine:pca_solvers": ", ".join(f"{k}: {v}" for k, v in solvers.items()),
        # the eigensolver's settings; its measured accuracy is in pca_angle_bound,
        # pca_residual and pca_iterations
        "hmine:pca_solver": PCA_SOLVER,
        "hmine:pca_tol_degrees": float(PCA_TOL_DEGREES),
        "hmine:pca_oversamples": int(PCA_OVERSAMPLES),
        "hmine:pca_max_iter": int(PCA_MAX_ITER),
        "hmine:pca_degenerate_gap": float(PCA_DEGENERATE_GAP),
        "hmine:pca_random_state": int(random_state),
        "hmine:conditional_span": "the other attributes' directions of the same method",
        "hmine:scale_convention": (
            "direction is a unit vector per step; scale_unit is the std over samples (ddof=1) of the "
            "data projected on it; an edit at scale s adds s * scale_unit * direction"
        ),
    }
    probe_bounds = [p.pca_angle_bound_ for p in probes.values() if p.pca_angle_bound_ is not None]
    if probe_bounds:  # degrees; the probes' principal subspaces use the same solver and settings
        attrs["hmine:probe_pca_angle_bound"] = float(max(probe_bounds))
    return attrs
