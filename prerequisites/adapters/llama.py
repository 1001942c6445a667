"""Llama-family decoders: grouped-query attention (an attention unit is a KV group), gated FFN."""
from prerequisites.adapters.base import Adapter, input_of
from prerequisites.modeling_stat import NoHeads


class LlamaAdapter(Adapter):
    family = "llama"
    default_allocation = "ffn_greedy"
    depth_weighting = "expfit"
    capture_kwargs = {"use_cache": False}
    is_decoder = True
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_consumer = "self_attn.o_proj"
    ffn_producers = ("mlp.gate_proj", "mlp.up_proj")
    ffn_consumer = "mlp.down_proj"

    def layers(self, model):
        return model.model.layers

    def head_dim(self):
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def query_heads_per_unit(self):
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def gated_ffn(self):
        return True

    def attention_context(self, layer, x, extras):
        x = layer.input_layernorm(x)
        return input_of(layer.self_attn.o_proj, lambda: layer.self_attn(
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
