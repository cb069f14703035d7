"""Top singular directions of the Jacobian of the noise prediction with respect to h.

At one step of a sample's trajectory, with x_t and t fixed, the U-Net's noise
prediction is a function of the bottleneck h alone (Haas et al. 2024):

    f(h) = M ⊙ ε_θ(x_t, t; h),                                               (1)

where M is an optional pixel mask (1 inside the region whose change we care about).
Its Jacobian at the h the trajectory actually produced, h0, is

    J = ∂f/∂h |_{h = h0}    of shape (d_out, d_h),                            (2)

and its top right singular vectors v_1, …, v_k (unit vectors in h-space) are the
directions along which a small step in h changes the (masked) noise prediction most;
σ_i = ‖J v_i‖ are the singular values. J is never materialised: only its products
with vectors are used, Jᵀ u by reverse-mode AD (``torch.func.vjp``) and J v by
reverse mode applied to that (a vjp of the vjp), both from one linearisation of f.

Haas et al.'s Alg. 1 is batched subspace iteration on JᵀJ in h-space.
:func:`jacobian_subspace` is its block Krylov acceleration: the same products per
iteration, the same top-k subspace, far fewer iterations, and a Rayleigh–Ritz step so
that the k vectors come out ordered by singular value.
:func:`sequential_power_iteration` is the one-vector-at-a-time power iteration with
deflation of the published code, kept as a baseline. :func:`exact_jacobian_svd`
materialises J for tests on tiny models.

Notation in comments: d_h = number of entries of h; V_i is the (b, d_h) block of new
orthonormal directions of iteration i (as rows), Q = [V_1; …; V_i] all of them,
U = J Q (rows of d_out entries) and W = Jᵀ J Q (rows of d_h entries).

References
----------
R. Haas, I. Huberman-Spiegelglas, R. Mulayoff, S. Graßhof, S. S. Brandt, T. Michaeli,
"Discovering Interpretable Directions in the Semantic Latent Space of Diffusion
Models", FG 2024 (Alg. 1).
G. H. Golub, R. Underwood, "The block Lanczos method for computing eigenvalues",
Mathematical Software III, 1977.
C. Musco, C. Musco, "Randomized Block Krylov Methods for Stronger and Faster
Approximate Singular Value Decomposition", NeurIPS 2015.
Y.-H. Park, M. Kwon, J. Choi, J. Jo, Y. Uh, "Understanding the Latent Space of
Diffusion Models through the Lens of Riemannian Geometry", NeurIPS 2023.

Modules
-------
==================================  ================================================================
:mod:`~hmine.jacobian.operators`    f = :func:`eps_of_h`, F of a batch = :func:`eps_of_h_rows`,
                                    :func:`h_at`, :func:`use_math_attention`, the J v / Jᵀ u products
:mod:`~hmine.jacobian.subspace`     :func:`jacobian_subspace` and :class:`JacobianResult`
:mod:`~hmine.jacobian.localised`    :func:`localised_directions` and :class:`LocalisedResult`
:mod:`~hmine.jacobian.batched`      :func:`jacobian_subspaces`, :func:`localised_directions_batch`:
                                    several images' products in one U-Net call
:mod:`~hmine.jacobian.reference`    :func:`sequential_power_iteration`, :func:`exact_jacobian_svd`,
                                    :func:`principal_angles_degrees`
==================================  ================================================================

Every name above is importable from :mod:`hmine.jacobian` itself.
"""

from hmine.jacobian.batched import jacobian_subspaces, localised_directions_batch
from hmine.jacobian.localised import LocalisedResult, localised_directions
from hmine.jacobian.operators import EpsOfHRows, eps_of_h, eps_of_h_rows, h_at, use_math_attention
from hmine.jacobian.operators import HFunction as HFunction
from hmine.jacobian.reference import (
    exact_jacobian_svd,
    principal_angles_degrees,
    sequential_power_iteration,
)
from hmine.jacobian.subspace import JacobianResult, jacobian_subspace

# private helpers that tests import from here
from hmine.jacobian.subspace import _fix_signs as _fix_signs
from hmine.jacobian.subspace import _random_orthonormal as _random_orthonormal

__all__ = [
    "EpsOfHRows",
    "JacobianResult",
    "LocalisedResult",
    "eps_of_h",
    "eps_of_h_rows",
    "exact_jacobian_svd",
    "h_at",
    "jacobian_subspace",
    "jacobian_subspaces",
    "localised_directions",
    "localised_directions_batch",
    "principal_angles_degrees",
    "sequential_power_iteration",
    "use_math_attention",
]
