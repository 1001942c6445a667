"""Removing units of one block: FFN neurons, or attention units (heads, or KV groups).

A block has n units feeding one linear map W (out × n·unit_dims): the FFN output projection,
or the attention output projection. Pruning keeps k units and replaces W by the weight that
best reproduces a target output from the kept units alone.

`UnitPruner` is STAT on one block, in the shape of GPTQ's per-layer object: statistics
accumulate batch by batch (`add_batch`: the Gram of the block's input), then one decision
(`solve`: the interpolative decomposition, which orders the units and prices every
truncation), after which `scores()` reports those prices and `prune(k)` returns the kept
units and the corrected W. As in DESIGN.md §2:
- neurons: column ID of A·D with D = diag(‖W[:, j]‖), so a neuron counts by how much it
  writes into the residual stream; the correction is the plain least-squares one;
- attention units: a pivoted QR over whole units (the Gram of the units is the matrix of
  traces of the unit blocks of G), then each dropped unit's dims are fitted on all the kept
  units' dims.

How the kept columns J are refitted is a `Correction` (DESIGN.md §4). With the default one,
the ID's own: W_J + W_¬J Tᵀ, reproducing W's output on the activations A′ the block receives.
Otherwise, from G′ = A′ᵀA′ and P = A′ᵀY accumulated beside it, the ridge fit
    W_Jᵀ = (G′_JJ + λI)⁻¹ (P_J + λ W_Jᵀ)    (λ → ∞: plain selection, W_J unchanged)
of a target Y: W's own output A′Wᵀ (`self`), or the dense model's AWᵀ (`dense`, with A the
dense model's activations fed beside A′), plus the residual stream's gap x − x′ (`residual`).
With a constant column (`bias`) every statistic is centred, J is chosen on the centred
activations, and the means go into the consumer's bias.
`MagnitudePruner` is the baseline: units ranked by the norms of their weights, uncorrected.
"""
import warnings
from dataclasses import dataclass

import torch

from prune.gram import Gram
from prune.interpolative import RIDGE, expand_groups, group_gram, ordered_factor, pivoted_factor

# candidate relative ridges of Correction(ridge="heldout"), and the output directions they are
# compared in
HELDOUT_RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
HELDOUT_DIRECTIONS = 64
PRICE_FOLDS = 4  # held-out prices: cross-validated over 4 folds of the calibration batches


@dataclass(frozen=True)
class Correction:
    """How a block's consumer is refitted once units go.

    target: 'self' (reproduce the consumer's output on the inputs the pruned model gives it)
      or 'dense' (reproduce the dense model's output: add_batch needs A_dense).
    residual: the target also includes x_dense − x′ of the residual stream that the consumer
      writes into (add_batch needs it; with target 'dense').
    bias: keep a constant column in the ID: the dropped units' mean goes into the bias.
    add_bias: with `bias`, also give a consumer without a bias one (else it is fitted
      without the constant column).
    ridge: the refit's ridge relative to the mean diagonal of G′_JJ, shrinking the new weight
      towards plain selection; None: the ID's own (interpolative.RIDGE); 'heldout': chosen
      per block among HELDOUT_RIDGES by how well the fit on the other batches reproduces the
      target on the batches fed with held_out=True.
    id_ridge: the ridge of the ID itself, relative to the mean diagonal of the (scaled) Gram:
      it changes which units are kept, the ID's coefficients and the prices of pass 1
      (interpolative.RIDGE by default); 'heldout': chosen per block, once its number of units
      is known, among HELDOUT_RIDGES by the held-out error of the pruned block, the units
      chosen and the correction fitted anew for every candidate (with an order given from
      elsewhere, select_on='dense', only the correction); pass 1 keeps the default unless its
      IDs also prune (one_shot, dense_ffn, ffn_then_attn, select_on='dense').
    """

    target: str = "self"
    residual: bool = False
    bias: bool = False
    add_bias: bool = False
    ridge: object = None
    id_ridge: object = RIDGE

    def __post_init__(self):
        if self.target not in ("self", "dense"):
            raise ValueError(f"unknown correction target {self.target!r}")
        if self.residual and self.target != "dense":
            raise ValueError("the residual correction needs the dense target")
        if not (self.ridge is None or self.ridge == "heldout" or float(self.ridge) > 0):
            raise ValueError(f"ridge must be positive, None or 'heldout', got {self.ridge!r}")
        if not (self.id_ridge == "heldout" or float(self.id_ridge) > 0):
            raise ValueError(f"id_ridge must be positive or 'heldout', got {self.id_ridge!r}")
        if self.ridge == "heldout" and self.id_ridge == "heldout":
            raise ValueError("the held-out batches choose one ridge: the refit's or the ID's, not both")

    @property
    def holds_out(self):
        """Whether some calibration batches only judge a ridge (fed with held_out=True)."""
        return "heldout" in (self.ridge, self.id_ridge)

    @property
    def relative_id_ridge(self):
        """The ID's ridge when it is a number (the default while 'heldout' is still to choose)."""
        return RIDGE if self.id_ridge == "heldout" else float(self.id_ridge)

    @property
    def classic(self):
        """The ID's own correction (no statistics beyond the Gram)."""
        return self.target == "self" and self.ridge is None and self.id_ridge != "heldout"


