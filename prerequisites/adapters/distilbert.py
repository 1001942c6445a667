"""DistilBERT (encoder): the output projection out_lin runs inside the attention module."""
import torch

from prerequisites.adapters.base import Adapter, input_of
from prerequisites.modeling_stat import NoHeads


class DistilBertAdapter(Adapter):
    family = "distilbert"
    qkv = ("attention.q_lin", "attention.k_lin", "attention.v_lin")
    attn_consumer = "attention.out_lin"
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
        mask = extras.get("attention_mask")
        return input_of(layer.attention.out_lin, lambda: layer.attention(x, attention_mask=mask))

    def after_attention(self, layer, context, x):
        return layer.sa_layer_norm(layer.attention.out_lin(context) + x)

    def ffn_hidden(self, layer, h):
        return layer.ffn.activation(layer.ffn.lin1(h))

    def after_ffn(self, layer, hidden, h):
        return layer.output_layer_norm(layer.ffn.lin2(hidden) + h)

    def remove_attention(self, layer):
        layer.attention = NoHeads(out_name="out_lin", out_proj=layer.attention.out_lin)

    def post_layer_modules(self, model):
        return [model.qa_outputs] if hasattr(model, "qa_outputs") else [model.pre_classifier, model.classifier]

    def logits(self, model, x):
        if hasattr(model, "qa_outputs"):
            return model.qa_outputs(x)
        # DistilBertForSequenceClassification: the first token, pre_classifier, ReLU, (dropout), classifier
        return model.classifier(torch.relu(model.pre_classifier(x[:, 0])))
