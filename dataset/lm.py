"""Decoder (causal LM) data: calibration windows and perplexity streams, GPTQ protocol.

Tasks (LM_TASKS) and where their text comes from. A file in --data_dir always wins over the
hub; the hub is read only when the file is absent (from its cache, or the network if any).

  wikitext2  local wiki.train.raw / wiki.test.raw (the wikitext-2-raw-v1 files), else hub
             Salesforce/wikitext, config wikitext-2-raw-v1. Text = the split's rows joined
             with "\\n\\n". A hub row is one line of the .raw file, newline kept, and a
             whitespace-only line is stored as "" (that is how the dataset's loading script
             built the hub copy), so a local file is read into rows the same way and gives the
             very same text.
  ptb-new    local ptb.train.txt / ptb.test.txt only (no hub loader works under
             datasets >= 4). Text = the stripped lines ("sentences") joined with " ".
  c4-new     local c4-train.00000-of-01024.json[.gz] / c4-validation.00000-of-00008.json[.gz]
             (one JSON object per line with a "text" field), else hub allenai/c4 with those
             en/ shards. Calibration: each window from a random train document long enough.
             Evaluation: the first 1100 validation documents joined with " ", at most 256
             windows (MAX_EVAL_WINDOWS).
  text       your own corpus: train.txt / test.txt in --data_dir, read as they are.
  austen     the demo corpus shipped in data/austen (found from the repo root, never the cwd;
             --data_dir is ignored): calibration = emma + mansfieldpark, evaluation =
             prideprejudice.

Evaluation sets of a run (available_eval_sets): a run calibrated on task T always reports
T's own set (under the name 'prideprejudice' for austen), and it is an error if that one is
missing. A run on a standard task (wikitext2, ptb-new, c4-new) also reports each other
standard set that is available - its local test file is in --data_dir, or the hub has it -
and silently skips those that are not, as GPTQ's scripts report all three. Runs on 'text' and
'austen' report their own set only.

Each test text is tokenized once, as a whole, with the tokenizer's defaults (so the BOS token
OPT's or Llama's tokenizer adds appears once, at the start, as in GPTQ), then cut into
non-overlapping windows with the tail dropped.

Without network, a hub look-up retries for ~20 s before giving up: set HF_DATASETS_OFFLINE=1
(and HF_HUB_OFFLINE=1) to make it fail at once. Failures are remembered for the process.
"""
import gzip
import json
import os
import random
from functools import lru_cache

import torch

from utils.errors import UserError, not_utf8

LM_TASKS = ("wikitext2", "ptb-new", "c4-new", "text", "austen")
STANDARD_TASKS = ("wikitext2", "ptb-new", "c4-new")
# The names the paper and GPTQ's scripts give the sets read here as ptb-new and c4-new (their
# "ptb" and "c4" evaluation sets are older variants, but calibration draws the same windows).
PAPER_NAMES = {"ptb": "ptb-new", "c4": "c4-new"}

C4_EVAL_DOCS = 1100  # GPTQ's c4-new: the first 1100 validation documents...
MAX_EVAL_WINDOWS = {"c4-new": 256}  # ...and the first 256 windows of them

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN_DIR = os.path.join(REPO_ROOT, "data", "austen")
AUSTEN_CALIBRATION = ("emma.txt", "mansfieldpark.txt")
AUSTEN_EVAL = "prideprejudice"

# Local file names per task and split ("test" is the evaluation split, whatever the source
# calls it).
LOCAL_FILES = {
    "wikitext2": {"train": "wiki.train.raw", "test": "wiki.test.raw"},
    "ptb-new": {"train": "ptb.train.txt", "test": "ptb.test.txt"},
    "c4-new": {"train": "c4-train.00000-of-01024.json.gz",
               "test": "c4-validation.00000-of-00008.json.gz"},
    "text": {"train": "train.txt", "test": "test.txt"},
}

# Hub sources: load_dataset keyword arguments per task and split.
WIKITEXT_HUB = dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1")
C4_HUB_TRAIN = {"train": "en/c4-train.00000-of-01024.json.gz"}
C4_HUB_VALIDATION = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
HUB = {
    ("wikitext2", "train"): dict(WIKITEXT_HUB, split="train"),
    ("wikitext2", "test"): dict(WIKITEXT_HUB, split="test"),
    ("c4-new", "train"): dict(path="allenai/c4", data_files=C4_HUB_TRAIN, split="train"),
    ("c4-new", "test"): dict(path="allenai/c4", data_files=C4_HUB_VALIDATION, split="validation"),
}


def check_task(task):
    if task not in LM_TASKS:
        choices = ", ".join(LM_TASKS + tuple(PAPER_NAMES))
        raise UserError(f"unknown language-model task {task!r} (choose from {choices})")


