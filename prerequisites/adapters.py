"""Family adapters: the only code in STAT that knows module names.

The pruning algorithm sees "layers, each with a head block and an FFN block". An adapter tells
it, for one architecture, which linear layers produce a block's units and which one consumes
them, how to run a layer in four pieces (so the activations at the two cut points, the inputs
of the attention output projection and of the FFN output projection, can be read and reused),
and how to give a layer its own head count and FFN width.

This file imports only torch and transformers: it is also written next to a pruned
checkpoint's weights as `modeling_stat.py`, so that the checkpoint loads with plain
`from_pretrained(dir, trust_remote_code=True)`. The Stat* model classes at the bottom are the
stock transformers classes whose layers are shrunk, right after construction, to the shapes
that `config.stat_heads` and `config.stat_ffn` record.
"""
import warnings

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    LlamaForCausalLM,
    OPTForCausalLM,
)


# ---------------------------------------------------------------------------------------------
# Linear layers of new shapes


def new_linear(in_features, out_features, bias, like):
    """An uninitialised linear layer on like's device and dtype: every caller fills it (random
    initialisation would only cost time, and warns for zero-sized layers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=like.weight.dtype)
    return layer.to_empty(device=like.weight.device)


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
    """A linear map with a new input side (the consumer of pruned units), bias unchanged."""
    new = new_linear(weight.shape[1], linear.out_features, linear.bias is not None, linear)
    with torch.no_grad():
        new.weight.copy_(weight.to(new.weight))
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def resized(linear, in_features=None, out_features=None):
    """An uninitialised linear layer of another shape: weights come from a checkpoint."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    return new_linear(in_features, out_features, linear.bias is not None, linear)


class NoHeads(nn.Module):
    """Stands in for the attention of a layer that lost all its heads.

    The attention then contributes only the bias of its output projection. `out_name`, when
    given, is the attribute name of that projection inside the replaced module (so checkpoint
    keys stay the same); otherwise the module returns the empty context and the projection
    lives outside it. Decoders keep one all-zero key/value head in the cache, because the cache
    reads the sequence length off its tensors and an empty tensor reads as length 0.
    """

    def __init__(self, out_name=None, out_proj=None, head_dim=None, layer_idx=None):
        super().__init__()
        self.out_name = out_name
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        if out_name is not None:
            setattr(self, out_name, out_proj)

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if past_key_values is not None and self.head_dim is not None:
            b, s = hidden_states.shape[:2]
            zeros = hidden_states.new_zeros(b, 1, s, self.head_dim)
            past_key_values.update(zeros, zeros, self.layer_idx)
        if self.out_name is None:
            return context, None
        return getattr(self, self.out_name)(context), None


# ---------------------------------------------------------------------------------------------
# Adapters


class Adapter:
    """What the algorithm needs to know about one architecture.

    Units of the head block are heads (or, with grouped-query attention, key/value groups:
    one KV head and the query heads that share it). `qkv` are the paths (inside a layer) of
    the query, key and value projections, whose output rows come unit after unit;
    `head_consumer` is the attention output projection, whose input columns come unit after
    unit. `ffn_producers` make the FFN's hidden units (one, or gate and up), `ffn_consumer`
    reads them.
    """

    family = None
    depth_weighting = "sqrt"  # how the allocation protects early layers (see prune/allocation.py)
    default_allocation = "greedy"  # measured best for this kind of model (README)
    capture_kwargs = {}  # extra model arguments for a calibration forward pass
    is_decoder = False
    qkv = ()
    head_consumer = None
    ffn_producers = ()
    ffn_consumer = None

    def __init__(self, config):
        self.config = config

    # --- geometry
    def layers(self, model):
        raise NotImplementedError

    def head_dim(self):
        raise NotImplementedError

    def queries_per_unit(self):
        return 1

    def hidden_size(self):
        return self.config.hidden_size

    def gated_ffn(self):
        return False

    def unit_dims(self):
        return self.queries_per_unit() * self.head_dim()

    def n_units(self, layer):
        return self.get(layer, self.head_consumer).in_features // self.unit_dims()

    def n_neurons(self, layer):
        return self.get(layer, self.ffn_consumer).in_features

    def head_producers(self):
        """(path, output rows per unit) of the query, key and value projections."""
        q, k, v = self.qkv
        dh = self.head_dim()
        return ((q, self.queries_per_unit() * dh), (k, dh), (v, dh))

    def linear_groups(self, layer):
        """The layer's linear maps in the order they run, grouped by the input they share
        (Q/K/V, output projection, FFN input side, FFN output side); zero-sized ones left out."""
        groups = [list(self.qkv), [self.head_consumer], list(self.ffn_producers), [self.ffn_consumer]]
        present = [[p for p in group if self._nonempty_linear(layer, p)] for group in groups]
        return [group for group in present if group]

    def _nonempty_linear(self, layer, path):
        try:
            module = self.get(layer, path)
        except AttributeError:  # the attention of a layer without heads is a stub
            return False
        return isinstance(module, nn.Linear) and module.weight.numel() > 0

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
    def prune_heads(self, layer, keep_units, consumer_weight):
        """Keep some units (sorted indices) and give the output projection its corrected weight."""
        for path, rows_per_unit in self.head_producers():
            rows = (keep_units[:, None] * rows_per_unit + torch.arange(rows_per_unit)[None, :]).reshape(-1)
            self.set(layer, path, keep_output_rows(self.get(layer, path), rows))
        self.set(layer, self.head_consumer, with_input_weight(self.get(layer, self.head_consumer), consumer_weight))
        self.heads_changed(layer, len(keep_units))

    def prune_neurons(self, layer, keep, consumer_weight):
        for path in self.ffn_producers:
            self.set(layer, path, keep_output_rows(self.get(layer, path), keep))
        self.set(layer, self.ffn_consumer, with_input_weight(self.get(layer, self.ffn_consumer), consumer_weight))

    def resize_layer(self, layer, n_units, n_neurons):
        """Give a freshly built layer the recorded shape (weights are loaded afterwards)."""
        for path, rows_per_unit in self.head_producers():
            self.set(layer, path, resized(self.get(layer, path), out_features=n_units * rows_per_unit))
        self.set(layer, self.head_consumer, resized(self.get(layer, self.head_consumer), in_features=n_units * self.unit_dims()))
        for path in self.ffn_producers:
            self.set(layer, path, resized(self.get(layer, path), out_features=n_neurons))
        self.set(layer, self.ffn_consumer, resized(self.get(layer, self.ffn_consumer), in_features=n_neurons))
        self.heads_changed(layer, n_units)

    def heads_changed(self, layer, n_units):
        """Per-layer attributes that follow the head count, and the stub for zero heads."""
        if n_units == 0:
            self.remove_attention(layer)

    def remove_attention(self, layer):
        raise NotImplementedError

    # --- decoders: what runs before the first and after the last layer
    def pre_layer_modules(self, model):
        return []

    def post_layer_modules(self, model):
        return []

    def logits(self, model, x):
        raise NotImplementedError


