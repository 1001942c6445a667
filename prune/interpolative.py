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
# n × n work is gathered or converted between precisions a block of rows at a time, of at most this many
# bytes in float64, through one reused buffer: no whole copy beside it, and no pile of freed blocks (a fixed
# 1024 rows, a new block each time, left 0.25-0.6 n² of temporaries at n = 4096: benchmarks/bench_block.py)
BLOCK_BYTES = 1 << 22


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

    def heldout_errors(self, G_held, W=None, by="torch", destroy=False, scale=None):
        """[k] = Frobenius error that the ID fitted here (the first k columns kept, coefficients
        R[:k,:k]⁻¹R[:k,k:]) leaves on other rows of A, whose Gram is G_held (columns in the
        original order); with W, the error after the following linear map, as in output_errors.
        k = 0..n.

        Writing the other rows as B R, the ID's residual on them is B[:, k:] R[k:, k:]
        (R[k:, :k] = 0), whose squared norm is the sum over the trailing block [k:, k:] of
        M ∘ N, with M = BᵀB = R⁻ᵀ G_held R⁻¹ and N = R Rᵀ (or V Vᵀ with V = R Wᵀ, as
        R[k:, :] Wᵀ = R[k:, k:] W[:, dropped]ᵀ); both symmetric, so the sum is twice the upper
        triangle's less the diagonal, every k from one n × n product.
        With by='lapack' (on the host) M comes from LAPACK's dsygst (n³ flops, the reduction of
        a generalised symmetric eigenproblem: 0.6x the time of two triangular solves at n = 1536
        on the CPU of docs/results.md) and R Rᵀ from dlauum (n³/3 flops: a product would take
        2n³); with 'torch' M comes from two triangular solves in place (2n³) and R Rᵀ from a
        product, where R lies.
        It all runs in R's precision (a float32 R: ssygst and slauum), the sums in float64.
        destroy: R may be overwritten (a factor used for nothing else). scale: the columns'
        scaling that G_held gets first, as the Gram the factor was taken of (diag(s) G diag(s)).
        """
        X = _ordered_copy(G_held, self.order, self.R.device, self.R.dtype)  # becomes M
        if scale is not None:
            s = scale.to(X)[self.order.to(X.device)]
            X *= s[:, None]
            X *= s[None, :]
        V = None if W is None else self.R @ W.detach().to(self.R)[:, self.order.to(self.R.device)].T
        on_host = by == "lapack" and self.R.device.type == "cpu"
        if on_host:  # R⁻ᵀ X R⁻¹ in the upper triangle of X (a Fortran view of it: its lower one), in place
            sygst = lapack.ssygst if X.dtype == torch.float32 else lapack.dsygst
            M, info = sygst(X.numpy().T, self.R.numpy().T, itype=1, lower=1, overwrite_a=1)
            if info:
                raise ValueError(f"?sygst failed: illegal argument {-info}")
            X = torch.from_numpy(M.T)
        else:
            torch.linalg.solve_triangular(self.R, X, upper=True, left=False, out=X)  # X R⁻¹, in place
            torch.linalg.solve_triangular(self.R.T, X, upper=False, out=X)  # R⁻ᵀ X R⁻¹
        if V is not None:
            N = V @ V.T
        elif on_host:  # R Rᵀ in n³/3 flops, where R lies when allowed
            lauum = lapack.slauum if self.R.dtype == torch.float32 else lapack.dlauum
            N = torch.from_numpy(lauum(self.R.numpy().T, lower=1, overwrite_c=int(destroy))[0].T)
        else:
            N = self.R @ self.R.T
        X *= N  # only the upper triangle of LAPACK's R Rᵀ is right: it is all that is read
        del N
        rows = _row_sums(X.triu_())
        tail = 2 * _suffix_sums(rows) - _suffix_sums(X.diagonal().double())
        return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()

    def coefficients(self, k):
        """T (k × (n−k)): A[:, order[k:]] ≈ A[:, order[:k]] T, least squares."""
        if k == 0 or k == self.n:
            return self.R.new_zeros(k, self.n - k)
        return torch.linalg.solve_triangular(self.R[:k, :k], self.R[:k, k:], upper=True)


def _ordered_copy(G, order, device, dtype=torch.float64):
    """G[order][:, order] in `dtype` on `device`, built a block of rows at a time (G may be a
    float32 Gram: no whole float64 copy of it besides the result)."""
    n = len(order)
    order = order.to(G.device)
    X = torch.empty(n, n, dtype=dtype, device=device)
    step = _rows_per_block(n)
    rows = G.new_empty(min(step, n), G.shape[1])
    for start in range(0, n, step):
        picked = order[start:start + step]
        torch.index_select(G, 0, picked, out=rows[:len(picked)])
        X[start:start + len(picked)] = rows[:len(picked)].index_select(1, order)
    return X


def _rows_per_block(n):
    return max(1, BLOCK_BYTES // (8 * max(n, 1)))


def _row_sums(X):
    """X.sum(dim=1) in float64, a block of rows at a time (no whole float64 copy of a float32 X)."""
    step = _rows_per_block(X.shape[-1])
    block = X.new_empty(min(step, len(X)), X.shape[-1], dtype=torch.float64)
    sums = X.new_empty(len(X), dtype=torch.float64)
    for start in range(0, len(X), step):
        end = min(start + step, len(X))
        part = block[:end - start]
        part.copy_(X[start:end])
        torch.sum(part, dim=1, out=sums[start:end])
    return sums


def add_rows(total, part):
    """total += part, a block of rows at a time: a part in another precision (float32 into
    float64) is converted a block at a time, not whole beside it."""
    step = _rows_per_block(total.shape[-1])
    block = total.new_empty(min(step, len(total)), total.shape[-1])
    for start in range(0, len(total), step):
        end = min(start + step, len(total))
        converted = block[:end - start]
        converted.copy_(part[start:end])
        total[start:end] += converted
    return total


def _suffix_sums(v):
    return torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0])