SELF = Correction()


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

    W, b: the consumer's weight (out × n·unit_dims) and bias (or None). scale_by_weight:
    select on A·diag(‖W[:, j]‖) (neurons) rather than on whole units of A (attention units).
    """

    def __init__(self, W, unit_dims=1, scale_by_weight=False, sketch_rows=None, sketch_seed=0, b=None,
                 correction=SELF, held_out_prices=False):
        self.W = W.detach().double()
        self.b = None if b is None else b.detach().double()
        self.unit_dims = unit_dims
        self.scale_by_weight = scale_by_weight
        self.correction = correction
        self.n = W.shape[1] // unit_dims
        self.constant = correction.bias and (b is not None or correction.add_bias)
        dims = W.shape[1]
        extra = dims * (correction.target == "dense") + W.shape[0] * correction.residual
        # A′ with a column of ones last when there is a constant; [A, x − x′] beside it;
        # one Gram per part of the calibration batches: with held-out prices PRICE_FOLDS folds
        # (the last of which is the held-out part of a ridge choice), else the fitting part and,
        # when the Correction chooses a ridge, the held-out one
        parts = PRICE_FOLDS if held_out_prices else 1 + correction.holds_out
        self.grams = [Gram(dims + self.constant, W.device, sketch_rows, sketch_seed + part, extra=extra)
                      for part in range(parts)]
        # held_out_prices: errors() and output_errors() are cross-validated: each fold priced by
        # the ID fitted on the other folds, the squared errors summed over the folds
        self.held_out_prices = held_out_prices
        self.prices = None
        self.order = self.factor = self.dim_scale = self.fit = self.heldout = self.given_order = None
        self.chosen_ridge = None  # the ridge a held-out choice took (the refit's or the ID's)

    @classmethod
    def neurons(cls, linear, sketch_rows=None, sketch_seed=0, correction=SELF, held_out_prices=False):
        return cls(linear.weight, 1, scale_by_weight=True, sketch_rows=sketch_rows, sketch_seed=sketch_seed,
                   b=linear.bias, correction=correction, held_out_prices=held_out_prices)

    @classmethod
    def attention(cls, linear, unit_dims, sketch_rows=None, sketch_seed=0, correction=SELF, held_out_prices=False):
        return cls(linear.weight, unit_dims, scale_by_weight=False, sketch_rows=sketch_rows, sketch_seed=sketch_seed,
                   b=linear.bias, correction=correction, held_out_prices=held_out_prices)

    def add_batch(self, A, mask=None, A_dense=None, residual=None, held_out=False, fold=None):
        """A: (..., n·unit_dims) inputs of the consumer; mask: (...) bool, True for real tokens;
        A_dense: the dense model's inputs of the consumer (target 'dense'); residual: x − x′
        (residual correction); held_out: the batch only judges the ridges (ridge 'heldout');
        fold: with held-out prices, the fold of the batch (0..PRICE_FOLDS−1; the last one is
        the held-out part of a ridge choice)."""
        if (A_dense is None) == (self.correction.target == "dense"):
            raise ValueError("A_dense is needed with the dense target, and only then")
        if (residual is None) == self.correction.residual:
            raise ValueError("residual is needed with the residual correction, and only then")
        if self.constant:
            A = torch.cat([A, A.new_ones(*A.shape[:-1], 1)], dim=-1)
        others = [t for t in (A_dense, residual) if t is not None]
        if (held_out and len(self.grams) == 1) or (fold is not None and not self.held_out_prices):
            raise ValueError("held_out needs a Correction that chooses a ridge ('heldout'); fold needs held-out prices")
        part = fold if fold is not None else (len(self.grams) - 1 if held_out else 0)
        self.grams[part].add_batch(A, mask, torch.cat(others, dim=-1) if others else None)

    def solve(self, order=None):
        """Order the units once, and keep what the refits need (the Grams are freed).

        order: the units' order decided elsewhere (the dense model's ID), else the ID's own."""
        grams, self.grams = self.grams, None
        parts = [g.products for g in grams if g.rows]  # the folds, with held-out prices
        # the held-out part of a ridge choice: the last Gram (with held-out prices, the last
        # fold), when it and some other part have rows
        held_out = grams[-1].products if len(grams) > 1 and grams[-1].rows and len(parts) > 1 else None
        if held_out is None:
            products = parts[0] if len(parts) == 1 else sum(parts) if parts else grams[0].products
        else:
            fit = sum(g.products for g in grams[:-1])
            if self.correction.holds_out:
                self.heldout = (self._statistics(fit), self._statistics(held_out))
            products = fit + held_out  # every part
            del fit
        del grams, held_out  # each fold's Gram is freed once the prices are done with it
        if order is not None:
            self.order = self.given_order = order.cpu()
        if self.scale_by_weight:
            self.dim_scale = self.W.norm(dim=0).to(products.device)
        if self.held_out_prices and len(parts) > 1:
            # before the factor of all the folds, so that the folds' factors never sit beside it
            self.prices = self._cross_validated_prices(parts, products)
        del parts
        total = self._statistics(products)
        G = total.G if self.correction.classic else total.G.clone()
        G = self._scaled(G, in_place=True)  # in place: a Gram is the largest matrix here
        relative_ridge = self.correction.relative_id_ridge
        if order is not None:
            self.factor = ordered_factor(G, expand_groups(self.order, self.unit_dims), relative_ridge)
        elif self.scale_by_weight:
            self.factor = pivoted_factor(G, relative_ridge)
            self.order = self.factor.order
        else:
            self.order = self._order(G, relative_ridge)
            self.factor = ordered_factor(G, expand_groups(self.order, self.unit_dims), relative_ridge)
        del G
        if not self.correction.classic:
            self.fit = total
        elif self.constant:
            self.fit = Statistics(None, None, total.mean, total.target_mean)
        return self

    def _order(self, G, relative_ridge):
        """The units in the order the ID of G (scaled for neurons) keeps them."""
        if self.given_order is not None:
            return self.given_order
        if self.scale_by_weight:
            return pivoted_factor(G, relative_ridge).order
        return pivoted_factor(group_gram(G, self.unit_dims), relative_ridge).order

    def _cross_validated_prices(self, parts, total):
        """(errors, output errors) per truncation, cross-validated over the folds `parts`
        (their products, `total` their sum): each fold gets the error that the ID fitted on the
        other folds leaves on it; the squared errors add up over the folds. `parts` is emptied
        fold by fold, so that a fold's Gram is freed once it is priced."""
        errors = output_errors = 0.0
        relative_ridge = self.correction.relative_id_ridge
        while parts:
            part = parts.pop(0)
            rest = total - part
            # with a constant, the fold is centred on the other folds' mean: the one its bias is fitted to
            G_held = self._scaled(self._gram(part, centre_on=rest))
            del part
            G_fit = self._scaled(self._gram(rest), in_place=True)  # rest is ours: scaled where it lies
            with warnings.catch_warnings():  # the folds' factors are not reported, only the factor of all of them
                warnings.simplefilter("ignore", RuntimeWarning)
                if self.scale_by_weight:
                    factor = pivoted_factor(G_fit, relative_ridge)
                else:
                    factor = ordered_factor(G_fit, expand_groups(self._order(G_fit, relative_ridge), self.unit_dims),
                                            relative_ridge)
            del rest, G_fit
            M = factor.heldout_gram(G_held)
            del G_held
            errors = errors + factor.heldout_errors(M) ** 2
            output_errors = output_errors + factor.heldout_errors(M, self._output_weight())[:: self.unit_dims] ** 2
        return errors.sqrt(), output_errors.sqrt()

    def _scaled(self, G, in_place=False):
        """G as the ID sees it: scaled by the weight norms for neurons (a copy unless in_place)."""
        if self.dim_scale is None:
            return G
        if not in_place:
            return G * self.dim_scale[:, None] * self.dim_scale[None, :]
        G *= self.dim_scale[:, None]
        G *= self.dim_scale[None, :]
        return G

    def _statistics(self, M):
        """G′ and P = A′ᵀY from the accumulated products M = A′ᵀ[A′ (1) A (x − x′)], centred
        when there is a constant, and the means."""
        dims = self.W.shape[1]
        top = M[: dims + self.constant]  # rows of A′'s dims, then the row of the constant
        if self.correction.classic:
            P = None
        elif self.correction.target == "self":
            P = top[:, :dims] @ self.W.T
        else:
            after = dims + self.constant
            P = top[:, after:after + dims] @ self.W.T
            if self.correction.residual:
                P += top[:, after + dims:]
        if not self.constant:
            return Statistics(M[:, :dims], P, None, None)
        count = M[dims, dims].clamp_min(1.0)
        mean = M[dims, :dims] / count
        target_mean = P[dims] / count if P is not None else self.W @ mean
        G = M[:dims, :dims] - count * torch.outer(mean, mean)
        if P is not None:
            P = P[:dims] - count * torch.outer(mean, target_mean)
        return Statistics(G, P, mean, target_mean)

    def _gram(self, M, centre_on=None):
        """G′ from the products M alone; with a constant, centred on the mean of the products
        `centre_on` (None: M's own): Σ(a − c)(a − c)ᵀ = Σaaᵀ − m(ācᵀ + cāᵀ − ccᵀ)."""
        dims = self.W.shape[1]
        if not self.constant:
            return M[:dims, :dims]
        count = M[dims, dims]
        mean = M[dims, :dims] / count.clamp_min(1.0)
        c = mean if centre_on is None else centre_on[dims, :dims] / centre_on[dims, dims].clamp_min(1.0)
        return M[:dims, :dims] - count * (torch.outer(mean, c) + torch.outer(c, mean) - torch.outer(c, c))

    def _output_weight(self):
        """W in the columns the ID was taken on (divided by the neuron scaling)."""
        return self.W if self.dim_scale is None else self.W / torch.where(self.dim_scale > 0, self.dim_scale, 1)

    def output_errors(self):
        """[i] = ‖(ID residual) W_droppedᵀ‖_F when the best i units are kept, i = 0..n (held out
        with held_out_prices)."""
        if self.prices is not None:
            return self.prices[1].cpu().numpy()
        return self.factor.output_errors(self._output_weight())[:: self.unit_dims].cpu().numpy()

    def pivots(self):
        """What each successive unit of the (scaled) ID adds, non-increasing."""
        return self.factor.pivots().cpu().numpy()

    def errors(self):
        """[k] = error of the (scaled) ID that keeps the first k columns, k = 0..n (held out with
        held_out_prices)."""
        if self.prices is not None:
            return self.prices[0].cpu().numpy()
        return self.factor.errors().cpu().numpy()

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
        """Keep the best k units: (kept units, sorted; the corrected W; the new bias, or None
        for the bias as it is)."""
        order = self.order.cpu()
        if k == self.n and self.correction.target == "self":  # nothing dropped: nothing to correct
            return order.sort().values, self.W, None
        if self.correction.id_ridge == "heldout" and self.heldout is not None and 0 < k < self.n:
            order = self._choose_id_ridge(k)
        if self.correction.classic:
            kept, W_new = keep_units(self.W, order, self.unit_dims, k, self.coefficients(k))
        else:
            kept = order[:k].sort().values
            dims = expand_groups(kept, self.unit_dims).to(self.W.device)
            W_new = self._refit(dims)
        if not self.constant:
            return kept, W_new, None
        # the constant's coefficient: what the target's mean and the kept columns' leave over
        dims = expand_groups(kept, self.unit_dims).to(self.W.device)
        b = self.b if self.b is not None else self.W.new_zeros(self.W.shape[0])
        return kept, W_new, b + self.fit.target_mean - W_new @ self.fit.mean[dims]

    def _choose_id_ridge(self, k):
        """The ID's ridge for keeping k units, chosen among HELDOUT_RIDGES: for each, the units
        the ID of the fitting batches keeps, refitted on them, judged by the error left on the
        held-out batches (in HELDOUT_DIRECTIONS random output directions). Returns the order
        of the units under the chosen ridge, on all batches."""
        fit, held_out = self.heldout
        G_fit = self._scaled(fit.G)
        directions = random_directions(self.W.shape[0], HELDOUT_DIRECTIONS, self.W.dtype, self.W.device)
        errors = []
        for alpha in HELDOUT_RIDGES:
            kept = self._order(G_fit, alpha)[:k].sort().values
            dims = expand_groups(kept, self.unit_dims).to(self.W.device)
            (G, P), (G_h, P_h) = (_restricted(s, dims) for s in (fit, held_out))
            W0t = self.W[:, dims].T
            if directions is not None:
                P, P_h, W0t = P @ directions, P_h @ directions, W0t @ directions
            Wt = ridge_fit(G, P, W0t.T, self._refit_ridge(alpha)).T
            errors.append(heldout_error(G_h, P_h, Wt))
        del G_fit
        self.chosen_ridge = HELDOUT_RIDGES[min(range(len(errors)), key=errors.__getitem__)]
        return self._order(self._scaled(self.fit.G), self.chosen_ridge)

    def _refit_ridge(self, id_ridge):
        """The refit's ridge: the correction's number, else the ID's (its coefficients' ridge)."""
        return id_ridge if self.correction.ridge is None else float(self.correction.ridge)

    def _refit(self, dims):
        W_kept = self.W[:, dims]
        if len(dims) == 0:
            return W_kept
        alpha = self.correction.ridge
        if alpha is None:
            alpha = self.chosen_ridge if self.correction.id_ridge == "heldout" and self.chosen_ridge \
                else self.correction.relative_id_ridge
        elif alpha == "heldout":
            alpha = RIDGE if self.heldout is None else choose_ridge(
                *(_restricted(s, dims) for s in self.heldout), W_kept, HELDOUT_RIDGES, HELDOUT_DIRECTIONS)
            self.chosen_ridge = alpha
        G, P = _restricted(self.fit, dims)
        return ridge_fit(G, P, W_kept, alpha)

    def to(self, device):
        """Move what the decision holds (W, R: n × n floats, the refit's statistics) to `device`."""
        self.W = self.W.to(device)
        if self.b is not None:
            self.b = self.b.to(device)
        self.factor.R = self.factor.R.to(device)
        if self.dim_scale is not None:
            self.dim_scale = self.dim_scale.to(device)
        if self.fit is not None:
            self.fit = self.fit.to(device)
        if self.heldout is not None:
            self.heldout = tuple(s.to(device) for s in self.heldout)
        return self


