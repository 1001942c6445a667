"""prune_bert.py --method kwon end to end on tiny checkpoints (GLUE and SQuAD), the labelled
samples drawn as Kwon et al. draw them, and the flags' errors."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import pipelines.encoder
import prune_bert
import prune_opt
import quantize_opt
import tiny
from dataset import glue, squad
from dataset.sampling import draw_with_replacement
from evaluate.tasks import make_task
from prerequisites.checkpoint import load_model
from test_prune_bert_cli import run_cli, write_mrpc, write_sst2
from test_squad_cli import write_squad
from tiny import one_thread  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny.minilm_dir())


def legacy_choice(population, n, seed):
    """What their script does: transformers.set_seed(seed) seeds numpy's global generator, then
    np.random.choice(len(dataset), num_samples)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.choice(population, n)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_draw_is_theirs(seed):
    assert draw_with_replacement(100, 300, seed).tolist() == legacy_choice(100, 300, seed).tolist()


def test_glue_labelled_sample(tmp_path, tokenizer):
    data = str(tmp_path / "SST-2")
    write_sst2(data)  # 48 training sentences
    task = make_task("sst2", tokenizer, data)
    sample = task.labelled_sample(100, 7)  # more than the training set: drawn with replacement
    train = glue.load_examples("sst2", "train", data)
    expected = glue.encode([train[i] for i in legacy_choice(len(train), 100, 7)], tokenizer, glue.get_task("sst2"))
    assert [s["input_ids"] for s in sample] == [e["input_ids"] for e in expected]  # in the order drawn
    assert [s["label"] for s in sample] == [e["label"] for e in expected]
    batches = task.labelled_batches(tiny.bert(), sample)
    assert [len(b["labels"]) for b in batches] == [32, 32, 32, 4]  # their mini-batches
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.tensor([e["label"] for e in expected]))


def test_squad_features_picked_as_from_all_features(tmp_path, tokenizer):
    data = str(tmp_path / "squad")
    write_squad(data, "2.0")
    examples = squad.load_squad("2.0", "train", data)
    # short windows, so that examples give several features each
    everything = squad.prepare_train_features(examples, tokenizer, max_length=48, stride=16)
    counts = squad.train_feature_counts(examples, tokenizer, max_length=48, stride=16)
    assert counts.sum() == len(everything) and counts.max() >= 3
    picks = legacy_choice(len(everything), 40, 5)
    picked = squad.train_features_at(examples, tokenizer, picks, counts, max_length=48, stride=16)
    assert picked == [everything[i] for i in picks]

    task = make_task("squad_v2", tokenizer, data)
    everything = squad.prepare_train_features(examples, tokenizer)
    assert task.labelled_sample(30, 2) == [everything[i] for i in legacy_choice(len(everything), 30, 2)]
    batches = task.labelled_batches(tiny.bert(qa=True), task.labelled_sample(30, 2))
    assert [len(b["start_positions"]) for b in batches] == [12, 12, 6]
    assert all(b["start_positions"].dtype == torch.long for b in batches)


def recording_kwon(monkeypatch):
    """Record what the pipeline gives kwon_prune."""
    seen = {}
    real = pipelines.encoder.kwon_prune

    def recording(model, adapter, batches, *args, **kwargs):
        seen["batch_sizes"] = [len(next(iter(b.values()))) for b in batches]
        seen["keys"] = set(batches[0])
        seen["classification"] = kwargs.get("classification")
        return real(model, adapter, batches, *args, **kwargs)

    monkeypatch.setattr(pipelines.encoder, "kwon_prune", recording)
    return seen


