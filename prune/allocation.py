"""How many heads and neurons each layer keeps under a MAC budget μ (DESIGN.md §3).

Every allocator takes the per-layer scores of the dense model and the MAC costs of one
attention unit (a head, or with grouped-query attention a KV group) and of one FFN neuron, as
plain numbers (efficiency/macs.py computes them), and returns (attention units per layer,
neurons per layer) whose MACs do not exceed μ × the dense MACs.

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

    attn_errors[i]: output-space error of keeping the best i attention units (i = 0..H),
    non-increasing.
    neuron_pivots[j]: what the (j+1)-th neuron of the scaled ID adds, non-increasing.
    neuron_errors[k]: error of the scaled ID keeping k neurons (k = 0..N), non-increasing.
    neuron_output_errors[k]: optionally, the error that ID leaves in the FFN's output
    (‖E·W_droppedᵀ‖, like attn_errors); the knapsack allocators price neurons by it when given.
    """

    attn_errors: np.ndarray
    neuron_pivots: np.ndarray
    neuron_errors: np.ndarray
    neuron_output_errors: np.ndarray = None

    @property
    def neuron_costs(self):
        """What the knapsack prices neurons by: the output-space errors when measured."""
        return self.neuron_errors if self.neuron_output_errors is None else self.neuron_output_errors

    @property
    def n_attn_units(self):
        return len(self.attn_errors) - 1

    @property
    def n_neurons(self):
        return len(self.neuron_pivots)


def dense_macs(scores, attn_cost, neuron_cost):
    return sum(s.n_attn_units * attn_cost + s.n_neurons * neuron_cost for s in scores)


# ---------------------------------------------------------------------------------------------
# Depth weighting


def depth_weights(scores, scheme):
    """Multipliers (for attention units, for neurons) per layer that protect early layers.

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
        attn_size = np.array([s.attn_errors[0] for s in scores])
        neuron_size = np.array([s.neuron_pivots.mean() if s.n_neurons else 0.0 for s in scores])
        return 1.0 / _exp_fit(attn_size), 1.0 / _exp_fit(neuron_size)
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


def faithful(scores, attn_cost, neuron_cost, mu, weighting="sqrt"):
    L = len(scores)
    w_attn, w_neuron = depth_weights(scores, weighting)
    # value of the i-th unit of a layer: the (weighted) error left when it is dropped too
    attn_values = np.concatenate([w_attn[l] * s.attn_errors[:-1] for l, s in enumerate(scores)])
    attn_owner = np.concatenate([np.full(s.n_attn_units, l) for l, s in enumerate(scores)])
    neuron_values = np.concatenate([w_neuron[l] * s.neuron_pivots for l, s in enumerate(scores)])
    neuron_owner = np.concatenate([np.full(s.n_neurons, l) for l, s in enumerate(scores)])
    sorted_attn_values = np.sort(attn_values)[::-1]
    attn_by_value = _owners_by_value(attn_values, attn_owner)
    neurons_by_value = _owners_by_value(neuron_values, neuron_owner)

    budget = mu * dense_macs(scores, attn_cost, neuron_cost)
    best = None
    for total_units in range(len(attn_values) + 1):
        left = budget - total_units * attn_cost
        if left < 0:
            break
        total_neurons = min(int(np.floor(left / neuron_cost + 1e-9)), len(neuron_values))
        units = np.bincount(attn_by_value[:total_units], minlength=L)
        neurons = np.bincount(neurons_by_value[:total_neurons], minlength=L)
        attn_cutoff = sorted_attn_values[total_units] if total_units < len(attn_values) else 0.0
        neuron_residual = np.mean([w_neuron[l] * s.neuron_errors[neurons[l]] for l, s in enumerate(scores)])
        gap = abs(attn_cutoff - 2.0 * neuron_residual)
        if best is None or gap < best[0]:
            best = (gap, units, neurons)
    return best[1].tolist(), best[2].tolist()


def uniform(scores, attn_cost, neuron_cost, mu, weighting=None):
    L = len(scores)
    units = [int(np.floor(mu * s.n_attn_units + 1e-9)) for s in scores]
    left = mu * dense_macs(scores, attn_cost, neuron_cost) - sum(units) * attn_cost
    total = int(np.floor(left / neuron_cost + 1e-9))
    # an even share per layer; the few left over go to the first layers
    neurons = [min(total // L + (l < total % L), s.n_neurons) for l, s in enumerate(scores)]
    return units, neurons


def greedy(scores, attn_cost, neuron_cost, mu, weighting="sqrt"):
    """Knapsack by squared output error removed per MAC, over attention units and neurons together.

    Each layer's units (and neurons) must be kept as a prefix of their order, and the error
    removed by successive units need not decrease; so each sequence is first cut into
    segments along its upper concave hull (whose gains per unit do decrease), and whole
    segments are taken best ratio first; the segment that does not fit is taken in part.
    """
    budget = mu * dense_macs(scores, attn_cost, neuron_cost)
    return _knapsack(scores, attn_cost, neuron_cost, budget, weighting, kinds=("attn", "neuron"))


def ffn_greedy(scores, attn_cost, neuron_cost, mu, weighting="expfit"):
    """Every attention unit kept; the rest of the budget spent on neurons as `greedy` spends it.

    On a Llama-family decoder (SmolLM2, README) dropping whole key/value groups hurt
    perplexity far more than their output error predicts, while neuron errors were
    faithful. When μ is too small to keep every unit, this is `greedy`.
    """
    units = [s.n_attn_units for s in scores]
    budget = mu * dense_macs(scores, attn_cost, neuron_cost) - sum(units) * attn_cost
    if budget < 0:
        return greedy(scores, attn_cost, neuron_cost, mu, weighting)
    _, neurons = _knapsack(scores, attn_cost, neuron_cost, budget, weighting, kinds=("neuron",))
    return units, neurons


def _knapsack(scores, attn_cost, neuron_cost, budget, weighting, kinds):
    L = len(scores)
    w_attn, w_neuron = depth_weights(scores, weighting)
    cost = {"attn": attn_cost, "neuron": neuron_cost}
    items = []  # (gain per MAC, layer, kind, units in the segment)
    for l, s in enumerate(scores):
        for kind, errors, weight in (("attn", s.attn_errors, w_attn[l]), ("neuron", s.neuron_costs, w_neuron[l])):
            if kind not in kinds:
                continue
            removed = (weight * errors[0]) ** 2 - (weight * np.asarray(errors)) ** 2  # cumulative, k = 0..n
            for count, gain in _concave_segments(removed):
                items.append((gain / (count * cost[kind]), l, kind, count))
    items.sort(key=lambda item: -item[0])
    kept = {"attn": np.zeros(L, dtype=int), "neuron": np.zeros(L, dtype=int)}
    left = budget
    for _, l, kind, count in items:
        take = min(count, int(np.floor(left / cost[kind] + 1e-9)))
        if take <= 0:
            continue
        kept[kind][l] += take
        left -= take * cost[kind]
    return kept["attn"].tolist(), kept["neuron"].tolist()


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
