"""GPTQ (Frantar et al. 2022): one-shot quantization of an nn.Linear from calibration inputs.

Statistics accumulate with `GPTQ.add_batch`, then `GPTQ.quantize` makes one pass over the columns,
rounding each to a uniform min-max grid and moving the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's squared output error.
`rtn_quantize` is the round-to-nearest baseline on the same grid.

Arithmetic is float32 for float16/bfloat16/float32 layers (float64 layers stay float64, which lets
tests compare against exact references). The dequantized weight is written back into the layer in
its own dtype.

`reference=True` (`--gptq_reference`) does what the reference implementation (IST-DASLab/gptq,
which the authors' scripts copy) does where this one chose otherwise, so that both give the same
weights on the same inputs (tests/test_gptq.py transcribes the reference step by step):
- the symmetric grid: a row with no negative weight keeps xmin = 0 (only rows with a negative
  weight get xmin = −xmax), so its grid, zero point in the middle, clips its top half; here
  every row gets the symmetric range [−max|w|, max|w|];
- the per-row grid (groupsize −1) is fitted on the weight before the columns of dead inputs are
  zeroed; here after;
- a group's grid is fitted on the weight as the reference reads it: a group that starts inside a
  block of columns sees those columns without the updates from earlier columns of the same block;
  here with every update so far applied, so that groups do not depend on the block size;
- the Hessian's running mean counts sequences (the leading dimension of a 3-D input), not rows;
  this only rescales H (and its dampening with it), which changes nothing but rounding;
- an all-zero row gets the range [−1, 1]; here any row whose step would be zero.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def check_bits(bits):
    """The one check of a bit width (the quantizer, the packer and the CLI all use it)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def check_groupsize(groupsize):
    """The one check of a group size (the quantizer and the CLI both use it)."""
    if groupsize != -1 and groupsize <= 0:
        raise ValueError(f"groupsize must be -1 (one group per row) or positive, got {groupsize}")


def default_group_index(columns: int, groupsize: int, device=None) -> torch.Tensor:
    """The group of each column when groups follow column order: col // groupsize (all 0 for -1)."""
    if groupsize == -1:
        return torch.zeros(columns, dtype=torch.long, device=device)
    return torch.arange(columns, device=device) // groupsize