def canonical_task(task):
    """The task a name stands for (the paper's `ptb` and `c4` are ptb-new and c4-new here)."""
    task = PAPER_NAMES.get(task, task)
    check_task(task)
    return task


def eval_set_name(task):
    """The name a task's evaluation set is reported under."""
    check_task(task)
    return AUSTEN_EVAL if task == "austen" else task


# ---------------------------------------------------------------------------------------------
# Finding and reading files


def _local_path(task, split, data_dir):
    """Path of a task's local file in data_dir, or None. C4 shards may be .json or .json.gz."""
    if data_dir is None:
        return None
    if not os.path.isdir(data_dir):
        raise UserError(f"data dir not found: {data_dir}")
    name = LOCAL_FILES[task][split]
    candidates = [name, name[: -len(".gz")]] if name.endswith(".gz") else [name]
    for candidate in candidates:
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing(task, split, data_dir):
    """The UserError for a split that neither --data_dir nor the hub could supply."""
    name = LOCAL_FILES[task][split]
    where = f"in --data_dir {data_dir}" if data_dir is not None else "(no --data_dir given)"
    message = f"{task}: no {name} {where}"
    if (task, split) in HUB:
        hub_name = HUB[task, split]["path"]
        message += f", and the hub dataset {hub_name} is neither cached nor reachable"
    both = " and ".join(LOCAL_FILES[task].values())
    return UserError(f"{message}; put {both} in --data_dir")


@lru_cache(maxsize=None)
def _hub_split(task, split):
    """The hub split as a datasets.Dataset, or None when no cache or network has it.

    Cached, so an unreachable hub costs its retries once per process, not once per call.
    """
    import datasets  # slow to import; only the hub path needs it

    try:
        return datasets.load_dataset(**HUB[task, split])
    except Exception:  # offline, not cached, hub error...: all mean "not available"
        return None


