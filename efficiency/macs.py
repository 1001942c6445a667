"""Multiply-accumulate counts, following Kwon et al. 2022 (docs/design.md §3): the one cost model.

With sequence length S, hidden size d and head size d_h:
- one head costs 4·S·d·d_h (Q, K, V and output projections) + 2·S²·d_h (scores, weighted sum);
- with grouped-query attention the unit is a KV group of q heads: q·(2·S·d·d_h + 2·S²·d_h)
  for its queries and outputs plus 2·S·d·d_h for its one key and one value head;
- one FFN neuron costs 2·S·d (3·S·d with a gated FFN);
- embeddings, LayerNorm, softmax, biases and task heads are not counted.
The pruning code (prune/) receives the two per-unit costs as a pair of numbers.

A second way to price units (`--mac_split authors`): the authors' scripts fix by hand the
share of a layer's MACs that its FFN neurons take, w_n = 0.6622759267443489 for every BERT
task (Kwon et al.'s costs for BERT-base at QQP's S = 30.55) and 4/7 for OPT, whatever the
model and the sequence length; `split_costs` prices a layer's units so, keeping its total.
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


# The authors' fixed neuron share w_n, per kind of model (prune_bert.py, prune_opt.py).
AUTHORS_NEURON_SHARE = {"encoder": 0.6622759267443489, "decoder": 4 / 7}
MAC_SPLITS = ("exact", "authors")


def split_costs(costs, neuron_share, attn_units, neurons):
    """Costs under a fixed split: a dense layer (attn_units units, neurons neurons) costs what
    `costs` say, its neurons `neuron_share` of it, its attention units the rest."""
    layer = attn_units * costs.attn_unit + neurons * costs.neuron
    return Costs(attn_unit=(1 - neuron_share) * layer / attn_units, neuron=neuron_share * layer / neurons)


def unit_prices(adapter, shape, seq_len, kind):
    """A unit's MACs priced both ways, {"exact": Costs, "authors": Costs}, for a dense model of
    this shape (attention units per layer, neurons per layer); kind: "encoder" or "decoder"."""
    exact = adapter_costs(adapter, seq_len)
    attn_units, neurons = shape
    return {"exact": exact, "authors": split_costs(exact, AUTHORS_NEURON_SHARE[kind], max(attn_units), max(neurons))}


def mac_ratios(prices, dense_shape, pruned_shape):
    """The share of MACs a pruned shape keeps, priced both ways: (exact, with the authors' split)."""
    return tuple(model_macs(*pruned_shape, prices[split]) / model_macs(*dense_shape, prices[split])
                 for split in ("exact", "authors"))


def model_macs(attn_units, neurons, costs):
    """MACs of a shape (attention units and neurons per layer)."""
    return sum(attn_units) * costs.attn_unit + sum(neurons) * costs.neuron


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
