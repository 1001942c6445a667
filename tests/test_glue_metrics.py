import math

import numpy as np
import pytest
import torch

from dataset.glue import get_task
from evaluate.glue import evaluate_task, predict
from evaluate.glue_metrics import (_ranks, accuracy, f1, glue_metrics, matthews_corrcoef,
                                   pearson, spearman)

# A 2x2 confusion matrix, pairs (prediction, label):
#   (1,1) TP, (1,1) TP, (1,0) FP, (0,0) TN, (0,0) TN, (0,1) FN, (0,0) TN, (1,1) TP
#   TP = 3, FP = 1, FN = 1, TN = 3
PRED = [1, 1, 1, 0, 0, 0, 0, 1]
LABEL = [1, 1, 0, 0, 0, 1, 0, 1]


def test_accuracy():
    # 6 of 8 right.
    assert accuracy(PRED, LABEL) == 0.75
    assert accuracy(np.array([2, 0, 1]), np.array([2, 0, 1])) == 1.0
    assert isinstance(accuracy(PRED, LABEL), float)


def test_f1_symmetric_matrix():
    # F1 = 2TP / (2TP + FP + FN) = 6 / 8.
    assert f1(PRED, LABEL) == pytest.approx(0.75)


def test_f1_and_mcc_asymmetric_matrix():
    # TP = 2, FP = 1, FN = 2, TN = 5.
    pred = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    label = [1, 1, 0, 1, 1, 0, 0, 0, 0, 0]
    # F1 = 4 / (4 + 1 + 2) = 4/7.
    assert f1(pred, label) == pytest.approx(4 / 7)
    # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (10 - 2) / sqrt(3*4*6*7).
    assert matthews_corrcoef(pred, label) == pytest.approx(8 / math.sqrt(504))


def test_mcc_symmetric_matrix():
    # (3*3 - 1*1) / sqrt(4*4*4*4) = 8 / 16.
    assert matthews_corrcoef(PRED, LABEL) == pytest.approx(0.5)


def test_mcc_extremes_and_degenerate():
    y = [0, 1, 1, 0]
    assert matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], y) == pytest.approx(-1.0)
    # Constant predictions: TN + FN = 0 zeroes the denominator; MCC is 0 by convention.
    assert matthews_corrcoef([1, 1, 1, 1], y) == 0.0
    assert matthews_corrcoef([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_mcc_multiclass():
    # labels 0 1 2 0 1 2, predictions 0 2 1 0 0 2: c = 3 correct of s = 6;
    # true counts t = (2, 2, 2), predicted counts p = (3, 1, 2); t.p = 12, p.p = 14, t.t = 12.
    # MCC = (3*6 - 12) / sqrt((36 - 14)(36 - 12)) = 6 / sqrt(528).
    assert matthews_corrcoef([0, 2, 1, 0, 0, 2], [0, 1, 2, 0, 1, 2]) == \
        pytest.approx(6 / math.sqrt(528))


def test_f1_degenerate():
    # No positive prediction and no positive label: 2TP + FP + FN = 0, F1 reported as 0.
    assert f1([0, 0], [0, 0]) == 0.0
    # Everything predicted positive, one of two right: 2 / (2 + 1 + 0).
    assert f1([1, 1], [1, 0]) == pytest.approx(2 / 3)


def test_pearson():
    # Centred: dx = (-1.5, -.5, .5, 1.5), dy = (-1.5, .5, -.5, 1.5);
    # sum dx dy = 4, sum dx^2 = sum dy^2 = 5, r = 4/5.
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    # A constant input has no correlation to measure: 0, not NaN.
    assert pearson([1.0, 1.0, 1.0], [1, 2, 3]) == 0.0


def test_ranks_average_ties():
    # 5 is 1st, 10 is 2nd, the two 20s share ranks 3 and 4.
    assert _ranks(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman():
    # Monotonic but not linear: rank correlation is exactly 1 (or -1).
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [64, 27, 8, 1]) == pytest.approx(-1.0)
    # Tie: ranks of x = (1, 2.5, 2.5, 4), of y = (1, 2, 3, 4); centred (-1.5, 0, 0, 1.5) and
    # (-1.5, -.5, .5, 1.5): sum of products 4.5, sums of squares 4.5 and 5,
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        f1([], [])


def test_glue_metrics_names():
    pred, label = [1, 0, 1, 1], [1, 0, 0, 1]
    assert set(glue_metrics(get_task("mrpc"), pred, label)) == {"accuracy", "f1"}
    assert set(glue_metrics(get_task("qqp"), pred, label)) == {"accuracy", "f1"}
    assert set(glue_metrics(get_task("cola"), pred, label)) == {"matthews_correlation"}
    for task in ("sst2", "mnli", "qnli", "rte", "movie-sentiment"):
        assert set(glue_metrics(get_task(task), pred, label)) == {"accuracy"}
    stsb = glue_metrics(get_task("stsb"), [0.1, 2.0, 3.5, 4.9], [0.0, 2.5, 3.0, 5.0])
    assert set(stsb) == {"pearson", "spearmanr"}
    assert stsb["spearmanr"] == pytest.approx(1.0)
    assert all(type(v) is float for v in stsb.values())
    for name in ("mrpc", "stsb", "cola", "mnli"):
        spec = get_task(name)
        assert spec.primary_metric in spec.metric_names


class _FixedLogits(torch.nn.Module):
    """Stands in for a classifier: logits are a function of the first token id."""

    def __init__(self, n_out):
        super().__init__()
        self.n_out = n_out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        first = input_ids[:, 0].float()
        if self.n_out == 1:
            logits = first[:, None] / 10
        else:  # class = first token id mod n_out
            logits = torch.nn.functional.one_hot(input_ids[:, 0] % self.n_out, self.n_out).float()
        return type("Output", (), {"logits": logits})()


def _batch(first_ids, labels, label_dtype=torch.long):
    ids = torch.tensor([[i, 5, 0] for i in first_ids])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor(labels, dtype=label_dtype)}


def test_predict_classification_and_regression():
    model = _FixedLogits(3).train()
    preds, labels = predict(model, [_batch([3, 4], [0, 1]), _batch([5], [0])], "cpu", "t")
    assert preds.tolist() == [0, 1, 2] and labels.tolist() == [0, 1, 0]
    assert model.training  # mode restored
    preds, _ = predict(_FixedLogits(1), [_batch([30, 12], [3.0, 1.0], torch.float32)], "cpu", "t")
    assert preds == pytest.approx([3.0, 1.2])


def test_evaluate_task_mnli_names_mismatched():
    model = _FixedLogits(3)
    spec = get_task("mnli")
    # matched: predictions 0 1 2 vs labels 0 1 1 (2/3); mismatched: 0 0 vs 0 1 (1/2).
    results = evaluate_task(model, spec, {
        "validation_matched": [_batch([3, 4, 5], [0, 1, 1])],
        "validation_mismatched": [_batch([3, 6], [0, 1])],
    }, "cpu")
    assert results == pytest.approx({"accuracy": 2 / 3, "accuracy_mm": 0.5})
    results = evaluate_task(_FixedLogits(1), get_task("stsb"),
                            {"validation": [_batch([10, 20, 40], [1.0, 2.5, 3.0], torch.float32)]},
                            "cpu")
    assert set(results) == {"pearson", "spearmanr"}
    assert results["spearmanr"] == pytest.approx(1.0)
