"""The exact PCA eigensolver: top eigenpairs of a sample covariance, to a measured angle.

:func:`top_eigenpairs` is randomized block Krylov iteration (block Lanczos with full
re-orthogonalisation) on the covariance C, in float64. The basis Q = [V_1, …, V_i] spans
span{V_1, C V_1, …, C^(i−1) V_1} from a random orthonormal block V_1 of k + ``n_oversamples``
columns; each iteration pushes one new block through ``product`` (one pass over the data)
and does a Rayleigh–Ritz step over all of span(Q): QᵀCQ = ZᵀZ = Y Θ Yᵀ with
Z = [z_1, …, z_i], Ritz vectors QY, and C of them, WY, without further passes
(W = [w_1, …, w_i]).

It stops on a measured bound, not an iteration count: the residuals of the Ritz pairs and
the spectral gaps around them bound each axis's angle to C's exact eigenvector
(Davis–Kahan, :func:`_sine_bound`). Why Krylov and not subspace (power) iteration: over
the whole Krylov space the angles shrink at a rate set by the square root of the relative
gap between θ_k and the eigenvalues beyond the block instead of by the gap itself, so it
needs fewer data passes, which is what an out-of-core fit pays for.

Both :class:`~hmine.directions.StepwisePCA` (in memory and out of core) and
:class:`~hmine.directions.LinearProbe`'s principal subspaces use it, with the settings
below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The PCA solver's settings (top_eigenpairs), used by StepwisePCA and LinearProbe.

#: What computes every PCA (and is recorded with the directions, ``hmine:pca_solver``).
PCA_SOLVER = (
    "block Krylov iteration on the covariance in float64 with Rayleigh-Ritz, stopped by a residual "
    "(Davis-Kahan) bound on each axis's angle to the exact one"
)
#: Stop when every component's angle to the exact principal axis is bounded by this many
#: degrees: 100 times below the 0.01 degree of agreement with an exact SVD that the
#: tests demand, so that the bound's own slack never matters.
PCA_TOL_DEGREES = 1e-4
#: Columns per Krylov block beyond the wanted components: the block's spectral gap, not
#: the (possibly tiny) one after the k-th eigenvalue, sets how fast the iteration converges.
PCA_OVERSAMPLES = 8
#: Data passes (Krylov blocks) before the solver gives up with a warning.
PCA_MAX_ITER = 100
#: Eigenvalues closer than this fraction of the largest are treated as one degenerate
#: cluster: their individual axes are not defined, only the subspace they span, so the
#: angle bound (and the convergence test) is that of the cluster's subspace.
PCA_DEGENERATE_GAP = 1e-6


@dataclass(frozen=True)
class Eigenpairs:
    """The top eigenpairs of a sample covariance C and their measured accuracy.

    Attributes
    ----------
    vectors : ndarray (features, k)
        Orthonormal Ritz vectors, by decreasing Ritz value.
    values : ndarray (k,)
        Ritz values vᵀCv: the variance of the data along each vector (ddof=1).
    residuals : ndarray (k,)
        ‖Cv − θv‖ / θ₁ per pair: the residual relative to the largest variance (the
        pair's normwise backward error).
    angle_bounds : ndarray (k,)
        Degrees: a bound, from the residuals and the spectral gaps, on the angle between
        each vector and C's exact eigenvector; for a vector whose eigenvalue is in a
        degenerate cluster (see :data:`PCA_DEGENERATE_GAP`), on the largest angle
        between the cluster's span and the exact one.
    subspace_angle_bound : float
        Degrees: the same bound for the span of all k vectors (the largest principal
        angle to the exact top-k eigenspace).
    iterations : int
        Blocks pushed through the covariance: one data pass each.
    converged : bool
        Whether every angle bound is within the tolerance.
    """

    vectors: np.ndarray
    values: np.ndarray
    residuals: np.ndarray
    angle_bounds: np.ndarray
    subspace_angle_bound: float
    iterations: int
    converged: bool


def _orthonormal_complement(block: np.ndarray, basis: np.ndarray, rounding: float) -> np.ndarray:
    """Orthonormal columns spanning the part of span(``block``) orthogonal to ``basis``.

    Gram–Schmidt against the (orthonormal) columns of ``basis`` is done twice: one pass
    leaves components along ``basis`` that grow with the cancellation, a second brings
    them down to rounding level. Left singular vectors whose singular value is below
    ``rounding`` times the largest column norm of ``block`` are dropped: they carry no
    new direction.
    """
    scale = np.linalg.norm(block, axis=0).max(initial=0.0)
    if scale == 0:
        return block[:, :0]
    for _ in range(2):
        block = block - basis @ (basis.T @ block)
    left, singular_values, _ = np.linalg.svd(block, full_matrices=False)
    return left[:, singular_values > rounding * scale]


def _degenerate_clusters(values: np.ndarray, k: int, degenerate_gap: float) -> list[tuple[int, int]]:
    """(first, last) index pairs of the runs of Ritz values that cover the top k.

    Consecutive values closer than ``degenerate_gap`` times the largest form one run;
    the last run may reach past k.
    """
    tie = degenerate_gap * max(values[0], np.finfo(np.float64).tiny)
    clusters, first = [], 0
    while first < k:
        last = first
        while last + 1 < len(values) and values[last] - values[last + 1] <= tie:
            last += 1
        clusters.append((first, last))
        first = last + 1
    return clusters


def _sine_bound(values: np.ndarray, residuals: np.ndarray, first: int, last: int, invariant: bool) -> float:
    """Davis–Kahan bound on the sine of the angle between span(Ritz vectors first..last)
    and C's exact eigenspace of the same eigenvalues: ‖R‖₂ / gap.

    ``residuals`` holds Cv − θv for the first few Ritz pairs (columns), at least up to
    ``last + 1`` unless the basis ends there. The gap is the distance from the run's
    Ritz values to the rest of the spectrum: above, to the Ritz value before the run
    (Ritz values are lower bounds of the eigenvalues they approximate, so this never
    overstates the gap); below, to the next Ritz value plus its residual norm (the
    eigenvalue it approximates lies within that). When the basis has no Ritz value
    below the run, the gap below is the run's smallest value if the basis is invariant
    (it holds C's whole range: the rest of the spectrum is 0), and unknown otherwise.
    """
    if last + 1 < residuals.shape[1]:
        below = values[last + 1] + np.linalg.norm(residuals[:, last + 1])
    elif last + 1 >= len(values) and invariant:
        below = 0.0
    else:
        return math.inf
    gap = values[last] - below
    if first > 0:
        gap = min(gap, values[first - 1] - values[first])
    if not gap > 0:
        return math.inf
    return float(np.linalg.norm(residuals[:, first : last + 1], 2) / gap)


def _degrees(sine: float | np.ndarray):
    return np.degrees(np.arcsin(np.minimum(sine, 1.0)))


#: ``product(B)`` for a (features, b) block B returns ``(z, w)``: z = X_c B / √(n−1)
#: (samples, b) and w = X_cᵀ z = C B (features, b), where X_c is the centred data and
#: C = X_cᵀX_c / (n−1) its covariance; zᵀz = BᵀCB.
CovarianceProduct = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def top_eigenpairs(
    product: CovarianceProduct,
    n_features: int,
    k: int,
    *,
    n_oversamples: int = PCA_OVERSAMPLES,
    tol_degrees: float = PCA_TOL_DEGREES,
    max_iter: int = PCA_MAX_ITER,
    degenerate_gap: float = PCA_DEGENERATE_GAP,
    max_basis: int | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """Top-k eigenpairs of a sample covariance C by block Krylov iteration, to a measured angle.

    The method, and why Krylov: see the module docs. It stops when the residuals
    R = CV − VΘ prove every top-k Ritz vector within ``tol_degrees`` of C's exact
    eigenvector (:func:`_sine_bound`: ‖r_i‖ over the spectral gap around θ_i, estimated
    from the other Ritz values and their residuals), or, where eigenvalues are closer than
    ``degenerate_gap`` times the largest, the span of their cluster within ``tol_degrees``
    of the exact eigenspace; and the span of all k vectors within ``tol_degrees`` of the
    top-k eigenspace (unless a cluster straddles θ_k, when that span is not defined). The
    bound is measured on the returned vectors themselves, not assumed from an iteration count.

    Parameters
    ----------
    product : callable
        See :data:`CovarianceProduct`.
    n_features : int
        Rows of C.
    k : int
        Eigenpairs wanted.
    n_oversamples : int
        Columns per block beyond k.
    tol_degrees : float
        The angle bound every top-k vector (or degenerate cluster) must meet.
    max_iter : int
        Blocks (data passes) before giving up with a :class:`RuntimeWarning`.
    degenerate_gap : float
        Relative spacing below which eigenvalues form one cluster.
    max_basis : int or None
        Most columns Q may hold (Q and W take 16 bytes per feature and column). When the
        next block would exceed it, the basis is restarted from its top
        ``max_basis − block`` Ritz vectors (a thick restart: their residuals lie in the
        next block's span, so the iteration carries on from there). None: no limit; the
        basis never outgrows the rank of C plus one block.
    seed : int
        Seeds the random start block.

    Returns
    -------
    Eigenpairs
    """
    block, max_basis = _block_sizes(n_features, k, n_oversamples, tol_degrees, max_iter, max_basis)
    tol = math.sin(math.radians(tol_degrees))
    rng = np.random.default_rng(seed)
    start = np.linalg.qr(rng.standard_normal((n_features, block)))[0]
    step, iteration = _block_krylov(product, start, k, tol, max_iter, degenerate_gap, max_basis)
    if not step.converged:
        warnings.warn(
            f"PCA: after {iteration} block Krylov iterations the top-{k} axes are only known to within "
            f"{_degrees(step.sines.max()):.2g} degrees (tolerance {tol_degrees:g}); raise max_iter",
            RuntimeWarning,
            stacklevel=2,
        )
    scale = max(step.values[0], np.finfo(np.float64).tiny)
    return Eigenpairs(
        vectors=step.ritz[:, :k],
        values=step.values[:k].copy(),
        residuals=np.linalg.norm(step.residuals[:, :k], axis=0) / scale,
        angle_bounds=_degrees(step.sines),
        subspace_angle_bound=float(_degrees(step.subspace_sine)),
        iterations=iteration,
        converged=step.converged,
    )


def _block_sizes(
    n_features: int, k: int, n_oversamples: int, tol_degrees: float, max_iter: int, max_basis: int | None
) -> tuple[int, int | None]:
    """:func:`top_eigenpairs`' settings checked: its block width and its basis limit."""
    if k < 1 or k > n_features:
        raise ValueError(f"k={k} must be between 1 and n_features={n_features}")
    if max_iter < 1 or n_oversamples < 0 or tol_degrees <= 0:
        raise ValueError(
            f"need max_iter >= 1, n_oversamples >= 0 and tol_degrees > 0; "
            f"got {max_iter}, {n_oversamples} and {tol_degrees}"
        )
    block = min(k + n_oversamples, n_features)
    if max_basis is not None:
        max_basis = max(max_basis, k + 2 * block)  # room for k + block Ritz vectors and a block
    return block, max_basis


@dataclass(frozen=True)
class _RitzStep:
    """One Rayleigh–Ritz step of :func:`top_eigenpairs` over span(Q), with its bounds."""

    values: np.ndarray  # Ritz values Θ, decreasing (negatives, rounding, set to 0)
    coords: np.ndarray  # Y: the Ritz vectors' coordinates in Q, by column
    following: np.ndarray  # the next block: the part of the newest C-block orthogonal to Q
    invariant: bool  # span(Q) holds C's whole range
    ritz: np.ndarray  # the Ritz vectors the bounds look at, QY
    residuals: np.ndarray  # their residuals CQY − QYΘ
    sines: np.ndarray  # (k,) bound on each vector's (or its cluster's) angle, as a sine
    subspace_sine: float  # the same for the span of all k vectors
    converged: bool


def _block_krylov(
    product: CovarianceProduct,
    new: np.ndarray,
    k: int,
    tol: float,
    max_iter: int,
    degenerate_gap: float,
    max_basis: int | None,
) -> tuple[_RitzStep, int]:
    """:func:`top_eigenpairs`' iteration from the start block ``new``: its last step and count."""
    block = new.shape[1]
    # a new direction smaller than this (relative) is noise: too small for float64
    # Gram–Schmidt to keep it orthogonal to Q
    rounding = np.finfo(np.float64).eps ** 0.5
    basis = images = projections = None  # Q, W = CQ and Z
    for iteration in range(1, max_iter + 1):
        z, w = product(new)
        if basis is None:
            basis, images, projections = new, w, z
        else:
            basis, images, projections = (
                np.concatenate(pair, axis=1) for pair in ((basis, new), (images, w), (projections, z))
            )
        step = _rayleigh_ritz(basis, images, projections, w, k, tol, degenerate_gap, rounding)
        if step.converged or step.invariant or iteration == max_iter:
            break
        if max_basis is not None and basis.shape[1] + step.following.shape[1] > max_basis:
            keep = max_basis - block
            basis, images, projections = (a @ step.coords[:, :keep] for a in (basis, images, projections))
        new = step.following
    return step, iteration


def _rayleigh_ritz(
    basis: np.ndarray,
    images: np.ndarray,
    projections: np.ndarray,
    w: np.ndarray,
    k: int,
    tol: float,
    degenerate_gap: float,
    rounding: float,
) -> _RitzStep:
    """Ritz pairs over span(Q) (``basis``), their angle bounds and the next Krylov block.

    ``images`` is W = CQ, ``projections`` Z (ZᵀZ = QᵀCQ) and ``w`` the newest block's
    image under C.
    """
    # Rayleigh–Ritz over span(Q): QᵀCQ = ZᵀZ = Y Θ Yᵀ, by decreasing Θ
    values, coords = np.linalg.eigh(projections.T @ projections)
    values, coords = np.maximum(values[::-1], 0.0), coords[:, ::-1]
    following = _orthonormal_complement(w, basis, rounding)
    invariant = following.shape[1] == 0  # span(Q) holds C's whole range
    clusters = _degenerate_clusters(values, k, degenerate_gap)
    n_pairs = min(len(values), clusters[-1][1] + 2)  # the pairs the bounds look at
    ritz = basis @ coords[:, :n_pairs]
    residuals = images @ coords[:, :n_pairs] - ritz * values[:n_pairs]
    sines = np.empty(k)
    for first, last in clusters:
        sines[first : last + 1] = _sine_bound(values, residuals, first, last, invariant)
    subspace_sine = _sine_bound(values, residuals, 0, k - 1, invariant)
    # the top-k span is defined (and must meet the tolerance too) unless a tie straddles k
    subspace_defined = clusters[-1][1] < k
    converged = bool(sines.max() <= tol and (subspace_sine <= tol or not subspace_defined))
    return _RitzStep(values, coords, following, invariant, ritz, residuals, sines, subspace_sine, converged)
