"""GGUF export (prerequisites/gguf_export.py, scripts/export_gguf.py) and the exported files run in
llama.cpp (evaluate/llama_cpp.py). The llama.cpp tests need llama-cpp-python (`make gguf`, which
`make test` runs); without it they are skipped with that reason."""
import importlib.util
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tiny
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, load_tokenizer, save_pruned
from prerequisites.gguf_export import export_gguf, rope_permuted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (make gguf builds it)")


def tiny_llama(bias=False, seed=0):
    """Four layers, grouped-query attention (4 query heads over 2 KV heads, head size 8)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=False, attention_bias=bias, mlp_bias=bias, rope_theta=10000.0)
    model = tiny._spread(LlamaForCausalLM(config)).eval()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.3)
    return model


def pruned(model, units, neurons):
    """The model with layer i keeping the KV groups units[i] and the FFN neurons neurons[i]
    (the kept units' consumer columns unchanged)."""
    adapter = adapter_for(model)
    width = adapter.attn_unit_dims()
    for layer, keep_units, keep in zip(adapter.layers(model), units, neurons):
        keep_units, keep = torch.tensor(keep_units, dtype=torch.long), torch.tensor(keep, dtype=torch.long)
        dims = (keep_units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
        adapter.prune_attn_units(layer, keep_units, adapter.get(layer, adapter.attn_consumer).weight[:, dims])
        adapter.prune_neurons(layer, keep, adapter.get(layer, adapter.ffn_consumer).weight[:, keep])
    return model


# layer 0 keeps one KV group, layer 1 none, layer 2 a single FFN neuron, layer 3 no neuron
UNITS = [[1], [], [0, 1], [0]]
NEURONS = [list(range(0, 64, 2)), list(range(40)), [5], []]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved checkpoints, reloaded as the export script reads them: name -> folder."""
    root = tmp_path_factory.mktemp("gguf-checkpoints")
    tokenizer = load_tokenizer(tiny.gpt2_tokenizer_dir())
    folders = {"dense": tiny.save_checkpoint(tiny_llama(), root / "dense", tiny.gpt2_tokenizer_dir())}
    for name, model, units in (("pruned", tiny_llama(), UNITS),
                               ("pruned-bias", tiny_llama(bias=True), UNITS),
                               ("no-heads-0", tiny_llama(), [[], [0], [0, 1], [1]])):
        folders[name] = str(root / name)
        save_pruned(pruned(model, units, NEURONS), folders[name], tokenizer)
    return folders


def export(folder, path, outtype="f32"):
    model = load_model(folder)
    return model, export_gguf(model, load_tokenizer(folder), folder, str(path), outtype)


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def test_rope_permutation_against_both_rotary_layouts():
    """Rotating transformers' queries (rotate-half) then permuting equals permuting the weights
    then rotating adjacent pairs, as llama.cpp does, written out here from the rotary formula."""
    torch.manual_seed(0)
    n_heads, head_dim, hidden, seq, base = 3, 8, 16, 5, 10000.0
    w, x = torch.randn(n_heads * head_dim, hidden), torch.randn(seq, hidden)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (seq, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)
    q = (x.double() @ w.double().T).reshape(seq, n_heads, head_dim).transpose(0, 1)[None]
    rotated, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    expected = rope_permuted(rotated[0].transpose(0, 1).reshape(seq, -1).T.numpy(), n_heads).T

    pairs = (x.double().numpy() @ rope_permuted(w.double().numpy(), n_heads).T).reshape(seq, n_heads, head_dim // 2, 2)
    cos, sin = np.cos(angles.numpy())[:, None, :], np.sin(angles.numpy())[:, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    ours = np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(seq, -1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    # and a bias (one row per output) moves with its rows
    b = np.arange(n_heads * head_dim, dtype=np.float64)
    np.testing.assert_array_equal(rope_permuted(b, n_heads), rope_permuted(b[:, None] * np.ones((1, 2)), n_heads)[:, 0])


def test_arrays_and_shapes_follow_the_checkpoint(checkpoints, tmp_path):
    model, (heads, heads_kv, widths) = export(checkpoints["pruned"], tmp_path / "p.gguf")
    # what each layer kept, with the traps: layer 1 has no heads and no bias (no attention);
    # layer 3 kept no neuron (one zero neuron is written)
    assert heads == [2, 0, 4, 2] and heads_kv == [1, 0, 2, 1] and widths == [32, 40, 1, 1]
    reader, kv = fields(tmp_path / "p.gguf")
    assert kv["general.architecture"] == "deci"
    assert kv["deci.attention.head_count"] == heads and kv["deci.attention.head_count_kv"] == heads_kv
    assert kv["deci.feed_forward_length"] == widths and kv["deci.block_count"] == 4
    for key in ("deci.attention.head_count", "deci.attention.head_count_kv", "deci.feed_forward_length"):
        field = reader.fields[key]
        assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert kv["deci.attention.key_length"] == kv["deci.attention.value_length"] == 8
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # (out, in)
    assert shapes["blk.0.attn_q.weight"] == (16, 32) and shapes["blk.0.attn_k.weight"] == (8, 32)
    assert shapes["blk.0.attn_output.weight"] == (32, 16)
    assert not any(name.startswith("blk.1.attn") for name in shapes)
    assert shapes["blk.2.ffn_up.weight"] == (1, 32) and shapes["blk.2.ffn_down.weight"] == (32, 1)
    assert shapes["blk.3.ffn_gate.weight"] == (1, 32)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert not tensors["blk.3.ffn_gate.weight"].any() and not tensors["blk.3.ffn_down.weight"].any()
    layer = model.model.layers[2]
    np.testing.assert_array_equal(tensors["blk.2.ffn_down.weight"].reshape(32, 1),
                                  layer.mlp.down_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.2.attn_k.weight"].reshape(16, 32),
                                  rope_permuted(layer.self_attn.k_proj.weight.detach().numpy(), 2))
    assert shapes["output.weight"] == (50257, 32) and kv["tokenizer.ggml.pre"] == "gpt-2"


def test_dense_export_has_every_width_equal(checkpoints, tmp_path):
    _, (heads, heads_kv, widths) = export(checkpoints["dense"], tmp_path / "d.gguf")
    assert heads == [4] * 4 and heads_kv == [2] * 4 and widths == [64] * 4


def test_layer_without_heads_keeps_its_bias_through_a_zero_group(checkpoints, tmp_path):
    model, (heads, heads_kv, _) = export(checkpoints["pruned-bias"], tmp_path / "b.gguf")
    assert heads[1] == 2 and heads_kv[1] == 1  # one zero group carries o_proj's bias
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert not tensors["blk.1.attn_v.weight"].any() and not tensors["blk.1.attn_output.weight"].any()
    np.testing.assert_array_equal(tensors["blk.1.attn_output.bias"],
                                  model.model.layers[1].self_attn.o_proj.bias.detach().numpy())


def test_layer_zero_always_keeps_a_group(checkpoints, tmp_path):
    _, (heads, heads_kv, _) = export(checkpoints["no-heads-0"], tmp_path / "z.gguf")
    assert heads[0] == 2 and heads_kv[0] == 1


def test_q8_0_blocks_and_f16_fallback(checkpoints, tmp_path):
    """Q8_0 where the row length is a multiple of 32, f16 elsewhere; norms stay f32. Q8_0 rounds
    to half a step d = max|block| / 127, and stores d in f16 (relative error 2^-11, times |q| <= 127)."""
    model, _ = export(checkpoints["pruned"], tmp_path / "q.gguf", "q8_0")
    types = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    q = types["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = rope_permuted(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), 2)
    restored = gguf.quants.dequantize(q.data, q.tensor_type).reshape(weight.shape)
    step = np.abs(weight).reshape(-1, 32).max(axis=1) / 127
    assert (np.abs(restored - weight).reshape(-1, 32) <= step[:, None] * (0.5 + 127 * 2.0 ** -11)).all()
    assert types["blk.2.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # a row of 1
    assert types["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def run_script(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_gguf.py"), *args],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("case", ["opt", "outtype", "folder", "missing"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_checkpoints, checkpoints, tmp_path):
    out = tmp_path / "out.gguf"
    args = {"opt": [tiny_checkpoints["tiny-opt"], str(out)],
            "outtype": [checkpoints["dense"], str(out), "--outtype", "q4_0"],
            "folder": [checkpoints["dense"], str(tmp_path / "no-such-folder" / "out.gguf")],
            "missing": [str(tmp_path / "no-checkpoint"), str(out)]}[case]
    result = run_script(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert os.listdir(tmp_path) == []


def test_interrupted_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError):
        export(checkpoints["dense"], tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


# --- in llama.cpp

def transformers_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@needs_llama_cpp
@pytest.mark.parametrize("name", ["dense", "pruned", "pruned-bias", "no-heads-0"])
def test_llama_cpp_logits_equal_transformers(name, checkpoints, tmp_path):
    """llama.cpp on the f32 export computes what transformers computes on the checkpoint, to
    float32 rounding (different summation orders over widths of at most 64)."""
    from evaluate import llama_cpp

    model, _ = export(checkpoints[name], tmp_path / "m.gguf")
    ids = torch.randint(0, 50257, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = transformers_logits(model, ids)
    with llama_cpp.load(tmp_path / "m.gguf", n_ctx=64, threads=1) as llm:
        got = llama_cpp.logits(llm, ids)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_the_checkpoint(checkpoints, tmp_path):
    from dataset.lm import AUSTEN_DIR
    from evaluate import llama_cpp

    export(checkpoints["dense"], tmp_path / "m.gguf")
    text = open(os.path.join(AUSTEN_DIR, "emma.txt"), encoding="utf-8").read()[:20000]
    tokenizer = load_tokenizer(checkpoints["dense"])
    with llama_cpp.load(tmp_path / "m.gguf", n_ctx=64, threads=1) as llm:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert ours == tokenizer(text)["input_ids"]


@needs_llama_cpp
def test_llama_cpp_quantizes_the_pruned_export(checkpoints, tmp_path):
    from evaluate import llama_cpp

    export(checkpoints["pruned"], tmp_path / "m.gguf")
    llama_cpp.quantize(tmp_path / "m.gguf", tmp_path / "m-q8.gguf", "q8_0")
    assert os.path.getsize(tmp_path / "m-q8.gguf") < os.path.getsize(tmp_path / "m.gguf") / 2
    ids = list(range(100, 132))
    with llama_cpp.load(tmp_path / "m.gguf", n_ctx=64, threads=1) as full, \
            llama_cpp.load(tmp_path / "m-q8.gguf", n_ctx=64, threads=1) as quantized:
        a, b = llama_cpp.logits(full, ids), llama_cpp.logits(quantized, ids)
    assert 0 < np.abs(a - b).max() <= 0.05 * np.abs(a).max()
