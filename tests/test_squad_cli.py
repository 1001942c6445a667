"""prune_bert.py end to end on SQuAD 1.1 / 2.0 with tiny random question-answering models.

The test writes small files in the official JSON layout (train-v1.1.json, dev-v1.1.json,
train-v2.0.json, dev-v2.0.json); one dev context is long enough to be cut into several
384-token windows, and the v2.0 files hold unanswerable questions.
"""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import evaluate.tasks
import pipelines.encoder
import prune_bert
import tiny
from dataset.squad import collate, load_squad, prepare_eval_features
from evaluate.inputs import accepted_inputs
from evaluate.squad import evaluate_squad
from prerequisites.checkpoint import load_model
from test_prune_bert_cli import run_cli

NAMES = "Emma Harriet Jane Frank Robert George Isabella Anne Philip Henry".split()
PLACES = "Highbury Hartfield Donwell Randalls London Bath Richmond Weymouth Surrey Kent".split()
THINGS = ["a letter", "a piano", "a basket", "a shawl", "a bonnet", "a ribbon", "a riddle", "a portrait"]


def sentence(i):
    """A plain sentence whose facts (who, where, what) vary with i."""
    who, where, what = NAMES[i % len(NAMES)], PLACES[(3 * i) % len(PLACES)], THINGS[(5 * i) % len(THINGS)]
    return f"On day {i}, {who} walked to {where} and carried {what} for {NAMES[(i + 4) % len(NAMES)]}."


