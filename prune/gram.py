"""Streaming Gram matrices: G = AᵀA accumulated batch by batch, never holding A.

Every decision STAT makes depends on the activations A (tokens × units) only through G, so
memory is O(units²) whatever the number of calibration tokens.
"""
import torch
from scipy.linalg import blas


class Gram:
    """Accumulates G = AᵀA over batches of rows of A, in float64.

    Each batch's product is formed in float32 (fast on any device, and the per-batch sum is
    short) and added into the float64 accumulator, where the long sum over batches happens.
    On the CPU the product is BLAS's ssyrk, which forms one triangle only: half the work.
    With `sketch_rows`, each batch of m rows is first compressed to that many rows by a
    CountSketch (every row lands in one random bucket with a random sign), so E[(SA)ᵀ(SA)] = AᵀA
    at O(m·n) cost instead of O(m·n²): an option for very long calibration sets, not the default.
    """

    def __init__(self, n, device="cpu", sketch_rows=None, seed=0):
        self.n = n
        self.device = torch.device(device)
        self._sum = torch.zeros(n, n, dtype=torch.float64, device=device)  # lower triangle on the CPU
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
        A = A.to(device=self.device, dtype=torch.float32)
        if self.sketch_rows and A.shape[0] > self.sketch_rows:
            A = count_sketch(A, self.sketch_rows, self.generator)
        if self.device.type == "cpu":
            # ssyrk on the (n × m, Fortran-ordered) transpose fills the upper triangle of AᵀA;
            # read back transposed, that is the lower triangle of a C-ordered array
            upper = blas.ssyrk(1.0, A.contiguous().numpy().T, trans=0, lower=0)
            self._sum.add_(torch.from_numpy(upper.T))
        else:
            self._sum.add_(A.T @ A)

    @property
    def G(self):
        if self.device.type != "cpu":
            return self._sum
        lower = torch.tril(self._sum)
        return lower + torch.tril(lower, -1).T


def count_sketch(A, k, generator):
    """Compress the rows of A to k rows: S A with one ±1 per column of S."""
    m = A.shape[0]
    bucket = torch.randint(0, k, (m,), generator=generator, device=A.device)
    sign = torch.randint(0, 2, (m,), generator=generator, device=A.device).to(A.dtype) * 2 - 1
    return torch.zeros(k, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, bucket, A * sign[:, None])
