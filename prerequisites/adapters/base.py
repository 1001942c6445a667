"""What the algorithm needs to know about one architecture, and the parts every family shares.

An adapter is the only code in STAT that knows module names. The algorithm sees "layers, each
with an attention block and an FFN block", each block a set of units feeding one linear map:

- attention units: heads, or with grouped-query attention key/value groups (one KV head and
  the query heads that share it), so that every layer keeps the same number of query heads
  per KV head. `qkv` are the paths (inside a layer) of the query, key and value projections,
  whose output rows come unit after unit; `attn_consumer` is the attention output projection,
  whose input columns come unit after unit;
- FFN neurons: `ffn_producers` make them (one linear map, or gate and up), `ffn_consumer`
  reads them.

An adapter runs a layer in four pieces, so that the activations at the two cut points (the
inputs of the two consumers) can be read and reused, and gives a layer its own unit counts.
"""
import torch
from torch import nn

from prerequisites.modeling_stat import NoHeads, new_linear, resized


def keep_output_rows(linear, rows):
    """The same linear map restricted to some output rows (the units a producer keeps)."""
    rows = rows.to(linear.weight.device)
    new = new_linear(linear.in_features, len(rows), linear.bias is not None, linear)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def with_input_weight(linear, weight):
    """A linear map with a new input side (the consumer of pruned units), its bias unchanged."""
    new = new_linear(weight.shape[1], linear.out_features, linear.bias is not None, linear)
    with torch.no_grad():
        new.weight.copy_(weight.to(new.weight))
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


