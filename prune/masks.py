"""Multipliers on the units of every layer, and the smaller model they stand for.

A mask holds one number per attention unit and per FFN neuron of each layer. It acts on the
input of the consumers (the attention output projection: each unit's dims; the FFN output
projection: each neuron), through forward pre-hooks, so the model's code is untouched: a 0
removes a unit, 1 keeps it, any other value rescales it. Kwon et al. multiply the attention
probabilities of each head (`head_mask`), which scales that head's output, the same thing.

`prune_to_masks` turns a mask into a real smaller model: units at 0 are removed, and each kept
unit's multiplier goes into the consumer's weight columns that read it.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from prune.interpolative import expand_groups


@dataclass
class UnitMasks:
    attn: list  # per layer: (attention units,) tensor
    neurons: list  # per layer: (neurons,) tensor

    @classmethod
    def ones(cls, model, adapter, device=None, dtype=None):
        """Every unit kept, with multiplier 1, in the dtype of the layers' weights."""
        attn, neurons = [], []
        for layer in adapter.layers(model):
            weight = adapter.get(layer, adapter.ffn_consumer).weight
            kwargs = {"device": device or weight.device, "dtype": dtype or weight.dtype}
            attn.append(torch.ones(adapter.n_attn_units(layer), **kwargs))
            neurons.append(torch.ones(adapter.n_neurons(layer), **kwargs))
        return cls(attn, neurons)

    @classmethod
    def from_keep(cls, attn_keep, neuron_keep, like):
        """0/1 masks from per-layer boolean arrays, shaped and typed like the masks `like`."""
        def convert(keeps, masks):
            return [torch.as_tensor(k, dtype=torch.bool).to(m.device).to(m.dtype) for k, m in zip(keeps, masks)]
        return cls(convert(attn_keep, like.attn), convert(neuron_keep, like.neurons))

    def clone(self):
        return UnitMasks([m.detach().clone() for m in self.attn], [m.detach().clone() for m in self.neurons])

    def counts(self):
        """(attention units kept per layer, neurons kept per layer): the nonzero entries."""
        return [int(m.count_nonzero()) for m in self.attn], [int(m.count_nonzero()) for m in self.neurons]

    def attn_dims(self, layer_index, unit_dims):
        """Layer `layer_index`'s attention mask on the consumer's input columns."""
        return self.attn[layer_index].repeat_interleave(unit_dims)


def _multiply_input(mask):
    def hook(_module, args):
        return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
    return hook


@contextmanager
def masks_applied(model, adapter, masks):
    """Within the block, every forward pass of `model` runs with `masks` on its units
    (gradients reach the masks when they require grad)."""
    handles = []
    unit_dims = adapter.attn_unit_dims()
    try:
        for l, layer in enumerate(adapter.layers(model)):
            if masks.attn[l].numel():  # a layer without heads has no consumer input to scale
                consumer = adapter.get(layer, adapter.attn_consumer)
                handles.append(consumer.register_forward_pre_hook(_multiply_input(masks.attn_dims(l, unit_dims))))
            if masks.neurons[l].numel():
                consumer = adapter.get(layer, adapter.ffn_consumer)
                handles.append(consumer.register_forward_pre_hook(_multiply_input(masks.neurons[l])))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def prune_to_masks(model, adapter, keep, scales):
    """Make `model` the smaller model that `keep` (0/1 per unit) and `scales` (each kept unit's
    multiplier) describe: the units at 0 in `keep` go, and each kept unit's scale multiplies
    the consumer's weight columns that read it (its head dims in W_O, its column of the FFN
    output projection). The consumers' biases stay as they are."""
    unit_dims = adapter.attn_unit_dims()
    for l, layer in enumerate(adapter.layers(model)):
        if keep.attn[l].numel():
            kept = torch.nonzero(keep.attn[l].cpu()).flatten()
            W = adapter.get(layer, adapter.attn_consumer).weight
            dims = expand_groups(kept, unit_dims).to(W.device)
            column_scale = scales.attn[l].to(W.device, torch.float64).repeat_interleave(unit_dims)[dims]
            adapter.prune_attn_units(layer, kept, (W.double()[:, dims] * column_scale).to(W.dtype))
        if keep.neurons[l].numel():
            kept = torch.nonzero(keep.neurons[l].cpu()).flatten()
            W = adapter.get(layer, adapter.ffn_consumer).weight
            columns = kept.to(W.device)
            column_scale = scales.neurons[l].to(W.device, torch.float64)[columns]
            adapter.prune_neurons(layer, kept, (W.double()[:, columns] * column_scale).to(W.dtype))
