"""Multiply-accumulate counts, following Kwon et al. 2022 (DESIGN.md §3): the one cost model.

With sequence length S, hidden size d and head size d_h:
- one head costs 4·S·d·d_h (Q, K, V and output projections) + 2·S²·d_h (scores, weighted sum);
- with grouped-query attention the unit is a KV group of q heads: q·(2·S·d·d_h + 2·S²·d_h)
  for its queries and outputs plus 2·S·d·d_h for its one key and one value head;
- one FFN neuron costs 2·S·d (3·S·d with a gated FFN);
- embeddings, LayerNorm, softmax, biases and task heads are not counted.
The pruning code (prune/) receives the two per-unit costs as a pair of numbers.
"""
from typing import NamedTuple


class Costs(NamedTuple):
    """MACs of one attention unit (head, or KV group) and of one FFN neuron, in every layer:
    a pair of numbers, which is all the pruning code receives."""

    attn_unit: float
    neuron: float


def unit_costs(d, head_dim, seq_len, query_heads_per_unit=1, gated=False):
    S = seq_len
    attn_unit = query_heads_per_unit * (2 * S * d * head_dim + 2 * S * S * head_dim) + 2 * S * d * head_dim
    neuron = (3 if gated else 2) * S * d
    return Costs(attn_unit=float(attn_unit), neuron=float(neuron))


def adapter_costs(adapter, seq_len):
    return unit_costs(adapter.hidden_size(), adapter.head_dim(), seq_len,
                      adapter.query_heads_per_unit(), adapter.gated_ffn())


def model_macs(attn_units, neurons, costs):
    """MACs of a shape (attention units and neurons per layer)."""
    return sum(attn_units) * costs.attn_unit + sum(neurons) * costs.neuron


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
