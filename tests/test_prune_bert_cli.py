"""prune_bert.py end to end on tiny random tiny_checkpoints, and its errors on bad input."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import pipelines.encoder
import prune_bert
import tiny
from prerequisites.checkpoint import load_model
from prune.stat import CalibrationWarning
from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "good bad great awful fine dull lovely boring superb weak film plot actors story music scenes".split()


def write_sst2(folder, n_train=48, n_dev=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("sentence\tlabel\n")
            for i in range(n):
                length = int(torch.randint(3, 12, (1,), generator=g))
                words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
                f.write(f"{' '.join(words)}\t{i % 2}\n")


def write_mrpc(folder, n_train=40, n_dev=20):
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
            for i in range(n):
                a = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5))
                b = " ".join(WORDS[(2 * i + k) % len(WORDS)] for k in range(4))
                f.write(f"{i % 2}\t{i}\t{i + 1000}\t{a}\t{b}\n")


@pytest.mark.parametrize("model_name,task", [("tiny-bert", "sst2"), ("tiny-distilbert", "mrpc")])
def test_end_to_end_on_a_tiny_model(tiny_checkpoints, tmp_path, model_name, task):
    data = str(tmp_path / "glue" / ("SST-2" if task == "sst2" else "MRPC"))
    (write_sst2 if task == "sst2" else write_mrpc)(data)
    out, saved = str(tmp_path / "output"), str(tmp_path / "pruned")
    argv = ["--model_name", model_name, "--task_name", task, "--mu", "0.5", "--seed", "3",
            "--sample_batch_size", "16", "--model_dir", tiny_checkpoints[model_name], "--data_dir", data,
            "--output_dir", out, "--device", "cpu", "--save_model", saved, "--batch_size", "8"]
    record = prune_bert.main(argv)
    prune_bert.main(argv[:-4] + ["--method", "magnitude", "--batch_size", "8"])

    lines = open(os.path.join(out, model_name, f"{task}.jsonl")).read().splitlines()
    assert len(lines) == 2
    first, second = json.loads(lines[0]), json.loads(lines[1])
    for key in ("model_name", "task_name", "method", "mu", "mac_ratio", "seed", "sample_batch_size", "metric_name",
                "dense_metric", "pruned_metric", "metrics", "heads_per_layer", "neurons_per_layer", "params_dense",
                "params_pruned", "prune_seconds", "latency_dense_ms", "latency_pruned_ms", "device"):
        assert key in first, key
    assert first["method"] == "stat" and second["method"] == "magnitude"
    assert first["argv"] == ["prune_bert.py", *argv] and "transformers" in first["versions"]
    assert first["seed"] == 3 and first["sample_batch_size"] == 16 and first["mu"] == 0.5
    assert 0 < first["mac_ratio"] <= 0.5
    assert first["params_pruned"] < first["params_dense"]
    assert 0.0 <= first["pruned_metric"] <= 1.0 and first["metric_name"] == "accuracy"
    if task == "mrpc":
        assert set(first["metrics"]["dense"]) == {"accuracy", "f1"}
    text = open(os.path.join(out, model_name, f"{task}.txt")).read()
    assert text.count("MACs kept") == 2

    reloaded = load_model(saved)
    assert reloaded.config.stat_heads == record["heads_per_layer"]
    assert reloaded.config.stat_ffn == record["neurons_per_layer"]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: prune_bert.main(argv))
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize("bad,expected", [
    (["--mu", "0"], "mu must be in (0, 1]"),
    (["--mu", "1.5"], "mu must be in (0, 1]"),
    (["--mu", "-0.2"], "mu must be in (0, 1]"),
    (["--mu", "half"], "mu must be a number"),
    (["--task_name", "sst3"], "unknown task 'sst3'"),
    (["--seed", "-1"], "seed must be in 0..4294967295"),
    (["--seed", str(2**32)], "seed must be in 0..4294967295"),
    (["--sample_batch_size", "49"], "only 48"),  # the training set has 48 examples
    (["--model_dir", "/nonexistent/checkpoint"], "checkpoint not found"),
])
def test_bad_input_gives_one_line_and_exit_status_2(tiny_checkpoints, tmp_path, capsys, monkeypatch, bad, expected):
    monkeypatch.setattr(pipelines.encoder, "load_model", tiny.model_loaded)  # every check comes before the model loads
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    argv = {"--model_name": "tiny-bert", "--task_name": "sst2", "--mu": "0.5",
            "--model_dir": tiny_checkpoints["tiny-bert"], "--data_dir": data, "--output_dir": str(tmp_path / "out")}
    argv.update(dict(zip(bad[::2], bad[1::2])))
    code, err = run_cli([x for kv in argv.items() for x in kv], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err
    assert not os.path.exists(tmp_path / "out")  # no half-written results


def test_malformed_data_file(tiny_checkpoints, tmp_path, capsys):
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    with open(os.path.join(data, "dev.tsv"), "a") as f:
        f.write("a sentence with no label column\n")
    code, err = run_cli(["--model_name", "tiny-bert", "--task_name", "sst2", "--mu", "0.5", "--model_dir",
                         tiny_checkpoints["tiny-bert"], "--data_dir", data], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "dev.tsv" in err


@pytest.mark.parametrize("flag", ["--save_model", "--output_dir"])
def test_output_paths_under_a_file_fail_before_any_work(tiny_checkpoints, tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setattr(pipelines.encoder, "load_model", tiny.model_loaded)
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = {"--model_name": "tiny-bert", "--task_name": "sst2", "--mu": "0.5",
            "--model_dir": tiny_checkpoints["tiny-bert"], "--data_dir": data, "--output_dir": str(tmp_path / "out")}
    for path in (a_file, a_file / "inside"):
        argv[flag] = str(path)
        code, err = run_cli([x for kv in argv.items() for x in kv], capsys)
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith(f"error: argument {flag}: cannot write to {path}: {a_file} is not a folder"), err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("damage", ["no weights", "truncated weights"])
def test_damaged_checkpoint(tiny_checkpoints, tmp_path, capsys, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["tiny-bert"], broken)
    weights = broken / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    code, err = run_cli(["--model_name", "tiny-bert", "--task_name", "sst2", "--mu", "0.5", "--model_dir", str(broken),
                         "--data_dir", data, "--sample_batch_size", "16", "--output_dir", str(tmp_path / "out")],
                        capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot load checkpoint {broken}: "), err
    assert not os.path.exists(tmp_path / "out")


def test_real_process_exit_status(tmp_path):
    """The same through a real interpreter: status 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "prune_bert.py", "--model_name", "nothing-here", "--task_name", "sst2",
                           "--mu", "0.5", "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: checkpoint not found: models/nothing-here/sst2"]


