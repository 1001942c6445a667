"""Decoders end to end: layer-by-layer perplexity, prune_opt.py and opt_eval.py on tiny models."""
import argparse
import json
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

import opt_eval
import pipelines.decoder
import prune_opt
import quantize_opt
import tiny
from evaluate.perplexity import perplexity
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model
from prune.stat import CalibrationWarning
from utils.cli import run_main
from utils.errors import UserError


@pytest.mark.parametrize("make", [tiny.opt, tiny.llama])
def test_layer_by_layer_perplexity_equals_a_full_forward_pass(make):
    model = make()
    windows = torch.randint(5, 2000, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = torch.stack([model(w[None], labels=w[None]).loss for w in windows])
    expected = float(torch.exp(losses.mean()))  # GPTQ protocol: exp of the mean per-window NLL
    got = perplexity(model, adapter_for(model), windows, "cpu", batch_size=2, progress=False)
    # float32 losses of ~10.8 nats (logsumexp over the vocabulary) in another order: ~1e-5 of exp(loss);
    # leaving one of the 5 windows out moves it by 1e-3 or more
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    data = tiny.write_austen(tmp_path_factory.mktemp("text"), 40000, 12000)
    return {**tiny_checkpoints, "data": data}


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_prune_opt_end_to_end(setup, tmp_path, name):
    out, saved = str(tmp_path / "out"), str(tmp_path / "pruned")
    argv = ["--model_name", name, "--model_dir", setup[name], "--task", "text", "--data_dir", setup["data"],
            "--mu", "0.6", "--seed", "1", "--nsamples", "8", "--seqlen", "64", "--eval_samples", "6",
            "--output_dir", out, "--device", "cpu", "--save_model", saved]
    record = prune_opt.main(argv)
    line = json.loads(open(os.path.join(out, "opt", f"{name}.jsonl")).read().splitlines()[-1])
    for key in ("model_name", "task", "method", "mu", "mac_ratio", "seed", "nsamples", "seqlen", "ppl_dense",
                "ppl_pruned", "heads_per_layer", "neurons_per_layer", "params_dense", "params_pruned",
                "prune_seconds", "peak_memory_mb", "device"):
        assert key in line, key
    assert line["seqlen"] == 64 and line["nsamples"] == 8 and 0 < line["mac_ratio"] <= 0.6
    assert line["argv"] == ["prune_opt.py", *argv] and "git_commit" in line
    assert set(line["ppl_dense"]) == {"text"} and line["ppl_pruned"]["text"] > 0
    assert line["params_pruned"] < line["params_dense"]
    assert "perplexity text: dense" in open(os.path.join(out, "opt", f"{name}.txt")).read()

    # the saved model reloads to the same shapes and perplexity, and generates
    reloaded = load_model(saved)
    assert reloaded.config.stat_heads == record["heads_per_layer"]
    windows = torch.randint(5, 2000, (3, 32), generator=torch.Generator().manual_seed(2))
    pruned_again = perplexity(reloaded, adapter_for(reloaded), windows, "cpu", progress=False)
    assert pruned_again > 0
    with torch.no_grad():
        out_ids = reloaded.generate(windows[:1, :8], max_new_tokens=5, do_sample=False)
    assert out_ids.shape == (1, 13)


def test_width_multiple_end_to_end(setup, tmp_path):
    """tiny-llama's FFNs have 64 neurons: with --width_multiple 16 every layer keeps a multiple of
    16, the budget holds, and the record and the result line say so."""
    out = str(tmp_path / "out")
    record = prune_opt.main(["--model_name", "tiny-llama", "--model_dir", setup["tiny-llama"], "--task", "text",
                             "--data_dir", setup["data"], "--mu", "0.6", "--seed", "1", "--nsamples", "8",
                             "--seqlen", "64", "--eval_samples", "2", "--output_dir", out, "--device", "cpu",
                             "--width_multiple", "16"])
    assert all(n % 16 == 0 for n in record["neurons_per_layer"]) and 0 < record["mac_ratio"] <= 0.6
    assert record["width_multiple"] == 16
    assert "widths in multiples of 16" in open(os.path.join(out, "opt", "tiny-llama.txt")).read()


def test_opt_eval(setup, tmp_path):
    record = opt_eval.main(["--model_name", "tiny-opt", "--model_dir", setup["tiny-opt"], "--task", "text",
                            "--data_dir", setup["data"], "--seqlen", "64", "--output_dir", str(tmp_path)])
    model = load_model(setup["tiny-opt"])
    tokens = AutoTokenizer.from_pretrained(setup["tiny-opt"])(open(os.path.join(setup["data"], "test.txt")).read())
    ids = torch.tensor(tokens["input_ids"])
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    assert record["ppl_dense"]["text"] == pytest.approx(perplexity(model, adapter_for(model), windows, "cpu",
                                                                   progress=False), rel=1e-5)


@pytest.mark.parametrize("bad,expected", [
    (["--mu", "0"], "mu must be in (0, 1]"),
    (["--mu", "2"], "mu must be in (0, 1]"),
    (["--task", "wikitext3"], "unknown"),
    (["--model_dir", "/no/such/model"], "checkpoint not found"),
    (["--data_dir", "/no/such/data"], "not found"),
])
def test_bad_input(setup, tmp_path, capsys, bad, expected):
    args = {"--model_name": "tiny-opt", "--model_dir": setup["tiny-opt"], "--task": "text",
            "--data_dir": setup["data"], "--mu": "0.5", "--output_dir": str(tmp_path / "out")}
    args.update(dict(zip(bad[::2], bad[1::2])))
    with pytest.raises(SystemExit) as info:
        run_main(lambda: prune_opt.main([x for kv in args.items() for x in kv]))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / "out")


