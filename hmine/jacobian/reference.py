"""Baselines and references for :func:`~hmine.jacobian.jacobian_subspace`.

:func:`sequential_power_iteration` is the one-vector-at-a-time power iteration with
deflation of Haas et al.'s published code; :func:`exact_jacobian_svd` materialises J for
tests on tiny models; :func:`principal_angles_degrees` compares the subspaces they find.
"""

from __future__ import annotations

import numpy as np
import torch

from hmine.jacobian.operators import HFunction, _as_h, _products, _with_autodiff
from hmine.jacobian.subspace import JacobianResult, _fix_signs, _random_orthonormal


@_with_autodiff
def sequential_power_iteration(
    f: HFunction,
    h0: torch.Tensor,
    k: int = 3,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    forward_mode: bool = False,
) -> JacobianResult:
    """Top-k right singular vectors of J one at a time: power iteration with deflation.

    The scheme of the published code of Haas et al. (there in output space; here in
    h-space, which gives the same vectors), kept as the baseline for
    :func:`jacobian_subspace`. Vector i starts from the i-th column of the same seeded
    V0 and iterates v ← P⊥ JᵀJ v / ‖P⊥ JᵀJ v‖, where P⊥ projects out the vectors
    already found (deflation, applied every iteration). It stops when the deflated
    relative residual ‖P⊥ JᵀJ v − σ² v‖ / σ² is below ``tol`` or after ``max_iter``
    iterations, then moves on to the next vector. J v and Jᵀ u are single
    (unbatched) calls of the same product functions as :func:`jacobian_subspace`'s,
    from one linearisation built once and reused, as in the published code (whose
    J v is a forward-mode pass instead, which costs more per product; see
    ``_products``).

    Parameters
    ----------
    f : callable
        As for :func:`jacobian_subspace`.
    h0 : Tensor of shape (channel, y, x)
    k : int, default=3
    tol : float, default=1e-4
        Per-vector tolerance on the deflated relative residual.
    max_iter : int, default=100
        Iteration limit *per vector*.
    seed : int, default=0
        Seeds V0 (the same V0 as :func:`jacobian_subspace` with the same seed).
    forward_mode : bool, default=False
        Compute J v by forward-mode AD, as the published code does, instead of the
        cheaper vjp of the vjp; the same vectors, a faithful cost of the reference.

    Returns
    -------
    JacobianResult
        ``iterations`` is summed over the k vectors and ``n_jvp == n_vjp ==
        iterations``. ``residuals`` are the undeflated residuals
        ‖JᵀJ v_i − σ_i² v_i‖ / σ_i², comparable with :func:`jacobian_subspace`'s; they
        can exceed ``tol`` slightly, because the vectors found earlier are only
        accurate to ``tol`` themselves.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    h0 = h0.detach().clone()
    d_h = h0.numel()
    products = _products(f, h0, forward_mode)  # J v and Jᵀ u of single columns
    starts = _random_orthonormal(d_h, k, seed)
    found: list[torch.Tensor] = []
    sigmas, residuals = [], []
    total_iterations, all_converged = 0, True
    for i in range(k):
        done = torch.stack(found) if found else starts[:0]
        direction, sigma_squared, pulled_back, deflated_residual, iteration = _deflated_power_iteration(
            products, h0, starts[i], done, tol, max_iter
        )
        total_iterations += iteration
        all_converged &= bool(deflated_residual < tol)
        found.append(direction)
        sigmas.append(sigma_squared.sqrt())
        residuals.append((pulled_back - sigma_squared * direction).norm() / sigma_squared)
    return JacobianResult(
        singular_values=torch.stack(sigmas).to(h0.dtype),
        vectors=_as_h(_fix_signs(torch.stack(found)), h0),
        residuals=torch.stack(residuals).to(h0.dtype),
        iterations=total_iterations,
        n_jvp=total_iterations,
        n_vjp=total_iterations,
        converged=all_converged,
    )


def _deflated_power_iteration(products, h0: torch.Tensor, direction: torch.Tensor, done: torch.Tensor, tol: float, max_iter: int):
    """Power iteration on P⊥ JᵀJ P⊥ from ``direction``, P⊥ projecting out the rows of ``done``.

    ``products`` are the single-column J v and Jᵀ u. Returns the vector (float64), its
    σ² = ‖J v‖², JᵀJ v, its deflated relative residual and the iterations run.
    """
    jacobian_times, jacobian_transpose_times = products
    d_h = h0.numel()
    for iteration in range(1, max_iter + 1):
        # deflation: v ← P⊥ v = v − Σ_j ⟨v_j, v⟩ v_j, then normalise
        direction = direction - done.T @ (done @ direction)
        direction = direction / direction.norm()
        # one J v (forward mode) and one Jᵀ u (reverse mode)
        image = jacobian_times(direction.to(h0.dtype).reshape(h0.shape))
        pulled_back = jacobian_transpose_times(image).reshape(d_h).double()
        # σ² = ‖J v‖²; deflated residual ‖P⊥ JᵀJ v − σ² v‖ / σ² decides convergence
        sigma_squared = image.double().square().sum().clamp_min(torch.finfo(torch.float64).tiny)
        deflated = pulled_back - done.T @ (done @ pulled_back)
        deflated_residual = (deflated - sigma_squared * direction).norm() / sigma_squared
        if deflated_residual < tol or iteration == max_iter:
            break
        direction = deflated  # power step on P⊥ JᵀJ P⊥
    return direction, sigma_squared, pulled_back, deflated_residual, iteration


@_with_autodiff
def exact_jacobian_svd(f: HFunction, h0: torch.Tensor, k: int = 3) -> JacobianResult:
    """The exact top-k right singular vectors of J, by materialising J.

    For tests and tiny models only: J is built with ``torch.func.jacrev`` (one
    reverse pass per output entry) and stored densely, d_out × d_h, then decomposed
    with ``torch.linalg.svd`` in float64. On a real U-Net this is far too slow and
    too large.

    Parameters
    ----------
    f : callable
        As for :func:`jacobian_subspace`.
    h0 : Tensor of shape (channel, y, x)
    k : int, default=3

    Returns
    -------
    JacobianResult
        float64 tensors, signs fixed as in :func:`jacobian_subspace`; ``residuals``
        are those of the exact vectors (rounding level), ``iterations`` and ``n_jvp``
        are 0 and ``n_vjp`` is d_out.
    """
    h0 = h0.detach().clone()
    jacobian = torch.func.jacrev(f)(h0)
    jacobian = jacobian.reshape(-1, h0.numel()).double()  # J, eq. 2, (d_out, d_h)
    _, singular_values, right_t = torch.linalg.svd(jacobian, full_matrices=False)
    vectors = _fix_signs(right_t[:k])
    sigma_squared = singular_values[:k].square()
    gram_times = (jacobian @ vectors.T).T @ jacobian  # rows: (JᵀJ v_i)ᵀ
    residuals = (gram_times - sigma_squared[:, None] * vectors).norm(dim=1) / sigma_squared
    return JacobianResult(
        singular_values=singular_values[:k],
        vectors=vectors.reshape(k, *h0.shape),
        residuals=residuals,
        iterations=0,
        n_jvp=0,
        n_vjp=jacobian.shape[0],
        converged=True,
    )


def principal_angles_degrees(a, b) -> np.ndarray:
    """Principal angles between the subspaces spanned by the rows of ``a`` and ``b``.

    Parameters
    ----------
    a : Tensor or ndarray of shape (k_a, ...)
        k_a vectors, each flattened to d entries (e.g. (k, channel, y, x)).
    b : Tensor or ndarray of shape (k_b, ...)
        k_b vectors of the same d entries.

    Returns
    -------
    angles : ndarray of shape (min(k_a, k_b),)
        In degrees, largest first (``scipy.linalg.subspace_angles``). The subspaces
        agree to within ``angles[0]`` degrees; signs of the vectors do not matter.
    """
    from scipy.linalg import subspace_angles

    def as_columns(rows) -> np.ndarray:
        rows = rows.detach().cpu().double().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, float)
        return rows.reshape(rows.shape[0], -1).T

    a, b = as_columns(a), as_columns(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold vectors of the same size, got {a.shape[0]} and {b.shape[0]}")
    return np.degrees(subspace_angles(a, b))