class BertAdapter(Adapter):
    family = "bert"
    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    head_consumer = "attention.output.dense"
    ffn_producers = ("intermediate.dense",)
    ffn_consumer = "output.dense"

    def layers(self, model):
        return model.base_model.encoder.layer

    def head_dim(self):
        return self.config.hidden_size // self.config.num_attention_heads

    def attention_context(self, layer, x, extras):
        return layer.attention.self(x, attention_mask=extras.get("attention_mask"))[0]

    def after_attention(self, layer, context, x):
        return layer.attention.output(context, x)

    def ffn_hidden(self, layer, h):
        return layer.intermediate(h)

    def after_ffn(self, layer, hidden, h):
        return layer.output(hidden, h)

    def remove_attention(self, layer):
        # BertSelfOutput (dense + LayerNorm of the residual) stays; only the heads go.
        layer.attention.self = NoHeads()


class DistilBertAdapter(Adapter):
    family = "distilbert"
    qkv = ("attention.q_lin", "attention.k_lin", "attention.v_lin")
    head_consumer = "attention.out_lin"
    ffn_producers = ("ffn.lin1",)
    ffn_consumer = "ffn.lin2"

    def hidden_size(self):
        return self.config.dim

    def layers(self, model):
        return model.base_model.transformer.layer

    def head_dim(self):
        return self.config.dim // self.config.n_heads

    def attention_context(self, layer, x, extras):
        # DistilBERT applies out_lin inside its attention module: read its input on the way.
        return _input_of(layer.attention.out_lin, lambda: layer.attention(x, attention_mask=extras.get("attention_mask")))

    def after_attention(self, layer, context, x):
        return layer.sa_layer_norm(layer.attention.out_lin(context) + x)

    def ffn_hidden(self, layer, h):
        return layer.ffn.activation(layer.ffn.lin1(h))

    def after_ffn(self, layer, hidden, h):
        return layer.output_layer_norm(layer.ffn.lin2(hidden) + h)

    def remove_attention(self, layer):
        layer.attention = NoHeads(out_name="out_lin", out_proj=layer.attention.out_lin)