class Quantizer:
    """Uniform grid scale * (q - zero), q in [0, 2^bits - 1], with one scale and zero per row.

    `find_params(w)` fits the grid to the rows of w (a whole weight or one group of its columns);
    `encode` / `decode` / `quantize` then apply it to any tensor with the same number of rows.
    """

    def __init__(self, bits: int, sym: bool = False, reference: bool = False):
        check_bits(bits)
        self.bits = bits
        self.sym = sym
        self.reference = reference  # the reference implementation's grid (module docstring)
        self.maxq = 2**bits - 1
        self.scale = None  # (rows, 1)
        self.zero = None  # (rows, 1), integer-valued

    def find_params(self, w: torch.Tensor) -> None:
        # The range always includes 0, so zero weights (pruned or dead inputs) stay exactly zero.
        xmin = w.min(dim=1).values.clamp(max=0)
        xmax = w.max(dim=1).values.clamp(min=0)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin) if self.reference else -xmax
        # An all-zero row (or one whose step underflows) would get scale 0 and divide by it.
        flat = (xmin == 0) & (xmax == 0) if self.reference else (xmax - xmin) / self.maxq == 0
        xmin = xmin.masked_fill(flat, -1)
        xmax = xmax.masked_fill(flat, 1)
        scale = (xmax - xmin) / self.maxq
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            # Clamped so the zero point always fits in `bits` bits, as storage packs it that way.
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        self.scale = scale.unsqueeze(1)
        self.zero = zero.unsqueeze(1)

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats of w's dtype) in [0, maxq]."""
        return torch.clamp(torch.round(w / self.scale) + self.zero, 0, self.maxq)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.scale * (q - self.zero)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized weight: w rounded to the nearest grid point."""
        return self.decode(self.encode(w))


@dataclass
class QuantResult:
    """What a quantized layer stores; the layer weight equals scales[:, g_idx] * (codes - zeros[:, g_idx])."""

    codes: torch.Tensor  # uint8 (rows, columns), original column order
    scales: torch.Tensor  # (rows, groups) in the compute dtype (float32 unless the layer is float64)
    zeros: torch.Tensor  # uint8 (rows, groups)
    g_idx: torch.Tensor  # long (columns,): the group whose scale and zero each column uses
    bits: int
    groupsize: int  # -1: one group per row
    sym: bool
    # GPTQ: the sum of the per-weight losses (w - q)^2 / [H^-1]_qq / 2, which totals
    # tr(dW H dW^T) / 2 with the dampened H, i.e. the mean squared output error over calibration
    # rows plus the dampening term. RTN has no Hessian: plain sum of (w - q)^2 (the same formula with H = 2I).
    error: float


class GPTQ:
    """GPTQ for one nn.Linear: feed its inputs with add_batch, then call quantize once.

    reference: behave as the reference implementation does (module docstring)."""

    def __init__(self, layer: nn.Linear, reference: bool = False):
        self.layer = layer
        self.reference = reference
        self.rows, self.columns = layer.weight.shape
        self.dtype = _compute_dtype(layer.weight.dtype)
        self.H = torch.zeros(self.columns, self.columns, dtype=self.dtype, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, mask: torch.Tensor = None) -> None:
        """Add inputs (..., in_features); mask (...) is True for rows to keep (False for padding)."""
        if self.H is None:
            raise RuntimeError("add_batch after free()")
        x = inp.reshape(-1, inp.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(x.device)]
        n = x.shape[0]
        if n == 0:
            return
        if self.reference:  # the reference counts sequences: the leading dim of (batch, seq, features)
            n = inp.shape[0] if inp.dim() == 3 else 1
        # A running mean over rows keeps H = 2 X X^T / n without holding X or growing with n.
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x.to(device=self.H.device, dtype=self.dtype) * math.sqrt(2 / self.nsamples)
        self.H += x.T @ x

    def free(self) -> None:
        self.H = None

    def quantize(
        self,
        wbits: int,
        groupsize: int = -1,
        sym: bool = False,
        act_order: bool = False,
        percdamp: float = 0.01,
        blocksize: int = 128,
    ) -> QuantResult:
        """Quantize the layer's weight in place (same dtype) and return its codes and grids."""
        if self.H is None:
            raise RuntimeError("quantize after free()")
        if self.nsamples == 0:
            raise RuntimeError("quantize needs at least one add_batch with a non-empty input")
        check_groupsize(groupsize)
        columns = self.columns
        device = self.H.device
        W = self.layer.weight.detach().to(self.dtype).clone()
        H = self.H.clone()
        quantizer = Quantizer(wbits, sym, self.reference)
        if self.reference and groupsize == -1:
            quantizer.find_params(W)  # the reference fits the row grid before dead columns are zeroed

        # An input that is always zero says nothing about the output: its weights can be dropped
        # for free, and a unit diagonal keeps H invertible.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        if act_order:
            # Rounding the most active inputs first leaves the most columns to absorb their error.
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        # Dampening keeps the inverse stable when calibration inputs are nearly collinear.
        diag = torch.arange(columns, device=device)
        H[diag, diag] += percdamp * torch.mean(torch.diag(H))
        # Row i of the upper Cholesky factor U of H^-1 is, divided by U[i, i], the row of the
        # inverse Hessian of the columns i.. once columns ..i-1 are fixed: all updates come from U.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        del H

        codes = torch.zeros(W.shape, dtype=torch.uint8, device=device)
        Q = torch.zeros_like(W)
        error = torch.zeros((), dtype=self.dtype, device=device)
        scales, zeros = [], []
        if groupsize == -1:
            if not self.reference:
                quantizer.find_params(W)
            scales.append(quantizer.scale)
            zeros.append(quantizer.zero)

        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if groupsize != -1 and col % groupsize == 0:
                    end = min(col + groupsize, columns)
                    group = W[:, col:end] if self.reference else _current_weights(W, W1, Err1, Hinv, i1, i2, col, end)
                    quantizer.find_params(group)
                    scales.append(quantizer.scale)
                    zeros.append(quantizer.zero)
                w = W1[:, i : i + 1]
                d = Hinv1[i, i]
                q = quantizer.encode(w)
                deq = quantizer.decode(q)
                codes[:, col : col + 1] = q.to(torch.uint8)
                Q[:, col : col + 1] = deq
                error += ((w - deq) ** 2).sum() / d**2 / 2
                err = (w - deq) / d
                # Later columns of this block absorb the error now; later blocks get all of the
                # block's errors in one matrix product below, which is the same sum reordered.
                W1[:, i + 1 :] -= err @ Hinv1[i : i + 1, i + 1 :]
                Err1[:, i : i + 1] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        g_idx = default_group_index(columns, groupsize, device)
        if act_order:
            # g_idx so far maps permuted positions to groups; index it by each original column's position.
            inverse = torch.argsort(perm)
            codes, Q, g_idx = codes[:, inverse], Q[:, inverse], g_idx[inverse]

        with torch.no_grad():
            self.layer.weight.copy_(Q.to(self.layer.weight.dtype))
        return QuantResult(
            codes=codes,
            scales=torch.cat(scales, dim=1),
            zeros=torch.cat(zeros, dim=1).to(torch.uint8),
            g_idx=g_idx,
            bits=wbits,
            groupsize=groupsize,
            sym=sym,
            error=error.item(),
        )


