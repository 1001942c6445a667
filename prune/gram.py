"""Streaming Gram matrices: G = AᵀA accumulated batch by batch, never holding A.

Every decision STAT makes depends on the activations A (tokens × units) only through G, so
memory is O(units²) whatever the number of calibration tokens.
"""
import math
from dataclasses import dataclass, replace

import torch

SKETCHES = ("gaussian", "count")
# the Gram's column panels: narrow enough to skip most of the upper triangle, wide enough for
# BLAS to run at its matrix-matrix rate (256 measured best of 128-1024 at n = 576-8192)
BLOCK = 256


@dataclass(frozen=True)
class Sketch:
    """A row sketch applied to every batch before its Gram product (E[(SA)ᵀ(SA)] = AᵀA).

    gaussian: each window (a sequence of the batch; its padding excluded) becomes `rows` rows,
      S A with S Gaussian, scaled by 1/√rows, as the authors' OPT code compresses each
      2048-token window to 100 rows: the Gram then costs T·rows·n + (T·rows/w)·n² for T tokens
      in windows of w, against T·n² (a window of at most `rows` tokens is kept as it is);
    count: each batch becomes `rows` rows, every row landing in one random bucket with a random
      sign (CountSketch: O(T·n)).
    The random draws follow `seed`."""

    kind: str
    rows: int
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SKETCHES:
            raise ValueError(f"unknown sketch {self.kind!r}: choose from {', '.join(SKETCHES)}")
        if self.rows < 1:
            raise ValueError(f"a sketch needs at least one row, not {self.rows}")

    def reseeded(self, offset):
        return replace(self, seed=self.seed + offset)

    def rows_kept(self, tokens_per_window):
        """How many rows the sketch leaves of windows with these numbers of real tokens (a
        CountSketch takes the batch's windows together)."""
        if self.kind == "count":
            return min(sum(tokens_per_window), self.rows)
        return sum(min(tokens, self.rows) for tokens in tokens_per_window)


class Gram:
    """Accumulates G = AᵀA over batches of rows of A, in float64 (and, with `extra` columns,
    the cross products AᵀB with other rows B that come with A: `cross`); in float32 where
    memory matters more than the last digits (`dtype`: the folds of held-out prices).

    Each batch's product is formed in float32 (fast on any device, and the per-batch sum is
    short) and added into the float64 accumulator, where the long sum over batches happens.
    G is symmetric, so only its column panels of BLOCK on and below the diagonal are formed
    (about half the flops; the upper triangle is mirrored once, when `products` is read):
    0.6x the time of torch's whole product at n = 1536 on the CPU of docs/results.md. (BLAS's
    ssyrk through scipy fights torch's thread pool.)
    With a `sketch` (Sketch), each batch is first compressed; A and B are sketched together
    (the same draws), so AᵀB stays unbiased too.
    """

    def __init__(self, n, device="cpu", sketch=None, extra=0, dtype=torch.float64):
        self.n = n
        self.extra = extra
        self.device = torch.device(device)
        self._products = torch.zeros(n, n + extra, dtype=dtype, device=device)
        self._mirrored = True  # whether the upper triangle of G is up to date
        self.rows = 0
        self.sketch = sketch
        self.generator = torch.Generator(device=device).manual_seed(sketch.seed) if sketch else None

    @property
    def products(self):
        """[G, AᵀB] (n × (n + extra)), G whole."""
        if not self._mirrored:
            G = self._products[:, : self.n]
            for start in range(0, self.n, BLOCK):
                end = min(start + BLOCK, self.n)
                G[start:end, end:] = G[end:, start:end].T
            self._mirrored = True
        return self._products

    @property
    def G(self):
        return self.products[:, : self.n]

    @property
    def cross(self):
        return self.products[:, self.n:]

    def add_batch(self, A, mask=None, B=None):
        """A: (..., n) activations (windows: (batch, sequence, n)); mask: (...) bool, True for
        rows that count (not padding); B: (..., extra) the other rows whose cross products with
        A are accumulated."""
        if B is not None:
            A = torch.cat([A, B.to(A)], dim=-1)
        if self.n == 0:  # a block with no units left has nothing to accumulate
            return
        A = A.to(device=self.device, dtype=torch.float32)
        if mask is not None:
            mask = mask.to(self.device)
        if self.sketch is not None and self.sketch.kind == "gaussian":
            self.rows += int(mask.sum()) if mask is not None else A.shape[:-1].numel()
            A = gaussian_sketch(A, mask, self.sketch.rows, self.generator)
        else:
            if mask is not None:
                A = A[mask]
            A = A.reshape(-1, self.n + self.extra)
            self.rows += A.shape[0]
            if self.sketch is not None and A.shape[0] > self.sketch.rows:
                A = count_sketch(A, self.sketch.rows, self.generator)
        if A.shape[0]:
            self._add_products(A)

    def _add_products(self, A):
        """products += A[:, :n]ᵀ A, G's panels on and below the diagonal only."""
        P, n = self._products, self.n
        for start in range(0, n, BLOCK):
            end = min(start + BLOCK, n)
            panel = A[:, start:n].T @ A[:, start:end]
            P[start:, start:end] += panel  # float32 product, added in P's precision
        if self.extra:
            P[:, n:] += A[:, :n].T @ A[:, n:]
        self._mirrored = False


def gaussian_sketch(A, mask, rows, generator):
    """Each window of A (..., length, n) compressed to `rows` rows S·A, S Gaussian / √rows (its
    padded positions, per `mask`, left out); returns (windows·rows, n). Windows of at most
    `rows` positions are returned as they are (their real rows)."""
    n = A.shape[-1]
    length = A.shape[-2] if A.dim() > 1 else 1
    windows = A.reshape(-1, length, n)
    if mask is not None:
        mask = mask.reshape(-1, length)
    if length <= rows:
        return windows[mask] if mask is not None else windows.reshape(-1, n)
    if mask is not None:
        windows = windows * mask[..., None].to(windows.dtype)
    S = torch.randn(windows.shape[0], rows, length, generator=generator, device=A.device, dtype=A.dtype)
    return (S @ windows).reshape(-1, n) / math.sqrt(rows)


def count_sketch(A, k, generator):
    """Compress the rows of A to k rows: S A with one ±1 per column of S."""
    m = A.shape[0]
    bucket = torch.randint(0, k, (m,), generator=generator, device=A.device)
    sign = torch.randint(0, 2, (m,), generator=generator, device=A.device).to(A.dtype) * 2 - 1
    return torch.zeros(k, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, bucket, A * sign[:, None])
