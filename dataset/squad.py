"""SQuAD 1.1 / 2.0: examples, tokenized features, calibration samples and batches.

An *example* is one question on one context:
    {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}
(a SQuAD 2.0 question with no answer has empty lists).

A *feature* is one window of an example as the model sees it: the question, then a slice of
the context. Contexts longer than max_length are cut into windows that overlap by `stride`
tokens, so one example can give several features. Features are not padded here: `collate`
pads each batch to its own longest feature, on the right.
"""
import json
import os
import random

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.sampling import draw_with_replacement
from utils.errors import UserError, not_utf8

VERSIONS = ("1.1", "2.0")
SPLITS = ("train", "validation")

# The official file names, as distributed on the SQuAD site.
JSON_FILES = {
    ("1.1", "train"): "train-v1.1.json",
    ("1.1", "validation"): "dev-v1.1.json",
    ("2.0", "train"): "train-v2.0.json",
    ("2.0", "validation"): "dev-v2.0.json",
}
HUB_NAMES = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}


# -----------------------------------------------------------------------------
# Examples

def load_squad(version, split, data_dir=None):
    """Examples of SQuAD `version` ("1.1" or "2.0"), `split` ("train" or "validation").

    With data_dir, read the official JSON file from it; otherwise ask the Hugging Face hub
    (or its local cache).
    """
    if version not in VERSIONS:
        raise UserError(f"unknown SQuAD version {version!r} (use one of {', '.join(VERSIONS)})")
    if split not in SPLITS:
        raise UserError(f"unknown SQuAD split {split!r} (use one of {', '.join(SPLITS)})")
    if data_dir is not None:
        return _load_json(os.path.join(data_dir, JSON_FILES[version, split]), version)
    return _load_hub(version, split)


def _load_json(path, version):
    if not os.path.isfile(path):
        raise UserError(f"SQuAD file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise not_utf8(path, err)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}")
    try:
        examples = _examples_from_json(data, version)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path} does not have the SQuAD JSON structure "
                        f"(data -> paragraphs -> qas): {type(err).__name__}: {err}")
    _check_examples(examples, path)
    if not examples:
        raise UserError(f"{path} holds no questions")
    if version == "1.1":
        for ex in examples:
            if not ex["answers"]["text"]:
                raise UserError(f"{path}: question {ex['id']} has no answer; "
                                f"is this a SQuAD 2.0 file?")
    return examples


def _check_examples(examples, path):
    """Types and unique ids, checked here: a wrong type would otherwise fail in the middle of
    featurization or, for an answer, only in the metric after the whole run."""
    seen = set()
    for ex in examples:
        if not isinstance(ex["id"], str):
            raise UserError(f"{path}: question id {ex['id']!r} is not a string")
        where = f"{path}: question {ex['id']}"
        if ex["id"] in seen:
            raise UserError(f"{where}: the id is used twice")
        seen.add(ex["id"])
        if not isinstance(ex["question"], str):
            raise UserError(f"{where}: the question is not a string")
        answers = ex["answers"]
        if not all(isinstance(text, str) for text in answers["text"]):
            raise UserError(f"{where}: an answer text is not a string")
        # bool is an int to Python, not to SQuAD
        if not all(type(start) is int and start >= 0 for start in answers["answer_start"]):
            raise UserError(f"{where}: an answer_start is not a non-negative integer")


def _examples_from_json(data, version):
    examples = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            if not isinstance(context, str):
                raise TypeError("context is not a string")
            for qa in paragraph["qas"]:
                # SQuAD 2.0 files list "plausible_answers" for unanswerable questions; the
                # gold for those is no answer at all.
                answers = [] if qa.get("is_impossible", False) else qa["answers"]
                examples.append({
                    "id": qa["id"],
                    "question": qa["question"],
                    "context": context,
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [a["answer_start"] for a in answers],
                    },
                })
    return examples


def _load_hub(version, split):
    name = HUB_NAMES[version]
    try:
        import datasets  # lazily: reading local JSON files must not need it
        ds = datasets.load_dataset(name, split=split)
        rows = ds.select_columns(["id", "question", "context", "answers"]).to_list()
    except Exception as err:
        raise UserError(f"could not load {name} ({split}) from the Hugging Face hub "
                        f"({type(err).__name__}); pass --data_dir with the SQuAD JSON files "
                        f"({JSON_FILES[version, 'train']}, {JSON_FILES[version, 'validation']})")
    return [{"id": r["id"], "question": r["question"], "context": r["context"],
             "answers": {"text": list(r["answers"]["text"]),
                         "answer_start": list(r["answers"]["answer_start"])}}
            for r in rows]


# -----------------------------------------------------------------------------
# Features