# --- protocols, provenance, the dense-score cache ---------------------------------------------

PROVENANCE = ("protocol", "allocation", "calibration", "score_fraction", "mac_split", "sampler", "pricing",
              "correction", "sketch", "sketch_rows", "sketch_seed", "batch_size", "dtype", "mac_ratio",
              "mac_ratio_authors", "dense_cached", "argv", "git_commit", "git_dirty", "versions")


def sst2_argv(tiny_checkpoints, tmp_path, *extra):
    data = str(tmp_path / "SST-2")
    if not os.path.exists(data):
        write_sst2(data)
    return ["--model_name", "tiny-bert", "--task_name", "sst2", "--mu", "0.5", "--sample_batch_size", "16",
            "--model_dir", tiny_checkpoints["tiny-bert"], "--data_dir", data, "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--batch_size", "8", *extra]


def test_protocol_paper_end_to_end_and_every_knob_in_the_record(tiny_checkpoints, tmp_path):
    record = prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path, "--protocol", "paper", "--seed", "2"))
    saved = json.loads(open(tmp_path / "out" / "tiny-bert" / "sst2.jsonl").read().splitlines()[-1])
    for key in PROVENANCE:
        assert key in saved, key
    assert saved["protocol"] == "paper" and saved["allocation"] == "faithful"
    assert saved["calibration"] == "ffn_then_attn" and saved["mac_split"] == "authors"
    assert saved["sampler"] == "with_replacement" and saved["score_fraction"] == 1.0
    assert saved["sketch"] is None and saved["batch_size"] == 8 and saved["dtype"] == "float32"
    # the budget holds where the paper counts it: with the authors' fixed split
    assert 0 < record["mac_ratio_authors"] <= 0.5 + 1e-9 and record["mac_ratio"] > 0
    assert "protocol paper" in open(tmp_path / "out" / "tiny-bert" / "sst2.txt").read()

    # a flag given wins over the protocol, the others stay the protocol's
    record = prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path, "--protocol", "paper", "--allocation", "greedy",
                                       "--sketch", "count", "--sketch_rows", "64", "--seed", "5"))
    assert record["allocation"] == "greedy" and record["calibration"] == "ffn_then_attn"
    assert (record["sketch"], record["sketch_rows"], record["sketch_seed"]) == ("count", 64, 5)
    improved = prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path))
    assert (improved["protocol"], improved["allocation"], improved["calibration"], improved["mac_split"],
            improved["sampler"], improved["score_fraction"]) == ("improved", "greedy", "sequential", "exact",
                                                                 "distinct", 0.25)
    assert improved["mac_ratio"] <= 0.5 + 1e-9