class OPTAdapter(Adapter):
    family = "opt"
    default_allocation = "ffn_greedy"
    capture_kwargs = {"use_cache": False}
    is_decoder = True
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    depth_weighting = "expfit"
    head_consumer = "self_attn.out_proj"
    ffn_producers = ("fc1",)
    ffn_consumer = "fc2"

    def layers(self, model):
        return model.model.decoder.layers

    def head_dim(self):
        return self.config.hidden_size // self.config.num_attention_heads

    def attention_context(self, layer, x, extras):
        if layer.do_layer_norm_before:
            x = layer.self_attn_layer_norm(x)
        return _input_of(layer.self_attn.out_proj, lambda: layer.self_attn(
            hidden_states=x, attention_mask=extras.get("attention_mask"), position_ids=extras.get("position_ids")))

    def after_attention(self, layer, context, x):
        h = x + layer.self_attn.out_proj(context)
        return h if layer.do_layer_norm_before else layer.self_attn_layer_norm(h)

    def ffn_hidden(self, layer, h):
        if layer.do_layer_norm_before:
            h = layer.final_layer_norm(h)
        return layer.activation_fn(layer.fc1(h))

    def after_ffn(self, layer, hidden, h):
        y = h + layer.fc2(hidden)
        return y if layer.do_layer_norm_before else layer.final_layer_norm(y)

    def heads_changed(self, layer, n_units):
        # OPTAttention reshapes with self.num_heads, so each layer carries its own count.
        layer.self_attn.num_heads = n_units
        super().heads_changed(layer, n_units)

    def remove_attention(self, layer):
        layer.self_attn = NoHeads(out_name="out_proj", out_proj=layer.self_attn.out_proj,
                                  head_dim=self.head_dim(), layer_idx=layer.self_attn.layer_idx)

    def pre_layer_modules(self, model):
        decoder = model.model.decoder
        return [m for m in (decoder.embed_tokens, decoder.embed_positions, decoder.project_in) if m is not None]

    def post_layer_modules(self, model):
        decoder = model.model.decoder
        return [m for m in (decoder.final_layer_norm, decoder.project_out, model.lm_head) if m is not None]

    def logits(self, model, x):
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)
        return model.lm_head(x)


class LlamaAdapter(Adapter):
    """Llama-family decoders: grouped-query attention (a unit is a KV group), gated FFN."""

    family = "llama"
    default_allocation = "ffn_greedy"
    capture_kwargs = {"use_cache": False}
    is_decoder = True
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    depth_weighting = "expfit"
    head_consumer = "self_attn.o_proj"
    ffn_producers = ("mlp.gate_proj", "mlp.up_proj")
    ffn_consumer = "mlp.down_proj"

    def layers(self, model):
        return model.model.layers

    def head_dim(self):
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def queries_per_unit(self):
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def gated_ffn(self):
        return True

    def attention_context(self, layer, x, extras):
        x = layer.input_layernorm(x)
        return _input_of(layer.self_attn.o_proj, lambda: layer.self_attn(
            hidden_states=x, attention_mask=extras.get("attention_mask"),
            position_embeddings=extras.get("position_embeddings"), position_ids=extras.get("position_ids")))

    def after_attention(self, layer, context, x):
        return x + layer.self_attn.o_proj(context)

    def ffn_hidden(self, layer, h):
        h = layer.post_attention_layernorm(h)
        return layer.mlp.act_fn(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)

    def after_ffn(self, layer, hidden, h):
        return h + layer.mlp.down_proj(hidden)

    def remove_attention(self, layer):
        layer.self_attn = NoHeads(out_name="o_proj", out_proj=layer.self_attn.o_proj,
                                  head_dim=self.head_dim(), layer_idx=layer.self_attn.layer_idx)

    def pre_layer_modules(self, model):
        return [model.model.embed_tokens, model.model.rotary_emb]

    def post_layer_modules(self, model):
        return [model.model.norm, model.lm_head]

    def logits(self, model, x):
        return model.lm_head(model.model.norm(x))


class _Captured(Exception):
    pass


def _input_of(module, run):
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


ADAPTERS = {"bert": BertAdapter, "distilbert": DistilBertAdapter, "opt": OPTAdapter, "llama": LlamaAdapter}


def adapter_for(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type not in ADAPTERS:
        raise ValueError(f"no STAT adapter for model type {config.model_type!r} (have: {', '.join(ADAPTERS)})")
    return ADAPTERS[config.model_type](config)


# ---------------------------------------------------------------------------------------------
# Pruned checkpoints: stock classes, shrunk to the shapes the config records


def apply_recorded_shapes(model):
    config = model.config
    heads, ffn = getattr(config, "stat_heads", None), getattr(config, "stat_ffn", None)
    if heads is None or ffn is None:
        return model
    adapter = adapter_for(config)
    layers = adapter.layers(model)
    if not (len(heads) == len(ffn) == len(layers)):
        raise ValueError(f"config records {len(heads)} head counts and {len(ffn)} FFN widths for {len(layers)} layers")
    for layer, n_units, n_neurons in zip(layers, heads, ffn):
        adapter.resize_layer(layer, n_units, n_neurons)
    return model


class StatBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


class StatBertForQuestionAnswering(BertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


class StatDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


class StatDistilBertForQuestionAnswering(DistilBertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


class StatOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


class StatLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_recorded_shapes(self)


# stock class -> (its pruned twin, the Auto class that loads it)
STAT_CLASSES = {
    BertForSequenceClassification: (StatBertForSequenceClassification, "AutoModelForSequenceClassification"),
    BertForQuestionAnswering: (StatBertForQuestionAnswering, "AutoModelForQuestionAnswering"),
    DistilBertForSequenceClassification: (StatDistilBertForSequenceClassification, "AutoModelForSequenceClassification"),
    DistilBertForQuestionAnswering: (StatDistilBertForQuestionAnswering, "AutoModelForQuestionAnswering"),
    OPTForCausalLM: (StatOPTForCausalLM, "AutoModelForCausalLM"),
    LlamaForCausalLM: (StatLlamaForCausalLM, "AutoModelForCausalLM"),
}