def _tail_norms(M, minus=0.0):
    """sqrt(sum of squared entries of rows k.. of M − minus[k]), for k = 0..rows."""
    tail = _suffix_sums((M.double() ** 2).sum(dim=1))
    return (torch.cat([tail, tail.new_zeros(1)]) - minus).clamp_min(0).sqrt()


FACTORS = ("auto", "torch", "lapack")  # who computes the pivoted Cholesky: see resolve_factor


def resolve_factor(factor, device):
    """'torch' or 'lapack' for `factor` in FACTORS. auto: torch where the Gram is on a GPU (it never
    leaves the device), LAPACK on the CPU, where it measured faster (benchmarks/bench_block.py, docs/results.md)."""
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}: choose from {', '.join(FACTORS)}")
    if factor == "auto":
        return "torch" if torch.device(device).type == "cuda" else "lapack"
    return factor


def pivoted_factor(G, relative_ridge=RIDGE, factor="lapack", stop_after=None, overwrite=False):
    """Greedy column order and R factor of G + ridge·I (the pivoted QR of A, from G only).

    factor: 'lapack' (scipy's dpstrf, on the host) or 'torch' (torch_pivoted_cholesky, where G
    lies). overwrite: G may be factored where it lies (else a copy is). With the ridge added
    every pivot is at least the ridge in exact arithmetic, so the factorisation goes on until
    then; should rounding stop it earlier (a Gram of fewer tokens than units, with a huge
    dynamic range), the columns left carry no information and get the factor of the ridge alone.
    stop_after: (torch) only the first k pivots; R[k:, k:] is then the Schur complement left,
    not a factor: enough for coefficients(k), not for errors().
    """
    ridge = ridge_of(G, relative_ridge)
    in_place = overwrite and G.dtype == torch.float64 and G.is_contiguous()
    if factor == "torch":
        order, R = torch_pivoted_cholesky(G.detach() if in_place else G.detach().to(torch.float64, copy=True), ridge,
                                          stop_after)
        return Factor(order=order.cpu(), R=R, ridge=ridge)
    if factor != "lapack":
        raise ValueError(f"unknown factor {factor!r}: 'torch' or 'lapack'")
    device = G.device
    # LAPACK factors a Fortran-ordered matrix where it lies: a symmetric C-ordered one is that
    # already (its transpose); the lower factor L it leaves there is R = Lᵀ in C order
    if in_place and G.device.type == "cpu":
        Gr = G.detach().numpy().T
    else:
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


@torch.no_grad()
def torch_pivoted_cholesky(G, ridge, stop_after=None, block=64):
    """(order, R): G[order][:, order] + ridge·I = RᵀR, R upper triangular, the columns taken
    greedily (the largest remaining diagonal, ties to the first) as LAPACK's dpstrf takes them,
    in place of G (float64, contiguous: overwritten) and on its device.

    Blocked as dpstrf is: within a panel of `block` pivots, each row of R is the row of the
    Schur complement as of the panel's start less the panel's rows above it (a matrix-vector
    product), and the candidates' diagonals are the panel start's less the squares of the
    panel's rows; after the panel one rank-`block` update of the trailing block, where the
    flops are. The pivot and the stop are tensors, never read on the host: no synchronisation
    per pivot. Like dpstrf told to stop at ridge/2, once no candidate exceeds it (or one is
    NaN) the pivoting stops, and the rows left get the factor of the ridge alone.
    stop_after: only that many pivots (R[k:, k:] is then the trailing Schur complement).
    """
    A = G
    n = A.shape[0]
    A.diagonal().add_(ridge)
    index = torch.arange(n, device=A.device)
    order = index.clone()
    stopped = torch.zeros((), dtype=torch.bool, device=A.device)
    last = n if stop_after is None else stop_after
    for start in range(0, last, block):
        end = min(start + block, last)
        work = torch.zeros(n - start, dtype=A.dtype, device=A.device)  # Σ of squares of the panel's rows
        for p in range(start, end):
            candidates = A.diagonal()[p:] - work[p - start:]
            best = torch.argmax(candidates)
            value = candidates[best]
            stopped |= ~(value > ridge / 2)
            pair = torch.stack([index[p], p + torch.where(stopped, 0, best)])
            _swap(A, pair)
            work[pair - start] = work[pair.flip(0) - start]
            order[pair] = order[pair.flip(0)]
            row = A[p, p + 1:] - A[start:p, p] @ A[start:p, p + 1:]
            pivot = torch.where(stopped, ridge, value).sqrt()
            row = torch.where(stopped, 0.0, row / pivot)
            A[p, p] = pivot
            A[p, p + 1:] = row
            work[p + 1 - start:] += row ** 2
        if end < n:  # the trailing block's rank-(end − start) update, both triangles (rows are swapped whole)
            panel = A[start:end, end:]
            A[end:, end:].addmm_(panel.T, panel, alpha=-1)
    return order, A.triu_()


def _swap(A, pair):
    """Swap rows and columns pair[0] and pair[1] of A, in place (indices as a device tensor)."""
    A.index_copy_(0, pair, A.index_select(0, pair.flip(0)))
    A.index_copy_(1, pair, A.index_select(1, pair.flip(0)))


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
