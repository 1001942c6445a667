"""The pivoted Cholesky in torch (prune/interpolative.py torch_pivoted_cholesky) against LAPACK's
dpstrf, which scipy reaches: the same greedy order where the pivots are well separated, and
elsewhere every pivot within rounding of the largest remaining diagonal and the same errors;
rank-deficient Grams, the ridge, one unit, ties, a stop after k pivots; and, on the CPU, a spy
that the torch path never hands a Gram to numpy or scipy (so that on a GPU it never leaves it)."""
import numpy as np
import pytest
import torch

import tiny
from efficiency.macs import adapter_costs
from prerequisites.adapters import adapter_for
from prune import interpolative
from prune.interpolative import pivoted_factor, resolve_factor
from prune.stat import stat_prune


def separated_gram(n, seed=0, m=None):
    """The Gram of n columns whose sizes fall geometrically (from 1 to 1e-3): greedy pivots
    far apart, so that rounding cannot reorder them."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m or 3 * n + 5, n, generator=g, dtype=torch.float64)
    A = A * torch.logspace(0, -3, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return A.T @ A


def both(G, **kwargs):
    return pivoted_factor(G.clone(), factor="lapack", **kwargs), pivoted_factor(G.clone(), factor="torch", **kwargs)


def greedy_check(G, factor, tol=1e-10):
    """Every pivot of `factor` is, within rounding, the largest diagonal of the Schur complement
    left when it was taken (computed here step by step in numpy, in the factor's order)."""
    S = G.numpy()[np.ix_(factor.order.numpy(), factor.order.numpy())] + factor.ridge * np.eye(len(G))
    scale = np.abs(np.diag(S)).max()
    for p in range(len(S) - 1):
        if S[p:, p:].diagonal().max() <= factor.ridge / 2:
            break  # pivoting stopped, as dpstrf's tolerance says
        assert S[p, p] >= S[p:, p:].diagonal().max() - tol * scale, p
        S[p + 1:, p + 1:] -= np.outer(S[p + 1:, p], S[p, p + 1:]) / S[p, p]


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200])
def test_the_same_order_and_factor_as_dpstrf_when_pivots_are_well_separated(n):
    G = separated_gram(n, seed=n)
    lapack, ours = both(G)
    assert ours.order.tolist() == lapack.order.tolist()
    torch.testing.assert_close(ours.R, lapack.R, rtol=1e-9, atol=1e-12 * float(lapack.R.abs().max()))
    assert ours.ridge == lapack.ridge
    Gp = G[ours.order][:, ours.order] + ours.ridge * torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(ours.R.T @ ours.R, Gp, rtol=1e-10, atol=1e-12 * float(Gp.abs().max()))


@pytest.mark.parametrize("kind", ["duplicated", "low_rank", "few_rows"])
def test_rank_deficient_grams_pivot_greedily_with_the_errors_of_dpstrf(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "duplicated":  # every column twice: the second copies carry nothing
        B = torch.randn(300, 40, generator=g, dtype=torch.float64)
        A = torch.cat([B, B], dim=1)
    elif kind == "low_rank":
        A = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 90, generator=g,
                                                                                 dtype=torch.float64)
    else:  # fewer rows (tokens) than columns, as a thin calibration gives
        A = torch.randn(30, 100, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 100, dtype=torch.float64)
    G = A.T @ A
    lapack, ours = both(G)
    greedy_check(G, ours)
    scale = float(lapack.errors()[0])
    torch.testing.assert_close(ours.errors(), lapack.errors(), rtol=1e-6, atol=1e-7 * scale)
    rank = torch.linalg.matrix_rank(A).item()
    # the first `rank` columns carry everything, but for the ridge's own part, ridge·‖T‖² (Factor.errors)
    assert float(ours.errors()[rank]) < 1e-3 * scale


def test_ties_go_to_the_first_column_as_in_dpstrf():
    G = torch.eye(70, dtype=torch.float64)
    G[10, 10] = G[50, 50] = 2.0  # two largest, tied: the first first
    lapack, ours = both(G)
    assert ours.order.tolist() == lapack.order.tolist()
    # each pivot swaps places with the column at its position: the others keep theirs
    assert ours.order[:12].tolist() == [10, 50, 2, 3, 4, 5, 6, 7, 8, 9, 0, 11]


