"""hmine.jacobian against the exact SVD of a materialised Jacobian on a tiny float64 U-Net."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet

from hmine.jacobian import (
    JacobianResult,
    _random_orthonormal,
    eps_of_h,
    eps_of_h_rows,
    exact_jacobian_svd,
    h_at,
    jacobian_subspace,
    jacobian_subspaces,
    localised_directions,
    localised_directions_batch,
    principal_angles_degrees,
    sequential_power_iteration,
    use_math_attention,
)

SIZE, T, TOL = 8, 500, 1e-5


@pytest.fixture(scope="module")
def unet():
    # 8x8 input -> h of 16 x 4 x 4 = 256 dims, eps of 3 x 8 x 8 = 192: jacrev is cheap.
    # float64 so that the iterative methods can be compared with the exact SVD tightly.
    return make_tiny_unet(sample_size=SIZE).eval().double().requires_grad_(False)


@pytest.fixture(scope="module")
def x_t():
    # seed 2 gives every case below a spectral gap of at least 7% between sigma_3 and sigma_4
    generator = torch.Generator().manual_seed(2)
    return torch.randn(1, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)


def _mask(name):
    if name is None:
        return None
    mask = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.float64)
    if name == "left":
        mask[..., : SIZE // 2] = 1.0
    elif name == "ones":
        mask[:] = 1.0
    return mask


def _problem(unet, x_t, position="after", mask=None):
    return eps_of_h(unet, x_t, T, position, _mask(mask)), h_at(unet, x_t, T, position)


def _vector_angles(a, b):
    """Angle (degrees) between each pair of matching vectors, sign ignored."""
    return np.array([principal_angles_degrees(a[i : i + 1], b[i : i + 1])[0] for i in range(len(a))])


def _relative_errors(got, want):
    return ((got - want).abs() / want).numpy()


def test_use_math_attention_switches_every_attention_and_is_idempotent(unet):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attention, "the test U-Net must have mid-block attention"
    use_math_attention(unet)
    processors = [m.processor for m in attention]
    assert all(type(p) is AttnProcessor for p in processors)
    assert use_math_attention(unet) is unet
    assert [m.processor for m in attention] == processors  # second call changes nothing


@pytest.mark.parametrize("mask", [None, "left"])
def test_f_of_h0_is_the_masked_noise_prediction(unet, x_t, mask):
    f, h0 = _problem(unet, x_t, "after", mask)
    with torch.no_grad():
        eps = unet(x_t, T).sample
    expected = eps[0] if mask is None else (_mask(mask) * eps)[0]
    torch.testing.assert_close(f(h0), expected, rtol=1e-12, atol=1e-12)
    assert h0.shape == (16, SIZE // 2, SIZE // 2)


@pytest.mark.parametrize(
    "position, mask", [("after", None), ("after", "left"), ("before", "left"), ("middle", None)]
)
def test_subspace_iteration_matches_exact_svd(unet, x_t, position, mask):
    f, h0 = _problem(unet, x_t, position, mask)
    exact = exact_jacobian_svd(f, h0, k=4)
    assert exact.singular_values[2] / exact.singular_values[3] > 1.05, "test needs a spectral gap"
    result = jacobian_subspace(f, h0, k=3, tol=TOL, max_iter=300)

    assert isinstance(result, JacobianResult) and result.converged
    assert result.vectors.shape == (3, *h0.shape) and result.singular_values.shape == (3,)
    assert (result.residuals < TOL).all()
    angles = principal_angles_degrees(result.vectors, exact.vectors[:3])
    assert angles.max() < 1.0, angles
    assert _vector_angles(result.vectors, exact.vectors[:3]).max() < 1.0
    assert _relative_errors(result.singular_values, exact.singular_values[:3]).max() < 1e-3
    # descending, unit norm, and the same deterministic signs as the exact vectors
    assert (result.singular_values[:-1] >= result.singular_values[1:]).all()
    torch.testing.assert_close(result.vectors.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.vectors, exact.vectors[:3], rtol=0, atol=1e-3)


@pytest.mark.parametrize("forward_mode", [False, True], ids=["vjp-of-vjp", "forward-mode"])
def test_sequential_power_iteration_matches_exact_svd(unet, x_t, forward_mode):
    f, h0 = _problem(unet, x_t, "after", "left")
    exact = exact_jacobian_svd(f, h0, k=2)
    result = sequential_power_iteration(f, h0, k=2, tol=TOL, max_iter=300, forward_mode=forward_mode)
    assert result.converged
    assert _vector_angles(result.vectors, exact.vectors).max() < 1.0
    assert _relative_errors(result.singular_values, exact.singular_values).max() < 1e-3
    assert (result.residuals < 10 * TOL).all()  # undeflated residuals: see the docstring
    assert result.n_jvp == result.n_vjp == result.iterations > 0


def test_the_mask_changes_the_top_direction(unet, x_t):
    f_full, h0 = _problem(unet, x_t, "after", None)
    f_left, _ = _problem(unet, x_t, "after", "left")
    f_ones, _ = _problem(unet, x_t, "after", "ones")
    full = jacobian_subspace(f_full, h0, k=1, tol=TOL, max_iter=300)
    left = jacobian_subspace(f_left, h0, k=1, tol=TOL, max_iter=300)
    ones = jacobian_subspace(f_ones, h0, k=1, tol=TOL, max_iter=300)
    # the comparison can tell: an all-ones mask gives the unmasked direction back ...
    assert principal_angles_degrees(ones.vectors, full.vectors)[0] < 0.1
    # ... and masking half of the image turns the top direction well away from it
    assert principal_angles_degrees(left.vectors, full.vectors)[0] > 20.0
    assert left.singular_values[0] < full.singular_values[0]  # masking only removes rows


def _exact_localised(f, h0, mask, rank, k):
    """Reference: materialise J, take its exact top-rank right singular vectors V, solve
    Bᵀ M² B w = μ Bᵀ B w (B = J Vᵀ) with scipy, and return (shares, unit vectors)."""
    from scipy.linalg import eigh

    jacobian = torch.func.jacrev(f)(h0).reshape(-1, h0.numel()).double()
    basis = torch.linalg.svd(jacobian, full_matrices=False)[2][:rank]
    images = jacobian @ basis.T
    weights = torch.broadcast_to(mask[0], f(h0).shape).reshape(-1, 1).square()
    shares, coords = eigh((images.T @ (weights * images)).numpy(), (images.T @ images).numpy())
    vectors = torch.from_numpy(coords[:, ::-1][:, :k].copy()).T @ basis
    return jacobian, torch.from_numpy(shares[::-1][:k].copy()), vectors / vectors.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("rank, k", [(6, 1), (12, 3)])
def test_localised_directions_match_the_exact_generalised_eigenproblem(unet, x_t, rank, k):
    f, h0 = _problem(unet, x_t, "after", None)
    mask = _mask("left")
    jacobian, shares, vectors = _exact_localised(f, h0, mask, rank, k)
    result = localised_directions(f, h0, mask, k=k, rank=rank, tol=1e-9, max_iter=300)

    assert result.vectors.shape == (k, *h0.shape) and result.shares.shape == (k,)
    assert _vector_angles(result.vectors, vectors).max() < 1.0
    torch.testing.assert_close(result.shares, shares, rtol=1e-6, atol=1e-9)
    # the shares and responses are what they claim: measured on the exact J
    changes = result.vectors.reshape(k, -1) @ jacobian.T
    inside = (torch.broadcast_to(mask[0], f(h0).shape).reshape(1, -1) * changes).square().sum(1)
    torch.testing.assert_close(inside / changes.square().sum(1), result.shares, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(changes.norm(dim=1), result.responses, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.vectors.flatten(1).norm(dim=1), torch.ones(k, dtype=torch.float64))


def test_localised_directions_beat_the_masked_and_unmasked_singular_vectors(unet, x_t):
    f, h0 = _problem(unet, x_t, "after", None)
    f_left, _ = _problem(unet, x_t, "after", "left")
    mask = _mask("left")
    jacobian = torch.func.jacrev(f)(h0).reshape(-1, h0.numel()).double()
    weights = torch.broadcast_to(mask[0], f(h0).shape).reshape(-1)

    def share(vectors):
        changes = vectors.reshape(len(vectors), -1) @ jacobian.T
        return ((weights * changes).square().sum(1) / changes.square().sum(1)).numpy()

    result = localised_directions(f, h0, mask, k=1, rank=16, tol=1e-9, max_iter=300)
    unmasked = exact_jacobian_svd(f, h0, k=16)
    masked = exact_jacobian_svd(f_left, h0, k=1)
    # the top share is the maximum over the search space: no singular vector in it does better
    assert result.shares[0].item() >= share(unmasked.vectors).max() - 1e-9
    assert result.shares[0].item() > share(masked.vectors)[0] + 0.05
    # a mask of ones: every direction is fully inside
    ones = localised_directions(f, h0, _mask("ones"), k=2, rank=4, tol=1e-9, max_iter=300)
    torch.testing.assert_close(ones.shares, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="localised_rank"):
        localised_directions(f, h0, mask, k=5, rank=4)


def test_localised_directions_leave_out_what_the_jacobian_annihilates():
    """f(h) = A h with rank(A) = 5: a search space of 6 holds one null direction, whose
    share is noise; it is left out, so the answer is that of the 5 real directions."""
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(40, 5, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(30, 5, generator=generator, dtype=torch.float64))[0]
    matrix = left @ torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0], dtype=torch.float64)) @ right.T
    f = lambda h: (matrix @ h.reshape(-1)).reshape(1, 5, 8)  # noqa: E731
    h0 = torch.zeros(1, 5, 6, dtype=torch.float64)
    mask = torch.zeros(1, 5, 8, dtype=torch.float64)
    mask[..., :3] = 1.0
    five = localised_directions(f, h0, mask, k=2, rank=5, tol=1e-10, max_iter=50)
    six = localised_directions(f, h0, mask, k=2, rank=6, tol=1e-10, max_iter=50)
    torch.testing.assert_close(six.shares, five.shares, rtol=1e-8, atol=1e-10)
    assert (six.responses > 1.0).all()  # not a null direction
    with pytest.raises(ValueError, match="only 5 singular values"):
        localised_directions(f, h0, mask, k=6, rank=8, tol=1e-10, max_iter=50)
    with pytest.raises(ValueError, match="lower jacobian.localised_rank"):
        localised_directions(f, h0, mask, k=1, rank=31)


def test_products_are_counted_per_column(unet, x_t):
    f, h0 = _problem(unet, x_t)
    result = jacobian_subspace(f, h0, k=3, tol=1e-3, max_iter=300)
    assert result.iterations > 1
    assert result.n_jvp == result.n_vjp == result.iterations * 3  # default oversample=0
    wider = jacobian_subspace(f, h0, k=3, tol=1e-3, max_iter=300, oversample=2)
    assert wider.n_jvp == wider.n_vjp == wider.iterations * (3 + 2)
    capped = jacobian_subspace(f, h0, k=2, tol=1e-14, max_iter=4, oversample=0)
    assert not capped.converged and capped.iterations == 4 and capped.n_jvp == capped.n_vjp == 8
    sequential = sequential_power_iteration(f, h0, k=2, tol=1e-14, max_iter=4)
    assert not sequential.converged and sequential.iterations == sequential.n_jvp == 8


def test_oversampling_keeps_the_answer_and_does_not_slow_convergence(unet, x_t):
    f, h0 = _problem(unet, x_t)
    exact = exact_jacobian_svd(f, h0, k=3)
    plain = jacobian_subspace(f, h0, k=3, tol=TOL, max_iter=300, oversample=0)
    extra = jacobian_subspace(f, h0, k=3, tol=TOL, max_iter=300, oversample=3)
    assert extra.vectors.shape == plain.vectors.shape == exact.vectors.shape
    assert _vector_angles(extra.vectors, exact.vectors).max() < 1.0
    assert extra.iterations <= plain.iterations


def test_same_seed_same_result_and_caller_grad_mode_does_not_matter(unet, x_t):
    f, h0 = _problem(unet, x_t)
    first = jacobian_subspace(f, h0, k=2, tol=1e-3)
    with torch.inference_mode():
        f_inf, h0_inf = _problem(unet, x_t)
        second = jacobian_subspace(f_inf, h0_inf, k=2, tol=1e-3)
    with torch.no_grad():
        third = jacobian_subspace(f, h0, k=2, tol=1e-3)
    for other in (second, third):
        assert other.iterations == first.iterations
        torch.testing.assert_close(other.vectors, first.vectors, rtol=0, atol=1e-12)
    assert not any(p.requires_grad for p in unet.parameters())


def test_signs_are_fixed_by_the_largest_entry(unet, x_t):
    f, h0 = _problem(unet, x_t)
    rows = jacobian_subspace(f, h0, k=3, tol=1e-3).vectors.flatten(1)
    largest = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    assert (largest > 0).all()


def test_float32_model_converges_at_a_practical_tolerance(x_t):
    unet32 = make_tiny_unet(sample_size=SIZE).eval().requires_grad_(False)
    f, h0 = _problem(unet32, x_t.float())
    exact = exact_jacobian_svd(f, h0, k=3)
    result = jacobian_subspace(f, h0, k=3, tol=1e-3, max_iter=300)
    assert result.converged and result.vectors.dtype == torch.float32
    assert principal_angles_degrees(result.vectors, exact.vectors).max() < 2.0


def test_bad_inputs_are_refused_with_a_fix(unet, x_t):
    with pytest.raises(ValueError, match="does not broadcast"):
        eps_of_h(unet, x_t, T, mask=torch.ones(1, 1, SIZE + 1, SIZE))
    with pytest.raises(ValueError, match="one image"):
        eps_of_h(unet, x_t.repeat(2, 1, 1, 1), T)
    f, h0 = _problem(unet, x_t)
    with pytest.raises(ValueError, match="k must be between"):
        jacobian_subspace(f, h0, k=h0.numel() + 1)
    training = make_tiny_unet(sample_size=SIZE)
    with pytest.raises(ValueError, match="eval"):
        eps_of_h(training, x_t.float(), T)


def _linear_problem(singular_values, shape):
    """f(h) = A h, A with the given singular values and random singular vectors."""
    generator = torch.Generator().manual_seed(0)
    singular_values = torch.as_tensor(singular_values, dtype=torch.float64)
    rank, d_h = len(singular_values), int(np.prod(shape))
    left, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d_h, rank, generator=generator, dtype=torch.float64))
    matrix = left * singular_values @ right.T
    return (lambda h: matrix @ h.reshape(-1)), torch.zeros(shape, dtype=torch.float64), matrix


def _plain_subspace_iteration_products(matrix, k, tol, seed, max_iter=5000):
    """Products J v that plain subspace iteration (Haas et al. Alg. 1) needs to converge.

    The method jacobian_subspace accelerates, with the same seeded start, Rayleigh–Ritz
    step, residuals and stopping rule, run on the dense matrix: V ← orth(JᵀJ V).
    """
    directions = _random_orthonormal(matrix.shape[1], k, seed)
    for iteration in range(1, max_iter + 1):
        images = directions @ matrix.T
        ritz_values, ritz_coords = torch.linalg.eigh(images @ images.T)
        ritz_values, ritz_coords = ritz_values.flip(0), ritz_coords.flip(1)
        directions = ritz_coords.T @ directions
        pulled_back = ritz_coords.T @ images @ matrix
        residuals = (pulled_back - ritz_values[:, None] * directions).norm(dim=1) / ritz_values
        if residuals.max() < tol:
            return iteration * k
        directions = torch.linalg.qr(pulled_back.T)[0].T
    raise AssertionError("plain subspace iteration did not converge")


def test_block_krylov_needs_far_fewer_products_than_subspace_iteration_at_a_small_gap():
    # σ_3 / σ_4 = 1.01: subspace iteration with 3 columns shrinks the error by only
    # (σ_4/σ_3)² ≈ 0.98 per iteration; the Krylov space is searched as a whole
    singular_values = [1.0, 0.95, 0.9] + [0.9 * 0.99 * 0.995**j for j in range(597)]
    f, h0, matrix = _linear_problem(singular_values, (8, 16, 16))
    result = jacobian_subspace(f, h0, k=3, tol=1e-4, max_iter=1000)
    plain_products = _plain_subspace_iteration_products(matrix, k=3, tol=1e-4, seed=0)

    assert result.converged and (result.residuals < 1e-4).all()
    assert result.n_jvp * 4 < plain_products, (result.n_jvp, plain_products)  # measured: 75 against 573
    _, exact_values, exact_right_t = torch.linalg.svd(matrix, full_matrices=False)
    assert principal_angles_degrees(result.vectors, exact_right_t[:3].reshape(3, *h0.shape)).max() < 1.0
    assert _relative_errors(result.singular_values, exact_values[:3]).max() < 1e-3


def test_an_invariant_krylov_space_stops_the_iteration_with_dependent_columns_dropped():
    # J of rank 5: W = JᵀJ Q lies in the 5-dimensional row space of J, which the basis
    # holds completely after 3 iterations of 3 + 3 + 2 columns (W_2 has only two
    # directions outside span(Q); the third is dropped); then no new column is left
    f, h0, _ = _linear_problem([3.0, 2.0, 1.0, 0.5, 0.25], (2, 4, 4))
    result = jacobian_subspace(f, h0, k=3, tol=0.0, max_iter=50)  # tol 0: never met
    assert not result.converged and result.iterations == 3
    assert result.n_jvp == result.n_vjp == 3 + 3 + 2
    assert (result.residuals < 1e-10).all()
    torch.testing.assert_close(result.singular_values, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


# -- several images at once (hmine.jacobian.batched) -------------------------------------


def _rows_problem(unet, n=3, timesteps=(500, 300, 800), masked=True):
    """n images (x_t from seeded noise) at their own timesteps, each with its own mask."""
    generator = torch.Generator().manual_seed(2)
    dtype = next(unet.parameters()).dtype
    x_t = torch.randn(n, 3, SIZE, SIZE, generator=generator, dtype=dtype)
    masks = None
    if masked:
        masks = torch.zeros(n, 1, SIZE, SIZE, dtype=dtype)
        for r in range(n):  # a different region per image: left half, top half, a corner
            masks[r, :, : SIZE // 2 if r % 3 == 1 else SIZE, : SIZE // 2 if r % 3 != 1 else SIZE] = 1.0
            if r % 3 == 2:
                masks[r, :, SIZE // 2 :] = 0.0
    h0 = torch.stack([h_at(unet, x_t[r : r + 1], timesteps[r]) for r in range(n)])
    singles = [eps_of_h(unet, x_t[r : r + 1], timesteps[r], mask=None if masks is None else masks[r : r + 1]) for r in range(n)]
    return eps_of_h_rows(unet, x_t, torch.tensor(timesteps[:n]), mask=masks), h0, singles, masks


def test_f_of_rows_is_each_images_f(unet):
    f, h0, singles, _ = _rows_problem(unet)
    out = f(h0)
    for r, single in enumerate(singles):
        torch.testing.assert_close(out[r], single(h0[r]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.subset([2, 0])(h0[[2, 0]]), out[[2, 0]], rtol=1e-12, atol=1e-12)


def test_batched_subspaces_equal_one_at_a_time_and_the_exact_svd(unet):
    f, h0, singles, _ = _rows_problem(unet)
    batched = jacobian_subspaces(f, h0, k=3, tol=TOL, max_iter=300, seeds=[0, 1, 2])
    assert len(batched) == 3
    for r, single in enumerate(singles):
        one = jacobian_subspace(single, h0[r], k=3, tol=TOL, max_iter=300, seed=r)
        exact = exact_jacobian_svd(single, h0[r], k=3)
        got = batched[r]
        assert got.converged and (got.residuals < TOL).all()
        # the same iteration as the one-image solver: same steps, same products, same answer
        assert (got.iterations, got.n_jvp, got.n_vjp) == (one.iterations, one.n_jvp, one.n_vjp)
        assert principal_angles_degrees(got.vectors, one.vectors).max() < 0.01
        torch.testing.assert_close(got.vectors, one.vectors, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.singular_values, one.singular_values, rtol=1e-9, atol=0)
        assert principal_angles_degrees(got.vectors, exact.vectors).max() < 1.0
        assert _relative_errors(got.singular_values, exact.singular_values).max() < 1e-3
    # the images do not converge together here, so the drop-out path is exercised
    assert len({result.iterations for result in batched}) > 1


class _RowLinear:
    """F(H) = [A_r h_r]: a row-wise linear map with known spectra, recording each call's rows."""

    def __init__(self, matrices, rows=None, calls=None):
        self.matrices, self.rows = matrices, list(range(len(matrices))) if rows is None else rows
        self.calls = [] if calls is None else calls

    def __call__(self, h):
        self.calls.append(tuple(self.rows))
        return torch.stack([self.matrices[r] @ h[i].reshape(-1) for i, r in enumerate(self.rows)])

    def subset(self, rows):
        return _RowLinear(self.matrices, [self.rows[i] for i in rows], self.calls)


