"""Multiply-accumulate counts, following Kwon et al. 2022 (DESIGN.md §3).

With sequence length S, hidden size d and head size d_h:
- one head costs 4·S·d·d_h (Q, K, V and output projections) + 2·S²·d_h (scores, weighted sum);
- with grouped-query attention the unit is a KV group of q heads: q·(2·S·d·d_h + 2·S²·d_h)
  for its queries and outputs plus 2·S·d·d_h for its one key and one value head;
- one FFN neuron costs 2·S·d (3·S·d with a gated FFN);
- embeddings, LayerNorm, softmax, biases and task heads are not counted.
"""
from prune.allocation import Costs, macs_of

# The MACs of a shape (heads and neurons per layer): the allocators' own count, so that the
# reported ratio is the one the budget was held to.
model_macs = macs_of


def unit_costs(d, head_dim, seq_len, queries_per_unit=1, gated=False):
    S = seq_len
    head = queries_per_unit * (2 * S * d * head_dim + 2 * S * S * head_dim) + 2 * S * d * head_dim
    neuron = (3 if gated else 2) * S * d
    return Costs(head=float(head), neuron=float(neuron))


def adapter_costs(adapter, seq_len):
    return unit_costs(adapter.hidden_size(), adapter.head_dim(), seq_len,
                      adapter.queries_per_unit(), adapter.gated_ffn())


def shape_of(model, adapter):
    """(units per layer, neurons per layer) of a model as it is now."""
    layers = adapter.layers(model)
    return [adapter.n_units(l) for l in layers], [adapter.n_neurons(l) for l in layers]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
