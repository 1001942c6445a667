"""--low_memory: layers read from the checkpoint's files for their turn and written as they are
done (prerequisites/streaming.py) give exactly what the in-memory path gives: the same pruning,
perplexity and quantization, and pruned checkpoints that load the same way to the same logits."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import opt_eval
import prune_opt
import quantize_opt
import tiny
from efficiency.macs import adapter_costs
from evaluate.perplexity import window_nlls
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, save_pruned
from prerequisites.layerwise import each_layer
from prerequisites.streaming import INDEX_FILE, load_streamed
from prune.stat import stat_prune
from quantize.sequential import quantize_model
from quantize.storage import QUANTIZED, save_quantized
from test_adapters import shrink
from utils.cli import run_main
from utils.errors import UserError


def tied_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return tiny._spread(LlamaForCausalLM(config)).eval()


FAMILIES = {"opt": lambda: tiny.opt(vocab=1000), "llama": lambda: tiny.llama(vocab=1000), "tied-llama": tied_llama}


def saved(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return str(path)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def is_empty(layer):
    return all(t.device.type == "meta" for t in list(layer.parameters()) + list(layer.buffers()))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_model_is_the_checkpoint_with_empty_layers(family, tmp_path):
    model = FAMILIES[family]()
    path = saved(model, tmp_path / "dense")
    streamed, store = load_streamed(path, str(tmp_path / "work"))
    adapter = adapter_for(streamed)
    assert all(is_empty(layer) for layer in adapter.layers(streamed))
    outside = [t for name, t in streamed.named_parameters() if ".layers." not in name]
    assert outside and all(t.device.type == "cpu" for t in outside)
    if family == "tied-llama":
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    # one layer at a time holds weights, and they are the checkpoint's
    dense = dict(model.state_dict())
    for index, layer in each_layer(streamed, adapter, "cpu", store, progress=False):
        assert [is_empty(other) for other in adapter.layers(streamed)] == [i != index for i in range(3)]
        prefix = adapter.layer_names(streamed)[index] + "."
        for key, t in layer.state_dict().items():
            assert torch.equal(t, dense[prefix + key])
    assert all(is_empty(layer) for layer in adapter.layers(streamed))
    # so the layer-by-layer perplexity is the model's
    windows = torch.randint(5, 1000, (4, 20), generator=torch.Generator().manual_seed(0))
    expected = window_nlls(model, adapter_for(model), windows, "cpu", batch_size=2, progress=False)
    got = window_nlls(streamed, adapter, windows, "cpu", batch_size=2, progress=False, store=store)
    assert torch.equal(got, expected)


# the last case: the dense stream carried beside the pruned one through layers that live on disk
# between their turns, and held-out prices (their folds' Grams beside each layer in pass 1)
@pytest.mark.parametrize("family,method,calibration,correction,pricing", [
    ("opt", "stat", "sequential", "self", "insample"), ("llama", "stat", "sequential", "self", "insample"),
    ("tied-llama", "stat", "sequential", "self", "insample"), ("tied-llama", "stat", "one_shot", "self", "insample"),
    ("opt", "magnitude", None, "self", "insample"), ("llama", "stat", "sequential", "dense", "heldout")])
def test_streamed_pruning_writes_the_same_checkpoint(family, method, calibration, correction, pricing, tmp_path):
    dense_path = saved(FAMILIES[family](), tmp_path / "dense")
    batches = tiny.random_batches(n_batches=4, batch=4, length=16)
    kwargs = dict(method=method, calibration=calibration or "sequential", progress=False, correction=correction,
                  pricing=pricing)

    model = load_model(dense_path)
    adapter = adapter_for(model)
    in_memory = stat_prune(model, adapter, batches, adapter_costs(adapter, 16), 0.5, "cpu", **kwargs)
    save_pruned(model, str(tmp_path / "in-memory"))

    streamed, store = load_streamed(dense_path, str(tmp_path / "work"))
    result = stat_prune(streamed, adapter_for(streamed), batches, adapter_costs(adapter, 16), 0.5, "cpu", store=store,
                        **kwargs)
    assert (result.attn_units, result.neurons) == (in_memory.attn_units, in_memory.neurons)
    assert all(is_empty(layer) for layer in adapter_for(streamed).layers(streamed))
    store.save(str(tmp_path / "streamed"))

    files = sorted(os.listdir(tmp_path / "streamed"))
    assert INDEX_FILE in files and "model-00004-of-00004.safetensors" in files and "modeling_stat.py" in files
    assert os.listdir(tmp_path / "work") == []  # the layers' files moved into the checkpoint
    for file in ("config.json", "generation_config.json"):
        configs = [json.load(open(tmp_path / name / file)) for name in ("in-memory", "streamed")]
        assert configs[0] == configs[1]
    assert json.load(open(tmp_path / "streamed" / "config.json"))["stat_heads"] == in_memory.attn_units
    expected = logits(load_model(str(tmp_path / "in-memory")), batches)
    assert torch.equal(logits(load_model(str(tmp_path / "streamed")), batches), expected)
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"), trust_remote_code=True)
    assert torch.equal(logits(remote.eval(), batches), expected)


def test_checkpoints_sharded_pruned_or_named_from_the_base_model_stream(tmp_path):
    """A sharded source (index file), a pruned one (layers of their own shapes, one without
    attention), and OPT's hub layout (keys without the `model.` prefix) all read as from_pretrained
    reads them."""
    windows = torch.randint(5, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    pruned = shrink(tiny.llama(vocab=1000), [2, 0, 1], [20, 5, 64])
    save_pruned(pruned, str(tmp_path / "pruned"))
    opt = tiny.opt(vocab=1000)
    (tmp_path / "opt-hub").mkdir()
    opt.config.architectures = ["OPTForCausalLM"]
    opt.config.save_pretrained(tmp_path / "opt-hub")
    save_file({k.removeprefix("model."): v.contiguous() for k, v in opt.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "opt-hub" / "model.safetensors"), metadata={"format": "pt"})
    sources = {"sharded": saved(tiny.llama(vocab=1000), tmp_path / "sharded", max_shard_size="100KB"),
               "pruned": str(tmp_path / "pruned"), "opt-hub": str(tmp_path / "opt-hub")}
    assert os.path.exists(os.path.join(sources["sharded"], INDEX_FILE))
    for name, path in sources.items():
        model = load_model(path)
        streamed, store = load_streamed(path, str(tmp_path / f"work-{name}"))
        expected = window_nlls(model, adapter_for(model), windows, "cpu", progress=False)
        got = window_nlls(streamed, adapter_for(streamed), windows, "cpu", progress=False, store=store)
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("nearest", [False, True])
def test_streamed_quantization_gives_the_same_codes_and_checkpoint(nearest, tmp_path):
    dense_path = str(tmp_path / "dense")  # a pruned model: layers of their own shapes
    save_pruned(shrink(tiny.opt(vocab=1000), [4, 2, 1], [50, 9, 17]), dense_path)
    batches = tiny.random_batches(n_batches=3, batch=4, length=16)
    model = load_model(dense_path)
    expected = quantize_model(model, adapter_for(model), batches, "cpu", 4, groupsize=16, nearest=nearest,
                              progress=False)
    streamed, store = load_streamed(dense_path, str(tmp_path / "work"))
    got = quantize_model(streamed, adapter_for(streamed), batches, "cpu", 4, groupsize=16, nearest=nearest,
                         progress=False, store=store)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name].qweight, expected[name].qweight) and torch.equal(got[name].scales,
                                                                                     expected[name].scales)
    save_quantized(model, expected, str(tmp_path / "q-memory"))
    save_quantized(streamed, got, str(tmp_path / "q-streamed"), store=store)
    reference = logits(load_model(str(tmp_path / "q-memory"), formats=[QUANTIZED]), batches)
    assert torch.equal(logits(load_model(str(tmp_path / "q-streamed"), formats=[QUANTIZED]), batches), reference)
    # the dequantized weights, saved as an ordinary checkpoint (what lm-eval reads)
    store.save(str(tmp_path / "dequantized"))
    assert torch.equal(logits(load_model(str(tmp_path / "dequantized")), batches), reference)


@pytest.fixture(scope="module")
def corpus(tiny_checkpoints, tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    tiny.write_austen(data, 30000, 8000)
    return str(data), tiny_checkpoints["tiny-llama"]


def run(script, corpus, tmp_path, name, extra):
    data, model_dir = corpus
    argv = ["--model_name", "tiny-llama", "--model_dir", model_dir, "--task", "text", "--data_dir", data,
            "--seqlen", "64", "--nsamples", "6", "--eval_samples", "3", "--output_dir", str(tmp_path / name),
            "--device", "cpu", "--save_model", str(tmp_path / name / "model"), *extra]
    return script.main(argv)


SAME = ("ppl_dense", "ppl_pruned", "ppl_quantized", "heads_per_layer", "neurons_per_layer", "mac_ratio",
        "params_pruned", "size_on_disk_mb")


@pytest.mark.parametrize("script,extra,formats", [
    (prune_opt, ["--mu", "0.5"], []),
    (quantize_opt, ["--mu", "0.6", "--wbits", "4", "--groupsize", "16"], [QUANTIZED]),
    (opt_eval, ["--wbits", "3", "--nearest"], [QUANTIZED]),
], ids=["prune_opt", "quantize_opt", "opt_eval"])
def test_low_memory_runs_report_and_save_what_in_memory_runs_do(corpus, tmp_path, script, extra, formats):
    records = [run(script, corpus, tmp_path, name, extra + flag)
               for name, flag in (("in-memory", []), ("streamed", ["--low_memory"]))]
    assert records[1]["low_memory"] and not records[0]["low_memory"]
    for key in SAME:
        assert records[0].get(key) == records[1].get(key), key
    assert "low memory" in open(tmp_path / "streamed" / "opt" / "tiny-llama.txt").read()
    batches = tiny.random_batches(n_batches=2, batch=2, length=16)
    models = [load_model(str(tmp_path / name / "model"), formats=formats) for name in ("in-memory", "streamed")]
    assert torch.equal(logits(models[1], batches), logits(models[0], batches))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".stat-layers-")]  # the work folder is gone


def test_low_memory_needs_safetensors_and_an_unpacked_checkpoint(corpus, tmp_path, capsys):
    data, _ = corpus
    bin_dir = tmp_path / "bin"
    model = tiny.llama(positions=128)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny.gpt2_tokenizer_dir()).save_pretrained(bin_dir)
    with pytest.raises(UserError, match="reads the weights from safetensors files"):
        load_streamed(str(bin_dir), str(tmp_path))
    quantized = tmp_path / "quantized"
    run(opt_eval, corpus, tmp_path, "q", ["--wbits", "4", "--nearest"])
    os.rename(tmp_path / "q" / "model", quantized)
    argv = ["--model_name", "q", "--model_dir", str(quantized), "--task", "text", "--data_dir", data,
            "--seqlen", "64", "--output_dir", str(tmp_path / "out"), "--low_memory"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(lambda: opt_eval.main(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "not packed quantized ones" in err, err