def _read_lines(path):
    """The file's lines, newline kept, split as Python's text mode splits them."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(f)
    except UnicodeDecodeError as err:
        raise not_utf8(path, err)


def _read_text(path):
    return "".join(_read_lines(path))


def _read_json_texts(path, limit=None):
    """The "text" field of each line of a JSON-lines file (.json or .json.gz), at most `limit`."""
    opener = gzip.open if path.endswith(".gz") else open
    texts = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(texts) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line {lineno}: not valid JSON ({err.msg})")
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise UserError(
                        f'{path}, line {lineno}: expected an object with a "text" string')
                texts.append(doc["text"])
    except (OSError, EOFError) as err:  # a truncated or non-gzip .gz file
        raise UserError(f"cannot read {path}: {err}")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err)
    return texts


# ---------------------------------------------------------------------------------------------
# Texts, per task and split


def _wikitext(split, data_dir):
    path = _local_path("wikitext2", split, data_dir)
    if path is not None:
        # Rebuild the hub rows from the .raw file (see the module docstring).
        rows = [line if line.strip() else "" for line in _read_lines(path)]
    else:
        dataset = _hub_split("wikitext2", split)
        if dataset is None:
            raise _missing("wikitext2", split, data_dir)
        rows = dataset["text"]
    return "\n\n".join(rows)


def _ptb(split, data_dir):
    path = _local_path("ptb-new", split, data_dir)
    if path is None:
        raise _missing("ptb-new", split, data_dir)
    # ptb_text_only's sentences are the stripped lines of the file.
    return " ".join(line.strip() for line in _read_lines(path))


def _c4_documents(split, data_dir, limit=None):
    path = _local_path("c4-new", split, data_dir)
    if path is not None:
        return _read_json_texts(path, limit)
    dataset = _hub_split("c4-new", split)
    if dataset is None:
        raise _missing("c4-new", split, data_dir)
    if limit is not None:
        return dataset[:limit]["text"]
    return dataset["text"]  # a lazy column: indexable, without loading 356k documents


def _plain(split, data_dir):
    path = _local_path("text", split, data_dir)
    if path is None:
        raise _missing("text", split, data_dir)
    return _read_text(path)


def _austen(names):
    paths = [os.path.join(AUSTEN_DIR, name) for name in names]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"austen: shipped file missing: {path} (restore data/austen from git)")
    return "\n\n".join(_read_text(path) for path in paths)


def train_text(task, data_dir=None):
    """The calibration text of a task: one string, or for c4-new a sequence of documents."""
    check_task(task)
    if task == "wikitext2":
        return _wikitext("train", data_dir)
    if task == "ptb-new":
        return _ptb("train", data_dir)
    if task == "c4-new":
        return _c4_documents("train", data_dir)
    if task == "text":
        return _plain("train", data_dir)
    return _austen(AUSTEN_CALIBRATION)


def eval_text(task, data_dir=None):
    """The joined evaluation (test) text of a task, ready to tokenize once."""
    check_task(task)
    if task == "wikitext2":
        return _wikitext("test", data_dir)
    if task == "ptb-new":
        return _ptb("test", data_dir)
    if task == "c4-new":
        return " ".join(_c4_documents("test", data_dir, limit=C4_EVAL_DOCS))
    if task == "text":
        return _plain("test", data_dir)
    return _austen([AUSTEN_EVAL + ".txt"])


def _eval_available(task, data_dir):
    if task == "austen":
        return os.path.isfile(os.path.join(AUSTEN_DIR, AUSTEN_EVAL + ".txt"))
    if _local_path(task, "test", data_dir) is not None:
        return True
    return (task, "test") in HUB and _hub_split(task, "test") is not None


def available_eval_sets(task, data_dir=None):
    """Tasks whose evaluation set a run calibrated on `task` reports: its own first, then the
    other standard sets that are available (see the module docstring).

    Raises UserError when the task's own evaluation set is missing, so a run can check this
    before the expensive pruning. Pass each returned task to eval_text / eval_tokens.
    """
    check_task(task)
    if not _eval_available(task, data_dir):
        eval_text(task, data_dir)  # raises the UserError that says what to put where
    tasks = [task]
    if task in STANDARD_TASKS:
        tasks += [other for other in STANDARD_TASKS
                  if other != task and _eval_available(other, data_dir)]
    return tasks


# ---------------------------------------------------------------------------------------------
# Tokens and windows


def tokenize(tokenizer, text):
    """Token ids of a whole text as a LongTensor (1, n_tokens), the tokenizer's special tokens
    included (as GPTQ's plain tokenizer(text) call does)."""
    # verbose=False: a corpus is far longer than the model's context on purpose (it is cut
    # into windows afterwards), so the "longer than the maximum sequence length" warning is
    # noise here.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def calibration_windows(task, tokenizer, nsamples, seqlen, seed, data_dir=None):
    """`nsamples` random windows of `seqlen` tokens from the task's train text: LongTensor
    (nsamples, seqlen).

    The draws are those of GPTQ's datautils (random.seed(seed), then random.randint per
    sample), made with a random.Random local to this call, so the same seed gives the same
    windows and the global random state is left alone.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    text = train_text(task, data_dir)
    if task == "c4-new":
        return _document_windows(text, tokenizer, nsamples, seqlen, rng)

    ids = tokenize(tokenizer, text)[0]
    # A window start is drawn from [0, n - seqlen - 1], as in GPTQ: seqlen + 1 tokens at least.
    if ids.numel() < seqlen + 1:
        raise UserError(f"{task}: the train text has {ids.numel()} tokens, fewer than the "
                        f"{seqlen + 1} a calibration window of {seqlen} needs")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[start:start + seqlen] for start in starts])


def _document_windows(documents, tokenizer, nsamples, seqlen, rng):
    """C4's sampling: for each window, draw documents until one has more than seqlen tokens,
    then a random window inside it."""
    if len(documents) == 0:
        raise UserError("c4-new: the train shard has no documents")
    too_short = set()  # so a shard with no long document ends in an error, not a loop
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index in too_short:
                continue
            ids = tokenize(tokenizer, documents[index])[0]
            # GPTQ accepts >= seqlen, then fails on a document of exactly seqlen tokens
            # (randint(0, -1)); > seqlen gives the same draws wherever GPTQ works.
            if ids.numel() > seqlen:
                break
            too_short.add(index)
            if len(too_short) == len(documents):
                raise UserError(f"c4-new: no train document has more than {seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def eval_tokens(task, tokenizer, data_dir=None, tasks=None):
    """Tokenized evaluation streams: {set name: LongTensor (1, n_tokens)} for each set of
    `tasks` (canonical names) or, when None, of available_eval_sets(task, data_dir), own set
    first. Each test text is tokenized once, whole. Window each one with
    eval_windows(tokens, seqlen, MAX_EVAL_WINDOWS.get(task))."""
    tasks = available_eval_sets(task, data_dir) if tasks is None else tasks
    return {eval_set_name(name): tokenize(tokenizer, eval_text(name, data_dir)) for name in tasks}


def eval_available(task, data_dir=None):
    """Whether a task's evaluation set can be read (from --data_dir, the shipped files or the hub)."""
    check_task(task)
    return _eval_available(task, data_dir)


def window_batches(windows, batch_size):
    """Model inputs of `batch_size` windows each (the last batch may hold fewer)."""
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]


def eval_windows(tokens, seqlen, max_windows=None):
    """Non-overlapping windows of a token stream (1, n) or (n,): LongTensor
    (n_windows, seqlen), n_windows = n // seqlen (at most max_windows); the tail is dropped."""
    if not (tokens.dim() == 1 or (tokens.dim() == 2 and tokens.size(0) == 1)):
        raise ValueError(f"expected one token stream (1, n), got shape {tuple(tokens.shape)}")
    ids = tokens.reshape(-1)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one "
                        f"window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)