def _tokenize(examples, tokenizer, max_length, stride):
    """Question first, context second; only the context is truncated, into overlapping windows.

    No padding here (collate pads on the right, whatever the tokenizer's padding side), so
    question-then-context is the right order for BERT-style models.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("SQuAD features need a fast tokenizer (it gives offset mappings)")
    # Some questions start with lots of whitespace, which only eats into the context's room.
    questions = [ex["question"].lstrip() for ex in examples]
    contexts = [ex["context"] for ex in examples]
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _model_inputs(enc, i):
    feature = {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
    if "token_type_ids" in enc:
        feature["token_type_ids"] = enc["token_type_ids"][i]
    return feature


def _context_span(sequence_ids):
    """First and last token index of the context (sequence 1) in one window."""
    context = [t for t, s in enumerate(sequence_ids) if s == 1]
    return context[0], context[-1]


def _answer_tokens(example, offsets, sequence_ids):
    """Start and end token of the first gold answer in this window; (0, 0), the CLS token,
    when there is no answer or it is not wholly inside the window."""
    answers = example["answers"]
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    first, last = _context_span(sequence_ids)
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    # The first context token that ends after the answer starts, and the last one that
    # starts before the answer ends.
    start = next(t for t in range(first, last + 1) if offsets[t][1] > start_char)
    end = next(t for t in range(last, first - 1, -1) if offsets[t][0] < end_char)
    return start, end


def prepare_train_features(examples, tokenizer, max_length=384, stride=128, chunk=1000):
    """Training features, with start/end token positions of the answer (CLS when absent).

    STAT only needs the inputs; the positions are the targets of the task loss that Kwon et
    al.'s importance scores differentiate.
    """
    features = []
    for lo in range(0, len(examples), chunk):
        part = examples[lo:lo + chunk]
        enc = _tokenize(part, tokenizer, max_length, stride)
        for i, ex_i in enumerate(enc["overflow_to_sample_mapping"]):
            feature = _model_inputs(enc, i)
            start, end = _answer_tokens(part[ex_i], enc["offset_mapping"][i], enc.sequence_ids(i))
            feature["start_positions"] = start
            feature["end_positions"] = end
            feature["example_index"] = lo + ex_i
            features.append(feature)
    return features


def train_feature_counts(examples, tokenizer, max_length=384, stride=128, chunk=1000):
    """How many training features (windows) each example gives, without keeping them: a
    sample drawn from all the features of the training set needs their number, and holding
    all of them (~88k lists of up to 384 token ids) would take gigabytes."""
    counts = np.zeros(len(examples), dtype=np.int64)
    for lo in tqdm(range(0, len(examples), chunk), desc="counting SQuAD training features", leave=False,
                   disable=len(examples) <= chunk):
        enc = _tokenize(examples[lo:lo + chunk], tokenizer, max_length, stride)
        np.add.at(counts, lo + np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64), 1)
    return counts


def train_features_at(examples, tokenizer, indices, counts, max_length=384, stride=128):
    """The features at `indices` (repeats allowed, in that order) of the list that
    prepare_train_features(examples) returns, featurizing only the examples they come from.

    counts: train_feature_counts(examples). An example's windows do not depend on which
    other examples are tokenized with it, so the features are the same as from the whole list.
    """
    starts = np.concatenate([[0], np.cumsum(counts)])
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and not 0 <= indices.min() <= indices.max() < starts[-1]:
        raise IndexError(f"feature index out of range 0..{starts[-1] - 1}")
    owners = np.searchsorted(starts, indices, side="right") - 1
    needed = sorted(set(owners.tolist()))
    windows = {i: [] for i in needed}
    for feature in prepare_train_features([examples[i] for i in needed], tokenizer, max_length, stride):
        windows[needed[feature["example_index"]]].append(feature)
    return [dict(windows[e][g - starts[e]], example_index=int(e)) for g, e in zip(indices.tolist(), owners.tolist())]


def prepare_eval_features(examples, tokenizer, max_length=384, stride=128, chunk=1000):
    """Evaluation features: model inputs, the index of their example, and offset_mapping
    (character spans in the context; None for question and special tokens, so that
    post-processing can only pick answers inside the context)."""
    features = []
    for lo in range(0, len(examples), chunk):
        part = examples[lo:lo + chunk]
        enc = _tokenize(part, tokenizer, max_length, stride)
        for i, ex_i in enumerate(enc["overflow_to_sample_mapping"]):
            feature = _model_inputs(enc, i)
            feature["example_index"] = lo + ex_i
            feature["offset_mapping"] = [
                tuple(o) if s == 1 else None
                for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))
            ]
            features.append(feature)
    return features


# -----------------------------------------------------------------------------
# Calibration and batching

def sample_calibration_features(features, n, seed, sampler="distinct"):
    """n features drawn at random, reproducibly for a given seed.

    distinct: n different features (random.Random(seed).sample).
    with_replacement: Kwon et al.'s draw (their main.py, which the STAT authors' BERT code
    follows), np.random.seed(seed) then np.random.choice(len(features), n), over the features of
    the whole training set: with replacement, so a feature may come twice.
    """
    if n < 1:
        raise UserError(f"the calibration sample size must be positive, got {n}")
    if sampler == "with_replacement":
        if not features:
            raise UserError("the training set has no features to calibrate on")
        return [features[i] for i in draw_with_replacement(len(features), n, seed)]
    if sampler != "distinct":
        raise ValueError(f"unknown sampler {sampler!r}")
    if n > len(features):
        raise UserError(f"asked for {n} calibration features, but the training set "
                        f"only has {len(features)}")
    picks = random.Random(seed).sample(range(len(features)), n)
    return [features[i] for i in picks]


def batches(features, batch_size):
    """Consecutive slices of `features`, in order."""
    for lo in range(0, len(features), batch_size):
        yield features[lo:lo + batch_size]


def collate(features, pad_token_id, with_positions=False):
    """Pad a batch on the right to its longest feature; return long tensors of model inputs
    (with_positions: and the answers' start_positions and end_positions, the task's labels)."""
    width = max(len(f["input_ids"]) for f in features)
    keys = ["input_ids", "attention_mask"]
    if "token_type_ids" in features[0]:
        keys.append("token_type_ids")
    batch = {}
    for key in keys:
        fill = pad_token_id if key == "input_ids" else 0
        t = torch.full((len(features), width), fill, dtype=torch.long)
        for row, f in enumerate(features):
            t[row, :len(f[key])] = torch.as_tensor(f[key], dtype=torch.long)
        batch[key] = t
    if with_positions:
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return batch