def paragraph(prefix, first, n_sentences, n_questions, n_unanswerable):
    """A context of n_sentences and questions on it; each answer is the walker's destination."""
    sentences = [sentence(i) for i in range(first, first + n_sentences)]
    context = " ".join(sentences)
    qas = []
    step = max(1, n_sentences // n_questions)
    for q in range(n_questions):
        i = first + min(q * step + step // 2, n_sentences - 1)  # spread over the context, so over windows
        day = f"On day {i},"
        where = PLACES[(3 * i) % len(PLACES)]
        answer_start = context.index(day) + context[context.index(day):].index(where)
        assert context[answer_start:answer_start + len(where)] == where
        qas.append({"id": f"{prefix}-{first}-{q}", "question": f"Where did {NAMES[i % len(NAMES)]} walk on day {i}?",
                    "answers": [{"text": where, "answer_start": answer_start}]})
    for q in range(n_unanswerable):
        # Nobody walks on day -1: the 2.0 layout marks these impossible, with a plausible answer.
        qas.append({"id": f"{prefix}-{first}-none-{q}", "question": f"Where did {NAMES[q]} walk on day -{q + 1}?",
                    "is_impossible": True, "answers": [],
                    "plausible_answers": [{"text": PLACES[0], "answer_start": context.find(PLACES[0])}]})
    return {"context": context, "qas": qas}


def whole_context_paragraph(i):
    """A short context whose gold answer is all of it: whatever span a model picks overlaps the
    gold, so even a random model scores some F1 and the checks on scores are not all on zeros."""
    context = f"{NAMES[i]} walked to {PLACES[i]} with {NAMES[i + 1]}"
    return {"context": context, "qas": [{"id": f"whole-{i}", "question": "Who walked where with whom?",
                                         "answers": [{"text": context, "answer_start": 0}]}]}


def write_squad(folder, version, more_train=0):
    """train and dev files of `version` ("1.1" or "2.0"), with `more_train` paragraphs of 4
    questions added to the training file; returns the dev paragraphs."""
    v2 = version == "2.0"
    layouts = {
        # (sentences, answerable questions, unanswerable questions) per paragraph
        "train": [(6, 3, 1 if v2 else 0), (8, 3, 1 if v2 else 0), (5, 2, 0), (7, 3, 1 if v2 else 0)]
        + [(6, 4, 0)] * more_train,
        "dev": [(40, 2, 1 if v2 else 0), (6, 2, 1 if v2 else 0), (9, 3, 0)],  # 40 sentences: 3 windows
    }
    os.makedirs(folder, exist_ok=True)
    suffix = "v2.0" if v2 else "v1.1"
    written = {}
    for split, layout in layouts.items():
        first, paragraphs = 0 if split == "train" else 500, []
        for n_sentences, n_questions, n_none in layout:
            paragraphs.append(paragraph(split, first, n_sentences, n_questions, n_none))
            first += n_sentences
        if split == "dev":
            paragraphs += [whole_context_paragraph(i) for i in range(3)]
        data = {"version": suffix, "data": [{"title": f"Austen-like {split}", "paragraphs": paragraphs}]}
        with open(os.path.join(folder, f"{split}-{suffix}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        written[split] = paragraphs
    return written["dev"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny.minilm_dir())


def logits(model, features):
    """Start and end logits of a padded batch of features."""
    with torch.no_grad():
        out = model(**accepted_inputs(model, collate(features, 0)))
    return out.start_logits, out.end_logits


@pytest.mark.parametrize("model_name,task,version", [("tiny-bert-qa", "squad", "1.1"),
                                                     ("tiny-distilbert-qa", "squad_v2", "2.0")])
def test_end_to_end_on_a_tiny_qa_model(tiny_checkpoints, tokenizer, tmp_path, monkeypatch, model_name, task, version):
    data = str(tmp_path / "squad")
    dev_paragraphs = write_squad(data, version)
    dev_questions = [qa for p in dev_paragraphs for qa in p["qas"]]
    n_unanswerable = sum(bool(qa.get("is_impossible")) for qa in dev_questions)
    assert (n_unanswerable > 0) == (version == "2.0")

    # The long dev context really is cut into several 384-token windows.
    long_question = dev_paragraphs[0]["qas"][0]
    long_example = {"id": long_question["id"], "question": long_question["question"],
                    "context": dev_paragraphs[0]["context"], "answers": {"text": [], "answer_start": []}}
    assert len(prepare_eval_features([long_example], tokenizer)) >= 3

    # Count the scoring passes, and keep hold of the pruned model when it is saved.
    scored_models, saved_models = [], []
    real_save = pipelines.encoder.save_pruned

    def counting_evaluate(model, *args, **kwargs):
        scored_models.append(model)
        return evaluate_squad(model, *args, **kwargs)

    def keeping_save(model, *args, **kwargs):
        saved_models.append(model)
        return real_save(model, *args, **kwargs)

    monkeypatch.setattr(evaluate.tasks, "evaluate_squad", counting_evaluate)
    monkeypatch.setattr(pipelines.encoder, "save_pruned", keeping_save)

    out, saved = str(tmp_path / "output"), str(tmp_path / "pruned")
    mu = 0.5
    record = prune_bert.main(["--model_name", model_name, "--task_name", task, "--mu", str(mu), "--seed", "1",
                              "--sample_batch_size", "8", "--batch_size", "4",
                              "--model_dir", tiny_checkpoints[model_name],
                              "--data_dir", data, "--output_dir", out, "--device", "cpu", "--save_model", saved])

    # One dense and one pruned scoring pass per run: the dense score is computed once.
    assert len(scored_models) == 2

    lines = open(os.path.join(out, model_name, f"{task}.jsonl")).read().splitlines()
    assert len(lines) == 1
    written = json.loads(lines[0])
    assert written == json.loads(json.dumps(record))
    assert written["saved_to"] == saved and record["saved_to"] == saved
    assert written["task_name"] == task and written["metric_name"] == "f1"
    assert written["dense_metric"] == written["metrics"]["dense"]["f1"]
    assert written["pruned_metric"] == written["metrics"]["pruned"]["f1"]
    assert 0 < written["mac_ratio"] <= mu
    assert written["params_pruned"] < written["params_dense"]
    assert written["sample_batch_size"] == 8 and written["seed"] == 1

    # The whole-context questions give these tiny models some F1, so the comparisons below are not of zeros.
    assert written["metrics"]["dense"]["f1"] > 0
    for which in ("dense", "pruned"):
        metrics = written["metrics"][which]
        assert "forward_seconds" not in metrics and "postprocess_seconds" not in metrics
        for name in ("exact", "f1"):
            assert 0.0 <= metrics[name] <= 100.0
        assert metrics["exact"] <= metrics["f1"] + 1e-9  # an exact match is also a full F1
        if version == "1.1":
            assert set(metrics) == {"exact", "f1"}
            continue
        assert set(metrics) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                                "NoAns_exact", "NoAns_f1", "NoAns_total"}
        assert metrics["total"] == len(dev_questions)
        assert metrics["NoAns_total"] == n_unanswerable
        assert metrics["HasAns_total"] == len(dev_questions) - n_unanswerable
        for name in ("exact", "f1"):  # the overall score is the question-weighted mean of the two subsets
            weighted = (metrics[f"HasAns_{name}"] * metrics["HasAns_total"]
                        + metrics[f"NoAns_{name}"] * metrics["NoAns_total"]) / metrics["total"]
            assert metrics[name] == pytest.approx(weighted, abs=1e-9)

    text = open(os.path.join(out, model_name, f"{task}.txt")).read()
    assert text.count("MACs kept") == 1 and "f1: dense" in text and "exact: dense" in text

    # The dense score is the dense checkpoint's, scored afresh here.
    examples = load_squad(version, "validation", data)
    features = prepare_eval_features(examples, tokenizer)
    dense = load_model(tiny_checkpoints[model_name])
    dense_again = evaluate_squad(dense, examples, features, version, "cpu", 4)
    assert dense_again["f1"] == pytest.approx(written["metrics"]["dense"]["f1"], abs=1e-9)
    assert dense_again["exact"] == pytest.approx(written["metrics"]["dense"]["exact"], abs=1e-9)

    # The saved model reloads with the recorded shapes and gives the pruned model's logits.
    reloaded = load_model(saved)
    assert reloaded.config.stat_heads == record["heads_per_layer"]
    assert reloaded.config.stat_ffn == record["neurons_per_layer"]
    assert len(saved_models) == 1
    pruned = saved_models[0].eval()
    start, end = logits(pruned, features)
    start_again, end_again = logits(reloaded, features)
    assert torch.equal(start, start_again) and torch.equal(end, end_again)
    assert not torch.equal(start, logits(dense, features)[0])  # pruning did something
    pruned_again = evaluate_squad(reloaded, examples, features, version, "cpu", 4)
    assert pruned_again["f1"] == pytest.approx(written["metrics"]["pruned"]["f1"], abs=1e-9)
    assert np.isfinite(start.numpy()).all()


def test_sequence_classification_checkpoint_is_refused(tiny_checkpoints, tmp_path, capsys):
    data = str(tmp_path / "squad")
    write_squad(data, "1.1")
    out = tmp_path / "output"
    argv = ["--model_name", "tiny-bert", "--task_name", "squad", "--mu", "0.5", "--model_dir",
            tiny_checkpoints["tiny-bert"], "--data_dir", data, "--output_dir", str(out), "--device", "cpu"]
    code, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert code == 2
    # The checkpoint is loaded before its kind is checked, so transformers' "Loading weights"
    # progress bar may come first; the error itself is one line, the last, with no traceback.
    err = lines[-1]
    assert err.startswith("error:") and all(line.startswith("Loading weights") for line in lines[:-1])
    assert "question-answering" in err and "BertForSequenceClassification" in err
    assert not out.exists()  # no half-written results


def test_missing_squad_file_is_one_line(tiny_checkpoints, tmp_path, capsys):
    data = str(tmp_path / "squad")
    write_squad(data, "1.1")
    os.remove(os.path.join(data, "dev-v1.1.json"))
    argv = ["--model_name", "tiny-bert-qa", "--task_name", "squad", "--mu", "0.5", "--model_dir",
            tiny_checkpoints["tiny-bert-qa"], "--data_dir", data, "--output_dir", str(tmp_path / "output")]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "dev-v1.1.json" in err


def test_protocol_paper_draws_among_all_training_features(tiny_checkpoints, tokenizer, tmp_path):
    from evaluate.tasks import make_task
    from dataset.squad import prepare_train_features

    data = str(tmp_path / "squad")
    write_squad(data, "1.1")
    task = make_task("squad", tokenizer, data)
    drawn = task.calibration_sample(12, 3, "with_replacement")
    every = prepare_train_features(load_squad("1.1", "train", data), tokenizer)
    state = np.random.get_state()
    np.random.seed(3)
    expected = [every[i]["input_ids"] for i in np.random.choice(len(every), 12)]  # Kwon et al.'s draw
    np.random.set_state(state)
    assert sorted(f["input_ids"] for f in drawn) == sorted(expected)

    record = prune_bert.main(["--model_name", "tiny-bert-qa", "--task_name", "squad", "--mu", "0.5", "--seed", "3",
                              "--sample_batch_size", "12", "--batch_size", "4", "--model_dir",
                              tiny_checkpoints["tiny-bert-qa"], "--data_dir", data,
                              "--output_dir", str(tmp_path / "out"),
                              "--device", "cpu", "--protocol", "paper"])
    assert (record["sampler"], record["allocation"], record["calibration"]) == ("with_replacement", "faithful",
                                                                                "ffn_then_attn")
    assert record["mac_ratio_authors"] <= 0.5 + 1e-9
