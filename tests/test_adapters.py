"""Adapters: the four-piece layer equals the layer, shapes shrink for real, checkpoints reload."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import tiny
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, save_pruned
from prerequisites.layerwise import capture_inputs

FAMILIES = {"bert": tiny.bert, "distilbert": tiny.distilbert, "opt": tiny.opt, "llama": tiny.llama}


def four_pieces(adapter, layer, x, extras):
    context = adapter.attention_context(layer, x, extras)
    h = adapter.after_attention(layer, context, x)
    return adapter.after_ffn(layer, adapter.ffn_hidden(layer, h), h)


def full_layer(layer, x, extras):
    out = layer(x, **extras)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_four_pieces_equal_the_layer(family):
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=1, pad=family in ("bert", "distilbert"))
    calib = capture_inputs(model, adapter, batches, "cpu")
    x, extras = calib.hidden[0], calib.extras[0]
    with torch.no_grad():
        for layer in adapter.layers(model):
            expected = full_layer(layer, x, extras)
            assert torch.allclose(four_pieces(adapter, layer, x, extras), expected, atol=1e-6)
            x = expected


def shrink(model, heads, neurons, seed=0):
    """Prune fixed units without any correction (shapes only)."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    for layer, h, n in zip(adapter.layers(model), heads, neurons):
        keep_units = torch.sort(torch.randperm(adapter.n_attn_units(layer), generator=g)[:h]).values
        dims = (keep_units[:, None] * adapter.attn_unit_dims() + torch.arange(adapter.attn_unit_dims())).reshape(-1)
        adapter.prune_attn_units(layer, keep_units, adapter.get(layer, adapter.attn_consumer).weight[:, dims])
        keep = torch.sort(torch.randperm(adapter.n_neurons(layer), generator=g)[:n]).values
        adapter.prune_neurons(layer, keep, adapter.get(layer, adapter.ffn_consumer).weight[:, keep])
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_shapes_are_real(family):
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    before = sum(p.numel() for p in model.parameters())
    shrink(model, [1, 0, 2], [10, 0, 33])
    layers = adapter.layers(model)
    assert [adapter.n_attn_units(l) for l in layers] == [1, 0, 2]
    assert [adapter.n_neurons(l) for l in layers] == [10, 0, 33]
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        model(**tiny.random_batches(n_batches=1)[0])  # runs with an empty layer


def test_a_bert_layer_with_nothing_left_adds_only_biases():
    model = shrink(tiny.bert(), [0, 4, 4], [0, 64, 64])
    layer = model.bert.encoder.layer[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x)[0] if isinstance(layer(x), tuple) else layer(x)
        h = layer.attention.output.LayerNorm(layer.attention.output.dense.bias + x)
        expected = layer.output.LayerNorm(layer.output.dense.bias + h)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_reloads_with_identical_logits(family, tmp_path):
    model = FAMILIES[family]()
    all_units = adapter_for(model).n_attn_units(adapter_for(model).layers(model)[0])
    shrink(model, [all_units, 0, 1], [50, 7, 0])
    batch = tiny.random_batches(n_batches=1, pad=family in ("bert", "distilbert"))[0]
    with torch.no_grad():
        expected = model(**batch).logits
    save_pruned(model, str(tmp_path))
    reloaded = load_model(str(tmp_path))
    auto = AutoModelForCausalLM if family in ("opt", "llama") else AutoModelForSequenceClassification
    remote = auto.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        assert torch.equal(remote(**batch).logits, expected)
    assert [adapter_for(reloaded).n_attn_units(l) for l in adapter_for(reloaded).layers(reloaded)] == [all_units, 0, 1]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_pruned_decoder_generates_with_a_kv_cache(family):
    model = shrink(FAMILIES[family](), [0, 1, 2], [20, 0, 64])  # layer 0 has no attention at all
    prompt = torch.randint(5, 1000, (2, 6))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                output_logits=True, return_dict_in_generate=True)
        # the same tokens in one pass, no cache: the logits that chose each new token
        full = model(cached.sequences).logits[:, prompt.shape[1] - 1:-1]
    assert cached.sequences.shape == (2, 14)
    # logits, not tokens: comparing greedy tokens of two runs would fail on a near-tie in float32
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reloaded_pruned_model_saves_and_reloads_again(family, tmp_path):
    # a model loaded from a pruned checkpoint is an instance of the reshapable twin class;
    # its checkpoint must still name the stock class, or it would not load a second time
    model = shrink(FAMILIES[family](), [2, 1, 2], [30, 9, 5])
    save_pruned(model, str(tmp_path / "first"))
    reloaded = load_model(str(tmp_path / "first"))
    shrink(reloaded, [1, 1, 1], [20, 9, 5])
    batch = tiny.random_batches(n_batches=1, pad=family in ("bert", "distilbert"))[0]
    with torch.no_grad():
        expected = reloaded(**batch).logits
    save_pruned(reloaded, str(tmp_path / "second"))
    with open(tmp_path / "second" / "config.json") as f:
        assert json.load(f)["architectures"] == [type(model).__name__]
    again = load_model(str(tmp_path / "second"))
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, expected)
