"""A Llama-family checkpoint, pruned or dense, as a GGUF file that stock llama.cpp runs.

llama.cpp's architecture `deci` (Nemotron-NAS) builds every layer with its own head count,
KV-head count and FFN width, read from per-layer INT32 arrays, with Llama's tensor names. Three
of its rules decide how a pruned layer is written (read in llama.cpp's src/models/deci.cpp and
src/llama-model.cpp):
- a layer whose FFN width is 0 is skipped whole, its attention output with it: a layer that kept
  no neuron is written with one neuron of zero weights (silu(0) * 0 adds nothing);
- a layer with head count 0 has no attention at all, not even the output projection's bias:
  a layer that kept no heads is written that way only when it has no bias to add; otherwise it
  keeps one KV group of zero weights, whose context is zero, so that the bias survives;
- layer 0's head count sets the default head size: here layer 0 always keeps a KV group, and
  the head size is written explicitly (key_length, value_length), since a pruned layer 0 has
  fewer heads than hidden_size / head_dim.
Queries and keys are permuted per layer from transformers' rotary layout (the two halves of a
head) to llama.cpp's (adjacent pairs).

The tokenizer is written from the checkpoint's tokenizer.json: byte-level BPE with the
pre-tokenizers of PRE_TOKENIZERS (the names llama.cpp knows them by). Other tokenizers, rope
scalings and model families stop with a one-line error.
"""
import json
import os

import gguf
import numpy as np
import torch

from prerequisites.modeling_stat import NoHeads
from utils.atomic import atomic_path
from utils.errors import UserError

ARCH = "deci"

# outtype -> (GGUF file type, the type of 2-D weights)
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}

# tokenizer.json pre_tokenizer -> llama.cpp's name for the same splitting
PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel", "use_regex": True}]},
}


# --- weights

def rope_permuted(w, n_heads):
    """Rows (or a bias) of queries or keys, from transformers' rotary layout (within a head, the
    first half pairs with the second) to llama.cpp's (row 2i pairs with row 2i + 1)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t):
    return t.detach().to(torch.float32).cpu().numpy()


def _has_bias(linear):
    return linear.bias is not None and bool(linear.bias.detach().any())


def attention_tensors(layer, index, config):
    """(n_head, n_head_kv, {tensor name in the block: array}) of one layer's attention."""
    head_dim = head_dim_of(config)
    hidden = config.hidden_size
    group = config.num_attention_heads // config.num_key_value_heads
    attn = layer.self_attn
    if isinstance(attn, NoHeads):
        if index > 0 and not _has_bias(attn.o_proj):
            return 0, 0, {}
        # one KV group of zero weights: its context is zero, so the layer adds o_proj's bias only
        tensors = {"attn_norm.weight": _array(layer.input_layernorm.weight),
                   "attn_q.weight": np.zeros((group * head_dim, hidden), np.float32),
                   "attn_k.weight": np.zeros((head_dim, hidden), np.float32),
                   "attn_v.weight": np.zeros((head_dim, hidden), np.float32),
                   "attn_output.weight": np.zeros((hidden, group * head_dim), np.float32)}
        if attn.o_proj.bias is not None:
            tensors["attn_output.bias"] = _array(attn.o_proj.bias)
        return group, 1, tensors
    n_head = attn.q_proj.out_features // head_dim
    n_head_kv = attn.k_proj.out_features // head_dim
    tensors = {"attn_norm.weight": _array(layer.input_layernorm.weight)}
    for name, linear, heads in (("attn_q", attn.q_proj, n_head), ("attn_k", attn.k_proj, n_head_kv),
                                ("attn_v", attn.v_proj, None), ("attn_output", attn.o_proj, None)):
        for part in ("weight", "bias"):
            value = getattr(linear, part)
            if value is not None:
                value = _array(value)
                tensors[f"{name}.{part}"] = rope_permuted(value, heads) if heads else value
    return n_head, n_head_kv, tensors


