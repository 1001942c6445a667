"""How many heads and neurons each layer keeps under a MAC budget μ (DESIGN.md §3).

Every allocator takes the per-layer scores of the dense model and the MAC cost of one unit,
and returns (heads_per_layer, neurons_per_layer) whose MACs do not exceed μ × the dense MACs.

- `faithful`: the rule of the authors' published code, read as a method. Scores are weighted
  to protect early layers; for each candidate total head count the budget fixes the neuron
  count, the kept heads and neurons are the globally best-scoring ones, and the chosen head
  count is the one whose head cut-off error is closest to twice the mean neuron ID error.
- `uniform`: every layer keeps the same share μ of its heads; neurons take the rest of the
  budget, spread evenly.
- `greedy`: a knapsack by estimated output error removed per MAC, over both kinds of unit.
- `ffn_greedy`: every head kept, the knapsack over neurons only (the decoders' default: see
  its docstring).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerScores:
    """What pass 1 measures on one dense layer.

    head_errors[i]: output-space error of keeping the best i heads (i = 0..H), non-increasing.
    neuron_pivots[j]: what the (j+1)-th neuron of the scaled ID adds, non-increasing.
    neuron_errors[k]: error of the scaled ID keeping k neurons (k = 0..N), non-increasing.
    """

    head_errors: np.ndarray
    neuron_pivots: np.ndarray
    neuron_errors: np.ndarray

    @property
    def n_heads(self):
        return len(self.head_errors) - 1

    @property
    def n_neurons(self):
        return len(self.neuron_pivots)


@dataclass
class Costs:
    """MACs of one head (or KV group) and of one FFN neuron, the same in every layer."""

    head: float
    neuron: float


def dense_macs(scores, costs):
    return sum(s.n_heads * costs.head + s.n_neurons * costs.neuron for s in scores)


def macs_of(heads, neurons, costs):
    return sum(heads) * costs.head + sum(neurons) * costs.neuron


# ---------------------------------------------------------------------------------------------
# Depth weighting


def depth_weights(scores, scheme):
    """Multipliers (for heads, for neurons) per layer that protect early layers.

    'sqrt' (BERT in the authors' code): sqrt(L − ℓ + 1) + 1 for layer ℓ = 1..L.
    'expfit' (OPT in the authors' code): divide each layer's scores by an exponential fit of
    their size over depth, since the residual stream, and every error measured in it, grows
    roughly geometrically with depth in a decoder.
    'none': no weighting.
    """
    L = len(scores)
    if scheme == "none":
        ones = np.ones(L)
        return ones, ones
    if scheme == "sqrt":
        w = np.sqrt(L - np.arange(1, L + 1) + 1) + 1
        return w, w
    if scheme == "expfit":
        head_size = np.array([s.head_errors[0] for s in scores])
        neuron_size = np.array([s.neuron_pivots.mean() if s.n_neurons else 0.0 for s in scores])
        return 1.0 / _exp_fit(head_size), 1.0 / _exp_fit(neuron_size)
    raise ValueError(f"unknown depth weighting {scheme!r}")


def _exp_fit(values):
    """exp(a + b·ℓ) fitted by least squares to log(values) over the layers with values > 0."""
    depth = np.arange(len(values), dtype=float)
    ok = values > 0
    if ok.sum() < 2:
        return np.ones(len(values))
    b, a = np.polyfit(depth[ok], np.log(values[ok]), 1)
    return np.exp(a + b * depth)


# ---------------------------------------------------------------------------------------------
# Allocators


def _owners_by_value(values, owners):
    """The owning layer of each unit, best value first (values of one layer are
    non-increasing, so the top units of each layer are a prefix of its order)."""
    return owners[np.argsort(-values, kind="stable")]


def faithful(scores, costs, mu, weighting="sqrt"):
    L = len(scores)
    w_head, w_neuron = depth_weights(scores, weighting)
    # value of the i-th head of a layer: the (weighted) error left when it is dropped too
    head_values = np.concatenate([w_head[l] * s.head_errors[:-1] for l, s in enumerate(scores)])
    head_owner = np.concatenate([np.full(s.n_heads, l) for l, s in enumerate(scores)])
    neuron_values = np.concatenate([w_neuron[l] * s.neuron_pivots for l, s in enumerate(scores)])
    neuron_owner = np.concatenate([np.full(s.n_neurons, l) for l, s in enumerate(scores)])
    sorted_head_values = np.sort(head_values)[::-1]
    heads_by_value = _owners_by_value(head_values, head_owner)
    neurons_by_value = _owners_by_value(neuron_values, neuron_owner)

    budget = mu * dense_macs(scores, costs)
    best = None
    for total_heads in range(len(head_values) + 1):
        left = budget - total_heads * costs.head
        if left < 0:
            break
        total_neurons = min(int(np.floor(left / costs.neuron + 1e-9)), len(neuron_values))
        heads = np.bincount(heads_by_value[:total_heads], minlength=L)
        neurons = np.bincount(neurons_by_value[:total_neurons], minlength=L)
        head_cutoff = sorted_head_values[total_heads] if total_heads < len(head_values) else 0.0
        neuron_residual = np.mean([w_neuron[l] * s.neuron_errors[neurons[l]] for l, s in enumerate(scores)])
        gap = abs(head_cutoff - 2.0 * neuron_residual)
        if best is None or gap < best[0]:
            best = (gap, heads, neurons)
    return best[1].tolist(), best[2].tolist()


def uniform(scores, costs, mu, weighting=None):
    L = len(scores)
    heads = [int(np.floor(mu * s.n_heads + 1e-9)) for s in scores]
    left = mu * dense_macs(scores, costs) - sum(heads) * costs.head
    total = int(np.floor(left / costs.neuron + 1e-9))
    # an even share per layer; the few left over go to the first layers
    neurons = [min(total // L + (l < total % L), s.n_neurons) for l, s in enumerate(scores)]
    return heads, neurons


def greedy(scores, costs, mu, weighting="sqrt"):
    """Knapsack by squared output error removed per MAC, over heads and neurons together.

    Each layer's heads (and neurons) must be kept as a prefix of their order, and the error
    removed by successive units need not decrease; so each sequence is first cut into
    segments along its upper concave hull (whose gains per unit do decrease), and whole
    segments are taken best ratio first; the segment that does not fit is taken in part.
    """
    return _knapsack(scores, costs, mu * dense_macs(scores, costs), weighting, kinds=("head", "neuron"))


def ffn_greedy(scores, costs, mu, weighting="expfit"):
    """Every head kept; the rest of the budget spent on neurons as `greedy` spends it.

    On a Llama-family decoder (SmolLM2, README) dropping whole key/value groups hurt
    perplexity far more than their output error predicts, while neuron errors were
    faithful. When μ is too small to keep every head, this is `greedy`.
    """
    heads = [s.n_heads for s in scores]
    budget = mu * dense_macs(scores, costs) - sum(heads) * costs.head
    if budget < 0:
        return greedy(scores, costs, mu, weighting)
    _, neurons = _knapsack(scores, costs, budget, weighting, kinds=("neuron",))
    return heads, neurons


def _knapsack(scores, costs, budget, weighting, kinds):
    L = len(scores)
    w_head, w_neuron = depth_weights(scores, weighting)
    items = []  # (gain per MAC, layer, kind, units in the segment)
    for l, s in enumerate(scores):
        for kind, errors, weight, cost in (("head", s.head_errors, w_head[l], costs.head),
                                           ("neuron", s.neuron_errors, w_neuron[l], costs.neuron)):
            if kind not in kinds:
                continue
            removed = (weight * errors[0]) ** 2 - (weight * np.asarray(errors)) ** 2  # cumulative, k = 0..n
            for units, gain in _concave_segments(removed):
                items.append((gain / (units * cost), l, kind, units))
    items.sort(key=lambda item: -item[0])
    heads, neurons = np.zeros(L, dtype=int), np.zeros(L, dtype=int)
    left = budget
    for _, l, kind, units in items:
        cost = costs.head if kind == "head" else costs.neuron
        take = min(units, int(np.floor(left / cost + 1e-9)))
        if take <= 0:
            continue
        (heads if kind == "head" else neurons)[l] += take
        left -= take * cost
    return heads.tolist(), neurons.tolist()


def _concave_segments(cumulative):
    """Split a cumulative gain curve c[0..n] into (units, gain) segments along its upper
    concave hull, in order; the gains per unit of the segments are non-increasing."""
    hull = [0]
    for k in range(1, len(cumulative)):
        hull.append(k)
        while len(hull) >= 3:
            a, b, c = hull[-3], hull[-2], hull[-1]
            # drop b when it lies on or below the chord from a to c
            if (cumulative[b] - cumulative[a]) * (c - a) <= (cumulative[c] - cumulative[a]) * (b - a):
                hull.pop(-2)
            else:
                break
    return [(hull[i + 1] - hull[i], cumulative[hull[i + 1]] - cumulative[hull[i]]) for i in range(len(hull) - 1)]


ALLOCATORS = {"greedy": greedy, "ffn_greedy": ffn_greedy, "faithful": faithful, "uniform": uniform}