def test_converged_images_drop_out_or_stay_frozen_with_the_same_results():
    # three spectra with gaps from wide to narrow: the images need very different iteration counts
    gaps = [0.5, 0.9, 0.99]
    matrices = [_linear_problem([1.0, 0.95, 0.9] + [0.9 * g * 0.99**j for j in range(40)], (2, 8, 8))[2] for g in gaps]
    h0 = torch.zeros(3, 2, 8, 8, dtype=torch.float64)
    f = _RowLinear(matrices)
    dropping = jacobian_subspaces(f, h0, k=3, tol=1e-8, max_iter=200, seeds=[5, 6, 7])
    frozen_f = lambda h: _RowLinear(matrices)(h)  # noqa: E731 (no subset: finished rows stay in)
    frozen = jacobian_subspaces(frozen_f, h0, k=3, tol=1e-8, max_iter=200, seeds=[5, 6, 7])
    iterations = [result.iterations for result in dropping]
    assert iterations == sorted(iterations) and iterations[0] < iterations[2]  # narrower gap, more iterations
    # linearised again each time an image finished: first all three rows, then fewer
    assert f.calls[0] == (0, 1, 2) and f.calls[-1] == (2,)
    for r, matrix in enumerate(matrices):
        one = jacobian_subspace(lambda h, m=matrix: m @ h.reshape(-1), h0[r], k=3, tol=1e-8, max_iter=200, seed=5 + r)
        exact = torch.linalg.svd(matrix, full_matrices=False)[2][:3].reshape(3, 2, 8, 8)
        for result in (dropping[r], frozen[r]):
            assert result.converged and result.iterations == one.iterations and result.n_jvp == one.n_jvp
            torch.testing.assert_close(result.vectors, one.vectors, rtol=0, atol=1e-10)
            assert principal_angles_degrees(result.vectors, exact).max() < 0.01


