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
with vectors are used, J v by forward-mode AD (``torch.func.jvp``) and Jᵀ u by
reverse-mode AD (``torch.func.vjp``).

:func:`jacobian_subspace` is Haas et al.'s Alg. 1, batched subspace iteration on JᵀJ
in h-space, with a Rayleigh–Ritz step so that the k vectors come out ordered by
singular value. :func:`sequential_power_iteration` is the one-vector-at-a-time power
iteration with deflation of the published code, kept as a baseline.
:func:`exact_jacobian_svd` materialises J for tests on tiny models.

Notation in comments: d_h = number of entries of h, V is (k, d_h) with the current
orthonormal directions as rows, U = J V (k rows of d_out), W = Jᵀ J V (k rows of d_h).

References
----------
R. Haas, I. Huberman-Spiegelglas, R. Mulayoff, S. Graßhof, S. S. Brandt, T. Michaeli,
"Discovering Interpretable Directions in the Semantic Latent Space of Diffusion
Models", FG 2024 (Alg. 1).
Y.-H. Park, M. Kwon, J. Choi, J. Jo, Y. Uh, "Understanding the Latent Space of
Diffusion Models through the Lens of Riemannian Geometry", NeurIPS 2023.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.func import functional_call, jvp, vjp, vmap

from hmine.hooks import HPosition, HSpaceHook

__all__ = [
    "JacobianResult",
    "eps_of_h",
    "exact_jacobian_svd",
    "h_at",
    "jacobian_subspace",
    "principal_angles_degrees",
    "sequential_power_iteration",
    "use_math_attention",
]

HFunction = Callable[[torch.Tensor], torch.Tensor]


# -- model preparation ---------------------------------------------------------------


def use_math_attention(unet):
    """Switch every diffusers ``Attention`` module of ``unet`` to ``AttnProcessor()``.

    Forward-mode AD (``torch.func.jvp``) is not implemented for the fused
    scaled-dot-product attention kernel on CPU; the plain "math" processor computes
    the same attention with ordinary matmuls and softmax, which forward AD supports.
    ``UNet2DModel`` has no ``set_attn_processor``, so the modules are switched one by
    one. Idempotent: modules already on ``AttnProcessor`` are left alone.

    Parameters
    ----------
    unet : torch.nn.Module
        A diffusers U-Net (or any module containing ``Attention`` modules).

    Returns
    -------
    unet : torch.nn.Module
        The same module, switched in place.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention) and type(module.processor) is not AttnProcessor:
            module.set_processor(AttnProcessor())
    return unet


@contextlib.contextmanager
def _autodiff_allowed() -> Iterator[None]:
    """Leave any caller's ``inference_mode``/``no_grad`` so that AD can linearise f."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _with_autodiff(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _autodiff_allowed():
            return function(*args, **kwargs)

    return wrapper


