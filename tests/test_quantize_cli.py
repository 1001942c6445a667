"""GPTQ on whole models: quantize_model, quantized checkpoints, quantize_opt.py and opt_eval.py --wbits,
on tiny OPT and Llama models with uneven pruned shapes."""
import copy
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

import opt_eval
import quantize_opt
import tiny
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, save_pruned
from quantize.gptq import rtn_quantize
from quantize.sequential import quantize_model, quantized_linears
from quantize.storage import QUANTIZED, WEIGHTS_FILE, load_quantized, save_quantized, weights_size_mb
from test_adapters import shrink
from utils.errors import UserError

FAMILIES = {"opt": tiny.opt, "llama": tiny.llama}
# Uneven shapes: a layer with every head, one with no attention and no FFN, one with a single unit.
HEADS = {"opt": [4, 0, 1], "llama": [2, 0, 1]}  # Llama units are KV groups (2 of them)
NEURONS = [50, 0, 7]
# stat_prune needs at least one unit per block: the checkpoints pruned further on the command line
# have uneven shapes without empty blocks.
CLI_HEADS = {"opt": [4, 2, 1], "llama": [2, 1, 1]}
CLI_NEURONS = [50, 9, 17]
WORDS = "the a of and to in was her she he it his had you that with for not but be".split()


def pruned(family, heads=HEADS, neurons=NEURONS):
    return shrink(FAMILIES[family](), heads[family], neurons)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- quantize_model and the checkpoints, on the model directly


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_is_its_packed_codes_and_reloads_identically(family, tmp_path):
    model = pruned(family)
    batches = tiny.random_batches()
    dense = tiny.logits(model, batches)
    quantized = quantize_model(model, adapter_for(model), batches, "cpu", 4, groupsize=16, act_order=True,
                               progress=False)
    names = [name for name, _ in quantized_linears(model, adapter_for(model))]
    assert sorted(quantized) == sorted(names)
    assert not any(".1." in name for name in names)  # layer 1 has no linear left
    for name, weight in quantized.items():
        # on the grid: the layer weight is exactly its codes, scales and zero points
        assert torch.equal(model.get_submodule(name).weight, weight.dequantize(torch.float32))
    expected = tiny.logits(model, batches)
    assert 0 < relative_error(expected, dense) < 0.3

    save_quantized(model, quantized, str(tmp_path), settings={"wbits": 4, "groupsize": 16})
    for reloaded in (load_quantized(str(tmp_path)), load_model(str(tmp_path), formats=[QUANTIZED])):
        assert torch.equal(tiny.logits(reloaded, batches), expected)
        assert [adapter_for(reloaded).n_attn_units(l) for l in adapter_for(reloaded).layers(reloaded)] == HEADS[family]
    config = json.load(open(tmp_path / "config.json"))
    assert config["stat_quantization"]["modules"] == sorted(names)
    assert config["stat_quantization"]["wbits"] == 4

    # no float copy of a quantized weight: the packed file is smaller than the float checkpoint
    save_pruned(copy.deepcopy(model), str(tmp_path / "float"))
    saved_linear_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    saved = weights_size_mb(str(tmp_path / "float")) - weights_size_mb(str(tmp_path))
    assert saved * 2**20 > 0.5 * saved_linear_bytes


def test_eight_bits_leave_the_model_nearly_unchanged():
    model = pruned("llama")
    batches = tiny.random_batches()
    dense = tiny.logits(model, batches)
    four, eight = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(four, adapter_for(four), batches, "cpu", 4, progress=False)
    quantize_model(eight, adapter_for(eight), batches, "cpu", 8, progress=False)
    assert relative_error(tiny.logits(eight, batches), dense) < 0.02
    assert relative_error(tiny.logits(eight, batches), dense) < relative_error(tiny.logits(four, batches), dense) / 8


def test_gptq_beats_round_to_nearest_on_the_model():
    model = pruned("opt")
    batches = tiny.random_batches(n_batches=4, batch=8, length=16)
    dense = tiny.logits(model, batches)
    gptq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(gptq, adapter_for(gptq), batches, "cpu", 3, progress=False)
    quantize_model(rtn, adapter_for(rtn), None, "cpu", 3, nearest=True, progress=False)
    assert relative_error(tiny.logits(gptq, batches), dense) < relative_error(tiny.logits(rtn, batches), dense)


def test_nearest_is_round_to_nearest_of_each_linear():
    model = pruned("llama")
    expected = copy.deepcopy(model)
    quantize_model(model, adapter_for(model), None, "cpu", 4, groupsize=8, nearest=True, progress=False)
    for name, linear in quantized_linears(expected, adapter_for(expected)):
        rtn_quantize(linear, 4, groupsize=8)
        assert torch.equal(model.get_submodule(name).weight, linear.weight)