@dataclass
class Statistics:
    """What a refit needs: G′ = A′ᵀA′, P = A′ᵀY (centred when there is a constant), and the
    means of A′ and of the target Y (None without a constant)."""

    G: torch.Tensor
    P: torch.Tensor
    mean: torch.Tensor
    target_mean: torch.Tensor

    def to(self, device):
        return Statistics(*(None if t is None else t.to(device) for t in (self.G, self.P, self.mean,
                                                                          self.target_mean)))


def _restricted(statistics, dims):
    return statistics.G[dims][:, dims], statistics.P[dims]


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


def choose_ridge(fit, held_out, W0, alphas, directions=None, seed=0):
    """The alpha of `alphas` whose ridge_fit on `fit` (G, P) reproduces the target best on
    `held_out` (G_h, P_h): ‖A_h Wᵀ − Y_h‖² = tr(W G_h Wᵀ) − 2 tr(W P_h) + const.

    directions: compare the errors in that many random directions of the output space
    (Gaussian, seeded: an unbiased estimate, the same for every alpha) rather than in all of
    it, which makes each candidate cost one Cholesky factorisation of G and little more.
    """
    (G, P), (G_h, P_h) = fit, held_out
    W0t = W0.T
    omega = random_directions(P.shape[1], directions, P.dtype, P.device, seed) if directions else None
    if omega is not None:
        P, P_h, W0t = P @ omega, P_h @ omega, W0t @ omega
    errors = [heldout_error(G_h, P_h, ridge_fit(G, P, W0t.T, alpha).T) for alpha in alphas]
    return alphas[min(range(len(alphas)), key=errors.__getitem__)]


def random_directions(out, count, dtype, device, seed=0):
    """`count` seeded Gaussian directions of an output space of size `out` (out × count), or
    None when there are not more outputs than that: errors compared in them are an unbiased
    estimate of the errors in the whole space, at a fraction of the cost."""
    if count >= out:
        return None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(out, count, generator=generator, dtype=dtype).to(device)


def heldout_error(G_h, P_h, Wt):
    """‖A_h Wt − Y_h‖² − ‖Y_h‖² from G_h = A_hᵀA_h and P_h = A_hᵀY_h (the constant dropped: it
    is the same for every candidate)."""
    return float((Wt * (G_h @ Wt)).sum() - 2 * (Wt * P_h).sum())


class MagnitudePruner:
    """The baseline: units ranked by the norms of their weights, no correction."""

    def __init__(self, W, unit_norms, unit_dims=1):
        self.W = W.detach().double()
        self.unit_dims = unit_dims
        self.order = torch.argsort(unit_norms.cpu(), descending=True, stable=True)

    def prune(self, k):
        return (*keep_units(self.W, self.order, self.unit_dims, k), None)
