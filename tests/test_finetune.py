"""scripts/finetune.py end to end on tiny random encoders and tiny files: it trains, saves a
folder prune_bert.py reads and scores the same, reproduces the historical demo builder's loop
bit for bit, and refuses bad input in one line."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import pipelines.finetune
import prune_bert
import tiny
from dataset.squad import load_squad, prepare_train_features
from evaluate.tasks import make_task
from prerequisites.checkpoint import load_model
from scripts import finetune
from scripts.build_demo_classifier import DEMO_RECIPE
from test_prune_bert_cli import WORDS, write_sst2
from test_squad_cli import write_squad
from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NLI = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Base encoders without a task head, as a hub checkpoint such as bert-base-uncased is."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = AutoTokenizer.from_pretrained(tiny.minilm_dir())
    paths = {}
    for name, model in (("tiny-bert", tiny.bert().bert), ("tiny-distilbert", tiny.distilbert().distilbert)):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def write_mnli(folder, n_train=24, n_dev=9):
    """MNLI files with text labels (gold_label), the three classes in turn."""
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev), ("dev_mismatched.tsv", n_dev)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("index\tsentence1\tsentence2\tgold_label\n")
            for i in range(n):
                a = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6))
                b = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(4))
                f.write(f"{i}\t{a}\t{b}\t{NLI[i % 3]}\n")


def run(base, task, data, out, *extra):
    return finetune.main(["--model_name_or_path", base, "--task_name", task, "--data_dir", data, "--output_dir", out,
                          "--epochs", "1", "--batch_size", "8", "--device", "cpu", *extra])


@pytest.mark.parametrize("base,task", [("tiny-bert", "mnli"), ("tiny-distilbert", "sst2")])
def test_glue_fine_tuning_end_to_end(bases, tmp_path, capsys, base, task):
    data, out = str(tmp_path / "data"), str(tmp_path / "models" / base / task)
    (write_mnli if task == "mnli" else write_sst2)(data)
    record = run(bases[base], task, data, out)
    printed = capsys.readouterr().out

    assert sorted(os.listdir(out)) == ["config.json", "finetune.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert not os.path.exists(out + ".tmp")
    model = load_model(out)
    family = "Bert" if base == "tiny-bert" else "DistilBert"
    assert model.config.architectures == [f"{family}ForSequenceClassification"]
    names = NLI if task == "mnli" else ["negative", "positive"]
    assert model.config.id2label == dict(enumerate(names)) and model.config.num_labels == len(names)
    n_train = 24 if task == "mnli" else 48
    assert record["steps"] == math.ceil(n_train / 8) and record["train_size"] == n_train
    assert json.load(open(os.path.join(out, "finetune.json")))["dev_metrics"] == record["dev_metrics"]

    # trained: the encoder moved away from the base
    trained, start = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(bases[base], "model.safetensors"))
    moved = [k for k in start if not torch.equal(start[k], trained[k if k in trained else f"{family.lower()}.{k}"])]
    assert len(moved) > len(start) // 2

    # The printed dev metric is the saved model's, scored afresh by prune_bert.py's task code...
    tokenizer = AutoTokenizer.from_pretrained(out)
    again = make_task(task, tokenizer, data, 64).evaluate(model, "cpu")
    assert again == pytest.approx(record["dev_metrics"])
    assert f"dev accuracy {again['accuracy']:.4f}" in printed
    # ...and prune_bert.py prunes the folder, its dense score the same.
    pruned = prune_bert.main(["--model_name", base, "--task_name", task, "--mu", "0.5", "--model_dir", out,
                              "--data_dir", data, "--sample_batch_size", "8", "--batch_size", "8",
                              "--output_dir", str(tmp_path / "output"), "--device", "cpu"])
    assert pruned["metrics"]["dense"] == pytest.approx(record["dev_metrics"])
    assert 0 < pruned["mac_ratio"] <= 0.5


def test_squad_fine_tuning_end_to_end(bases, tmp_path):
    data, out = str(tmp_path / "squad"), str(tmp_path / "tiny-bert" / "squad_v2")
    write_squad(data, "2.0")
    record = run(bases["tiny-bert"], "squad_v2", data, out, "--max_length", "128", "--doc_stride", "32")
    model = load_model(out)
    assert model.config.architectures == ["BertForQuestionAnswering"]
    assert record["max_length"] == 128 and record["doc_stride"] == 32
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = prepare_train_features(load_squad("2.0", "train", data), tokenizer, 128, 32)
    assert record["train_size"] == len(windows) > 14  # 14 questions, some contexts cut into several windows
    assert record["steps"] == math.ceil(len(windows) / 8)
    pruned = prune_bert.main(["--model_name", "tiny-bert", "--task_name", "squad_v2", "--mu", "0.6", "--model_dir",
                              out, "--data_dir", data, "--sample_batch_size", "8", "--batch_size", "4",
                              "--output_dir", str(tmp_path / "output"), "--device", "cpu"])
    assert pruned["metrics"]["dense"] == pytest.approx(record["dev_metrics"])
    assert set(record["dev_metrics"]) >= {"exact", "f1", "HasAns_f1", "NoAns_f1"}


def test_a_learnable_task_is_learned(bases, tmp_path):
    """Sentences with 'superb' are positive, with 'awful' negative: a few epochs fit them."""
    data = tmp_path / "SST-2"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    filler = [w for w in WORDS if w not in ("superb", "awful")]
    for name, n in (("train.tsv", 64), ("dev.tsv", 32)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = [filler[int(j)] for j in torch.randint(0, len(filler), (6,), generator=g)]
            words.insert(int(torch.randint(0, 6, (1,), generator=g)), "superb" if i % 2 else "awful")
            lines.append(f"{' '.join(words)}\t{i % 2}")
        (data / name).write_text("\n".join(lines) + "\n")
    record = run(bases["tiny-bert"], "sst2", str(data), str(tmp_path / "out"), "--epochs", "6", "--lr", "3e-3")
    assert record["dev_metrics"]["accuracy"] >= 0.9


def reference_demo_loop(base, data, seed=0, epochs=1, batch_size=32, lr=5e-5):
    """The demo classifier's builder before scripts/finetune.py existed (git 0eaacbb,
    scripts/build_demo_classifier.py), transcribed, with the data folder as a parameter."""
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

    from dataset import glue

    torch.manual_seed(seed)
    spec = glue.get_task("movie-sentiment")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=spec.num_labels)
    train = glue.encode(glue.load_examples(spec, "train", data), tokenizer, spec)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            batch = glue.collate([train[j] for j in order[i:i + batch_size]], tokenizer.pad_token_id)
            model(**batch).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return model.state_dict()


def test_the_demo_recipe_reproduces_the_historical_builder_bit_for_bit(bases, tmp_path):
    data = tiny.write_movie_sentiment(tmp_path / "movie-sentiment", 150, 20)  # 5 steps
    expected = reference_demo_loop(bases["tiny-bert"], data)
    finetune.main(["--model_name_or_path", bases["tiny-bert"], "--output_dir", str(tmp_path / "demo"),
                   "--data_dir", str(data), *DEMO_RECIPE])
    got = load_file(str(tmp_path / "demo" / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # and the seed matters
    finetune.main(["--model_name_or_path", bases["tiny-bert"], "--output_dir", str(tmp_path / "seed1"),
                   "--data_dir", str(data), *DEMO_RECIPE, "--seed", "1"])
    other = load_file(str(tmp_path / "seed1" / "model.safetensors"))
    assert not torch.equal(other["classifier.weight"], got["classifier.weight"])


@pytest.mark.parametrize("change,expected", [
    ({"--task_name": "sst3"}, "unknown task 'sst3'"),
    ({"--model_name_or_path": "/no/such/model"}, "base model not found: /no/such/model"),
    ({"--model_name_or_path": "nobody-here/no-such-model"},
     "base model nobody-here/no-such-model is neither a local folder nor in the local Hugging Face cache"),
    ({"--data_dir": "/no/such/data"}, "data folder not found: /no/such/data"),
    ({"--epochs": "0"}, "argument --epochs: expected a positive integer"),
    ({"--warmup": "1"}, "the warm-up is a fraction of the steps in [0, 1)"),
    ({"--lr": "0"}, "argument --lr: expected a positive number, got 0.0"),
])
def test_bad_input_is_one_line_before_any_model_loads(bases, tmp_path, capsys, monkeypatch, change, expected):
    monkeypatch.setattr(pipelines.finetune, "load_for_task", tiny.model_loaded)
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    out = tmp_path / "out"
    argv = {"--model_name_or_path": bases["tiny-bert"], "--task_name": "sst2", "--data_dir": data,
            "--output_dir": str(out), "--device": "cpu"} | change
    code, err = run_cli_of(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists()


def run_cli_of(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(lambda: finetune.main([x for kv in argv.items() for x in kv]))
    return info.value.code, capsys.readouterr().err.strip()


def test_malformed_data_and_a_decoder_base_are_refused(bases, tmp_path, capsys):
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    with open(os.path.join(data, "train.tsv"), "a") as f:
        f.write("a sentence without its label\n")
    argv = {"--model_name_or_path": bases["tiny-bert"], "--task_name": "sst2", "--data_dir": data,
            "--output_dir": str(tmp_path / "out")}
    code, err = run_cli_of(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "train.tsv, line 50" in err, err
    decoder = str(tmp_path / "tiny-opt")
    tiny.opt().save_pretrained(decoder)
    capsys.readouterr()  # the save's progress bar
    code, err = run_cli_of(argv | {"--model_name_or_path": decoder}, capsys)
    assert code == 2 and err == f"error: {decoder} is a decoder; fine-tuning here is for BERT-family encoders"
    assert not (tmp_path / "out").exists()


def test_a_finished_model_is_never_overwritten(bases, tmp_path, capsys):
    data = str(tmp_path / "SST-2")
    write_sst2(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, err = run_cli_of({"--model_name_or_path": bases["tiny-bert"], "--task_name": "sst2", "--data_dir": data,
                            "--output_dir": str(out)}, capsys)
    assert code == 2 and err == f"error: {out} already exists: remove it, or choose another --output_dir"
    assert os.listdir(out) == ["config.json"]


def test_a_failed_save_leaves_nothing_that_looks_finished(bases, tmp_path, monkeypatch):
    data = str(tmp_path / "SST-2")
    write_sst2(data, n_train=16, n_dev=8)
    out = str(tmp_path / "out")
    # the record is the last file written: make its write fail, after the weights are on disk
    monkeypatch.setattr(pipelines.finetune, "RECORD_FILE", os.path.join("no-such-folder", "finetune.json"))
    with pytest.raises(FileNotFoundError):
        run(bases["tiny-bert"], "sst2", data, out)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