def test_the_dense_scores_are_cached(tiny_checkpoints, tmp_path, capsys):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["tiny-bert"], model_dir)
    argv = sst2_argv(tiny_checkpoints, tmp_path, "--model_dir", str(model_dir))
    first = prune_bert.main(argv)
    assert not first["dense_cached"]
    entries = list((tmp_path / "out" / ".dense_cache").glob("*.json"))
    assert len(entries) == 1
    second = prune_bert.main(argv)
    assert second["dense_cached"] and second["metrics"]["dense"] == first["metrics"]["dense"]
    assert "dense scores from the cache" in capsys.readouterr().out

    # a hit really reads the entry: planted values come back
    entry = json.loads(entries[0].read_text())
    entry["value"]["accuracy"] = 0.123
    entries[0].write_text(json.dumps(entry))
    assert prune_bert.main(argv)["dense_metric"] == 0.123
    # --no_cache scores again (and writes the true value back)
    fresh = prune_bert.main(argv + ["--no_cache"])
    assert not fresh["dense_cached"] and fresh["dense_metric"] == first["dense_metric"]
    assert prune_bert.main(argv)["dense_cached"]

    # another checkpoint in the same place (new weights file, new modification time): a miss
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not prune_bert.main(argv)["dense_cached"]
    # another evaluation set: a miss
    with open(tmp_path / "SST-2" / "dev.tsv", "a") as f:
        f.write("good film\t1\n")
    assert not prune_bert.main(argv)["dense_cached"]
    assert len(list((tmp_path / "out" / ".dense_cache").glob("*.json"))) == 3


def test_with_replacement_may_ask_for_more_examples_than_the_training_set(tiny_checkpoints, tmp_path):
    record = prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path, "--sampler", "with_replacement",
                                       "--sample_batch_size", "60"))  # the training set has 48
    assert record["sample_batch_size"] == 60 and record["sampler"] == "with_replacement"


def test_too_few_calibration_tokens_is_one_warning_line_naming_the_flag(tiny_checkpoints, tmp_path):
    """--sample_batch_size 1: one short sentence calibrates every Gram (issue 20's MiniLM case).
    Through a real interpreter (as a user sees it): one line on stderr names the blocks, the
    rows and the units, and the flag to pass instead; the run goes on."""
    argv = sst2_argv(tiny_checkpoints, tmp_path, "--sample_batch_size", "1")
    proc = subprocess.run([sys.executable, "prune_bert.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "too few calibration tokens" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: too few calibration tokens: pass 1 fits the IDs on ")
    assert "FFN of layers 0-2: 64 neurons" in lines[0] and "--sample_batch_size " in lines[0]
    with warnings.catch_warnings():  # 48 sentences, all in pass 1: enough rows for 64 neurons
        warnings.simplefilter("error", CalibrationWarning)
        prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path, "--sample_batch_size", "48", "--score_fraction", "1"))


def test_factor_torch_and_lapack_keep_the_same_units_and_the_record_says_which(tiny_checkpoints, tmp_path):
    records = {factor: prune_bert.main(sst2_argv(tiny_checkpoints, tmp_path, "--sample_batch_size", "48", "--factor",
                                                 factor, "--no_cache"))
               for factor in ("torch", "lapack", "auto")}
    assert [r["factor"] for r in records.values()] == ["torch", "lapack", "lapack"]  # auto on the CPU: lapack
    assert records["torch"]["heads_per_layer"] == records["lapack"]["heads_per_layer"]
    assert records["torch"]["neurons_per_layer"] == records["lapack"]["neurons_per_layer"]
    assert abs(records["torch"]["pruned_metric"] - records["lapack"]["pruned_metric"]) <= 1 / 24  # one dev sentence
    assert "factor torch" in open(tmp_path / "out" / "tiny-bert" / "sst2.txt").read()
