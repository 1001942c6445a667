"""Removing units of one block: FFN neurons, or attention units (heads, or KV groups).

A block has n units feeding one linear map W (out × n·unit_dims): the FFN output projection,
or the attention output projection. Pruning keeps k units and replaces W by the weight that
best reproduces W's output from the kept units alone.

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
`MagnitudePruner` is the baseline: units ranked by the norms of their weights, uncorrected.
"""
import torch

from prune.gram import Gram
from prune.interpolative import expand_groups, group_gram, ordered_factor, pivoted_factor


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
    (neurons) rather than on whole units of A (attention units).
    """

    def __init__(self, W, unit_dims=1, scale_by_weight=False, sketch_rows=None, sketch_seed=0):
        self.W = W.detach().double()
        self.unit_dims = unit_dims
        self.scale_by_weight = scale_by_weight
        self.n = W.shape[1] // unit_dims
        self.gram = Gram(W.shape[1], W.device, sketch_rows, sketch_seed)
        self.order = self.factor = self.dim_scale = None

    @classmethod
    def neurons(cls, W, sketch_rows=None, sketch_seed=0):
        return cls(W, 1, scale_by_weight=True, sketch_rows=sketch_rows, sketch_seed=sketch_seed)

    @classmethod
    def attention(cls, W, unit_dims, sketch_rows=None, sketch_seed=0):
        return cls(W, unit_dims, scale_by_weight=False, sketch_rows=sketch_rows, sketch_seed=sketch_seed)

    def add_batch(self, A, mask=None):
        """A: (..., n·unit_dims) inputs of the consumer; mask: (...) bool, True for real tokens."""
        self.gram.add_batch(A, mask)

    def solve(self):
        """Factor the Gram once: the order of the units and R (the Gram is freed)."""
        G, self.gram = self.gram.G, None
        if self.scale_by_weight:
            scale = self.W.norm(dim=0).to(G.device)
            G *= scale[:, None]
            G *= scale[None, :]  # in place: a Gram is the largest matrix here
            self.factor = pivoted_factor(G)
            self.order, self.dim_scale = self.factor.order, scale
        else:
            self.order = pivoted_factor(group_gram(G, self.unit_dims)).order
            self.factor = ordered_factor(G, expand_groups(self.order, self.unit_dims))
        return self

    def output_errors(self):
        """[i] = ‖(ID residual) W_droppedᵀ‖_F when the best i units are kept, i = 0..n."""
        return self.factor.output_errors(self.W)[:: self.unit_dims].cpu().numpy()

    def pivots(self):
        """What each successive unit of the (scaled) ID adds, non-increasing."""
        return self.factor.pivots().cpu().numpy()

    def errors(self):
        """[k] = error of the (scaled) ID that keeps the first k columns, k = 0..n."""
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
        """Keep the best k units: (kept units, sorted; the corrected W)."""
        return keep_units(self.W, self.order.cpu(), self.unit_dims, k, self.coefficients(k))

    def to(self, device):
        """Move what the decision holds (W, R: n × n floats) to `device`."""
        self.W = self.W.to(device)
        self.factor.R = self.factor.R.to(device)
        if self.dim_scale is not None:
            self.dim_scale = self.dim_scale.to(device)
        return self


class MagnitudePruner:
    """The baseline: units ranked by the norms of their weights, no correction."""

    def __init__(self, W, unit_norms, unit_dims=1):
        self.W = W.detach().double()
        self.unit_dims = unit_dims
        self.order = torch.argsort(unit_norms.cpu(), descending=True, stable=True)

    def prune(self, k):
        return keep_units(self.W, self.order, self.unit_dims, k)
