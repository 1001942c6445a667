"""Choosing and removing units of one block: FFN neurons, or attention heads (KV groups).

A block has n units feeding one linear map W (out × n·unit_dims): the FFN output projection,
or the attention output projection. Pruning keeps k units and replaces W by the weight that
best reproduces W's output from the kept units alone.

STAT (DESIGN.md §2):
- neurons: column ID of A·D with D = diag(‖W[:, j]‖), so a neuron counts by how much it
  writes into the residual stream; the correction is the plain least-squares one;
- heads: a pivoted QR over whole heads (the Gram of the heads is the matrix of traces of the
  head blocks of G), then each dropped head's dims are fitted on all the kept heads' dims.
The magnitude baseline keeps the units whose weights have the largest norms, uncorrected.
"""
import torch

from prune.interpolative import expand_groups, group_gram, ordered_factor, pivoted_factor


class UnitBlock:
    """The units of one block in the order they are kept, and how to remove the rest.

    order: (n,) units, most important first. factor: the Factor of the Gram over the block's
    input dims in that order (None: no correction). dim_scale: the column scaling the factor
    was computed with (neurons), undone in the correction.
    """

    def __init__(self, W, order, unit_dims=1, factor=None, dim_scale=None):
        self.W = W.detach().double()
        self.order = order.cpu()
        self.unit_dims = unit_dims
        self.factor = factor
        self.dim_scale = dim_scale
        self.n = order.numel()

    def to(self, device):
        """Move the tensors the block holds (a factor is n × n floats) to `device`."""
        self.W = self.W.to(device)
        if self.factor is not None:
            self.factor.R = self.factor.R.to(device)
        if self.dim_scale is not None:
            self.dim_scale = self.dim_scale.to(device)
        return self

    def prune(self, k):
        """Keep k units: returns (kept units, sorted; the new W of shape out × k·unit_dims)."""
        kept_units = self.order[:k]
        dims_in_order = expand_groups(self.order, self.unit_dims)
        kept_dims, dropped_dims = dims_in_order[: k * self.unit_dims], dims_in_order[k * self.unit_dims:]
        W = self.W
        W_new = W[:, kept_dims.to(W.device)]
        if self.factor is not None and 0 < k < self.n:
            T = self.factor.coefficients(k * self.unit_dims).to(W.device)
            if self.dim_scale is not None:  # T was fitted on scaled columns: undo the scaling
                s = self.dim_scale.to(W.device)
                s_kept, s_dropped = s[kept_dims], s[dropped_dims]
                T = s_kept[:, None] * T / torch.where(s_dropped > 0, s_dropped, 1)[None, :]
            W_new = W_new + W[:, dropped_dims.to(W.device)] @ T.T
        # Keep units in their original order, so a layer that keeps everything is unchanged.
        sort = torch.argsort(kept_units)
        dim_sort = expand_groups(sort, self.unit_dims)
        return kept_units[sort], W_new[:, dim_sort.to(W.device)]


def stat_neurons(G, W):
    """FFN neurons by the column ID of A·diag(‖W[:, j]‖), from G = AᵀA."""
    scale = W.detach().double().norm(dim=0).to(G.device)
    scaled = G * scale[:, None]
    scaled *= scale[None, :]  # in place: a Gram is the largest matrix here
    factor = pivoted_factor(scaled)
    del scaled
    return UnitBlock(W, factor.order, 1, factor, dim_scale=scale), factor


def stat_heads(G, W, unit_dims):
    """Heads (or KV groups of unit_dims dims) by a pivoted QR over whole units, from G = AᵀA."""
    unit_order = pivoted_factor(group_gram(G, unit_dims)).order
    factor = ordered_factor(G, expand_groups(unit_order, unit_dims))
    return UnitBlock(W, unit_order, unit_dims, factor), factor


def magnitude_units(W, unit_norms, unit_dims=1):
    """The baseline: units ranked by the norms of their weights, no correction."""
    order = torch.argsort(unit_norms.cpu(), descending=True, stable=True)
    return UnitBlock(W, order, unit_dims)