def _timestep_tensor(t, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.numel() != 1:
        raise ValueError(f"t must be one timestep, got a tensor of shape {tuple(t.shape)}")
    return t.reshape(1)


def _single_image(x_t: torch.Tensor) -> torch.Tensor:
    if x_t.ndim == 3:
        x_t = x_t[None]
    if x_t.ndim != 4 or x_t.shape[0] != 1:
        raise ValueError(
            f"x_t must be one image of shape (1, C, H, W), got shape {tuple(x_t.shape)}; "
            "build one f per image"
        )
    with torch.inference_mode(False):
        return x_t.detach().clone()  # a plain (not inference-mode) copy autograd may save


def h_at(unet, x_t: torch.Tensor, t, position: HPosition = "after") -> torch.Tensor:
    """h0: the bottleneck the U-Net computes for ``x_t`` at timestep ``t``.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel``
    x_t : Tensor of shape (1, C, H, W)
        One noisy image of the trajectory.
    t : int or Tensor with one element
        Its timestep.
    position : {"before", "middle", "after"}, default="after"
        Where h is read (see :mod:`hmine.hooks`).

    Returns
    -------
    h0 : Tensor of shape (channel, y, x)
        Detached; the point at which :func:`eps_of_h`'s Jacobian is taken.
    """
    x_t = _single_image(x_t)
    with torch.no_grad(), HSpaceHook(unet, position, record=True) as hook:
        unet(x_t, _timestep_tensor(t, x_t.device))
    return hook.recorded[0][0].clone()


def eps_of_h(
    unet,
    x_t: torch.Tensor,
    t,
    position: HPosition = "after",
    mask: torch.Tensor | None = None,
) -> HFunction:
    """Build f(h) = M ⊙ ε_θ(x_t, t; h) (eq. 1) for one image, with h an explicit input.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel``
        In eval mode. Its attention is switched to the math path in place
        (:func:`use_math_attention`) so that forward-mode AD works.
    x_t : Tensor of shape (1, C, H, W)
        One noisy image; fixed (not differentiated).
    t : int or Tensor with one element
        Its timestep.
    position : {"before", "middle", "after"}, default="after"
        Where h is replaced (see :mod:`hmine.hooks`).
    mask : Tensor of shape (1, 1 or C, H, W), (1 or C, H, W) or (H, W), optional
        Pixel weights M, broadcast over channels; None means no mask.

    Returns
    -------
    f : callable
        Maps h of shape (channel, y, x) to the masked noise prediction of shape
        (C, H, W). The U-Net's parameters enter as constants (detached copies passed
        through ``torch.func.functional_call``), so only h is differentiated; f works
        under ``torch.func.jvp``, ``vjp``, ``vmap`` and ``jacrev``.
    """
    if unet.training:
        raise ValueError("eps_of_h needs the U-Net in eval mode; call unet.eval() first")
    use_math_attention(unet)
    x_t = _single_image(x_t)
    timestep = _timestep_tensor(t, x_t.device)
    if mask is not None:
        with torch.inference_mode(False):
            mask = torch.as_tensor(mask).detach().clone().to(device=x_t.device, dtype=x_t.dtype)
        while mask.ndim < 4:
            mask = mask[None]
        try:
            torch.broadcast_shapes(mask.shape, x_t.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x_t of shape "
                f"{tuple(x_t.shape)}; give it shape (1, 1 or C, H, W)"
            ) from None
        if mask.shape[0] != 1:
            raise ValueError(f"mask must hold one image, got shape {tuple(mask.shape)}")
    # the model's parameters and buffers as constants: no autograd graph for them
    frozen = {name: p.detach() for name, p in unet.named_parameters()}
    frozen.update({name: b.detach() for name, b in unet.named_buffers()})
    hook = HSpaceHook(unet, position, record=False)

    def f(h: torch.Tensor) -> torch.Tensor:
        # h replaces the bottleneck at `position`; the down path sees only x_t
        hook.replacement = h[None]
        try:
            with hook:
                eps = functional_call(unet, frozen, (x_t, timestep)).sample
        finally:
            hook.replacement = None
        if mask is not None:
            eps = mask * eps  # eq. 1, M broadcast over channels
        return eps[0]

    return f


# -- results ---------------------------------------------------------------------------


@dataclass
class JacobianResult:
    """Top-k right singular vectors and values of J = ∂f/∂h (eq. 2).

    Attributes
    ----------
    singular_values : Tensor of shape (k,)
        σ_1 ≥ … ≥ σ_k, σ_i = ‖J v_i‖.
    vectors : Tensor of shape (k, channel, y, x)
        v_i, unit norm. Signs are fixed deterministically: the entry of largest
        absolute value of each v_i is positive.
    residuals : Tensor of shape (k,)
        Relative eigen-residuals ‖JᵀJ v_i − σ_i² v_i‖ / σ_i² of the returned vectors.
    iterations : int
        Iterations run (for the sequential method: summed over the k vectors).
    n_jvp, n_vjp : int
        Products J v and Jᵀ u computed, one per column.
    converged : bool
        Whether every vector met the tolerance before ``max_iter``.
    """

    singular_values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    n_jvp: int
    n_vjp: int
    converged: bool


def _fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so its entry of largest absolute value is positive."""
    largest = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.where(largest < 0, -1.0, 1.0).to(rows.dtype)


def _random_orthonormal(d_h: int, k: int, seed: int) -> torch.Tensor:
    """V0 = QR(randn(d_h, k)) from a seeded generator, as k float64 rows."""
    if not 1 <= k <= d_h:
        raise ValueError(f"k must be between 1 and the size of h ({d_h}), got {k}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(d_h, k, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian, mode="reduced")
    return q.T.contiguous()


def _products(f: HFunction, h0: torch.Tensor):
    """J·v and Jᵀ·u from one reverse-mode linearisation of f at h0 (built here, once).

    The products run under ``no_grad`` (forward-mode AD does not need grad mode, and
    the pullback then builds no graph for a second derivative). Both accept one
    column or, under ``vmap``, a stack of them.
    """
    with torch.enable_grad():
        _, pullback = vjp(f, h0)

    def jacobian_times(direction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return jvp(f, (h0,), (direction,))[1]  # J v, forward mode

    def jacobian_transpose_times(output: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pullback(output)[0]  # Jᵀ u, reverse mode

    return jacobian_times, jacobian_transpose_times


def _as_h(rows: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    return rows.to(dtype=h0.dtype).reshape(rows.shape[0], *h0.shape)


# -- batched subspace iteration (Haas et al. Alg. 1) ---------------------------------


@_with_autodiff
def jacobian_subspace(
    f: HFunction,
    h0: torch.Tensor,
    k: int = 3,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    oversample: int = 2,
) -> JacobianResult:
    """Top-k right singular vectors of J = ∂f/∂h at h0 by batched subspace iteration.

    Haas et al. Alg. 1: subspace iteration on JᵀJ in h-space, with all k columns
    pushed through each product at once (``vmap``). Each iteration computes
    U = J V by forward-mode AD and W = Jᵀ U by reverse-mode AD (one linearisation,
    built once and reused), takes the Ritz pairs of JᵀJ in span(V) from the k×k
    matrix UᵀU (Rayleigh–Ritz, ordered by singular value), and stops when every
    relative residual ‖JᵀJ v_i − σ_i² v_i‖ / σ_i² is below ``tol``; otherwise
    V ← orthonormal basis of W.

    Parameters
    ----------
    f : callable
        h of shape (channel, y, x) to any output tensor, e.g. from :func:`eps_of_h`;
        must support ``torch.func.jvp``, ``vjp`` and ``vmap``.
    h0 : Tensor of shape (channel, y, x)
        The point at which J is taken.
    k : int, default=3
        Number of singular directions.
    tol : float, default=1e-4
        Stop when the largest relative residual is below this.
    max_iter : int, default=100
        Give up (``converged=False``) after this many iterations.
    seed : int, default=0
        Seeds the random start V0.
    oversample : int, default=2
        Extra columns iterated beside the k wanted ones. Subspace iteration converges
        at the rate σ_{b+1}/σ_k for a block of b columns, so a few extra columns
        shorten it when σ_k and σ_{k+1} are close (measured on the shapes U-Net:
        53 → 29 iterations for k=3 with 3 extra); only the top k must converge.

    Returns
    -------
    JacobianResult
        ``n_jvp == n_vjp == iterations * (k + oversample)``.

    See Also
    --------
    sequential_power_iteration : the one-vector-at-a-time baseline.
    exact_jacobian_svd : the exact answer on tiny models.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    h0 = h0.detach().clone()
    d_h = h0.numel()
    if not 1 <= k <= d_h:
        raise ValueError(f"k must be between 1 and the size of h ({d_h}), got {k}")
    block = min(k + oversample, d_h)
    jacobian_times, jacobian_transpose_times = map(vmap, _products(f, h0))  # over the columns
    # V0 = QR(randn(d_h, block)), rows orthonormal; small linear algebra in float64
    directions = _random_orthonormal(d_h, block, seed)
    n_products = 0
    for iteration in range(1, max_iter + 1):
        # 1. U = J V and W = Jᵀ U = JᵀJ V  (one product of each kind per column)
        images = jacobian_times(_as_h(directions, h0))
        pulled_back = jacobian_transpose_times(images).reshape(block, d_h).double()
        images = images.reshape(block, -1).double()
        n_products += block
        # 2. Rayleigh–Ritz in span(V): the k×k projection of JᵀJ, with V's rows as the
        #    basis, is (J V)(J V)ᵀ = U Uᵀ = Y Λ Yᵀ (Λ descending)
        ritz_values, ritz_coords = torch.linalg.eigh(images @ images.T)
        order = torch.argsort(ritz_values, descending=True)
        ritz_values, ritz_coords = ritz_values[order], ritz_coords[:, order]
        #    Ritz vectors Ṽ = Yᵀ V and, by linearity, JᵀJ Ṽ = Yᵀ W: no extra products
        directions = ritz_coords.T @ directions
        pulled_back = ritz_coords.T @ pulled_back
        # 3. σ_i² = ‖J ṽ_i‖² = Λ_i; residual_i = ‖JᵀJ ṽ_i − σ_i² ṽ_i‖ / σ_i²
        sigma_squared = ritz_values.clamp_min(torch.finfo(torch.float64).tiny)
        residuals = (pulled_back - sigma_squared[:, None] * directions).norm(dim=1) / sigma_squared
        if residuals[:k].max() < tol or iteration == max_iter:
            break
        # 4. V ← QR(JᵀJ Ṽ): the next subspace (one step of subspace iteration)
        q, _ = torch.linalg.qr(pulled_back.T, mode="reduced")
        directions = q.T.contiguous()
    return JacobianResult(
        singular_values=sigma_squared[:k].sqrt().to(h0.dtype),
        vectors=_as_h(_fix_signs(directions[:k]), h0),
        residuals=residuals[:k].to(h0.dtype),
        iterations=iteration,
        n_jvp=n_products,
        n_vjp=n_products,
        converged=bool(residuals[:k].max() < tol),
    )


# -- baseline: sequential power iteration with deflation ------------------------------


@_with_autodiff
def sequential_power_iteration(
    f: HFunction,
    h0: torch.Tensor,
    k: int = 3,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
) -> JacobianResult:
    """Top-k right singular vectors of J one at a time: power iteration with deflation.

    The scheme of the published code of Haas et al. (there in output space; here in
    h-space, which gives the same vectors), kept as the baseline for
    :func:`jacobian_subspace`. Vector i starts from the i-th column of the same seeded
    V0 and iterates v ← P⊥ JᵀJ v / ‖P⊥ JᵀJ v‖, where P⊥ projects out the vectors
    already found (deflation, applied every iteration). It stops when the deflated
    relative residual ‖P⊥ JᵀJ v − σ² v‖ / σ² is below ``tol`` or after ``max_iter``
    iterations, then moves on to the next vector. J v and Jᵀ u are single
    (unbatched) ``jvp`` and ``vjp`` calls; the reverse-mode linearisation is built
    once and reused, as in the published code.

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
    jacobian_times, jacobian_transpose_times = _products(f, h0)  # single columns
    starts = _random_orthonormal(d_h, k, seed)
    found: list[torch.Tensor] = []
    sigmas, residuals = [], []
    total_iterations, all_converged = 0, True
    for i in range(k):
        done = torch.stack(found) if found else starts[:0]
        direction = starts[i]
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


# -- exact reference and comparison ------------------------------------------------------


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
