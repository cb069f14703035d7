"""Several images' Jacobian directions at once: one U-Net call for all their Krylov blocks.

At a fixed x_t the U-Net treats the images of a batch independently (eval mode, per-image
normalisation), so for F(H) = [f_1(h_1); …; f_n(h_n)] (:func:`eps_of_h_rows`) the
Jacobian ∂F/∂H is block-diagonal with image r's J_r as block r. One linearisation of F at
H0 = [h0_1; …; h0_n] therefore gives every image's product in one call: a column that
holds V_r in row r (and zeros elsewhere, or nothing: the rows are stacked, not summed)
comes back as J_r V_r in row r. Under ``vmap`` over b such columns, one call pushes b
columns of every image at once.

:func:`jacobian_subspaces` runs each image's block Krylov iteration exactly as
:func:`jacobian_subspace` does (the same :class:`~hmine.jacobian.subspace._BlockKrylov`
state, the same seeded start, stopping rule and Rayleigh–Ritz step), only with its
products computed beside the other images'. An image that has converged drops out: F
is linearised again at the images left (:meth:`EpsOfHRows.subset`), so no U-Net work
is spent on it. An image whose block is narrower than the others' (a column dropped as
dependent) gets zero columns, whose products are zero and are discarded. The results
equal the one-image solver's up to the rounding of the batched kernels.
:func:`localised_directions_batch` does the same for :func:`localised_directions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from hmine.jacobian.localised import LocalisedResult, _largest_shares, _region_weights, _search_floor
from hmine.jacobian.operators import HFunction, _products, _with_autodiff
from hmine.jacobian.subspace import JacobianResult, _BlockKrylov, _checked_point, _random_orthonormal, _rounding


def _row_products(f: HFunction, h0: torch.Tensor, rows: list[int]):
    """Batched (over columns) J v and Jᵀ u of the images ``rows`` of F, and F's restriction to them.

    With ``f.subset`` the restriction is F of those images only; without it (any other
    row-wise f) every row stays in and the others get zero columns.
    """
    if hasattr(f, "subset"):
        return tuple(map(vmap, _products(f.subset(rows), h0[rows]))), rows
    return tuple(map(vmap, _products(f, h0))), list(range(len(h0)))


def _push(products, states: dict[int, _BlockKrylov], in_call: list[int], h0: torch.Tensor) -> None:
    """One call of each product for the ``new`` blocks of ``states`` (images ``in_call`` of the call)."""
    jacobian_times, jacobian_transpose_times = products
    width = max(len(state.new) for state in states.values())
    columns = h0.new_zeros((width, len(in_call), *h0.shape[1:]))
    for slot, image in enumerate(in_call):
        if image in states:
            new = states[image].new
            columns[: len(new), slot] = new.to(h0.dtype).reshape(len(new), *h0.shape[1:])
    # 1. U = J V and W = Jᵀ U = JᵀJ V for every image's block, in one call each
    images = jacobian_times(columns)  # (width, image, *eps shape)
    pulled_back = jacobian_transpose_times(images)
    for slot, image in enumerate(in_call):
        if image in states:
            state = states[image]
            b = len(state.new)
            state.update(images[:b, slot].reshape(b, -1), pulled_back[:b, slot].reshape(b, -1))


@_with_autodiff
def jacobian_subspaces(
    f: HFunction,
    h0: torch.Tensor,
    k: int = 3,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    seeds: Sequence[int] | None = None,
    oversample: int = 0,
) -> list[JacobianResult]:
    """:func:`jacobian_subspace` of n images at once, their products batched into one call.

    Parameters
    ----------
    f : callable
        H of shape (n, channel, y, x) to outputs of shape (n, ...), row r depending on
        h_r alone, e.g. :func:`eps_of_h_rows`. With a ``subset(rows)`` method (as
        :class:`EpsOfHRows` has), images that have converged drop out of the calls;
        otherwise they stay in with zero columns.
    h0 : Tensor of shape (n, channel, y, x)
        The point of each image at which its J is taken.
    k, tol, max_iter, oversample
        As for :func:`jacobian_subspace`, per image.
    seeds : sequence of n int, optional
        Seed of each image's random start (default 0 for every image): image r's
        result is that of ``jacobian_subspace(f_r, h0[r], seed=seeds[r])``.

    Returns
    -------
    list of JacobianResult
        One per image, in order; ``iterations`` and ``n_jvp`` count that image's own.
        A U-Net call carries up to n × (k + oversample) columns: choose n for memory.
    """
    n = h0.shape[0]
    seeds = [0] * n if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{n} images but {len(seeds)} seeds; give one seed per image")
    h0 = h0.detach().clone()
    for row in h0:
        _checked_point(row, k, max_iter, oversample)
    d_h, rounding = h0[0].numel(), _rounding(h0.dtype)
    states = {
        r: _BlockKrylov(_random_orthonormal(d_h, min(k + oversample, d_h), seeds[r]).to(h0.device), k, tol, max_iter, rounding)
        for r in range(n)
    }
    live, products, in_call = list(range(n)), None, []
    while live:
        if products is None or (hasattr(f, "subset") and live != in_call):
            products, in_call = _row_products(f, h0, live)  # linearise at the images left
        _push(products, {r: states[r] for r in live}, in_call, h0)
        live = [r for r in live if not states[r].done]
    return [states[r].result(h0[r]) for r in range(n)]


def _images_of(f: HFunction, h0: torch.Tensor, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """J_r v for each image r and each of its ``vectors[r]`` (rows), in one call: (count_r, d_out) each."""
    jacobian_times, _ = _row_products(f, h0, list(range(len(h0))))[0]
    width = max(len(v) for v in vectors)
    columns = h0.new_zeros((width, *h0.shape))
    for r, v in enumerate(vectors):
        columns[: len(v), r] = v.to(h0.dtype)
    images = jacobian_times(columns)
    return [images[: len(v), r].reshape(len(v), -1).double() for r, v in enumerate(vectors)]


@_with_autodiff
def localised_directions_batch(
    f: HFunction,
    h0: torch.Tensor,
    masks: torch.Tensor,
    k: int = 1,
    *,
    rank: int = 32,
    tol: float = 1e-2,
    max_iter: int = 100,
    seeds: Sequence[int] | None = None,
) -> list[LocalisedResult]:
    """:func:`localised_directions` of n images at once (their products batched, as above).

    Parameters
    ----------
    f : callable
        The *unmasked* F of :func:`eps_of_h_rows`.
    h0 : Tensor of shape (n, channel, y, x)
    masks : Tensor of shape (n, 1 or C, H, W)
        Each image's pixel weights in [0, 1].
    k, rank, tol, max_iter
        As for :func:`localised_directions`, per image.
    seeds : sequence of n int, optional
        Seeds of the search spaces' random starts.

    Returns
    -------
    list of LocalisedResult
    """
    n = h0.shape[0]
    if len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks; give one mask per image")
    if not 1 <= k <= rank:
        raise ValueError(f"k must be between 1 and rank ({rank}), got {k}; raise jacobian.localised_rank or lower k")
    if rank > h0[0].numel():
        raise ValueError(f"rank ({rank}) exceeds the size of h ({h0[0].numel()}); lower jacobian.localised_rank")
    h0 = h0.detach().clone()
    spaces = jacobian_subspaces(f, h0, k=rank, tol=tol, max_iter=max_iter, seeds=seeds)
    kept = [_search_floor(space, h0[r], k, rank, max_iter) for r, space in enumerate(spaces)]
    images = _images_of(f, h0, kept)  # B_r as rows: J_r v_j for each basis vector
    eps_shape = f(h0).shape[1:]
    results = []
    for r in range(n):
        basis = kept[r].reshape(len(kept[r]), -1).double()
        weights = _region_weights(masks[r : r + 1], eps_shape).reshape(-1).square().to(images[r].device)
        shares, vectors, coords = _largest_shares(images[r], weights, basis, k)
        results.append(LocalisedResult(
            shares=shares[-k:].flip(0).to(h0.dtype),
            vectors=vectors.to(h0.dtype).reshape(k, *h0.shape[1:]),
            responses=(coords.T @ images[r]).norm(dim=1).to(h0.dtype),
            search_space=spaces[r],
        ))
    return results
