"""The column ID from a Gram matrix against column-pivoted QR and least squares on A itself."""
import numpy as np
import pytest
import scipy.linalg
import torch

from prune import gram, interpolative
from prune.gram import Gram, Sketch
from prune.interpolative import expand_groups, group_gram, ordered_factor, pivoted_factor


def low_rank_plus_noise(m, n, rank, noise, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) + noise * rng.standard_normal((m, n))
    return A * rng.uniform(0.2, 3.0, n)  # columns of different sizes, so the order is clear


def test_pivots_and_factor_match_pivoted_qr():
    A = low_rank_plus_noise(200, 30, 12, 0.05, seed=0)
    factor = pivoted_factor(torch.from_numpy(A.T @ A))
    _, R, P = scipy.linalg.qr(A, mode="economic", pivoting=True)
    k = 12  # greedy choices agree while the residual columns are well separated
    assert factor.order[:k].tolist() == P[:k].tolist()
    assert np.allclose(np.abs(np.diag(R))[:k], factor.pivots().numpy()[:k], rtol=1e-6)
    assert np.allclose(np.abs(R[:k, :]), np.abs(factor.R.numpy()[:k, :]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("k", [0, 1, 5, 17, 30])
def test_coefficients_are_least_squares_and_errors_are_residuals(k):
    A = low_rank_plus_noise(150, 30, 20, 0.1, seed=1)
    factor = pivoted_factor(torch.from_numpy(A.T @ A))
    kept, dropped = factor.order[:k].numpy(), factor.order[k:].numpy()
    T = factor.coefficients(k).numpy()
    if 0 < k < 30:
        T_ref = np.linalg.lstsq(A[:, kept], A[:, dropped], rcond=None)[0]
        assert np.allclose(T, T_ref, atol=1e-6)
    residual = A[:, dropped] - (A[:, kept] @ T if k else 0)
    assert factor.errors()[k].item() == pytest.approx(np.linalg.norm(residual), rel=1e-6, abs=1e-6)


def test_output_errors_are_the_error_after_the_next_layer():
    A = low_rank_plus_noise(120, 16, 10, 0.2, seed=2)
    W = np.random.default_rng(3).standard_normal((7, 16))
    factor = pivoted_factor(torch.from_numpy(A.T @ A))
    errors = factor.output_errors(torch.from_numpy(W)).numpy()
    for k in (0, 3, 9, 16):
        kept, dropped = factor.order[:k].numpy(), factor.order[k:].numpy()
        fit = A[:, kept] @ factor.coefficients(k).numpy() if k else 0
        ref = np.linalg.norm((A[:, dropped] - fit) @ W[:, dropped].T)
        assert errors[k] == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_rank_deficient_gram_gives_exact_interpolation():
    rng = np.random.default_rng(4)
    B = rng.standard_normal((100, 6))
    A = np.concatenate([B, B[:, :3] * 2.0, B[:, 3:] - B[:, :3]], axis=1)  # 12 columns, rank 6
    factor = pivoted_factor(torch.from_numpy(A.T @ A))
    # the ridge leaves an error floor of about sqrt(ridge)·‖T‖, far below the rank gap
    assert factor.errors()[6].item() < 1e-4 * np.linalg.norm(A)
    assert factor.errors()[5].item() > 0.1 * np.linalg.norm(A)
    kept, dropped = factor.order[:6].numpy(), factor.order[6:].numpy()
    assert np.allclose(A[:, kept] @ factor.coefficients(6).numpy(), A[:, dropped], atol=1e-5)


def test_group_gram_is_the_gram_of_whole_flattened_groups():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((40, 4 * 3))  # 4 groups (heads) of 3 dims
    heads = A.reshape(40, 4, 3).transpose(1, 0, 2).reshape(4, -1).T  # one column per head
    assert np.allclose(group_gram(torch.from_numpy(A.T @ A), 3).numpy(), heads.T @ heads)
    assert expand_groups(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


def test_ordered_factor_follows_the_given_order():
    A = low_rank_plus_noise(80, 9, 9, 0.1, seed=6)
    order = torch.tensor([3, 1, 4, 0, 8, 2, 7, 5, 6])
    factor = ordered_factor(torch.from_numpy(A.T @ A), order)
    R_ref = np.linalg.cholesky((A.T @ A)[order][:, order]).T
    assert np.allclose(np.abs(factor.R.numpy()), np.abs(R_ref), rtol=1e-5, atol=1e-6)


def test_gram_streams_batches_and_skips_padding():
    rng = np.random.default_rng(7)
    X = torch.from_numpy(rng.standard_normal((3, 5, 8))).float()  # (batch, tokens, units)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    X_padded = X.clone()
    X_padded[~mask] = 1e6  # padding rows that must never count
    G = Gram(8)
    G.add_batch(X_padded[:2], mask[:2])
    G.add_batch(X_padded[2:], mask[2:])
    rows = X[mask].double()
    assert G.rows == int(mask.sum())
    # float32 products of entries ~1 round by ~3e-7 (near-cancelling entries too); a padding row of 1e6 would not
    assert torch.allclose(G.G, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_gram_formed_by_panels_below_the_diagonal_is_the_whole_product():
    """n over two of the Gram's column panels (gram.BLOCK), cross products beside it: products
    equals [A, B]'s dense float64 product, symmetric, also when read between batches."""
    rng = np.random.default_rng(10)
    n, extra = 2 * gram.BLOCK + 37, 5
    batches = [torch.from_numpy(rng.standard_normal((2, 30, n + extra))).float() for _ in range(2)]
    G = Gram(n, extra=extra)
    G.add_batch(batches[0][..., :n], B=batches[0][..., n:])
    rows = batches[0].reshape(-1, n + extra).double()
    # 60 float32 products of entries ~1 an element: ~1e-5 of rounding in any summation order
    torch.testing.assert_close(G.products, rows[:, :n].T @ rows, rtol=1e-6, atol=5e-4)
    G.add_batch(batches[1][..., :n], B=batches[1][..., n:])
    rows = torch.cat([b.reshape(-1, n + extra) for b in batches]).double()
    torch.testing.assert_close(G.products, rows[:, :n].T @ rows, rtol=1e-6, atol=5e-4)
    assert torch.equal(G.G, G.G.T)


def test_count_sketch_is_unbiased():
    rng = np.random.default_rng(8)
    A = torch.from_numpy(rng.standard_normal((400, 6))).float()
    exact = (A.T @ A).double()
    estimates = []
    for seed in range(200):
        G = Gram(6, sketch=Sketch("count", 50, seed))
        G.add_batch(A)
        estimates.append(G.G)
    mean = torch.stack(estimates).mean(0)
    assert torch.linalg.norm(mean - exact) < 0.05 * torch.linalg.norm(exact)
    assert torch.linalg.norm(estimates[0] - exact) > 1e-3 * torch.linalg.norm(exact)  # it does sketch


def test_the_gaussian_sketch_is_unbiased_per_window_and_leaves_padding_out():
    """Windows (batch, length, n) with padding: E[(SA)ᵀ(SA)] over the draws is the Gram of the
    real rows alone (checked against the mean of many draws); each window becomes `rows` rows;
    a window no longer than `rows` is kept as it is; the draws follow the seed."""
    rng = np.random.default_rng(9)
    n, length = 5, 40
    A = torch.from_numpy(rng.standard_normal((3, length, n)) * [1.0, 2.0, 0.5, 3.0, 1.0]).float()
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[1, 25:] = False  # padding, full of large values that must not count
    A[1, 25:] = 100.0
    exact = sum(A[b][mask[b]].double().T @ A[b][mask[b]].double() for b in range(3))
    draws = []
    for seed in range(400):
        G = Gram(n, sketch=Sketch("gaussian", 8, seed))
        G.add_batch(A, mask)
        draws.append(G.G)
    assert G.rows == int(mask.sum())  # the tokens it saw, not the rows it kept
    mean = torch.stack(draws).mean(0)
    spread = torch.stack(draws).std(0) / 400 ** 0.5  # the standard error of the mean, entry by entry
    assert ((mean - exact).abs() <= 5 * spread + 1e-9).all()
    assert torch.linalg.norm(draws[0] - exact) > 0.05 * torch.linalg.norm(exact)  # one draw does sketch
    again = Gram(n, sketch=Sketch("gaussian", 8, 0))
    again.add_batch(A, mask)
    assert torch.equal(again.G, draws[0])
    short = Gram(n, sketch=Sketch("gaussian", length, 0))  # windows no longer than the rows: exact
    short.add_batch(A, mask)
    torch.testing.assert_close(short.G, exact, rtol=1e-5, atol=1e-4)
    assert Sketch("gaussian", 8).rows_kept([40, 25, 3]) == 8 + 8 + 3 and Sketch("count", 8).rows_kept([40, 25]) == 8


@pytest.mark.parametrize("by", ["lapack", "torch"])
@pytest.mark.parametrize("ill_conditioned", [False, True])
def test_heldout_errors_are_the_ids_errors_on_other_rows(ill_conditioned, by):
    """The ID fitted on A (every truncation k) applied to other rows A_h: the error it leaves,
    and that error after a linear map W, against the residuals formed explicitly; with LAPACK's
    dsygst and dlauum, or torch's solves, where the columns are scaled first or not."""
    rng = np.random.default_rng(11)
    n = 9
    mixing = rng.standard_normal((n, n))
    if ill_conditioned:
        mixing[:, -3:] = mixing[:, :3] + 1e-6 * rng.standard_normal((n, 3))
    A, A_h = rng.standard_normal((50, n)) @ mixing, rng.standard_normal((30, n)) @ mixing
    W = rng.standard_normal((4, n))
    s = rng.uniform(0.5, 2.0, n)
    factor = pivoted_factor(torch.from_numpy(A.T @ A))
    G_h = torch.from_numpy(A_h.T @ A_h)
    got = factor.heldout_errors(G_h, by=by).numpy()
    got_out = factor.heldout_errors(G_h, torch.from_numpy(W), by=by)
    # a fold's Gram kept in float32: the same up to its rounding, eps32·‖G_h‖ in the squared errors
    got_32 = factor.heldout_errors(G_h.float(), by=by).numpy()
    assert np.abs(got_32 ** 2 - got ** 2).max() <= 10 * np.finfo(np.float32).eps * n * float(G_h.abs().max())
    scaled = pivoted_factor(torch.from_numpy((A * s).T @ (A * s)))
    got_scaled = scaled.heldout_errors(G_h, by=by, scale=torch.from_numpy(s)).numpy()
    throwaway = pivoted_factor(torch.from_numpy((A * s).T @ (A * s)))  # its R may be overwritten
    assert np.array_equal(throwaway.heldout_errors(G_h, by=by, scale=torch.from_numpy(s), destroy=True), got_scaled)
    order = factor.order.numpy()
    for k in range(n + 1):
        J, D = order[:k], order[k:]
        T = factor.coefficients(k).numpy()
        E = A_h[:, D] - A_h[:, J] @ T
        scale = np.linalg.norm(A_h)
        assert got[k] == pytest.approx(np.linalg.norm(E), rel=1e-6, abs=1e-9 * scale)
        assert float(got_out[k]) == pytest.approx(np.linalg.norm(E @ W[:, D].T), rel=1e-6, abs=1e-9 * scale)
        J, D = scaled.order.numpy()[:k], scaled.order.numpy()[k:]
        T = scaled.coefficients(k).numpy()
        E = (A_h * s)[:, D] - (A_h * s)[:, J] @ T
        assert got_scaled[k] == pytest.approx(np.linalg.norm(E), rel=1e-6, abs=1e-9 * scale)
    # on the rows it was fitted on, it is the in-sample error (which the ridge inflates by
    # ridge·‖T‖², visible only when the kept columns are nearly dependent)
    in_sample = factor.heldout_errors(torch.from_numpy(A.T @ A), by=by).numpy()
    assert ill_conditioned or np.allclose(in_sample, factor.errors().numpy(), rtol=1e-6,
                                          atol=1e-9 * np.linalg.norm(A))


@pytest.mark.parametrize("block_bytes", [8 * 7 * 3, 1 << 22])  # 3 rows a block (the last one short), or all
def test_the_blockwise_helpers_equal_the_whole_operations(monkeypatch, block_bytes):
    """_ordered_copy, _row_sums and add_rows work a block of rows at a time through one reused
    buffer: the same results as the whole operations, whatever the block size."""
    monkeypatch.setattr(interpolative, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    G = torch.randn(7, 7, generator=g)
    order = torch.randperm(7, generator=g)
    ordered = interpolative._ordered_copy(G, order, "cpu", torch.float64)
    assert ordered.dtype == torch.float64 and torch.equal(ordered, G[order][:, order].double())
    sums = interpolative._row_sums(G)
    assert sums.dtype == torch.float64 and torch.allclose(sums, G.double().sum(dim=1), rtol=1e-12, atol=1e-12)
    total = torch.randn(7, 7, dtype=torch.float64, generator=g)
    part = torch.randn(7, 9, generator=g)[:, :7]  # float32, and not contiguous (a fold's products with extra columns)
    expected = total + part.double()
    assert torch.equal(interpolative.add_rows(total, part), expected) and torch.equal(total, expected)
