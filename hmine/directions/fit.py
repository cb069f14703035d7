"""Everything at once: the direction stage's computation, :func:`fit_directions`."""

from __future__ import annotations

import json

import logging
from collections.abc import Mapping, Sequence

import pandas as pd
import xarray as xr

from hmine.directions.conditional import conditional_direction
from hmine.directions.eigen import PCA_DEGENERATE_GAP, PCA_MAX_ITER, PCA_OVERSAMPLES, PCA_SOLVER, PCA_TOL_DEGREES
from hmine.directions.pca import StepwisePCA
from hmine.directions.plumbing import _check_h, _is_dask, _n_features, align_labels
from hmine.directions.regression import regression_directions
from hmine.directions.scale import normalise_directions
from hmine.directions.store import Direction, build_direction_dataset
from hmine.directions.supervised import LinearProbe, mean_difference_direction

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
      of the ``others``' directions of the same base removed per step. Probe normals are the
      boundaries the other attributes' decisions depend on, so an edit orthogonal to them
      leaves those (linear) decisions unchanged;
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
    probe_C, probe_test_fraction : float
        :class:`LinearProbe` settings.
    threshold : float or mapping of str to float
        The probes' decision threshold, one for all or one per attribute.
    probe_components : int or None
        :class:`LinearProbe`'s ``n_components``: probes are fitted in the top principal
        components of each step (None: in raw h coordinates).
    conditional : mapping of str to sequence of str, or "all", optional
        "all": every attribute conditioned on all the others (:func:`all_others`).
    regression, regression_alpha : bool, float
        Whether to fit the joint regression directions, and their ridge penalty.
    memory_budget_bytes : int
        The PCA's path choice; also, when h is lazy and no larger than a quarter of it, a
        loaded copy of h is used so that the fits do not each re-read the store.
    random_state : int
        Seeds the PCA solver's start block and the probes' splits.
    """
    h = _check_h(h)
    attributes, conditional, modes = _checked_arguments(labels, attributes, conditional, pca_modes)
    scores = align_labels(labels[attributes], h)
    if _is_dask(h) and h.nbytes <= memory_budget_bytes // 4:
        h = h.compute()  # a loaded copy; the caller's lazy h is left as it is

    # (metadata, raw direction) in output order; normalised together in one pass.
    raw, solvers = _pca_directions(h, modes, pca_components, memory_budget_bytes, random_state)
    probe_settings = {"C": probe_C, "test_fraction": probe_test_fraction, "threshold": threshold,
                      "random_state": random_state, "n_components": probe_components}  # fmt: skip
    top_k_used, mean_differences, probes = _supervised_directions(h, scores, attributes, top_k, probe_settings)
    raw += _supervised_raws(attributes, conditional, mean_differences, probes)
    raw += _regression_raws(h, scores, regression_alpha) if regression and attributes else []
    ds = build_direction_dataset(_normalised(raw, h))
    ds.attrs.update(_dataset_attrs(h.sizes["sample"], top_k_used, threshold, probe_components, solvers, random_state, probes))
    ds.attrs["hmine:regression_alpha"] = float(regression_alpha) if regression and attributes else "off"
    return ds


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
    h: xr.DataArray, modes: list[str], pca_components: int, memory_budget_bytes: int, random_state: int
) -> tuple[list[tuple[dict, xr.DataArray]], dict]:
    """(metadata, raw axis) of every PCA component of every mode, and the path each mode took."""
    n = h.sizes["sample"]
    raw: list[tuple[dict, xr.DataArray]] = []
    solvers = {}
    for mode in modes:
        method = "pca" if mode == "per_step" else "pca_all"
        n_features = _n_features(h) * (1 if mode == "per_step" else h.sizes["step"])
        k = min(pca_components, n - 1, n_features)
        if k < pca_components:
            logger.warning("%s: %d components asked, %d possible with %d samples", method, pca_components, k, n)
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


def _supervised_directions(
    h: xr.DataArray, scores: pd.DataFrame, attributes: list[str], top_k: int, probe_settings: dict
) -> tuple[int, dict, dict]:
    """The top_k used (clipped to half the samples), and each attribute's mean difference and probe."""
    n = h.sizes["sample"]
    top_k_used = min(top_k, n // 2)
    if top_k_used < top_k:
        logger.warning("top_k=%d is more than half of %d samples; using %d", top_k, n, top_k_used)
    mean_differences, probes = {}, {}
    for attribute in attributes:
        mean_differences[attribute] = mean_difference_direction(h, scores[attribute], top_k_used)
        settings = dict(probe_settings)
        if isinstance(settings["threshold"], Mapping):  # one per attribute
            settings["threshold"] = float(settings["threshold"][attribute])
        probes[attribute] = LinearProbe(**settings).fit(h, scores[attribute])
    return top_k_used, mean_differences, probes


def _supervised_raws(
    attributes: list[str], conditional: dict[str, list[str]], mean_differences: dict, probes: dict
) -> list[tuple[dict, xr.DataArray]]:
    """(metadata, raw direction) of the mean differences, the probes and the conditional directions."""
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


def _regression_raws(h: xr.DataArray, scores: pd.DataFrame, alpha: float) -> list[tuple[dict, xr.DataArray]]:
    """(metadata, raw direction) of every attribute's joint regression direction."""
    return [
        ({"name": f"regression/{a}", "method": "regression", "attribute": a}, coefficients)
        for a, coefficients in regression_directions(h, scores, alpha=alpha).items()
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