@pytest.mark.parametrize("model_name,task", [("tiny-bert", "sst2"), ("tiny-distilbert", "mrpc")])
def test_kwon_end_to_end_on_glue(tiny_checkpoints, tmp_path, monkeypatch, model_name, task):
    data = str(tmp_path / "glue")
    (write_sst2 if task == "sst2" else write_mrpc)(data)
    out, saved = str(tmp_path / "output"), str(tmp_path / "pruned")
    common = ["--model_name", model_name, "--task_name", task, "--mu", "0.5", "--seed", "2", "--model_dir",
              tiny_checkpoints[model_name], "--data_dir", data, "--output_dir", out, "--device", "cpu",
              "--batch_size", "8"]
    seen = recording_kwon(monkeypatch)
    saved_models = []
    real_save = pipelines.encoder.save_pruned
    monkeypatch.setattr(pipelines.encoder, "save_pruned",
                        lambda model, *args, **kwargs: saved_models.append(model) or real_save(model, *args, **kwargs))
    record = prune_bert.main(common + ["--method", "kwon", "--num_samples", "40", "--save_model", saved])
    stat_record = prune_bert.main(common + ["--sample_batch_size", "16"])

    assert seen["batch_sizes"] == [32, 8] and "labels" in seen["keys"] and seen["classification"] is True
    lines = [json.loads(line) for line in open(os.path.join(out, model_name, f"{task}.jsonl")).read().splitlines()]
    assert [r["method"] for r in lines] == ["kwon", "stat"]
    assert set(lines[0]) - {"saved_to"} == set(lines[1])  # the same keys as STAT's
    assert lines[0] == json.loads(json.dumps(record)) and stat_record["method"] == "stat"
    assert record["sample_batch_size"] == 40 and record["allocation"] == "fisher"
    assert record["calibration"] == "mask_tuning" and record["score_fraction"] is None
    assert 0 < record["mac_ratio"] <= 0.5
    assert record["params_pruned"] < record["params_dense"]
    assert "method kwon" in open(os.path.join(out, model_name, f"{task}.txt")).read()

    reloaded = load_model(saved)
    assert [reloaded.config.stat_heads, reloaded.config.stat_ffn] == [record["heads_per_layer"],
                                                                      record["neurons_per_layer"]]
    batches = tiny.random_batches()
    torch.testing.assert_close(tiny.logits(reloaded, batches), tiny.logits(saved_models[0].eval(), batches),
                               rtol=0, atol=0)


def test_kwon_end_to_end_on_squad(tiny_checkpoints, tmp_path, monkeypatch):
    data = str(tmp_path / "squad")
    write_squad(data, "1.1")
    out, saved = str(tmp_path / "output"), str(tmp_path / "pruned")
    seen = recording_kwon(monkeypatch)
    record = prune_bert.main(["--model_name", "tiny-bert-qa", "--task_name", "squad", "--mu", "0.4", "--method", "kwon",
                              "--num_samples", "20", "--batch_size", "4",
                              "--model_dir", tiny_checkpoints["tiny-bert-qa"],
                              "--data_dir", data, "--output_dir", out, "--device", "cpu", "--save_model", saved])
    assert seen["batch_sizes"] == [12, 8] and {"start_positions", "end_positions"} <= seen["keys"]
    assert seen["classification"] is False
    assert record["method"] == "kwon" and record["metric_name"] == "f1" and 0 < record["mac_ratio"] <= 0.4
    assert 0.0 <= record["pruned_metric"] <= 100.0
    reloaded = load_model(saved)
    assert reloaded.config.stat_heads == record["heads_per_layer"]


@pytest.mark.parametrize("extra,expected", [
    (["--method", "kwon", "--allocation", "uniform"], "--allocation: not used by --method kwon"),
    (["--method", "kwon", "--sample_batch_size", "16"], "--sample_batch_size: not used by --method kwon"),
    (["--num_samples", "64"], "--num_samples applies to --method kwon"),
    (["--method", "kwon", "--num_samples", "0"], "expected a positive integer"),
])
def test_flags_that_the_method_would_ignore_are_errors(tiny_checkpoints, tmp_path, capsys, extra, expected):
    code, err = run_cli(["--model_name", "tiny-bert", "--task_name", "sst2", "--mu", "0.5", "--model_dir",
                         tiny_checkpoints["tiny-bert"], "--output_dir", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and expected in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script,extra", [(prune_opt, []), (quantize_opt, ["--wbits", "4"])])
def test_decoders_refuse_kwon(capsys, script, extra):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--model_name", "opt-125M", "--mu", "0.5", "--method", "kwon", *extra])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--method kwon prunes encoders (prune_bert.py)" in err
