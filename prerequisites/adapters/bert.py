"""BERT (encoder): Q/K/V in attention.self, the output projection in attention.output."""
from prerequisites.adapters.base import Adapter
from prerequisites.modeling_stat import NoHeads


class BertAdapter(Adapter):
    family = "bert"
    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    attn_consumer = "attention.output.dense"
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

    def post_layer_modules(self, model):
        return [model.qa_outputs] if hasattr(model, "qa_outputs") else [model.bert.pooler, model.classifier]

    def logits(self, model, x):
        if hasattr(model, "qa_outputs"):
            return model.qa_outputs(x)
        return model.classifier(model.bert.pooler(x))  # BertForSequenceClassification's dropout: none in eval