SCRIPTS = {prune_opt: ["--mu", "0.5"], quantize_opt: ["--mu", "0.5", "--wbits", "4"], opt_eval: []}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_seed_must_fit_numpy(script, capsys):
    assert script.parse_args(["--model_name", "m", *SCRIPTS[script], "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    for seed in ("-1", str(2**32), "1.5"):
        with pytest.raises(SystemExit) as info:
            script.parse_args(["--model_name", "m", *SCRIPTS[script], "--seed", seed])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "argument --seed: seed must" in err, err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
@pytest.mark.parametrize("flag", ["--output_dir", "--save_model"])
def test_output_paths_under_a_file_are_refused_when_parsing(script, flag, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    extra = ["--wbits", "4"] if script is opt_eval and flag == "--save_model" else []
    for path in (a_file, a_file / "inside"):
        with pytest.raises(SystemExit) as info:
            script.parse_args(["--model_name", "m", *SCRIPTS[script], *extra, flag, str(path)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert f"argument {flag}: cannot write to {path}: {a_file} is not a folder" in err, err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
@pytest.mark.parametrize("train,expected", [(None, "no train.txt"), ("Too short.", "fewer than the 65")])
def test_calibration_text_is_checked_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, script, train,
                                                            expected):
    monkeypatch.setattr(pipelines.decoder, "load_model", tiny.model_loaded)
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.txt").write_text(open(os.path.join(setup["data"], "test.txt")).read())
    if train is not None:
        (data / "train.txt").write_text(train)
    quantize = ["--wbits", "4"] if script is opt_eval else []  # opt_eval calibrates only to quantize
    argv = ["--model_name", "tiny-opt", "--model_dir", setup["tiny-opt"], "--task", "text", "--data_dir", str(data),
            "--seqlen", "64", "--output_dir", str(tmp_path / "out"), *SCRIPTS[script], *quantize]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: script.main(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / "out")


# --- protocols, corpora, provenance, the dense-score cache ------------------------------------

def decoder_argv(setup, tmp_path, name="tiny-opt", *extra):
    return ["--model_name", name, "--model_dir", setup[name], "--data_dir", setup["data"], "--mu", "0.6",
            "--nsamples", "8", "--seqlen", "64", "--eval_samples", "6", "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", *extra]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_protocol_paper_end_to_end(setup, tmp_path, name):
    record = prune_opt.main(decoder_argv(setup, tmp_path, name, "--protocol", "paper", "--task", "text"))
    line = json.loads(open(tmp_path / "out" / "opt" / f"{name}.jsonl").read().splitlines()[-1])
    for key in ("protocol", "allocation", "calibration", "score_fraction", "mac_split", "calib_task", "eval_tasks",
                "sketch", "sketch_rows", "sketch_seed", "batch_size", "dtype", "mac_ratio", "mac_ratio_authors",
                "dense_cached", "argv", "git_commit", "git_dirty", "versions", "correction", "pricing"):
        assert key in line, key
    assert (line["protocol"], line["allocation"], line["calibration"], line["mac_split"]) == (
        "paper", "faithful", "one_shot", "authors")
    assert (line["correction"], line["pricing"]) == ("self", "insample")  # the authors'
    # their Gaussian sketch: 100 rows per 2048-token window, scaled to these windows
    seqlen = line["seqlen"]
    assert (line["sketch"], line["sketch_rows"], line["sketch_seed"]) == ("gaussian", -(-100 * seqlen // 2048), 0)

    assert line["score_fraction"] == 1.0 and line["calib_task"] == "text" and line["eval_tasks"] == ["text"]
    assert line["task"] == "text" and line["dtype"] == "float32" and line["batch_size"] == 4
    assert 0 < record["mac_ratio_authors"] <= 0.6 + 1e-9


def corpora_args(**given):
    return argparse.Namespace(**{"task": None, "calib_task": None, "eval_tasks": None, "data_dir": None,
                                 "protocol": "improved", **given})


def test_corpora_and_the_in_domain_warning(setup):
    resolve = pipelines.decoder.resolve_corpora
    in_domain = "warning: calibrating and scoring on the same corpus (text): in-domain calibration flatters"
    corpora, notes = resolve(corpora_args(task="text", data_dir=setup["data"]), calibrates=True)
    assert corpora == {"calib_task": "text", "eval_tasks": ["text"]}
    assert len(notes) == 1 and notes[0].startswith(in_domain)

    corpora, notes = resolve(corpora_args(calib_task="austen", eval_tasks=["text"], data_dir=setup["data"]), True)
    assert corpora == {"calib_task": "austen", "eval_tasks": ["text"]} and notes == []
    # scoring alone (opt_eval.py without quantization) calibrates nothing: no warning
    assert resolve(corpora_args(task="text", data_dir=setup["data"]), calibrates=False)[1] == []
    # --task with --eval_tasks: calibrate on one, score the others
    corpora, notes = resolve(corpora_args(task="text", eval_tasks=["austen"], data_dir=setup["data"]), True)
    assert corpora == {"calib_task": "text", "eval_tasks": ["austen"]} and notes == []
    # the paper's names
    corpora, _ = resolve(corpora_args(calib_task="c4", eval_tasks=["ptb", "c4", "c4-new"]), calibrates=False)
    assert corpora == {"calib_task": "c4-new", "eval_tasks": ["ptb-new", "c4-new"]}
    # the default: c4, and those of wikitext2, ptb, c4 that can be read (none, offline)
    with pytest.raises(UserError, match="none of the default evaluation sets"):
        resolve(corpora_args(data_dir=setup["data"]), calibrates=True)


def test_the_warning_comes_once_the_inputs_are_checked(setup, tmp_path, capsys):
    prune_opt.main(decoder_argv(setup, tmp_path, "tiny-opt", "--task", "text", "--mu", "0.8"))
    assert "warning: calibrating and scoring on the same corpus (text)" in capsys.readouterr().err


def test_the_dense_perplexity_is_cached(setup, tmp_path):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(setup["tiny-opt"], model_dir)
    argv = decoder_argv(setup, tmp_path, "tiny-opt", "--task", "text", "--model_dir", str(model_dir))
    first = prune_opt.main(argv)
    second = prune_opt.main(argv)
    assert not first["dense_cached"] and second["dense_cached"] and second["ppl_dense"] == first["ppl_dense"]
    assert not prune_opt.main(argv + ["--no_cache"])["dense_cached"]
    assert opt_eval.main(argv[:6] + argv[8:])["dense_cached"]  # opt_eval.py shares it (no --mu)
    assert not prune_opt.main(argv + ["--eval_samples", "5"])["dense_cached"]  # other windows
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not prune_opt.main(argv)["dense_cached"]


def test_too_few_calibration_tokens_warns_with_the_windows_to_pass(setup, tmp_path):
    argv = ["--model_name", "tiny-llama", "--model_dir", setup["tiny-llama"], "--task", "text", "--data_dir",
            setup["data"], "--mu", "0.6", "--nsamples", "1", "--seqlen", "40", "--eval_samples", "2",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.warns(CalibrationWarning) as caught:
        prune_opt.main(argv)
    lines = [str(w.message) for w in caught if w.category is CalibrationWarning]
    # one window of 40 tokens for 64 neurons: 1.6x as many tokens, 2 windows
    assert len(lines) == 1 and "on 40 rows (tokens)" in lines[0], lines
    assert "FFN of layers 0-2: 64 neurons" in lines[0] and "(--nsamples 2 at --seqlen 40)" in lines[0]
