"""Supervised raw directions: Haas et al.'s mean difference and linear-probe normals."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from sklearn.base import BaseEstimator

from hmine.directions.pca import _pca_of_rows
from hmine.directions.plumbing import VECTOR_DIMS, _aligned_scores, _check_h, _n_features, _wrap
from hmine.directions.rows import StepRows


def mean_difference_direction(h: xr.DataArray, scores, top_k: int) -> xr.DataArray:
    """Mean h of the top-k samples by score minus the mean of the bottom-k, per step.

    Haas et al.'s supervised direction. Ties in score are broken by sample position, so
    the choice is deterministic.

    Parameters
    ----------
    h : xarray.DataArray (sample, step, channel, y, x)
    scores : pandas.Series indexed by seed, or array-like in ``h.sample`` order
        Attribute scores; the Series' name is recorded as the attribute.
    top_k : int
        Samples per side; ``2 * top_k`` must not exceed the number of samples.

    Returns
    -------
    xarray.DataArray (step, channel, y, x)
        The raw (unnormalised) difference of means, float64.
    """
    h = _check_h(h)
    values, attribute = _aligned_scores(h, scores)
    bottom, top = _top_and_bottom(values, top_k)

    def group_mean(index):
        return np.asarray(h.isel(sample=index).astype(np.float64).mean("sample").values)

    difference = group_mean(top) - group_mean(bottom)
    attrs = {"method": "mean_difference", "attribute": attribute, "top_k": int(top_k)}
    return _wrap(difference, VECTOR_DIMS, h, name="mean_difference", attrs=attrs)


def _top_and_bottom(values: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of the ``top_k`` lowest and highest scores (ties broken by position)."""
    n = len(values)
    if not 1 <= top_k <= n // 2:
        raise ValueError(
            f"top_k={top_k} needs 1 <= top_k <= n_samples // 2 = {n // 2} so the top and bottom "
            "groups do not overlap; lower directions.top_k or sample more"
        )
    order = np.argsort(values, kind="stable")
    return np.sort(order[:top_k]), np.sort(order[-top_k:])