def test_a_tied_lm_head_is_stored_once_and_stays_tied(tmp_path):
    model = pruned("opt")  # OPT ties its LM head to the token embeddings
    quantized = quantize_model(model, adapter_for(model), None, "cpu", 4, nearest=True, progress=False)
    save_quantized(model, quantized, str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert "model.decoder.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert not any(key.endswith("q_proj.weight") for key in keys)
    reloaded = load_quantized(str(tmp_path))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = pruned("llama")
    save_quantized(model, quantize_model(model, adapter_for(model), None, "cpu", 4, nearest=True, progress=False),
                   str(tmp_path))
    path = str(tmp_path / WEIGHTS_FILE)
    state = load_file(path)
    del state["model.norm.weight"]
    save_file(state, path)
    with pytest.raises(UserError, match="model.norm.weight"):
        load_quantized(str(tmp_path))


# --- the command lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Pruned tiny checkpoints with the GPT-2 tokenizer, and a small text corpus.

    tiny-<family> has a layer with no attention and no FFN left; tiny-<family>-uneven is
    pruned unevenly but keeps every block, so that quantize_opt.py can prune it further.
    """
    root = tmp_path_factory.mktemp("quantize_cli")
    tokenizer = AutoTokenizer.from_pretrained(tiny.gpt2_tokenizer_dir())
    for family in FAMILIES:
        save_pruned(pruned(family), str(root / "models" / f"tiny-{family}"), tokenizer)
        save_pruned(pruned(family, CLI_HEADS, CLI_NEURONS), str(root / "models" / f"tiny-{family}-uneven"), tokenizer)
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "data")
    for name, n_words in (("train.txt", 3000), ("test.txt", 1200)):
        ids = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
        text = " ".join(WORDS[i] + ("." if k % 11 == 10 else "") for k, i in enumerate(ids))
        (root / "data" / name).write_text(text)
    return root


def cli_args(setup, name, *extra):
    return ["--model_name", f"tiny-{name}", "--model_dir", str(setup / "models" / f"tiny-{name}"),
            "--task", "text", "--data_dir", str(setup / "data"), "--seqlen", "32", "--nsamples", "8",
            "--batch_size", "4", "--eval_samples", "8", "--device", "cpu", *extra]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_opt_end_to_end_and_the_saved_model_reloads(setup, tmp_path, family):
    out, saved = str(tmp_path / "output"), str(tmp_path / "quantized")
    record = quantize_opt.main(cli_args(setup, f"{family}-uneven", "--mu", "0.8", "--seed", "1", "--wbits", "4",
                                        "--groupsize", "16", "--act_order", "--output_dir", out,
                                        "--save_model", saved))
    lines = open(os.path.join(out, "opt", f"tiny-{family}-uneven.jsonl")).read().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(record))
    for key in ("model_name", "task", "method", "allocation", "calibration", "mu", "mac_ratio", "seed", "nsamples",
                "seqlen", "ppl_dense", "ppl_pruned", "ppl_quantized", "heads_per_layer", "neurons_per_layer",
                "params_dense", "params_pruned", "prune_seconds", "wbits", "groupsize", "sym", "act_order",
                "nearest", "percdamp", "quantize_seconds", "size_on_disk_mb", "peak_memory_mb", "device"):
        assert key in record, key
    assert record["wbits"] == 4 and record["groupsize"] == 16 and record["act_order"] and not record["sym"]
    assert record["percdamp"] == 0.01 and record["mu"] == 0.8 and record["mac_ratio"] <= 0.8
    assert set(record["ppl_quantized"]) == set(record["ppl_dense"]) == {"text"}
    assert record["ppl_quantized"]["text"] != record["ppl_pruned"]["text"]
    assert 0 < record["size_on_disk_mb"]["quantized"] < record["size_on_disk_mb"]["dense"]
    text = open(os.path.join(out, "opt", f"tiny-{family}-uneven.txt")).read()
    assert "GPTQ 4-bit" in text and "quantized" in text and "size on disk" in text

    # the saved model evaluates to the same perplexity
    again = opt_eval.main(cli_args(setup, f"{family}-uneven", "--model_dir", saved, "--output_dir", out))
    assert again["ppl_dense"]["text"] == pytest.approx(record["ppl_quantized"]["text"], rel=1e-6)


def test_mu_one_and_nearest_quantize_the_unpruned_model(setup, tmp_path):
    record = quantize_opt.main(cli_args(setup, "opt", "--mu", "1", "--wbits", "8", "--nearest",
                                        "--output_dir", str(tmp_path)))
    assert record["ppl_pruned"] == record["ppl_dense"] and record["nearest"]
    assert record["ppl_quantized"]["text"] == pytest.approx(record["ppl_dense"]["text"], rel=0.01)
    assert "size_on_disk_mb" not in record


def test_opt_eval_with_and_without_wbits(setup, tmp_path):
    out = str(tmp_path)
    plain = opt_eval.main(cli_args(setup, "llama", "--output_dir", out))
    assert "ppl_quantized" not in plain and "wbits" not in plain
    record = opt_eval.main(cli_args(setup, "llama", "--wbits", "3", "--sym", "--output_dir", out))
    assert record["ppl_dense"] == plain["ppl_dense"] and record["method"] == "dense"
    assert record["wbits"] == 3 and record["sym"] and record["quantize_seconds"] >= 0
    assert record["ppl_quantized"]["text"] != record["ppl_dense"]["text"]


@pytest.mark.parametrize("argv,message", [
    (["--mu", "0.5", "--wbits", "5"], "invalid choice"),
    (["--mu", "0.5", "--wbits", "4", "--groupsize", "0"], "groupsize"),
    (["--mu", "0.5", "--wbits", "4", "--percdamp", "-1"], "percdamp"),
    (["--mu", "0.5", "--wbits", "4", "--nearest", "--act_order"], "--act_order"),
    (["--mu", "0.5"], "--wbits"),
])
def test_bad_quantize_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quantize_opt.parse_args(["--model_name", "m", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_opt_eval_quantize_flags_need_wbits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        opt_eval.parse_args(["--model_name", "m", "--groupsize", "128", "--save_model", "d"])
    assert exit_info.value.code == 2
    assert "--groupsize, --save_model need --wbits" in capsys.readouterr().err


def test_true_sequential_calibrates_each_group_on_the_layer_with_earlier_groups_quantized():
    """Layer 0 by hand: each group of linears (Q/K/V, output, FFN in, FFN out) gets GPTQ on the
    inputs the layer gives once the groups before it are quantized."""
    from quantize.gptq import GPTQ

    model = tiny.llama(layers=2, vocab=1000)
    batches = tiny.random_batches()
    by_hand = copy.deepcopy(model)
    adapter = adapter_for(by_hand)
    layer = adapter.layers(by_hand)[0]
    for group in adapter.linear_groups(layer):
        gptq = {path: GPTQ(adapter.get(layer, path)) for path in group}
        current = {}
        hooks = [adapter.get(layer, path).register_forward_hook(
            lambda module, inputs, output, path=path: gptq[path].add_batch(inputs[0], current["mask"]))
            for path in group]
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                by_hand(**batch)
        for hook in hooks:
            hook.remove()
        for path in group:
            gptq[path].quantize(4)

    sequential, one_pass = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(sequential, adapter_for(sequential), batches, "cpu", 4, true_sequential=True, progress=False)
    quantize_model(one_pass, adapter_for(one_pass), batches, "cpu", 4, progress=False)
    first = [adapter.layers(m)[0] for m in (by_hand, sequential, one_pass)]
    for group in adapter.linear_groups(layer):
        for path in group:
            expected = adapter.get(first[0], path).weight
            torch.testing.assert_close(adapter.get(first[1], path).weight, expected, rtol=0, atol=1e-6)
    # the first group sees the same inputs either way; the output projection does not
    q = adapter.linear_groups(layer)[0][0]
    assert torch.equal(adapter.get(first[1], q).weight, adapter.get(first[2], q).weight)
    o = adapter.linear_groups(layer)[1][0]
    assert not torch.equal(adapter.get(first[1], o).weight, adapter.get(first[2], o).weight)


def test_protocol_paper_quantizes_as_the_authors_scripts(setup, tmp_path):
    out = str(tmp_path)
    record = quantize_opt.main(cli_args(setup, "opt-uneven", "--mu", "0.8", "--protocol", "paper",
                                        "--groupsize", "16", "--output_dir", out))
    assert (record["wbits"], record["groupsize"], record["sym"], record["gptq_reference"],
            record["true_sequential"], record["act_order"]) == (4, 16, False, True, False, False)
    assert (record["allocation"], record["calibration"], record["mac_split"]) == ("faithful", "one_shot", "authors")
    assert "as the reference code" in open(os.path.join(out, "opt", "tiny-opt-uneven.txt")).read()
    baseline = opt_eval.main(cli_args(setup, "opt", "--protocol", "paper", "--output_dir", out))
    assert (baseline["wbits"], baseline["groupsize"], baseline["sym"], baseline["gptq_reference"]) == (4, 1024, True,
                                                                                                        True)
    assert "ppl_quantized" in baseline
    plain = opt_eval.main(cli_args(setup, "opt", "--protocol", "paper", "--no-sym", "--output_dir", out))
    assert plain["sym"] is False and plain["ppl_quantized"] != baseline["ppl_quantized"]
