"""Removing units of one block: FFN neurons, or attention units (heads, or KV groups).

A block has n units feeding one linear map W (out × n·unit_dims): the FFN output projection,
or the attention output projection. Pruning keeps k units and replaces W by the weight that
best reproduces a target output from the kept units alone.

`UnitPruner` is STAT on one block, in the shape of GPTQ's per-layer object: statistics
accumulate batch by batch (`add_batch`: the Gram of the block's input), then one decision
(`solve`: the interpolative decomposition, which orders the units and prices every
truncation), after which `prices()` reports those prices and `prune(k)`
returns the kept units and the corrected W. As in docs/design.md §2:
- neurons: column ID of A·D with D = diag(‖W[:, j]‖), so a neuron counts by how much it
  writes into the residual stream; the correction is the plain least-squares one;
- attention units: a pivoted QR over whole units (the Gram of the units is the matrix of
  traces of the unit blocks of G), then each dropped unit's dims are fitted on all the kept
  units' dims.

The correction (docs/design.md §4) reproduces one of two targets:
- 'self' (the paper's): W's own output on the activations A′ the block receives, which the
  ID gives directly: W_J + W_¬J Tᵀ;
- 'dense': the dense model's output plus the residual stream's gap, A Wᵀ + x − x′, with A
  and x the dense model's activations fed beside A′ and x′: the least-squares fit
  W_Jᵀ = (G′_JJ + λI)⁻¹ A′_Jᵀ (A Wᵀ + x − x′), from A′ᵀ[A′, A, x − x′] accumulated batch by
  batch. Each block then undoes, as far as its kept units can, the error arriving from below.
With held-out prices the batches fall in folds, and each truncation is priced
by the error the ID fitted on the other folds leaves on each fold (cross-validation).
`MagnitudePruner` is the baseline: units ranked by the norms of their weights, uncorrected.
"""
import warnings

import torch

from prune.gram import Gram
from prune.interpolative import RIDGE, add_rows, expand_groups, group_gram, ordered_factor, pivoted_factor

TARGETS = ("self", "dense")
# held-out prices: cross-validated over 3 folds of the calibration batches (4, the first choice, and 3 measured
# alike on held-out data, 2 behind: docs/results.md). The folds' Grams are float32, each fold's fit is factored in
# float64 and its pricing reduction (R⁻ᵀ G_fold R⁻¹, R Rᵀ) runs in float32: 0.6-0.7x the time, prices within
# 3e-4 of float64's (2.6e-5 measured) wherever they exceed 1 % of the block's whole error
# (tests/test_corrections.py), the same allocations on SmolLM2 (docs/results.md). Factoring the folds in float32
# too measured 3e-3 off: not done.
PRICE_FOLDS = 3


def keep_units(W, order, unit_dims, k, coefficients=None):
    """Keep the first k units of `order`: returns (kept units, sorted; the new W, out × k·unit_dims).

    coefficients: T (k·unit_dims × dropped dims) with A[:, dropped] ≈ A[:, kept] T, folded
    into the kept columns (None: the dropped columns are simply removed).
    """
    kept_units = order[:k]
    dims_in_order = expand_groups(order, unit_dims).to(W.device)
    kept_dims, dropped_dims = dims_in_order[: k * unit_dims], dims_in_order[k * unit_dims:]
    W_new = W[:, kept_dims]
    if coefficients is not None:
        W_new = W_new + W[:, dropped_dims] @ coefficients.to(W.device).T
    # Keep units in their original order, so a layer that keeps everything is unchanged.
    sort = torch.argsort(kept_units)
    return kept_units[sort], W_new[:, expand_groups(sort, unit_dims).to(W.device)]