def _current_weights(W, W1, Err1, Hinv, i1, i2, start, end):
    """Columns start..end-1 of the weight with every error update so far applied.

    Columns inside the block are up to date in W1; those past it still lack this block's lazy
    update, which is applied here so group parameters do not depend on the block size.
    (The reference code reads W directly, so its groups that start mid-block see stale weights.)
    """
    inside = W1[:, start - i1 : min(end, i2) - i1]
    if end <= i2:
        return inside
    outside = W[:, i2:end] - Err1[:, : start - i1] @ Hinv[i1:start, i2:end]
    return torch.cat([inside, outside], dim=1)


def rtn_quantize(layer: nn.Linear, wbits: int, groupsize: int = -1, sym: bool = False,
                 reference: bool = False) -> QuantResult:
    """Round every weight to the nearest point of its row's (or group's) min-max grid
    (reference: the reference implementation's grid, see the module docstring)."""
    check_groupsize(groupsize)
    W = layer.weight.detach().to(_compute_dtype(layer.weight.dtype))
    columns = W.shape[1]
    step = columns if groupsize == -1 else groupsize
    quantizer = Quantizer(wbits, sym, reference)
    codes, Q, scales, zeros = [], [], [], []
    for start in range(0, columns, step):
        quantizer.find_params(W[:, start : start + step])
        q = quantizer.encode(W[:, start : start + step])
        codes.append(q)
        Q.append(quantizer.decode(q))
        scales.append(quantizer.scale)
        zeros.append(quantizer.zero)
    Q = torch.cat(Q, dim=1)
    error = ((W - Q) ** 2).sum().item()
    with torch.no_grad():
        layer.weight.copy_(Q.to(layer.weight.dtype))
    return QuantResult(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scales=torch.cat(scales, dim=1),
        zeros=torch.cat(zeros, dim=1).to(torch.uint8),
        g_idx=default_group_index(columns, groupsize, W.device),
        bits=wbits,
        groupsize=groupsize,
        sym=sym,
        error=error,
    )