class Adapter:
    family = None
    depth_weighting = "sqrt_remaining"  # how `greedy` protects early layers (see prune/allocation.py)
    default_allocation = "greedy"  # measured best for this kind of model (docs/results.md)
    capture_kwargs = {}  # extra model arguments for a calibration forward pass
    is_decoder = False
    qkv = ()
    attn_consumer = None
    ffn_producers = ()
    ffn_consumer = None

    def __init__(self, config):
        self.config = config

    # --- geometry
    def layers(self, model):
        raise NotImplementedError

    def head_dim(self):
        raise NotImplementedError

    def query_heads_per_unit(self):
        return 1

    def hidden_size(self):
        return self.config.hidden_size

    def gated_ffn(self):
        return False

    def attn_unit_dims(self):
        """Input columns of the attention output projection per attention unit."""
        return self.query_heads_per_unit() * self.head_dim()

    def n_attn_units(self, layer):
        return self.get(layer, self.attn_consumer).in_features // self.attn_unit_dims()

    def n_neurons(self, layer):
        return self.get(layer, self.ffn_consumer).in_features

    def shape(self, model):
        """(attention units per layer, neurons per layer) of the model as it is now."""
        layers = self.layers(model)
        return [self.n_attn_units(layer) for layer in layers], [self.n_neurons(layer) for layer in layers]

    def attn_unit_producers(self):
        """(path, output rows per unit) of the query, key and value projections."""
        q, k, v = self.qkv
        dh = self.head_dim()
        return ((q, self.query_heads_per_unit() * dh), (k, dh), (v, dh))

    def linear_groups(self, layer):
        """The layer's linear maps in the order they run, grouped by the input they share
        (Q/K/V, output projection, FFN input side, FFN output side); zero-sized ones left out."""
        groups = [list(self.qkv), [self.attn_consumer], list(self.ffn_producers), [self.ffn_consumer]]
        present = [[p for p in group if self._nonempty_linear(layer, p)] for group in groups]
        return [group for group in present if group]

    def _nonempty_linear(self, layer, path):
        try:
            module = self.get(layer, path)
        except AttributeError:  # the attention of a layer without heads is a stub
            return False
        return isinstance(module, nn.Linear) and module.weight.numel() > 0

    def layer_names(self, model):
        """The full module name of each layer, e.g. 'model.layers.3'."""
        names = {id(module): name for name, module in model.named_modules()}
        return [names[id(layer)] for layer in self.layers(model)]

    # --- module access by path
    @staticmethod
    def get(layer, path):
        return layer.get_submodule(path)

    @staticmethod
    def set(layer, path, module):
        layer.set_submodule(path, module)

    # --- the layer in four pieces (eval mode: dropout is the identity)
    def attention_context(self, layer, x, extras):
        """Input of the attention output projection: the concatenated per-head outputs."""
        raise NotImplementedError

    def after_attention(self, layer, context, x):
        """The residual stream after the attention block (the FFN block's input)."""
        raise NotImplementedError

    def ffn_hidden(self, layer, h):
        """Input of the FFN output projection: hidden activations after the nonlinearity."""
        raise NotImplementedError

    def after_ffn(self, layer, hidden, h):
        """The layer's output."""
        raise NotImplementedError

    # --- shapes
    def prune_attn_units(self, layer, keep_units, consumer_weight):
        """Keep some attention units (sorted indices); give the output projection its new weight."""
        for path, rows_per_unit in self.attn_unit_producers():
            rows = (keep_units[:, None] * rows_per_unit + torch.arange(rows_per_unit)[None, :]).reshape(-1)
            self.set(layer, path, keep_output_rows(self.get(layer, path), rows))
        self.set(layer, self.attn_consumer,
                 with_input_weight(self.get(layer, self.attn_consumer), consumer_weight))
        self.attn_units_changed(layer, len(keep_units))

    def prune_neurons(self, layer, keep, consumer_weight):
        for path in self.ffn_producers:
            self.set(layer, path, keep_output_rows(self.get(layer, path), keep))
        self.set(layer, self.ffn_consumer,
                 with_input_weight(self.get(layer, self.ffn_consumer), consumer_weight))

    def resize_layer(self, layer, n_units, n_neurons):
        """Give a freshly built layer a shape (uninitialised: weights are loaded afterwards)."""
        for path, rows_per_unit in self.attn_unit_producers():
            self.set(layer, path, resized(self.get(layer, path), out_features=n_units * rows_per_unit))
        consumer = self.get(layer, self.attn_consumer)
        self.set(layer, self.attn_consumer, resized(consumer, in_features=n_units * self.attn_unit_dims()))
        for path in self.ffn_producers:
            self.set(layer, path, resized(self.get(layer, path), out_features=n_neurons))
        self.set(layer, self.ffn_consumer, resized(self.get(layer, self.ffn_consumer), in_features=n_neurons))
        self.attn_units_changed(layer, n_units)

    def attn_units_changed(self, layer, n_units):
        """Per-layer attributes that follow the unit count, and the stub for zero units."""
        if n_units == 0:
            self.remove_attention(layer)

    def remove_attention(self, layer):
        raise NotImplementedError

    def recorded_attributes(self, layer):
        """{path inside the layer: {attribute: value}} that a checkpoint must restore (OPT)."""
        return {}

    def layout(self, model):
        """The shapes a checkpoint records (prerequisites/modeling_stat.py rebuilds them)."""
        layout = {"linears": {}, "stubs": {}, "attributes": {}}
        for layer_name, layer in zip(self.layer_names(model), self.layers(model)):
            for name, module in layer.named_modules():
                full = f"{layer_name}.{name}"
                if isinstance(module, nn.Linear):
                    layout["linears"][full] = [module.in_features, module.out_features, module.bias is not None]
                elif isinstance(module, NoHeads):
                    layout["stubs"][full] = module.settings()
            for path, attributes in self.recorded_attributes(layer).items():
                layout["attributes"][f"{layer_name}.{path}"] = attributes
        return layout

    # --- what runs before the first layer (decoders; an encoder's embeddings run in capture) and
    # after the last: the head, whose logits the search judges a candidate by
    def pre_layer_modules(self, model):
        return []

    def post_layer_modules(self, model):
        return []

    def logits(self, model, x):
        """The head's logits on the last layer's output x: a decoder's next-token logits, an
        encoder classifier's class logits (batch × classes)."""
        raise NotImplementedError


class _Captured(Exception):
    pass


def input_of(module, run):
    """Run `run()` and return the input that `module` received (the rest is not computed)."""
    seen = {}

    def hook(_module, args):
        seen["input"] = args[0]
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["input"]