def mean_differences_of_rows(rows: StepRows, groups: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per (bottom, top) pair of positions, mean(top rows) - mean(bottom rows), float64, in one pass."""
    masks = []
    for bottom, top in groups:
        for index in (bottom, top):
            mask = np.zeros(rows.n, dtype=bool)
            mask[index] = True
            masks.append(mask)
    means = rows.means(masks)
    return [means[2 * i + 1] - means[2 * i] for i in range(len(groups))]


def _split(labels: np.ndarray, test_fraction: float, random_state: int, attribute: str):
    """Deterministic train/held-out split of sample positions, stratified when possible."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    counts = np.bincount(labels.astype(int), minlength=2)
    stratified = bool(counts.min() >= 2 and 2 <= n_test <= n - 2)
    train, test = train_test_split(
        np.arange(n),
        test_size=test_fraction,
        random_state=random_state,
        stratify=labels if stratified else None,
    )
    if len(np.unique(labels[train])) < 2:
        raise ValueError(
            f"attribute {attribute!r}: the training split has only one class "
            f"({counts[1]} positive of {n}); sample more or change the threshold"
        )
    return np.sort(train), np.sort(test), stratified


class LinearProbe(BaseEstimator):
    """Logistic-regression probe for a binarised attribute; its normal vector in h coordinates.

    Scores are binarised as ``score > threshold`` (the convention of the edit stage), the
    samples are split deterministically into train and held-out sets (stratified by class
    when each class has at least two samples), and a
    :class:`sklearn.linear_model.LogisticRegression` is fitted per step or once over the
    whole trajectory. Features are centred on the training mean but not scaled: scaling
    would make the normal vector live in standardised coordinates, not in h's.

    With ``n_components``, the probe is fitted on the projections of h onto the top
    principal components of the (centred) training samples (exact, by the solver of
    :class:`StepwisePCA`), and its normal is mapped back to h: w = Vᵀβ. Why: h has far
    more dimensions than there are samples (8,192 for the embedded model against ~800
    training samples), so an unrestricted probe separates the classes along low-variance
    directions that the data never moves along; its normal is accurate but not causal
    (measured on the embedded world with 1,024 samples: edits of +-20 std along it flipped
    is_circle in <= 10 % of samples, along the 32-component probe's normal in 82 %).
    Restricted to the principal subspace, the normal points where the samples actually
    vary, which is where the decoder responds. The decision function is a linear function
    of h either way.

    How many components: few enough that the normal stays in the directions the
    generative factors move h along, enough that the probe still decodes; on the demo, 16
    is where both hold (flip rates and accuracies for 8, 16 and 32 components are in
    ``docs/directions.md``), so :func:`fit_directions` defaults to 16.

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 regularisation strength.
    test_fraction : float, default=0.25
        Fraction of samples held out for ``heldout_accuracy_``.
    threshold : float, default=0.5
        Scores above it are positive.
    per_step : bool, default=True
        One probe per step, or one over the concatenated (step, channel, y, x) vector.
    random_state : int, default=0
        Seed of the split (and of the solver).
    max_iter : int, default=500
        Solver iterations.
    n_components : int or None, default=None
        Fit on the top principal components of the training samples (clipped to
        n_train - 1 and the number of features); None fits on raw h coordinates.

    Attributes
    ----------
    coef_ : xarray.DataArray (step, channel, y, x)
        Boundary normal in h coordinates (raw, unnormalised).
    intercept_ : xarray.DataArray (step,), or 0-d when ``per_step=False``
        Decision function ``<coef_, h> + intercept_`` in uncentred h coordinates.
    train_accuracy_, heldout_accuracy_ : xarray.DataArray (step,), or 0-d
    attribute_ : str
        The scores' name ("" for a bare array).
    n_positive_, n_train_, n_heldout_ : int
    n_components_ : int or None
        Principal components the probe was fitted on (None: raw coordinates).
    pca_angle_bound_ : float or None
        Degrees: the largest measured angle bound of those components to the exact
        principal axes of the training samples, over all steps (:func:`top_eigenpairs`);
        None for raw coordinates.
    stratified_ : bool
        Whether the split could be stratified.
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        test_fraction: float = 0.25,
        threshold: float = 0.5,
        per_step: bool = True,
        random_state: int = 0,
        max_iter: int = 500,
        n_components: int | None = None,
    ):
        self.C = C
        self.test_fraction = test_fraction
        self.threshold = threshold
        self.per_step = per_step
        self.random_state = random_state
        self.max_iter = max_iter
        self.n_components = n_components

    def fit(self, h: xr.DataArray, scores) -> LinearProbe:
        """Fit the probe.

        Parameters
        ----------
        h : xarray.DataArray (sample, step, channel, y, x)
        scores : pandas.Series indexed by seed, or array-like in ``h.sample`` order

        Returns
        -------
        self

        Raises
        ------
        ValueError
            When the binarised scores have a single class.
        """
        h = _check_h(h)
        self._prepare(h, scores)
        if self.per_step:
            fits = [self._fit_rows(StepRows(h, t, load=True)) for t in range(h.sizes["step"])]
        else:
            fits = [self._fit_rows(StepRows(h, None, load=True))]
        return self._finish(h, fits)

    def _prepare(self, h: xr.DataArray, scores) -> None:
        """Everything before the fits: binarised labels, the split, the components (``_setup``)."""
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        values, attribute = _aligned_scores(h, scores)
        labels, n_positive = self._binarised(values, attribute)
        train, test, self.stratified_ = _split(labels, self.test_fraction, self.random_state, attribute)
        self.attribute_ = attribute
        self.n_positive_ = n_positive
        self.n_train_, self.n_heldout_ = len(train), len(test)
        self.n_components_ = self._clipped_components(h, len(train))
        self._setup = (labels, train, test)

    def _finish(self, h: xr.DataArray, fits: list) -> LinearProbe:
        """The fitted attributes from one :meth:`_fit_rows` result per step (or one)."""
        vector_shape = (h.sizes["step"], h.sizes["channel"], h.sizes["y"], h.sizes["x"])
        stat_dims = ("step",) if self.per_step else ()
        coef = np.stack([f[0] for f in fits]) if self.per_step else fits[0][0]

        def stat(i):
            values = np.array([f[i] for f in fits], dtype=np.float64)
            return values if self.per_step else values[0]

        self.coef_ = _wrap(
            coef.reshape(vector_shape), VECTOR_DIMS, h, name="coef",
            attrs={"method": "probe", "attribute": self.attribute_},
        )  # fmt: skip
        self.intercept_ = _wrap(stat(1), stat_dims, h, name="intercept")
        self.train_accuracy_ = _wrap(stat(2), stat_dims, h, name="train_accuracy")
        self.heldout_accuracy_ = _wrap(stat(3), stat_dims, h, name="heldout_accuracy")
        bounds = [f[4] for f in fits if f[4] is not None]
        self.pca_angle_bound_ = max(bounds) if bounds else None
        del self._setup
        return self

    def _binarised(self, values: np.ndarray, attribute: str) -> tuple[np.ndarray, int]:
        """Scores above the threshold, and how many; both classes must occur."""
        labels = values > self.threshold
        n, n_positive = len(labels), int(labels.sum())
        if n_positive in (0, n):
            which = "positive" if n_positive == 0 else "negative"
            raise ValueError(
                f"attribute {attribute or '(unnamed)'!r} has no {which} samples at threshold "
                f"{self.threshold} ({n_positive} of {n} scores > {self.threshold}); choose a threshold "
                "inside the scores' range (directions.threshold) or sample more so both classes occur"
            )
        return labels, n_positive

    def _clipped_components(self, h: xr.DataArray, n_train: int) -> int | None:
        """``n_components`` clipped to n_train - 1 and the features of one fit (None: raw h)."""
        if self.n_components is not None and self.n_components < 1:
            raise ValueError(f"n_components must be >= 1 or None, got {self.n_components}")
        n_components = None
        if self.n_components is not None:
            n_features = _n_features(h) * (1 if self.per_step else h.sizes["step"])
            n_components = min(self.n_components, n_train - 1, n_features)
        return n_components

    def _fit_rows(self, rows: StepRows, max_basis: int | None = None):
        """One probe on a step's rows: coef, intercept, train and held-out accuracy, PCA angle bound.

        With ``n_components``, the principal subspace is the exact one of the training
        rows (:func:`_pca_of_rows` on them, centred on their float64 mean; Krylov basis
        capped at ``max_basis`` columns), and the probe sees every row's projection on
        it; the angle bound is None for raw coordinates.
        """
        from sklearn.linear_model import LogisticRegression

        labels, train, test = self._setup
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        mask = np.zeros(rows.n, dtype=bool)
        mask[train] = True
        if self.n_components_ is None:
            # raw coordinates: float32 rows centred on the training mean (lbfgs works on
            # float32 without an upcast copy); the training rows, then the held-out ones,
            # so that no copy of the whole step is made
            centre = rows.mean(mask).astype(np.float32)
            features = rows.dense(np.float32, train)
            features -= centre
            model.fit(features, labels[train])
            train_accuracy = model.score(features, labels[train])
            del features
            features = rows.dense(np.float32, test)
            features -= centre
            heldout_accuracy = model.score(features, labels[test])
            coef, centre, bound = model.coef_[0].astype(np.float64), centre.astype(np.float64), None
        else:
            fit = _pca_of_rows(rows, self.n_components_, mask=mask, seed=self.random_state, max_basis=max_basis)
            centre, bound = fit.mean, float(fit.eigenpairs.angle_bounds.max())
            features = rows.project(fit.components, centre)  # (samples, n_components)
            model.fit(features[train], labels[train])
            train_accuracy = model.score(features[train], labels[train])
            heldout_accuracy = model.score(features[test], labels[test])
            coef = fit.components.T @ model.coef_[0].astype(np.float64)  # w = Vᵀβ, back in h coordinates
        intercept = float(model.intercept_[0]) - float(coef @ centre)
        return coef, intercept, train_accuracy, heldout_accuracy, bound
