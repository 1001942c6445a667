"""Zero-shot scores from lm-evaluation-harness (--lm_eval_tasks), offline: a small multiple-choice
task defined in a local YAML over a local jsonl file, on tiny random OPT and Llama models. Each
score is checked against the same accuracy computed here directly from the model's
log-likelihoods of each choice."""
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import opt_eval
import pipelines.decoder
import prune_opt
import quantize_opt
import tiny
from evaluate import zero_shot
from prerequisites.checkpoint import load_model
from quantize.storage import QUANTIZED
from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "stat_tiny_choice"
WORDS = "the a of and to in was her she he it his had you that with for not but be house garden letter".split()


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot")
    paths = dict(tiny_checkpoints)
    # the task: 40 questions, 3 or 4 choices of 1 to 5 words (so acc and acc_norm differ)
    r = random.Random(0)
    docs = []
    for _ in range(40):
        choices = [" ".join(r.choice(WORDS) for _ in range(r.randint(1, 5))) for _ in range(r.choice((3, 4)))]
        docs.append({"question": " ".join(r.choice(WORDS) for _ in range(8)).capitalize() + ":",
                     "choices": choices, "label": r.randrange(len(choices))})
    tasks = root / "tasks"
    tasks.mkdir()
    zero_shot.write_choice_task(str(tasks), TASK, docs)
    paths["tasks"], paths["docs"] = str(tasks), docs
    paths["data"] = tiny.write_austen(root / "text", 40000, 12000)
    return paths


# lm-eval scores in a process of its own (evaluate/lm_eval_worker.py), choices batched and padded
# its way, log_softmax in float32; direct_scores takes one choice at a time in float64. A choice's
# log-likelihood (a sum of at most 5 token log-probabilities of about -11 nats each, through a
# float32 forward pass) thus differs between the two by float32 rounding: ~1e-6 relative, a few
# 1e-6 nats (3e-6 measured for right-padded float32 batches against this). acc and acc_norm (and
# their stderrs) are functions of argmaxes only, so they must agree exactly, as long as no
# question's best choice leads the next by less than twice that difference. LL_ROUNDING bounds
# it with 30x room; direct_scores checks that premise (a near tie fails here, by name, rather
# than as a mismatch that depends on the machine). The dense tiny models' smallest lead on these
# questions is 3e-3 nats.
LL_ROUNDING = 1e-4


@torch.no_grad()
def direct_scores(model, tokenizer, docs):
    """acc and acc_norm computed from the model's log-likelihood of each choice after its question
    (acc_norm divides by the choice's length in characters), with the stderr of a mean of 0/1."""
    hits, hits_norm = [], []
    for doc in docs:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        lengths = np.array([len(choice) for choice in doc["choices"]], dtype=float)
        for values in (np.array(lls), np.array(lls) / lengths):  # lengths >= 1: no larger a rounding
            first, second = np.sort(values)[::-1][:2]
            assert first - second > 2 * LL_ROUNDING, f"near tie between choices, rounding could flip it: {doc}"
        hits.append(float(np.argmax(lls) == doc["label"]))
        hits_norm.append(float(np.argmax(np.array(lls) / lengths) == doc["label"]))
    scores = {}
    for name, values in (("acc", hits), ("acc_norm", hits_norm)):
        scores[name] = float(np.mean(values))
        scores[f"{name}_stderr"] = float(np.std(values, ddof=1) / np.sqrt(len(values)))
    return scores


def assert_scores(got, expected):
    """Exact (up to the last bit of a mean and a std of 0/1 values): see LL_ROUNDING."""
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), (key, got, expected)


def common_argv(setup, name, tmp_path):
    return ["--model_name", name, "--model_dir", setup[name], "--task", "text", "--data_dir", setup["data"],
            "--seqlen", "64", "--eval_samples", "2", "--nsamples", "4", "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--lm_eval_tasks", TASK, "--lm_eval_include_path", setup["tasks"],
            "--lm_eval_batch_size", "16"]


