"""The GLUE metrics, computed in-house (fractions, not percentages).

Every function takes array-likes of predictions and labels and returns a Python float.
Where a metric is undefined because a denominator is 0 (constant predictions, say),
it returns 0.0, the usual convention ("no measurable agreement"), rather than NaN.
"""
import numpy as np


def _pair(predictions, labels):
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions, labels):
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions, labels):
    """Binary F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN)."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == 1) & (y == 1))
    fp = np.sum((p == 1) & (y != 1))
    fn = np.sum((p != 1) & (y == 1))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else 0.0


def matthews_corrcoef(predictions, labels):
    """Matthews correlation, in its multiclass form (equal to the 2x2 one for binary labels).

    With C the confusion matrix, c = trace(C), s = the number of samples, t and p the
    true and predicted class counts: (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)).
    """
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    t_counts = np.array([np.sum(y == k) for k in classes], dtype=np.float64)
    p_counts = np.array([np.sum(p == k) for k in classes], dtype=np.float64)
    correct = float(np.sum(p == y))
    s = float(p.size)
    numerator = correct * s - t_counts @ p_counts
    denominator = np.sqrt((s * s - p_counts @ p_counts) * (s * s - t_counts @ t_counts))
    return float(numerator / denominator) if denominator > 0 else 0.0


def pearson(predictions, labels):
    p, y = _pair(predictions, labels)
    p = p.astype(np.float64) - p.mean(dtype=np.float64)
    y = y.astype(np.float64) - y.mean(dtype=np.float64)
    denominator = np.sqrt(np.sum(p * p) * np.sum(y * y))
    if denominator == 0:  # a constant input: no linear relation can be measured
        return 0.0
    # Rounding can push a perfect correlation a hair past 1.
    return float(np.clip(np.sum(p * y) / denominator, -1.0, 1.0))


def _ranks(values):
    """Ranks 1..n, tied values sharing the average of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # rank of each distinct value's first copy
    average_rank = first_rank + (counts - 1) / 2.0
    return average_rank[inverse.reshape(-1)]


def spearman(predictions, labels):
    """Spearman's rank correlation: Pearson's on the ranks (ties get their average rank)."""
    p, y = _pair(predictions, labels)
    return pearson(_ranks(p), _ranks(y))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def glue_metrics(spec, predictions, labels):
    """The task's metrics (spec.metric_names), e.g. {"accuracy": ..., "f1": ...} for MRPC."""
    return {name: _METRICS[name](predictions, labels) for name in spec.metric_names}
