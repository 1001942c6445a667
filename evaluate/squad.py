"""SQuAD 1.1 / 2.0 evaluation: logits -> answer text -> exact match and F1.

The metric follows the official evaluation scripts: answers are compared after
normalisation (lower case, no punctuation, no articles, single spaces), each question scores
its best over the gold answers, and the numbers are percentages. For SQuAD 2.0 an
unanswerable question's gold is the empty answer, and the scores are also broken down into
answerable (HasAns) and unanswerable (NoAns) questions.
"""
import collections
import re
import string
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from dataset.squad import batches, collate
from evaluate.inputs import accepted_inputs

VERSIONS = ("1.1", "2.0")

# -----------------------------------------------------------------------------
# Metric

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text):
    """Lower case, drop punctuation, drop articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred, gold):
    """1.0 when the two answers are equal after normalisation, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_score(pred, gold, empty_matches_empty=True):
    """Harmonic mean of token precision and recall between the normalised answers.

    When either side is empty it is 0.0, except that two empty answers score 1.0 as in the
    official 2.0 script (a right no-answer); the 1.1 script scores them 0.0
    (empty_matches_empty=False).
    """
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(empty_matches_empty and pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_answers(example, version):
    golds = example["answers"]["text"]
    if version == "1.1":
        if not golds:
            raise ValueError(f"SQuAD 1.1 question {example['id']} has no gold answer")
        return golds
    # As the official v2 script: golds that normalise to nothing do not count, and a
    # question without any is scored against the empty answer.
    return [g for g in golds if normalize_answer(g)] or [""]


def squad_metrics(examples, predictions, version):
    """Official SQuAD metrics, in percent, for predictions {id: answer text}.

    1.1: {"exact", "f1"} (one name for exact match in both versions, so records aggregate).
    2.0: {"exact", "f1", "total"} and the same three for the HasAns and NoAns subsets (a subset with no
    questions is left out, as officially).
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown SQuAD version {version!r}")
    exact, f1, has_answer = [], [], []
    for ex in examples:
        if ex["id"] not in predictions:
            raise ValueError(f"no prediction for question {ex['id']}")
        pred = predictions[ex["id"]]
        golds = _gold_answers(ex, version)
        exact.append(max(exact_match(pred, g) for g in golds))
        f1.append(max(f1_score(pred, g, empty_matches_empty=version == "2.0") for g in golds))
        has_answer.append(bool(ex["answers"]["text"]))
    exact, f1, has_answer = np.array(exact), np.array(f1), np.array(has_answer, dtype=bool)

    if version == "1.1":
        return {"exact": float(100 * exact.mean()), "f1": float(100 * f1.mean())}
    metrics = {"exact": float(100 * exact.mean()), "f1": float(100 * f1.mean()),
               "total": len(exact)}
    for name, subset in (("HasAns", has_answer), ("NoAns", ~has_answer)):
        if subset.any():
            metrics[f"{name}_exact"] = float(100 * exact[subset].mean())
            metrics[f"{name}_f1"] = float(100 * f1[subset].mean())
            metrics[f"{name}_total"] = int(subset.sum())
    return metrics


# -----------------------------------------------------------------------------
# Post-processing: logits -> answer text

def _padded(logits, n_rows, width):
    """Logits as one float32 array (n_rows, width), from an array/tensor or a list of rows."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    if isinstance(logits, np.ndarray) and logits.ndim == 2:
        out = np.full((n_rows, max(width, logits.shape[1])), -np.inf, dtype=np.float32)
        out[:, :logits.shape[1]] = logits
        return out
    out = np.full((n_rows, width), -np.inf, dtype=np.float32)
    for i, row in enumerate(logits):
        row = np.asarray(row.detach().float().cpu() if isinstance(row, torch.Tensor) else row)
        out[i, :len(row)] = row
    return out


def _best_spans(start, end, context, n_best, max_answer_length):
    """Per window: the best-scoring answer span inside the context.

    As the reference post-processing (BERT's run_squad, transformers' run_qa) does it, so
    that scores compare with published ones: take the window's n_best highest start and end
    logits over all its tokens, score all n_best^2 pairs as start+end, reject pairs with an
    end or start outside the context, that end before they start or that are longer than
    max_answer_length, and keep the best. Vectorised over all windows.
    Returns (score, start token, end token); score is -inf where no span is valid.
    """
    k = min(n_best, start.shape[1])
    top_start = np.argpartition(-start, k - 1, axis=1)[:, :k]
    top_end = np.argpartition(-end, k - 1, axis=1)[:, :k]
    pair = (np.take_along_axis(start, top_start, axis=1)[:, :, None]
            + np.take_along_axis(end, top_end, axis=1)[:, None, :])      # (windows, k, k)
    length = top_end[:, None, :] - top_start[:, :, None] + 1
    in_context = (np.take_along_axis(context, top_start, axis=1)[:, :, None]
                  & np.take_along_axis(context, top_end, axis=1)[:, None, :])
    valid = in_context & (length >= 1) & (length <= max_answer_length) & np.isfinite(pair)
    pair = np.where(valid, pair, -np.inf).reshape(len(pair), -1)
    best = pair.argmax(axis=1)
    rows = np.arange(len(pair))
    return pair[rows, best], top_start[rows, best // k], top_end[rows, best % k]


def postprocess(examples, features, start_logits, end_logits, version,
                n_best=20, max_answer_length=30, null_threshold=0.0):
    """Answer text for each example, {id: text}, from the logits of its features (windows).

    The answer is the best span over all of an example's windows. For SQuAD 2.0 the
    no-answer score of a window is start_logit[CLS] + end_logit[CLS] (CLS is token 0), the
    example's is the minimum over its windows, and the prediction is "" when
    null score - best span score > null_threshold.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown SQuAD version {version!r}")
    n = len(features)
    width = max(len(f["offset_mapping"]) for f in features)
    start = _padded(start_logits, n, width)
    end = _padded(end_logits, n, width)
    context = np.zeros(start.shape, dtype=bool)
    for i, f in enumerate(features):
        context[i, :len(f["offset_mapping"])] = [o is not None for o in f["offset_mapping"]]

    span_score, span_start, span_end = _best_spans(start, end, context, n_best, max_answer_length)
    null_score = start[:, 0] + end[:, 0]

    # Per example: the window with the best span, and the lowest no-answer score.
    best_window = {}
    min_null = {}
    for i, f in enumerate(features):
        e = f["example_index"]
        if e not in best_window or span_score[i] > span_score[best_window[e]]:
            best_window[e] = i
        min_null[e] = min(min_null.get(e, np.inf), null_score[i])

    predictions = {}
    for e, ex in enumerate(examples):
        i = best_window.get(e)
        if i is None or not np.isfinite(span_score[i]):
            predictions[ex["id"]] = ""  # no window, or no valid span in any window
            continue
        if version == "2.0" and min_null[e] - span_score[i] > null_threshold:
            predictions[ex["id"]] = ""
            continue
        offsets = features[i]["offset_mapping"]
        predictions[ex["id"]] = ex["context"][offsets[span_start[i]][0]:offsets[span_end[i]][1]]
    return predictions


# -----------------------------------------------------------------------------
# End to end

@torch.no_grad()
def predict_logits(model, features, device, batch_size=64):
    """Start and end logits of every feature, as float32 arrays (features, longest feature);
    positions past a feature's length hold -inf."""
    model.eval()
    pad_id = getattr(model.config, "pad_token_id", None) or 0

    # Batches of similar lengths waste little on padding; rows go back in feature order.
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    width = max(len(f["input_ids"]) for f in features)
    start = torch.full((len(features), width), float("-inf"), device=device)
    end = torch.full((len(features), width), float("-inf"), device=device)
    n_batches = (len(order) + batch_size - 1) // batch_size
    for idx in tqdm(batches(order, batch_size), total=n_batches, desc="SQuAD eval",
                    unit="batch", file=sys.stderr):
        inputs = accepted_inputs(model, collate([features[i] for i in idx], pad_id))
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        out = model(**inputs)
        rows = torch.as_tensor(idx, device=device)
        w = inputs["input_ids"].shape[1]
        padding = inputs["attention_mask"] == 0
        start[rows, :w] = out.start_logits.float().masked_fill(padding, float("-inf"))
        end[rows, :w] = out.end_logits.float().masked_fill(padding, float("-inf"))
    # Copying to the host also waits for the device, so timings around this call are honest.
    return start.cpu().numpy(), end.cpu().numpy()


def evaluate_squad(model, examples, features, version, device, batch_size=64,
                   null_threshold=0.0):
    """Run a *ForQuestionAnswering model on the features and score its answers.

    Returns squad_metrics(...) plus forward_seconds (model passes, logits back on the host)
    and postprocess_seconds (logits to answers to metrics).
    """
    t0 = time.perf_counter()
    start, end = predict_logits(model, features, device, batch_size)
    forward_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    predictions = postprocess(examples, features, start, end, version,
                              null_threshold=null_threshold)
    metrics = squad_metrics(examples, predictions, version)
    postprocess_seconds = time.perf_counter() - t0

    metrics["forward_seconds"] = forward_seconds
    metrics["postprocess_seconds"] = postprocess_seconds
    return metrics
