"""Model classes whose layers have their own shapes: what a pruned checkpoint loads with.

This file is copied next to the weights of every pruned checkpoint, and the checkpoint's
config.json points `auto_map` at its classes, so that the checkpoint loads anywhere with plain
`AutoModelFor...from_pretrained(dir, trust_remote_code=True)`. It must therefore stand alone:
it imports only torch and transformers, and it knows no module names. Each Stat* class is the
stock transformers class, built from the config, then reshaped by the layout that the config
records (`stat_layout`, written by prerequisites/checkpoint.py):

- `linears`: {module name: [in_features, out_features, has bias]} of every linear map inside
  the layers (a pruned layer may gain a bias its stock module lacks; older checkpoints record
  [in_features, out_features], the stock module's bias assumed);
- `stubs`: {module name: settings of NoHeads} for the attention of a layer that lost all its
  heads;
- `attributes`: {module name: {attribute: value}} that follow the head count (OPT's
  `self_attn.num_heads`).

The weights are then loaded, strictly, by from_pretrained. Nothing is patched: the layers are
the stock modules with smaller linear maps.
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


def new_linear(in_features, out_features, bias, like):
    """An uninitialised linear layer on like's device and dtype: every caller fills it (random
    initialisation would only cost time, and warns for zero-sized layers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=like.weight.dtype)
    return layer.to_empty(device=like.weight.device)


def resized(linear, in_features=None, out_features=None, bias=None):
    """An uninitialised linear layer of another shape: weights come from a checkpoint."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    bias = linear.bias is not None if bias is None else bias
    return new_linear(in_features, out_features, bias, linear)


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

    def settings(self):
        """What the layout records to rebuild this stub."""
        return {"out_name": self.out_name, "head_dim": self.head_dim, "layer_idx": self.layer_idx}

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if past_key_values is not None and self.head_dim is not None:
            b, s = hidden_states.shape[:2]
            zeros = hidden_states.new_zeros(b, 1, s, self.head_dim)
            past_key_values.update(zeros, zeros, self.layer_idx)
        if self.out_name is None:
            return context, None
        return getattr(self, self.out_name)(context), None


def apply_layout(model, layout):
    """Reshape a freshly built model to a recorded layout (see the module docstring)."""
    for name, settings in layout.get("stubs", {}).items():
        old = model.get_submodule(name)
        out_name = settings.get("out_name")
        out_proj = getattr(old, out_name) if out_name else None
        model.set_submodule(name, NoHeads(out_name, out_proj, settings.get("head_dim"), settings.get("layer_idx")))
    for name, (in_features, out_features, *bias) in layout.get("linears", {}).items():
        model.set_submodule(name, resized(model.get_submodule(name), in_features, out_features, *bias))
    for name, attributes in layout.get("attributes", {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, value)
    return model


def _reshaped(self):
    layout = getattr(self.config, "stat_layout", None)
    if layout is not None:
        apply_layout(self, layout)


class StatBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


class StatBertForQuestionAnswering(BertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


class StatDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


class StatDistilBertForQuestionAnswering(DistilBertForQuestionAnswering):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


class StatOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


class StatLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _reshaped(self)


# stock class -> (its reshapable twin, the Auto class that loads it)
STAT_CLASSES = {
    BertForSequenceClassification: (StatBertForSequenceClassification, "AutoModelForSequenceClassification"),
    BertForQuestionAnswering: (StatBertForQuestionAnswering, "AutoModelForQuestionAnswering"),
    DistilBertForSequenceClassification: (StatDistilBertForSequenceClassification,
                                          "AutoModelForSequenceClassification"),
    DistilBertForQuestionAnswering: (StatDistilBertForQuestionAnswering, "AutoModelForQuestionAnswering"),
    OPTForCausalLM: (StatOPTForCausalLM, "AutoModelForCausalLM"),
    LlamaForCausalLM: (StatLlamaForCausalLM, "AutoModelForCausalLM"),
}
