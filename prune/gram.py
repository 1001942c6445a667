"""Streaming Gram matrices: G = AᵀA accumulated batch by batch, never holding A.

Every decision STAT makes depends on the activations A (tokens × units) only through G, so
memory is O(units²) whatever the number of calibration tokens.
"""
import torch


class Gram:
    """Accumulates G = AᵀA over batches of rows of A, in float64.

    Each batch's product is formed in float32 (fast on any device, and the per-batch sum is
    short) and added into the float64 accumulator, where the long sum over batches happens.
    With `sketch_rows`, each batch of m rows is first compressed to that many rows by a
    CountSketch (every row lands in one random bucket with a random sign), so E[(SA)ᵀ(SA)] = AᵀA
    at O(m·n) cost instead of O(m·n²): an option for very long calibration sets, not the default.
    """

    def __init__(self, n, device="cpu", sketch_rows=None, seed=0):
        self.n = n
        self.G = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.rows = 0
        self.sketch_rows = sketch_rows
        self.generator = None
        if sketch_rows:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def add_batch(self, A, mask=None):
        """A: (..., n) activations; mask: (...) bool, True for rows that count (not padding)."""
        A = A.reshape(-1, self.n)
        if mask is not None:
            A = A[mask.reshape(-1).to(A.device)]
        self.rows += A.shape[0]
        if A.shape[0] == 0:
            return
        A = A.to(device=self.G.device, dtype=torch.float32)
        if self.sketch_rows and A.shape[0] > self.sketch_rows:
            A = count_sketch(A, self.sketch_rows, self.generator)
        self.G += (A.T @ A).double()


def count_sketch(A, k, generator):
    """Compress the rows of A to k rows: S A with one ±1 per column of S."""
    m = A.shape[0]
    bucket = torch.randint(0, k, (m,), generator=generator, device=A.device)
    sign = torch.randint(0, 2, (m,), generator=generator, device=A.device).to(A.dtype) * 2 - 1
    return torch.zeros(k, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, bucket, A * sign[:, None])