def ffn_tensors(layer, config):
    """(n_ff, {tensor name in the block: array}) of one layer's FFN."""
    mlp = layer.mlp
    tensors = {"ffn_norm.weight": _array(layer.post_attention_layernorm.weight)}
    n_ff = mlp.gate_proj.out_features
    for name, linear in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
        for part in ("weight", "bias"):
            value = getattr(linear, part)
            if value is not None:
                tensors[f"{name}.{part}"] = _array(value)
    if n_ff == 0:  # one neuron of zero weights: llama.cpp skips a layer of width 0 whole
        hidden = config.hidden_size
        tensors["ffn_gate.weight"] = np.zeros((1, hidden), np.float32)
        tensors["ffn_up.weight"] = np.zeros((1, hidden), np.float32)
        tensors["ffn_down.weight"] = np.zeros((hidden, 1), np.float32)
        for name in ("ffn_gate.bias", "ffn_up.bias"):
            if name in tensors:
                tensors[name] = np.zeros(1, np.float32)
        n_ff = 1
    return n_ff, tensors


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_exportable(config):
    """A one-line error for what the deci builder cannot run (config: a checkpoint's config)."""
    if getattr(config, "model_type", None) != "llama":
        raise UserError(f"GGUF export covers Llama-family checkpoints; this one is "
                        f"{getattr(config, 'model_type', None)} (llama.cpp has no OPT, "
                        "and its BERT reads one width for all layers)")
    if config.hidden_act != "silu":
        raise UserError(f"llama.cpp's deci runs SiLU FFNs; this checkpoint uses {config.hidden_act}")
    rope = rope_settings(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope type {rope['rope_type']!r} is not exported (only the default rope)")


def rope_settings(config):
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in rope:
        rope = dict(rope, rope_theta=getattr(config, "rope_theta", 10000.0))
    return rope


def write_weights(writer, tensors, weight_type):
    """Add tensors: 2-D weights as weight_type (a row length that Q8_0's blocks do not divide stays
    f16, as llama.cpp's converter does), norms and biases f32."""
    for name, value in tensors.items():
        if value.ndim == 2 and weight_type == gguf.GGMLQuantizationType.Q8_0:
            if value.shape[1] % gguf.GGML_QUANT_SIZES[weight_type][0] == 0:
                writer.add_tensor(name, gguf.quants.quantize(value, weight_type), raw_dtype=weight_type)
            else:
                writer.add_tensor(name, value.astype(np.float16))
        elif value.ndim == 2 and weight_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, value.astype(np.float32))


# --- tokenizer

def pre_tokenizer_name(tokenizer_json):
    pre = tokenizer_json.get("pre_tokenizer")
    for name, pattern in PRE_TOKENIZERS.items():
        if _matches(pre, pattern):
            return name
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:80]}) is not one llama.cpp is known to "
                    f"split the same way here (known: {', '.join(PRE_TOKENIZERS)})")


def _matches(value, pattern):
    """Whether value has every field of pattern (lists element by element)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_matches(value.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and len(value) == len(pattern) and all(map(_matches, value, pattern))
    return value == pattern


def vocabulary(tokenizer, tokenizer_json, n_vocab):
    """(tokens, token types) for ids 0..n_vocab-1: added special tokens are control tokens,
    other added tokens user-defined, ids the tokenizer lacks unused padding."""
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    by_id = {i: token for token, i in tokenizer_json["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_special(tokenizer):
    """(adds BOS, adds EOS) when the tokenizer encodes a text, measured on one."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id and full[1:1 + len(plain)] == plain
    eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id and full[-1 - len(plain):-1] == plain
    return bos, eos


def write_tokenizer(writer, tokenizer, tokenizer_dir, n_vocab):
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise UserError(f"GGUF export needs the checkpoint's tokenizer.json; {tokenizer_dir} has none")
    with open(path, encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    if tokenizer_json["model"].get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("GGUF export covers byte-level BPE tokenizers (GPT-2's kind); this one is "
                        f"{tokenizer_json['model'].get('type')}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    tokens, types = vocabulary(tokenizer, tokenizer_json, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token = {}  # measured below, on the tokenizer itself
    special.add_to_gguf(writer, quiet=True)
    bos, eos = adds_special(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)


# --- the file

def export_gguf(model, tokenizer, tokenizer_dir, path, outtype="f32", name=None):
    """Write `model` (a dense or pruned LlamaForCausalLM) and its tokenizer to `path`, whole or
    not at all. Returns the per-layer (head counts, KV-head counts, FFN widths) written."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    check_exportable(model.config)
    config = model.config
    file_type, weight_type = OUTTYPES[outtype]
    blocks, heads, heads_kv, widths = [], [], [], []
    for index, layer in enumerate(model.model.layers):
        n_head, n_head_kv, attn = attention_tensors(layer, index, config)
        n_ff, ffn = ffn_tensors(layer, config)
        heads.append(n_head)
        heads_kv.append(n_head_kv)
        widths.append(n_ff)
        blocks.append({f"blk.{index}.{k}": v for k, v in {**attn, **ffn}.items()})

    n_vocab = config.vocab_size
    head_dim = head_dim_of(config)
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(temporary, arch=ARCH)
        writer.add_name(name or "stat-pruned")
        writer.add_file_type(file_type)
        if weight_type == gguf.GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_block_count(len(blocks))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(widths)
        writer.add_head_count(heads)
        writer.add_head_count_kv(heads_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope_settings(config)["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        write_tokenizer(writer, tokenizer, tokenizer_dir, n_vocab)

        tensors = {"token_embd.weight": _array(model.model.embed_tokens.weight),
                   "output_norm.weight": _array(model.model.norm.weight)}
        if not config.tie_word_embeddings:
            tensors["output.weight"] = _array(model.lm_head.weight)
        for block in blocks:
            tensors.update(block)
        write_weights(writer, tensors, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    return heads, heads_kv, widths

