"""Interpolative decompositions (IDs) computed from a Gram matrix G = AᵀA.

A rank-k column ID of A keeps columns J and writes A ≈ A[:, J] T. Column-pivoted QR of A,
A P = Q R, picks J = P[:k] greedily and gives T[:, not J] = R11⁻¹ R12. The pivoted Cholesky
factorisation of G = AᵀA produces the same permutation and the same R (in exact arithmetic),
so the whole ID is available from G alone. Everything here works on an `Factor`:
an order of the columns and the upper-triangular R with G[order][:, order] = RᵀR.

What R gives, for the first k columns of the order kept:
- coefficients of the dropped columns on the kept ones: R[:k, :k]⁻¹ R[:k, k:];
- the squared error of the ID, ‖A[:, dropped] − A[:, kept] T‖²_F = ‖R[k:, k:]‖²_F, i.e. the
  sum of squared entries of rows k.. of R (R is upper triangular), for every k at once;
- the error in the space of a following linear map W (out × n): ‖(residual) W[:, dropped]ᵀ‖_F
  = ‖R[k:, :] W[:, order]ᵀ‖_F, because R[k:, :k] = 0.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import lapack

RIDGE = 1e-8  # relative to the mean diagonal of G: keeps the factors defined for rank-deficient G


def ridge_of(G, relative=RIDGE):
    """The absolute ridge: `relative` times the mean diagonal of G.

    A larger relative ridge is a regularised ID: the coefficients solve the ridge regression of
    the dropped columns on the kept ones, the greedy order favours columns that ridge cannot
    explain, and errors() prices each truncation by that regression's objective."""
    mean_diagonal = float(torch.diagonal(G).mean())
    return relative * mean_diagonal if mean_diagonal > 0 else relative


@dataclass
class Factor:
    order: torch.Tensor  # (n,) long: columns in the order they are kept
    R: torch.Tensor  # (n, n) float64 upper triangular, G[order][:, order] + ridge I = RᵀR
    ridge: float = 0.0

    @property
    def n(self):
        return self.order.numel()

    def pivots(self):
        """|diag R|: what each successive column adds (non-increasing for a pivoted factor)."""
        return torch.diagonal(self.R).abs()

    def errors(self):
        """errors()[k] = Frobenius error of the ID that keeps the first k columns, k = 0..n.

        The ridge adds ridge·(n − k) to ‖R[k:, k:]‖², which is taken off again, and the value
        left exceeds the true squared error of the ID by ridge·‖T‖²_F: negligible unless the
        kept columns are nearly dependent.
        """
        dropped = torch.arange(self.n, -1, -1, dtype=torch.float64, device=self.R.device)
        return _tail_norms(self.R, self.ridge * dropped)

    def output_errors(self, W):
        """output_errors(W)[k] = ‖(ID residual) W[:, dropped]ᵀ‖_F when the first k columns are kept."""
        W = W.detach().to(device=self.R.device, dtype=torch.float64)[:, self.order.to(self.R.device)]
        column_sq = (W ** 2).sum(dim=0)
        ridge_part = self.ridge * torch.cat([_suffix_sums(column_sq), column_sq.new_zeros(1)])
        return _tail_norms(self.R @ W.T, ridge_part)

    def heldout_gram(self, G_held):
        """M = R⁻ᵀ G_held R⁻¹ for the Gram G_held of other rows of A (columns in the original
        order): B = A_held R⁻¹ has BᵀB = M, and heldout_errors reads the ID's errors on those
        rows off it."""
        order = self.order.to(self.R.device)
        X = G_held.to(device=self.R.device, dtype=torch.float64)[order[:, None], order]  # one copy
        X = torch.linalg.solve_triangular(self.R, X, upper=True, left=False)  # G_held R⁻¹
        return torch.linalg.solve_triangular(self.R.T, X, upper=False)

    def heldout_errors(self, M, W=None):
        """[k] = Frobenius error that the ID fitted here (the first k columns kept, coefficients
        R[:k,:k]⁻¹R[:k,k:]) leaves on other rows of A, given M = heldout_gram(their Gram);
        with W, the error after the following linear map, as in output_errors. k = 0..n.

        Writing the other rows as B R, the ID's residual on them is B[:, k:] R[k:, k:]
        (R[k:, :k] = 0), whose squared norm is the sum over the trailing block [k:, k:] of
        M ∘ N with N = R Rᵀ (or V Vᵀ with V = R Wᵀ, as R[k:, :] Wᵀ = R[k:, k:] W[:, dropped]ᵀ):
        every k from one n × n product.
        """
        V = self.R if W is None else self.R @ W.detach().to(self.R)[:, self.order.to(self.R.device)].T
        H = V @ V.T
        H *= M
        H = torch.flip(H, [0, 1])  # one copy; then summed in place from the old bottom-right corner
        tail = torch.flip(H.cumsum_(0).cumsum_(1).diagonal(), [0])
        return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()

    def coefficients(self, k):
        """T (k × (n−k)): A[:, order[k:]] ≈ A[:, order[:k]] T, least squares."""
        if k == 0 or k == self.n:
            return self.R.new_zeros(k, self.n - k)
        return torch.linalg.solve_triangular(self.R[:k, :k], self.R[:k, k:], upper=True)