class UnitPruner:
    """STAT's choice and correction for the units of one block (see the module docstring).

    W: the consumer's weight (out × n·unit_dims). scale_by_weight: select on A·diag(‖W[:, j]‖)
    (neurons) rather than on whole units of A (attention units). sketch: a prune.gram.Sketch of
    every batch (each fold's draws its own), or None. target: TARGETS.
    price_folds: 0 (prices in-sample), or prices() cross-validated over that many folds of the
    batches (add_batch's `fold`).
    factor: who computes the pivoted Cholesky factorisations, 'lapack' or 'torch'
    (prune/interpolative.py pivoted_factor).
    """

    def __init__(self, W, unit_dims=1, scale_by_weight=False, sketch=None, target="self", price_folds=0,
                 factor="lapack"):
        if target not in TARGETS:
            raise ValueError(f"unknown correction target {target!r}")
        self.W = W.detach().double()
        self.unit_dims = unit_dims
        self.scale_by_weight = scale_by_weight
        self.target = target
        self.n = W.shape[1] // unit_dims
        dims, out = W.shape[1], W.shape[0]
        extra = dims + out if target == "dense" else 0  # the dense target's [A, x − x′] beside A′
        # the folds' Grams in float32: they only price, and there are several of them (memory)
        dtype = torch.float32 if price_folds else torch.float64
        self.grams = [Gram(dims, W.device, sketch and sketch.reseeded(fold), extra, dtype)
                      for fold in range(price_folds or 1)]
        self.price_folds = price_folds
        self.factor_by = factor
        self.prices_held_out = None
        self.order = self.factor = self.dim_scale = None
        self.G = self.P = None  # the dense target's statistics: A′ᵀA′ and A′ᵀ(A Wᵀ + x − x′)

    @classmethod
    def neurons(cls, linear, sketch=None, target="self", price_folds=0, factor="lapack"):
        return cls(linear.weight, 1, True, sketch, target, price_folds, factor)

    @classmethod
    def attention(cls, linear, unit_dims, sketch=None, target="self", price_folds=0, factor="lapack"):
        return cls(linear.weight, unit_dims, False, sketch, target, price_folds, factor)

    @property
    def rows(self):
        """Calibration rows (tokens) fed so far, every fold together."""
        return sum(g.rows for g in self.grams)

    def add_batch(self, A, mask=None, A_dense=None, residual=None, fold=0):
        """A: (..., n·unit_dims) inputs of the consumer; mask: (...) bool, True for real tokens;
        A_dense, residual: the dense model's inputs of the consumer and the residual stream's
        gap x − x′ (the dense target needs both); fold: with held-out prices, the fold of the
        batch (0..price_folds − 1)."""
        if (A_dense is None or residual is None) == (self.target == "dense"):
            raise ValueError("A_dense and residual are needed with the dense target, and only then")
        if fold and not self.price_folds:
            raise ValueError("fold needs held-out prices")
        extra = None if A_dense is None else torch.cat([A_dense, residual.to(A_dense)], dim=-1)
        self.grams[fold].add_batch(A, mask, extra)

    def solve(self, keep=None):
        """Order the units once, and keep what the corrections need (the Grams are freed).

        keep: the number of units prune() will be asked for, when known (pass 2): a torch
        factorisation then stops after that many pivots (prices() are not available)."""
        folds = [g.products for g in self.grams if g.rows] or [self.grams[0].products]
        self.grams = None
        if self.scale_by_weight:
            self.dim_scale = self.W.norm(dim=0).to(folds[0].device)
        if self.price_folds and len(folds) > 1:
            # before the factor of all the folds, so that the folds' factors never sit beside it
            self.prices_held_out = self._cross_validated_prices(folds)
        products = folds.pop().double()
        while folds:  # summed in float64, each fold freed once added
            add_rows(products, folds.pop())
        dims = self.W.shape[1]
        if self.target == "dense":
            self.G = products[:, :dims].clone()
            self.P = products[:, dims:2 * dims] @ self.W.T + products[:, 2 * dims:]
        G = self._scaled(products[:, :dims])  # in place: a Gram is the largest matrix here
        del products
        self.order, self.factor = self._factor(G, keep)
        return self

    def _factor(self, G, keep=None):
        """(the units in the order the ID keeps them, the factor of G in that order): columns
        chosen one by one for neurons (G scaled; factored where it lies), whole units at a time
        for attention units (their dims then factored in that order)."""
        if self.scale_by_weight:
            stop = keep if self.factor_by == "torch" else None
            factor = pivoted_factor(G, factor=self.factor_by, stop_after=stop, overwrite=True)
            return factor.order, factor
        order = pivoted_factor(group_gram(G, self.unit_dims), factor=self.factor_by, overwrite=True).order
        return order, ordered_factor(G, expand_groups(order, self.unit_dims))

    def _cross_validated_prices(self, folds):
        """prices() cross-validated over `folds` (their products): each fold gets the error that
        the ID fitted on the other folds leaves on it; the squared errors add up over the folds.
        Memory, in n × n float64 matrices: the folds (float32, 0.5 each), the fit's Gram
        becoming its factor (1), that factor rounded to float32 (0.5, the float64 one then freed)
        and the held-out Gram becoming the products that price it (0.5): with 3 folds 3 at most."""
        dims = self.W.shape[1]
        squared = 0.0
        for f, held in enumerate(folds):
            others = folds[:f] + folds[f + 1:]
            G_fit = others[0][:, :dims].double()  # the first fold's copy is the fit's start: no zeros to add to
            for other in others[1:]:
                add_rows(G_fit, other[:, :dims])
            with warnings.catch_warnings():  # the folds' factors are not reported, only the factor of all of them
                warnings.simplefilter("ignore", RuntimeWarning)
                factor = self._factor(self._scaled(G_fit))[1]
            del G_fit
            factor.R = factor.R.float()  # the fold's reduction in float32 (see PRICE_FOLDS)
            W = None if self.scale_by_weight else self._output_weight()
            errors = factor.heldout_errors(held[:, :dims], W, self.factor_by, destroy=True, scale=self.dim_scale)
            squared = squared + (errors if W is None else errors[:: self.unit_dims]) ** 2
            del factor  # not beside the next fold's fit
        return squared.sqrt()

    def _scaled(self, G):
        """G as the ID sees it, scaled in place by the weight norms for neurons."""
        if self.dim_scale is not None:
            G *= self.dim_scale[:, None]
            G *= self.dim_scale[None, :]
        return G

    def _output_weight(self):
        """W in the columns the ID was taken on (divided by the neuron scaling)."""
        return self.W if self.dim_scale is None else self.W / torch.where(self.dim_scale > 0, self.dim_scale, 1)

    def prices(self):
        """[k] = what keeping the best k units costs, k = 0..n (held out with price_folds):
        for neurons the error of the scaled ID, ‖A_¬J − A_J T‖ in the scaled columns; for
        attention units the error after the output projection, ‖(ID residual) W_droppedᵀ‖_F
        (docs/design.md §3)."""
        if self.prices_held_out is not None:
            return self.prices_held_out.cpu().numpy()
        if self.scale_by_weight:
            return self.factor.errors().cpu().numpy()
        return self.factor.output_errors(self._output_weight())[:: self.unit_dims].cpu().numpy()

    def pivots(self):
        """What each successive unit of the (scaled) ID adds, non-increasing."""
        return self.factor.pivots().cpu().numpy()

    def coefficients(self, k):
        """T for keeping the first k units, in the units of A (the neuron scaling undone)."""
        if not 0 < k < self.n:
            return None
        T = self.factor.coefficients(k * self.unit_dims).to(self.W.device)
        if self.dim_scale is not None:  # T was fitted on scaled columns: undo the scaling
            dims = expand_groups(self.order, self.unit_dims).to(self.W.device)
            s = self.dim_scale.to(self.W.device)
            kept = k * self.unit_dims
            s_kept, s_dropped = s[dims[:kept]], s[dims[kept:]]
            T = s_kept[:, None] * T / torch.where(s_dropped > 0, s_dropped, 1)[None, :]
        return T

    def prune(self, k):
        """Keep the best k units: (kept units, sorted; the corrected W)."""
        order = self.order.cpu()
        if self.target == "self":
            if k == self.n:  # nothing dropped: nothing to correct
                return order.sort().values, self.W
            return keep_units(self.W, order, self.unit_dims, k, self.coefficients(k))
        kept = order[:k].sort().values
        dims = expand_groups(kept, self.unit_dims).to(self.W.device)
        if not len(dims):
            return kept, self.W[:, dims]
        return kept, ridge_fit(self.G[dims][:, dims], self.P[dims], self.W[:, dims], RIDGE)

    def to(self, device):
        """Move what the decision holds (W, R: n × n floats, the dense target's statistics) to `device`."""
        self.W = self.W.to(device)
        self.factor.R = self.factor.R.to(device)
        if self.dim_scale is not None:
            self.dim_scale = self.dim_scale.to(device)
        if self.G is not None:
            self.G, self.P = self.G.to(device), self.P.to(device)
        return self


def ridge_fit(G, P, W0, alpha):
    """argmin_W ‖A Wᵀ − Y‖² + λ‖W − W0‖² from G = AᵀA and P = AᵀY, λ = alpha · mean diag(G).

    Should rounding leave G + λI indefinite (a rank-deficient G rounded to float32), λ is
    raised tenfold until it factors, with a warning."""
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    scale = float(G.diagonal().mean()) or 1.0
    lam = alpha * scale
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(G + lam * eye)
        if int(info) == 0:
            return torch.cholesky_solve(P + lam * W0.T, L).T
        lam *= 10
        warnings.warn(f"ridge fit: G + λI not positive definite, λ raised to {lam / scale:.0e} of the mean "
                      "diagonal", RuntimeWarning, stacklevel=2)
    raise ValueError("Gram matrix is not positive semi-definite (NaN or Inf in activations?)")


class MagnitudePruner:
    """The baseline: units ranked by the norms of their weights, no correction."""

    def __init__(self, W, unit_norms, unit_dims=1):
        self.W = W.detach().double()
        self.unit_dims = unit_dims
        self.order = torch.argsort(unit_norms.cpu(), descending=True, stable=True)

    def prune(self, k):
        return keep_units(self.W, self.order, self.unit_dims, k)