def test_batched_float32_model_agrees_with_one_at_a_time_within_a_hundredth_of_a_degree():
    unet32 = make_tiny_unet(sample_size=SIZE).eval().requires_grad_(False)
    f, h0, singles, _ = _rows_problem(unet32, n=3)
    batched = jacobian_subspaces(f, h0, k=3, tol=1e-3, max_iter=300, seeds=[0, 1, 2])
    for r, single in enumerate(singles):
        one = jacobian_subspace(single, h0[r], k=3, tol=1e-3, max_iter=300, seed=r)
        assert batched[r].vectors.dtype == torch.float32 and batched[r].iterations == one.iterations
        assert principal_angles_degrees(batched[r].vectors, one.vectors).max() < 0.01


def test_batched_localised_directions_equal_one_at_a_time(unet):
    f, h0, _, masks = _rows_problem(unet, masked=True)
    unmasked, _, singles, _ = _rows_problem(unet, masked=False)
    batched = localised_directions_batch(unmasked, h0, masks, k=2, rank=8, tol=1e-9, max_iter=300, seeds=[0, 1, 2])
    for r, single in enumerate(singles):
        one = localised_directions(single, h0[r], masks[r : r + 1], k=2, rank=8, tol=1e-9, max_iter=300, seed=r)
        assert principal_angles_degrees(batched[r].vectors, one.vectors).max() < 0.01
        torch.testing.assert_close(batched[r].shares, one.shares, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batched[r].responses, one.responses, rtol=1e-9, atol=1e-12)
        assert batched[r].search_space.iterations == one.search_space.iterations
    with pytest.raises(ValueError, match="one mask per image"):
        localised_directions_batch(unmasked, h0, masks[:2], k=1, rank=4)


