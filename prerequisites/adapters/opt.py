"""OPT (decoder): pre- or post-LayerNorm layers, ReLU FFN fc1/fc2, learned positions."""
from prerequisites.adapters.base import Adapter, input_of
from prerequisites.modeling_stat import NoHeads


class OPTAdapter(Adapter):
    family = "opt"
    default_allocation = "ffn_greedy"
    depth_weighting = "expfit"
    capture_kwargs = {"use_cache": False}
    is_decoder = True
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_consumer = "self_attn.out_proj"
    ffn_producers = ("fc1",)
    ffn_consumer = "fc2"

    def layers(self, model):
        return model.model.decoder.layers

    def head_dim(self):
        return self.config.hidden_size // self.config.num_attention_heads

    def attention_context(self, layer, x, extras):
        if layer.do_layer_norm_before:
            x = layer.self_attn_layer_norm(x)
        return input_of(layer.self_attn.out_proj, lambda: layer.self_attn(
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

    def attn_units_changed(self, layer, n_units):
        # OPTAttention reshapes with self.num_heads, so each layer carries its own count.
        layer.self_attn.num_heads = n_units
        super().attn_units_changed(layer, n_units)

    def recorded_attributes(self, layer):
        return {"self_attn": {"num_heads": self.n_attn_units(layer)}} if self.n_attn_units(layer) else {}

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