def test_prune_opt_scores_dense_and_pruned(setup, tmp_path, monkeypatch):
    # from the repository root with the repository on PYTHONPATH, where a process that did not
    # isolate itself would import evaluate/ as the PyPI `evaluate` (zero_shot refuses that)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", ROOT)
    saved = str(tmp_path / "pruned")
    record = prune_opt.main(common_argv(setup, "tiny-llama", tmp_path) + ["--mu", "0.3", "--save_model", saved])
    tokenizer = AutoTokenizer.from_pretrained(setup["tiny-llama"])
    dense = direct_scores(load_model(setup["tiny-llama"]), tokenizer, setup["docs"])
    pruned = direct_scores(load_model(saved), tokenizer, setup["docs"])
    assert_scores(record["lm_eval"]["dense"][TASK], dense)
    assert_scores(record["lm_eval"]["pruned"][TASK], pruned)
    assert record["lm_eval"]["dense"][TASK]["samples"] == len(setup["docs"])
    assert dense["acc"] != dense["acc_norm"]  # the two metrics are told apart
    assert record["lm_eval_settings"]["num_fewshot"] == 0 and record["lm_eval_settings"]["version"] == "0.4.13"

    line = json.loads(open(tmp_path / "out" / "opt" / "tiny-llama.jsonl").read().splitlines()[-1])
    assert line["lm_eval"] == record["lm_eval"]
    block = open(tmp_path / "out" / "opt" / "tiny-llama.txt").read()
    assert (f"zero-shot {TASK} acc: dense {dense['acc']:.4f} ± {dense['acc_stderr']:.4f}  "
            f"pruned {pruned['acc']:.4f} ± {pruned['acc_stderr']:.4f}") in block
    assert f"zero-shot {TASK} acc_norm: dense {dense['acc_norm']:.4f}" in block


def test_quantized_models_are_scored_with_their_dequantized_weights(setup, tmp_path):
    saved = str(tmp_path / "quantized")
    argv = common_argv(setup, "tiny-opt", tmp_path) + ["--wbits", "2", "--nearest", "--save_model", saved,
                                                       "--lm_eval_limit", "25"]
    record = opt_eval.main(argv)
    tokenizer = AutoTokenizer.from_pretrained(setup["tiny-opt"])
    docs = setup["docs"][:25]
    assert_scores(record["lm_eval"]["dense"][TASK], direct_scores(load_model(setup["tiny-opt"]), tokenizer, docs))
    quantized = load_model(saved, formats=[QUANTIZED])  # the packed checkpoint, dequantized
    assert_scores(record["lm_eval"]["quantized"][TASK], direct_scores(quantized, tokenizer, docs))
    assert record["lm_eval"]["quantized"][TASK]["samples"] == 25 and record["lm_eval_settings"]["limit"] == 25

    record = quantize_opt.main(common_argv(setup, "tiny-opt", tmp_path) + ["--mu", "0.5", "--wbits", "4",
                                                                           "--lm_eval_limit", "5"])
    assert set(record["lm_eval"]) == {"dense", "quantized"}
    assert record["lm_eval"]["dense"][TASK]["samples"] == 5


def test_an_unknown_task_fails_before_the_model_loads(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipelines.decoder, "load_model", tiny.model_loaded)
    argv = common_argv(setup, "tiny-opt", tmp_path) + ["--mu", "0.5"]
    argv[argv.index(TASK)] = "no_such_task_anywhere"
    with pytest.raises(SystemExit) as info:
        run_main(lambda: prune_opt.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "unknown lm-eval task no_such_task_anywhere" in err[0], err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flag,value", [("--lm_eval_limit", "5"), ("--lm_eval_include_path", ".")])
def test_lm_eval_flags_need_tasks(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        prune_opt.parse_args(["--model_name", "m", "--mu", "0.5", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"{flag} need --lm_eval_tasks" in err, err


def test_the_repository_evaluate_folder_cannot_shadow_lm_evals_evaluate(setup, tmp_path):
    """Here (the repository on sys.path) `import evaluate` is the repository's folder; the worker,
    even started from the repository root with the repository on PYTHONPATH, finds the PyPI
    package. Started without -I, it would be shadowed: the check can fail. (zero_shot.run_worker
    also refuses an answer whose `evaluate` is the repository's.)"""
    local = os.path.join(ROOT, "evaluate", "__init__.py")
    assert importlib.util.find_spec("evaluate").origin == local  # the shadow is real in this process
    env = dict(os.environ, PYTHONPATH=ROOT)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"mode": "check", "tasks": [TASK], "include_path": setup["tasks"]}))
    found = {}
    for isolated in (True, False):
        result = tmp_path / f"result-{isolated}.json"
        command = [sys.executable, *(["-I"] if isolated else []), zero_shot.WORKER, str(request), str(result)]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        found[isolated] = json.loads(result.read_text())
    assert found[True]["unknown_tasks"] == [] and found[True]["lm_eval_version"] == "0.4.13"
    pypi = found[True]["evaluate_module"]
    assert pypi != local and pypi.endswith(os.path.join("site-packages", "evaluate", "__init__.py")), pypi
    assert found[False]["evaluate_module"] == local