def _suffix_sums(v):
    return torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0])


def _tail_norms(M, minus=0.0):
    """sqrt(sum of squared entries of rows k.. of M − minus[k]), for k = 0..rows."""
    tail = _suffix_sums((M.double() ** 2).sum(dim=1))
    return (torch.cat([tail, tail.new_zeros(1)]) - minus).clamp_min(0).sqrt()


def pivoted_factor(G, relative_ridge=RIDGE):
    """Greedy column order and R factor of G + ridge·I (the pivoted QR of A, from G only).

    LAPACK's dpstrf is the blocked pivoted Cholesky. With the ridge added every pivot is at
    least the ridge in exact arithmetic, so it is told to go on until then; should rounding
    stop it earlier (a Gram of fewer tokens than units, with a huge dynamic range), the
    columns left carry no information and get the factor of the ridge alone.
    """
    device = G.device
    ridge = ridge_of(G, relative_ridge)
    # copied in Fortran order, which LAPACK factors where it lies (given C order it would copy
    # it again); the lower factor L it leaves there is R = Lᵀ in C order: no copy to transpose
    Gr = np.array(G.detach().to("cpu", torch.float64).numpy(), order="F")
    Gr[np.diag_indices_from(Gr)] += ridge
    c, piv, rank, info = lapack.dpstrf(Gr, lower=1, tol=ridge / 2, overwrite_a=1)
    if info < 0:
        raise ValueError(f"dpstrf failed: illegal argument {-info}")
    R = torch.from_numpy(c.T).triu_()
    R[rank:, :] = 0.0
    R[range(rank, len(R)), range(rank, len(R))] = ridge ** 0.5
    order = torch.from_numpy(piv.astype(np.int64) - 1)
    return Factor(order=order, R=R.to(device), ridge=ridge)


def ordered_factor(G, order, relative_ridge=RIDGE):
    """R factor of G + ridge·I with the columns in a given order (no pivoting): used when the order is
    chosen at a coarser level (whole heads) and the fit is on the individual dimensions."""
    G = G.double()
    order = order.to(G.device)
    Gp = G[order][:, order]
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    ridge = first = ridge_of(G, relative_ridge)
    for attempt in range(8):  # a rank-deficient G rounded to float32 may be slightly indefinite
        L, info = torch.linalg.cholesky_ex(Gp + ridge * eye)
        if int(info) == 0:
            if attempt:
                # the same words for every block, so that a run prints it once, not once per layer
                warnings.warn(f"a Gram matrix was indefinite after rounding (rank-deficient activations): its "
                              f"ridge was raised to {ridge / first:.0e} times the one asked for", RuntimeWarning,
                              stacklevel=2)
            return Factor(order=order.cpu(), R=L.T.contiguous(), ridge=ridge)
        ridge *= 100
    raise ValueError("Gram matrix is not positive semi-definite (NaN or Inf in activations?)")


def group_gram(G, group_size):
    """Gram of whole groups of consecutive columns (heads): entry (a, b) is the trace of block (a, b).

    It is the Gram of the matrix whose columns are whole groups flattened over tokens and dims.
    """
    n_groups = G.shape[0] // group_size
    blocks = G.reshape(n_groups, group_size, n_groups, group_size)
    return torch.diagonal(blocks, dim1=1, dim2=3).sum(-1)


def expand_groups(group_order, group_size):
    """Column order of the dims when whole groups are taken in `group_order`."""
    offsets = torch.arange(group_size)
    return (group_order[:, None] * group_size + offsets[None, :]).reshape(-1)
