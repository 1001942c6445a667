"""How many heads and neurons each layer keeps under a MAC budget μ (docs/design.md §3).

Every allocator takes the per-layer scores of the dense model and the MAC costs of one
attention unit (a head, or with grouped-query attention a KV group) and of one FFN neuron, as
plain numbers (efficiency/macs.py computes them), and returns (attention units per layer,
neurons per layer) whose MACs do not exceed μ × the dense MACs.

- `faithful`: the allocation rule of the authors' released code, literally (docs/design.md §3), in
  its two variants: `prune_bert.py`'s ("bert": encoders) and `prune_opt.py`'s ("opt":
  decoders). Golden tests transcribe both from the scripts (tests/test_allocation.py).
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
    """

    attn_errors: np.ndarray
    neuron_pivots: np.ndarray
    neuron_errors: np.ndarray

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

    'sqrt' (BERT in the authors' code): sqrt(L − ℓ + 1) + 1 for layer ℓ = 0..L−1
    (√13+1 … √2+1 on BERT-base).
    'sqrt_remaining' (the improved protocol's encoders, measured with `greedy`): sqrt(L − ℓ) + 1,
    the square root of the layers from this one to the last, plus one (√12+1 … 2 on BERT-base).
    'expfit' (decoders, improved): divide each layer's scores by an exponential fit of their size
    over depth, since the residual stream, and every error measured in it, grows roughly
    geometrically with depth in a decoder (heads: the error of keeping none; neurons: the mean
    pivot. The authors' decoder rule fits the first pivot instead: see `faithful`).
    'none': no weighting.
    A pair of arrays (for attention units, for neurons) is taken as the weights themselves
    (`--allocation measured`: prune/search.py's measured_weights).
    """
    L = len(scores)
    if isinstance(scheme, tuple):
        return tuple(np.asarray(w, dtype=float) for w in scheme)
    if scheme == "none":
        ones = np.ones(L)
        return ones, ones
    if scheme == "sqrt":
        w = authors_depth_weights(L)
        return w, w
    if scheme == "sqrt_remaining":
        w = np.sqrt(L - np.arange(L)) + 1
        return w, w
    if scheme == "expfit":
        attn_size = np.array([s.attn_errors[0] for s in scores])
        neuron_size = np.array([s.neuron_pivots.mean() if s.n_neurons else 0.0 for s in scores])
        return 1.0 / _exp_fit(attn_size), 1.0 / _exp_fit(neuron_size)
    raise ValueError(f"unknown depth weighting {scheme!r}")


def authors_depth_weights(L):
    """prune_bert.py's layer weights: sqrt(L − ℓ + 1) + 1 for ℓ = 0..L−1."""
    return np.sqrt(L - np.arange(L) + 1.0) + 1


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


FAITHFUL_VARIANTS = ("bert", "opt")
OPT_HEAD_FACTOR = 1.125  # prune_opt.py: the error of keeping i of H heads is multiplied by 1.125^(H − i)


def faithful(scores, attn_cost, neuron_cost, mu, weighting=None, variant="bert", neuron_share=None):
    """The allocation rule of the authors' code, literally (docs/design.md §3).

    variant 'bert' (prune_bert.py; encoders) or 'opt' (prune_opt.py; decoders). `weighting` is
    not used: each variant fixes its own. neuron_share: the share w_n of a layer's MACs that its
    neurons take, as the authors fix it by hand (0.6622759267443489 for every BERT task,
    4/7 for OPT); None: the exact share of these costs.

    Scores (L layers of H_max attention units and N_max neurons): a layer's neuron scores are
    its pivots |diag R|, its head scores the errors of keeping i = 0..H−1 heads.
    - bert: both multiplied by w_ℓ = sqrt(L − ℓ + 1) + 1;
      opt: each divided by an exponential fit over depth of the layer's *first* score, and
      head error i multiplied by 1.125^(H_max − i).
    - For every head count H = ⌊μ·H_max⌋ .. H_max (per layer, on average), the budget fixes
      N(H) = int((μ − (1 − w_n)·H/H_max) / w_n · N_max) neurons per layer; the neurons kept
      are those whose weighted score exceeds the (N·L + 1)-th largest (one global threshold).
    - The head cut-off of H: bert, the (H·L)-th largest weighted head error (a layer keeps its
      errors >= it); opt, the (H·L + 1)-th (a layer keeps its errors > it). H = H_max: 0.
    - H* = argmin |cutoff(H) − 2·mean_ℓ ‖R22_ℓ‖_F| where ‖R22_ℓ‖_F is the *unweighted* error
      of layer ℓ's scaled neuron ID at the neuron count N(H) gives it.
    - Neurons: the threshold again at the mean of those counts (floored), as the scripts do.
    Three departures, where the scripts would break the budget or crash: head counts whose
    heads alone exceed μ (μ < (1 − w_n)·H/H_max) are not candidates (the scripts score them with
    no neurons and, when one is chosen, keep its heads above μ); H* = 0 keeps no head (prune_bert.py would index
    the smallest error, e[−1], and keep every head; only μ < 1/H_max reaches it); a threshold
    rank past the last neuron keeps them all (the scripts raise IndexError, e.g. at μ = 1).
    With neuron_share None the neuron count is floor((μ·D − H·c_a) / c_n) per layer (D, c_a,
    c_n: a layer's dense MACs and the unit costs), the same formula in MACs, which is exact
    at μ = 1 where the float shares may round below.
    """
    if variant not in FAITHFUL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(FAITHFUL_VARIANTS)}")
    L = len(scores)
    H_max = max(s.n_attn_units for s in scores)
    N_max = max(s.n_neurons for s in scores)
    neuron_scores = [np.asarray(s.neuron_pivots, dtype=float) for s in scores]
    head_scores = [np.asarray(s.attn_errors[:-1], dtype=float) for s in scores]  # keeping i = 0..H−1
    if variant == "bert":
        w = authors_depth_weights(L)
        neuron_scores = [w[l] * x for l, x in enumerate(neuron_scores)]
        head_scores = [w[l] * x for l, x in enumerate(head_scores)]
    else:
        neuron_fit = _authors_exp_fit([x[0] if len(x) else 0.0 for x in neuron_scores])
        head_fit = _authors_exp_fit([x[0] if len(x) else 0.0 for x in head_scores])
        neuron_scores = [x / neuron_fit[l] for l, x in enumerate(neuron_scores)]
        head_scores = [x / head_fit[l] * OPT_HEAD_FACTOR ** (H_max - np.arange(len(x)))
                       for l, x in enumerate(head_scores)]
    all_neurons = np.sort(np.concatenate(neuron_scores))[::-1]
    all_heads = np.sort(np.concatenate(head_scores))[::-1]

    def neurons_per_layer(H):
        """N(H), the rule's neuron count per layer for H heads per layer; −1 when H heads alone
        exceed the budget (the scripts' int() would round a small negative count up to 0)."""
        if neuron_share is not None:
            count = (mu - (1 - neuron_share) * (H / H_max)) / neuron_share * N_max
            return int(count) if count >= 0 else -1
        layer_macs = H_max * attn_cost + N_max * neuron_cost
        return int(np.floor((mu * layer_macs - H * attn_cost) / neuron_cost + 1e-9))

    def neuron_counts(N):
        """Per layer, the neurons whose weighted score beats the global threshold at rank N·L."""
        if N * L >= len(all_neurons):
            return np.array([len(x) for x in neuron_scores])
        cutoff = all_neurons[N * L]
        return np.array([int(np.sum(x > cutoff)) for x in neuron_scores])

    def head_cutoff(H):
        if H >= H_max:
            return 0.0
        rank = H * L - 1 if variant == "bert" else H * L
        return all_heads[min(rank, len(all_heads) - 1)]

    candidates, gaps = [], []
    for H in range(int(mu * H_max), H_max + 1):
        N = neurons_per_layer(H)
        if N < 0:
            continue
        kept = neuron_counts(N)
        residual = np.mean([s.neuron_errors[k] for s, k in zip(scores, kept)])
        candidates.append(H)
        gaps.append(abs(head_cutoff(H) - 2 * residual))
    best = candidates[int(np.argmin(gaps))]

    neurons = neuron_counts(int(np.mean(neuron_counts(neurons_per_layer(best)))))
    if best >= H_max:
        heads = np.array([len(x) for x in head_scores])
    elif best == 0:
        heads = np.zeros(L, dtype=int)
    elif variant == "bert":
        heads = np.array([int(np.sum(x >= head_cutoff(best))) for x in head_scores])
    else:
        heads = np.array([int(np.sum(x > head_cutoff(best))) for x in head_scores])
    return [int(h) for h in heads], [int(n) for n in neurons]


def _authors_exp_fit(first_scores):
    """prune_opt.py's depth fit: exp(a·x + b) with (a, b) fitted by np.polyfit to the log of
    each layer's first score, x = 1..L (layers with no positive score left out of the fit)."""
    values = np.asarray(first_scores, dtype=float)
    x = np.arange(1, len(values) + 1)
    ok = values > 0
    if ok.sum() < 2:
        return np.ones(len(values))
    a, b = np.polyfit(x[ok], np.log(values[ok]), deg=1)
    return np.e ** (x * a + b)


def uniform(scores, attn_cost, neuron_cost, mu, weighting=None):
    L = len(scores)
    units = [int(np.floor(mu * s.n_attn_units + 1e-9)) for s in scores]
    left = mu * dense_macs(scores, attn_cost, neuron_cost) - sum(units) * attn_cost
    total = int(np.floor(left / neuron_cost + 1e-9))
    # an even share per layer; the few left over go to the first layers
    neurons = [min(total // L + (l < total % L), s.n_neurons) for l, s in enumerate(scores)]
    return units, neurons


def greedy(scores, attn_cost, neuron_cost, mu, weighting="sqrt_remaining"):
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

    On a Llama-family decoder (SmolLM2, docs/results.md) dropping whole key/value groups hurt
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
        for kind, errors, weight in (("attn", s.attn_errors, w_attn[l]), ("neuron", s.neuron_errors, w_neuron[l])):
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


def round_neurons(scores, attn_units, neurons, attn_cost, neuron_cost, mu, multiple, weighting="expfit"):
    """Neuron counts that are multiples of `multiple` (or a layer's whole width), within the same
    budget: every count is rounded down, then the MACs that frees are given back `multiple`
    neurons at a time, to the layer where the block removes the most weighted error per MAC
    (the knapsack's measure), while a block fits.

    Inference engines run such widths faster: llama.cpp's matrix kernels and its quantized
    formats work in blocks of 32 (Q8_0) and 256 (K-quants) along a row (docs/gguf.md).
    """
    _, w_neuron = depth_weights(scores, weighting)
    counts = [n if n == s.n_neurons else n - n % multiple for n, s in zip(neurons, scores)]
    left = mu * dense_macs(scores, attn_cost, neuron_cost) - sum(attn_units) * attn_cost - sum(counts) * neuron_cost
    while True:
        best = None
        for l, (count, s) in enumerate(zip(counts, scores)):
            step = min(multiple, s.n_neurons - count)
            if step == 0 or step * neuron_cost > left + 1e-9:
                continue
            errors = w_neuron[l] * np.asarray(s.neuron_errors)
            gain = (errors[count] ** 2 - errors[count + step] ** 2) / (step * neuron_cost)
            if best is None or gain > best[0]:
                best = (gain, l, step)
        if best is None:
            return counts
        counts[best[1]] += best[2]
        left -= best[2] * neuron_cost


ALLOCATORS = {"greedy": greedy, "ffn_greedy": ffn_greedy, "faithful": faithful, "uniform": uniform}