def test_the_ridge_and_an_empty_gram():
    G = torch.zeros(6, 6, dtype=torch.float64)  # no information at all: the factor of the ridge alone
    lapack, ours = both(G)
    assert torch.equal(ours.R, lapack.R)
    assert torch.equal(ours.R, lapack.ridge ** 0.5 * torch.eye(6, dtype=torch.float64))
    assert ours.order.tolist() == lapack.order.tolist() == list(range(6))
    G = separated_gram(30, seed=3)
    for relative in (1e-8, 0.3):  # a large ridge is a regularised ID: the order changes with it
        lapack, ours = both(G, relative_ridge=relative)
        assert ours.ridge == pytest.approx(relative * float(G.diagonal().mean()))
        assert ours.order.tolist() == lapack.order.tolist()
        torch.testing.assert_close(ours.errors(), lapack.errors(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 64, 100, 150])
def test_a_factorisation_stopped_after_k_pivots_gives_the_same_coefficients(k):
    G = separated_gram(150, seed=4)
    full = pivoted_factor(G.clone(), factor="torch")
    stopped = pivoted_factor(G.clone(), factor="torch", stop_after=k)
    assert stopped.order[:k].tolist() == full.order[:k].tolist()
    assert sorted(stopped.order[k:].tolist()) == sorted(full.order[k:].tolist())
    # the dropped columns in the same order (the full factorisation went on permuting them)
    same = lambda factor: torch.argsort(factor.order[k:])  # noqa: E731
    torch.testing.assert_close(stopped.coefficients(k)[:, same(stopped)], full.coefficients(k)[:, same(full)],
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stopped.R[:k, :k], full.R[:k, :k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("factor", ["lapack", "torch"])
def test_the_gram_is_factored_where_it_lies_only_when_allowed(factor):
    G = separated_gram(20)
    kept = G.clone()
    copied = pivoted_factor(G, factor=factor)
    assert torch.equal(G, kept)
    in_place = pivoted_factor(G, factor=factor, overwrite=True)
    assert in_place.R.data_ptr() == G.data_ptr()
    # the same factor (LAPACK reads the other triangle in place: A.T @ A is symmetric to rounding)
    torch.testing.assert_close(in_place.R, copied.R, rtol=1e-12, atol=1e-12)


def test_auto_is_torch_on_a_gpu_and_lapack_on_the_cpu():
    assert resolve_factor("auto", "cuda:0") == resolve_factor("torch", "cpu") == "torch"
    assert resolve_factor("auto", "cpu") == resolve_factor("lapack", "cuda") == "lapack"
    with pytest.raises(ValueError):
        resolve_factor("magma", "cpu")


class Forbidden:
    """Stands in for numpy and scipy's LAPACK inside prune/interpolative.py: any use fails."""

    def __getattr__(self, name):
        raise AssertionError(f"the torch factorisation reached numpy/scipy ({name})")


@pytest.mark.parametrize("pricing", ["insample", "heldout"])
def test_the_torch_path_never_hands_a_gram_to_numpy_or_scipy(monkeypatch, pricing):
    """A spy on the CPU: with factor='torch' no Gram reaches numpy or scipy (only the prices,
    vectors, go to numpy for the allocation), so on a GPU the Grams stay on the device."""
    numpy_of = torch.Tensor.numpy

    def vectors_only(tensor, *args, **kwargs):
        assert tensor.dim() <= 1, f"a {tuple(tensor.shape)} matrix went to numpy"
        return numpy_of(tensor, *args, **kwargs)

    monkeypatch.setattr(interpolative, "np", Forbidden())
    monkeypatch.setattr(interpolative, "lapack", Forbidden())
    monkeypatch.setattr(torch.Tensor, "numpy", vectors_only)
    for make in (tiny.llama, tiny.bert):
        model = make()
        adapter = adapter_for(model)
        result = stat_prune(model, adapter, tiny.random_batches(n_batches=4), adapter_costs(adapter, 12), 0.5, "cpu",
                            progress=False, factor="torch", pricing=pricing, score_fraction=1.0)
        assert result.factor == "torch"
    with pytest.raises(AssertionError, match="numpy"):  # the spy does see the LAPACK path
        stat_prune(tiny.bert(), adapter, tiny.random_batches(), adapter_costs(adapter, 12), 0.5, "cpu",
                   progress=False, factor="lapack")


def test_torch_and_lapack_prune_a_model_alike():
    batches = tiny.random_batches(n_batches=6, batch=8, length=16)
    results, logits = {}, {}
    for factor in ("torch", "lapack"):
        model = tiny.bert(layers=3)
        adapter = adapter_for(model)
        results[factor] = stat_prune(model, adapter, batches, adapter_costs(adapter, 16), 0.5, "cpu",
                                     progress=False, factor=factor, score_fraction=1.0)
        logits[factor] = tiny.logits(model, batches)
    assert (results["torch"].attn_units, results["torch"].neurons) == (results["lapack"].attn_units,
                                                                       results["lapack"].neurons)
    torch.testing.assert_close(logits["torch"], logits["lapack"], rtol=1e-4, atol=1e-4)
