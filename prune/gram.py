"""Streaming Gram matrices: G = AᵀA accumulated batch by batch, never holding A.

Every decision STAT makes depends on the activations A (tokens × units) only through G, so
memory is O(units²) whatever the number of calibration tokens.
"""
import torch


class Gram:
    """Accumulates G = AᵀA over batches of rows of A, in float64 (and, with `extra` columns,
    the cross products AᵀB with other rows B that come with A: `cross`).

    Each batch's product is formed in float32 (fast on any device, and the per-batch sum is
    short) and added into the float64 accumulator, where the long sum over batches happens.
    (BLAS's ssyrk would form one triangle only, half the work; but through scipy on the CPU
    its thread pool fights torch's between batches, and measured twice as slow overall.)
    With `sketch_rows`, each batch of m rows is first compressed to that many rows by a
    CountSketch (every row lands in one random bucket with a random sign), so E[(SA)ᵀ(SA)] = AᵀA
    at O(m·n) cost instead of O(m·n²): an option for very long calibration sets, not the default.
    A and B are sketched together (the same buckets and signs), so AᵀB stays unbiased too.
    """

    def __init__(self, n, device="cpu", sketch_rows=None, seed=0, extra=0):
        self.n = n
        self.extra = extra
        self.device = torch.device(device)
        self.products = torch.zeros(n, n + extra, dtype=torch.float64, device=device)
        self.rows = 0
        self.sketch_rows = sketch_rows
        self.generator = None
        if sketch_rows:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def G(self):
        return self.products[:, : self.n]

    @property
    def cross(self):
        return self.products[:, self.n:]

    def add_batch(self, A, mask=None, B=None):
        """A: (..., n) activations; mask: (...) bool, True for rows that count (not padding);
        B: (..., extra) the other rows whose cross products with A are accumulated."""
        if B is not None:
            A = torch.cat([A, B.to(A)], dim=-1)
        if mask is not None:
            A = A[mask.to(A.device)]
        rows = A.shape[:-1].numel()
        self.rows += rows
        if rows == 0 or self.n == 0:  # a block with no units left has nothing to accumulate
            return
        A = A.reshape(rows, self.n + self.extra)
        A = A.to(device=self.device, dtype=torch.float32)
        if self.sketch_rows and A.shape[0] > self.sketch_rows:
            A = count_sketch(A, self.sketch_rows, self.generator)
        self.products.add_(A[:, : self.n].T @ A)


def count_sketch(A, k, generator):
    """Compress the rows of A to k rows: S A with one ±1 per column of S."""
    m = A.shape[0]
    bucket = torch.randint(0, k, (m,), generator=generator, device=A.device)
    sign = torch.randint(0, 2, (m,), generator=generator, device=A.device).to(A.dtype) * 2 - 1
    return torch.zeros(k, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, bucket, A * sign[:, None])