def test_batched_bad_inputs_are_refused_with_a_fix(unet):
    f, h0, _, _ = _rows_problem(unet, masked=False)
    with pytest.raises(ValueError, match="one seed per image"):
        jacobian_subspaces(f, h0, k=2, seeds=[0])
    with pytest.raises(ValueError, match="one timestep or one per image"):
        eps_of_h_rows(unet, torch.zeros(3, 3, SIZE, SIZE, dtype=torch.float64), torch.tensor([1, 2]))
    x_t = torch.zeros(3, 3, SIZE, SIZE, dtype=torch.float64)
    with pytest.raises(ValueError, match="must hold 3 images"):
        eps_of_h_rows(unet, x_t, T, mask=torch.ones(1, 1, SIZE, SIZE))  # one mask for all: ambiguous, refused
    with pytest.raises(ValueError, match="does not broadcast"):
        eps_of_h_rows(unet, x_t, T, mask=torch.ones(2, 1, SIZE, SIZE))


def test_batched_products_on_celebahq_blocks_equal_one_at_a_time():
    """CelebA-HQ's block layout (attention one level above the bottleneck, two resnets per
    block) at toy width: the batched pullback under vmap used to fail in GroupNorm's native
    backward ("NYI: querying is_contiguous inside of vmap"); now it runs and, from the same
    start, gives each image's one-at-a-time vectors."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=64,
        block_out_channels=(32,) * 6,
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=8,
    ).eval()
    unet.requires_grad_(False)
    x_t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    h0 = torch.stack([h_at(unet, x_t[r : r + 1], T) for r in range(2)])
    batched = jacobian_subspaces(eps_of_h_rows(unet, x_t, T), h0, k=1, max_iter=2, seeds=[0, 1])
    for r in range(2):
        alone = jacobian_subspace(eps_of_h(unet, x_t[r : r + 1], T), h0[r], k=1, max_iter=2, seed=r)
        assert batched[r].iterations == alone.iterations
        assert principal_angles_degrees(batched[r].vectors, alone.vectors).max() < 0.01
