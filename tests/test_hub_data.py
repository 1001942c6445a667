"""The hub loaders of GLUE, SQuAD and the LM corpora, offline: `datasets.load_dataset` (the name
the loaders call) is replaced by a stand-in that answers only the exact requests the real hub
datasets answer, with data in their real schemas. Column handling and label order are checked
against the stand-in's rows, and against the original files' loaders on the same content.

The schemas, and where they come from:
- nyu-mll/glue: the loading script the hub copy was built from (huggingface/datasets,
  datasets/glue/glue.py, Glue._info and BUILDER_CONFIGS) and the dataset card's dataset_info
  (https://huggingface.co/datasets/nyu-mll/glue): one string column per text field, `label` a
  ClassLabel with the task's label_classes in that order (STS-B: float32), `idx` int32. Splits
  train/validation/test, MNLI train/validation_matched/validation_mismatched/test_matched/
  test_mismatched; the test splits have label -1 (process_label(-1): -1.0 for STS-B).
- rajpurkar/squad and rajpurkar/squad_v2: datasets/squad/squad.py and squad_v2/squad_v2.py:
  id, title, context, question (strings), answers = Sequence({text: string, answer_start: int32})
  (a dict of lists in datasets >= 4); splits train and validation; an unanswerable SQuAD 2.0
  question has empty lists.
- Salesforce/wikitext, wikitext-2-raw-v1: datasets/wikitext/wikitext.py: one row per line of
  wiki.{test,train,valid}.raw, `text` with its newline, "" for a whitespace-only line; splits
  test/train/validation.
- allenai/c4, en shards: the card's dataset_info (https://huggingface.co/datasets/allenai/c4,
  and the legacy `c4` card it replaced): text, timestamp, url, all strings; loaded here from one
  json.gz shard per split with data_files.
"""
import gzip
import json

import datasets
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from transformers import AutoTokenizer

import tiny
from dataset import glue, lm, squad
from evaluate.tasks import make_task
from utils.errors import UserError

CLASS_NAMES = {  # nyu-mll/glue's ClassLabel names, in order
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "stsb": None,  # float32 scores
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
}
TEXT_COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
                "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
                "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2")}
GLUE_SPLITS = {"mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}
HUB_TASKS = [name for name in glue.TASKS if name != "movie-sentiment"]  # movie-sentiment ships in data/


def glue_features(task):
    label = Value("float32") if CLASS_NAMES[task] is None else ClassLabel(names=CLASS_NAMES[task])
    return Features({**{column: Value("string") for column in TEXT_COLUMNS[task]}, "label": label,
                     "idx": Value("int32")})


def glue_split(task, split, n=7):
    """Rows whose texts say where they come from; labels cycle through every class (test: -1)."""
    columns = {column: [f"{task} {split} {column} {i}" for i in range(n)] for column in TEXT_COLUMNS[task]}
    if split.startswith("test"):
        labels = [-1.0 if CLASS_NAMES[task] is None else -1] * n
    elif CLASS_NAMES[task] is None:
        labels = [[0.0, 1.25, 2.5, 3.75, 5.0][i % 5] for i in range(n)]
    else:
        labels = [i % len(CLASS_NAMES[task]) for i in range(n)]
    return Dataset.from_dict({**columns, "label": labels, "idx": list(range(n))}, features=glue_features(task))


def glue_hub(task):
    return DatasetDict({split: glue_split(task, split)
                        for split in GLUE_SPLITS.get(task, ("train", "validation", "test"))})


class StandIn:
    """load_dataset for a fixed set of hub datasets: {(path, config name): DatasetDict}. Requests
    the real hub would refuse fail here too; every request is recorded."""

    def __init__(self, hub):
        self.hub, self.calls = hub, []

    def __call__(self, path, name=None, split=None, data_files=None):
        self.calls.append((path, name, split, data_files))
        if (path, name) not in self.hub:
            raise FileNotFoundError(f"Couldn't find dataset {path} ({name}) on the Hugging Face Hub")
        available = self.hub[path, name]
        if callable(available):  # a dataset read from data_files decides from them
            available = available(data_files)
        if split is None:
            return available
        if split not in available:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(available)}.')
        return available[split]


@pytest.fixture
def glue_standin(monkeypatch):
    standin = StandIn({("nyu-mll/glue", task): glue_hub(task) for task in HUB_TASKS})
    monkeypatch.setattr(datasets, "load_dataset", standin)
    return standin


# ---------------------------------------------------------------------------------------
# GLUE


def test_every_hub_task_has_its_schema_here():
    assert sorted(HUB_TASKS) == sorted(CLASS_NAMES)


@pytest.mark.parametrize("task", HUB_TASKS)
def test_glue_columns_and_labels_follow_the_hub(glue_standin, task):
    spec = glue.get_task(task)
    hub = glue_hub(task)
    # The task's label names are the hub's class names, in the hub's order: prune_bert.py maps a
    # checkpoint's predictions through them (evaluate/tasks.py class_to_label).
    assert spec.label_names == tuple(CLASS_NAMES[task] or ())
    assert spec.is_regression == (CLASS_NAMES[task] is None)
    assert spec.text_keys == TEXT_COLUMNS[task]
    for split in ("train",) + spec.eval_splits:
        rows = hub[split].to_list()
        examples = glue.load_examples(task, split)
        assert [(ex.text_a, ex.text_b, ex.label) for ex in examples] == [
            (row[spec.text_keys[0]], row[spec.text_keys[1]] if len(spec.text_keys) > 1 else None, row["label"])
            for row in rows]
        assert all(type(ex.label) is (float if spec.is_regression else int) for ex in examples)
    # Only the labelled splits are ever asked for, each by its hub name.
    asked = [split for _, _, split, _ in glue_standin.calls]
    assert asked == ["train", *spec.eval_splits] and not any(s.startswith("test") for s in asked)


def test_an_unlabelled_split_is_refused(monkeypatch):
    """nyu-mll/glue's test splits hold -1 for every label; scored, they would count as errors."""
    hub = glue_hub("mnli")
    hub["validation_matched"] = hub["test_matched"]
    monkeypatch.setattr(datasets, "load_dataset", StandIn({("nyu-mll/glue", "mnli"): hub}))
    with pytest.raises(UserError, match=r"nyu-mll/glue \(mnli, validation_matched\) has examples without a label"):
        glue.load_examples("mnli", "validation_matched")


# The original GLUE TSV layouts with text labels (MNLI, QNLI, RTE): their words must give the
# hub's ids, or a model fine-tuned on one source would be scored in the wrong order on the other.
_MNLI_COLUMNS = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse"
                 "\tsentence2_parse\tsentence1\tsentence2")
TSV_LAYOUTS = {
    "mnli": ("MNLI", _MNLI_COLUMNS + "\tlabel1\tgold_label", lambda i, a, b, label: f"{i}\t1\t1n\tfiction\t( a )"
             f"\t( b )\t(ROOT a)\t(ROOT b)\t{a}\t{b}\t{label}\t{label}"),
    "qnli": ("QNLI", "index\tquestion\tsentence\tlabel", lambda i, a, b, label: f"{i}\t{a}\t{b}\t{label}"),
    "rte": ("RTE", "index\tsentence1\tsentence2\tlabel", lambda i, a, b, label: f"{i}\t{a}\t{b}\t{label}"),
}


@pytest.mark.parametrize("task", list(TSV_LAYOUTS))
def test_text_labels_of_the_tsv_files_give_the_hub_ids(glue_standin, tmp_path, task):
    spec = glue.get_task(task)
    folder, header, row = TSV_LAYOUTS[task]
    hub = glue_hub(task)
    label_feature = hub["train"].features["label"]
    files = {"train": "train.tsv", "validation": "dev.tsv", "validation_matched": "dev_matched.tsv",
             "validation_mismatched": "dev_mismatched.tsv"}
    (tmp_path / folder).mkdir()
    for split in ("train",) + spec.eval_splits:
        lines = [row(r["idx"], r[spec.text_keys[0]], r[spec.text_keys[1]], label_feature.int2str(r["label"]))
                 for r in hub[split].to_list()]
        (tmp_path / folder / files[split]).write_text("\n".join([header, *lines]) + "\n")
        assert glue.load_examples(task, split, str(tmp_path)) == glue.load_examples(task, split)


def test_mnli_from_the_hub_scores_like_an_independent_count(glue_standin):
    """End to end: prune_bert.py's task on hub data, a tiny 3-class model, both dev splits; the
    accuracies against the stand-in's labels counted here by hand. Then the same model with its
    classes named in another order (contradiction first), which the task must undo."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.minilm_dir())
    task = make_task("mnli", tokenizer, data_dir=None, batch_size=4)
    model = tiny.bert(num_labels=3)
    hub = glue_hub("mnli")

    def predictions(split):
        rows = hub[split].to_list()
        enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits.argmax(-1).tolist(), [r["label"] for r in rows]

    def accuracy(split, order):
        guesses, labels = predictions(split)
        return sum(order[g] == y for g, y in zip(guesses, labels)) / len(labels)

    same = task.evaluate(model, "cpu")
    assert same["accuracy"] == pytest.approx(accuracy("validation_matched", [0, 1, 2]))
    assert same["accuracy_mm"] == pytest.approx(accuracy("validation_mismatched", [0, 1, 2]))
    # class i of the model means CLASS_NAMES[order[i]] of the dataset
    model.config.id2label = {0: "contradiction", 1: "entailment", 2: "neutral"}
    permuted = task.evaluate(model, "cpu")
    assert permuted["accuracy"] == pytest.approx(accuracy("validation_matched", [2, 0, 1]))
    assert permuted["accuracy_mm"] == pytest.approx(accuracy("validation_mismatched", [2, 0, 1]))
    assert (same["accuracy"], same["accuracy_mm"]) != (permuted["accuracy"], permuted["accuracy_mm"])


# ---------------------------------------------------------------------------------------
# SQuAD

SQUAD_FEATURES = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                           "question": Value("string"),
                           "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")})})
CONTEXT = "Super Bowl 50 was won by the Denver Broncos, who beat the Carolina Panthers 24 to 10."


def squad_rows(version, split):
    """Questions on one context: one with the repeated answers of a dev question, one with two
    different answers, and (SQuAD 2.0) one without an answer."""
    start = CONTEXT.index("Denver Broncos")
    rows = [
        {"id": f"{split}-1", "title": "Super_Bowl_50", "context": CONTEXT, "question": "Who won Super Bowl 50?",
         "answers": {"text": ["Denver Broncos"] * 3, "answer_start": [start] * 3}},
        {"id": f"{split}-2", "title": "Super_Bowl_50", "context": CONTEXT, "question": "Who lost?",
         "answers": {"text": ["the Carolina Panthers", "Carolina Panthers"],
                     "answer_start": [CONTEXT.index("the Carolina"), CONTEXT.index("Carolina")]}},
    ]
    if version == "2.0":
        rows.append({"id": f"{split}-3", "title": "Super_Bowl_50", "context": CONTEXT,
                     "question": "Who won Super Bowl 51?", "answers": {"text": [], "answer_start": []}})
    return rows


@pytest.fixture
def squad_standin(monkeypatch):
    hub = {(squad.HUB_NAMES[version], None): DatasetDict({
        split: Dataset.from_list(squad_rows(version, split), features=SQUAD_FEATURES)
        for split in ("train", "validation")}) for version in squad.VERSIONS}
    standin = StandIn(hub)
    monkeypatch.setattr(datasets, "load_dataset", standin)
    return standin


def official_json(version, split):
    """The same questions in the official JSON layout (SQuAD 2.0: is_impossible, plausible_answers)."""
    qas = []
    for row in squad_rows(version, split):
        answers = [{"text": text, "answer_start": start}
                   for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        qa = {"id": row["id"], "question": row["question"], "answers": answers}
        if version == "2.0":
            qa["is_impossible"] = not answers
            if not answers:
                qa["plausible_answers"] = [{"text": "Denver Broncos", "answer_start": CONTEXT.index("Denver")}]
        qas.append(qa)
    return {"version": "v2.0" if version == "2.0" else "1.1",
            "data": [{"title": "Super_Bowl_50", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}


@pytest.mark.parametrize("version", squad.VERSIONS)
def test_squad_nested_answers_follow_the_hub(squad_standin, tmp_path, version):
    for split in squad.SPLITS:
        examples = squad.load_squad(version, split)
        assert examples == [{key: row[key] for key in ("id", "question", "context", "answers")}
                            for row in squad_rows(version, split)]
        with open(tmp_path / squad.JSON_FILES[version, split], "w") as f:
            json.dump(official_json(version, split), f)
        assert squad.load_squad(version, split, str(tmp_path)) == examples  # the official files agree
    assert [(path, split) for path, _, split, _ in squad_standin.calls] == [
        (squad.HUB_NAMES[version], "train"), (squad.HUB_NAMES[version], "validation")]
    if version == "2.0":
        assert examples[2]["answers"] == {"text": [], "answer_start": []}


def test_squad_training_positions_from_hub_answers(squad_standin):
    tokenizer = AutoTokenizer.from_pretrained(tiny.minilm_dir())
    examples = squad.load_squad("2.0", "train")
    features = squad.prepare_train_features(examples, tokenizer)
    spans = [tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1]) for f in features]
    assert spans == ["denver broncos", "the carolina panthers", "[CLS]"]  # the first answer; none: CLS


# ---------------------------------------------------------------------------------------
# Language-model corpora

WIKI_RAW = " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a game .\n \n = = Gameplay = = \n \n"


def wikitext_rows(raw):
    """The rows of Salesforce/wikitext from a .raw file, as its loading script made them."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


C4_DOCS = {"train": [f"train document {i} " + "word " * (40 + 10 * i) for i in range(6)],
           "validation": [f"validation document {i}." for i in range(1103)]}
C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_FEATURES = Features({"text": Value("string"), "timestamp": Value("string"), "url": Value("string")})


def c4_from_data_files(data_files):
    """allenai/c4 loaded from data_files: only the shards the repository has."""
    (split, shard), = data_files.items()
    if C4_SHARDS.get(split) != shard:
        raise FileNotFoundError(f"Unable to find '{shard}' in allenai/c4")
    docs = C4_DOCS[split]
    return DatasetDict({split: Dataset.from_dict({
        "text": docs, "timestamp": ["2019-04-25T12:57:54Z"] * len(docs),
        "url": [f"https://example.org/{i}" for i in range(len(docs))]}, features=C4_FEATURES)})


@pytest.fixture
def lm_standin(monkeypatch):
    wikitext = DatasetDict({split: Dataset.from_dict({"text": wikitext_rows(WIKI_RAW)},
                                                     features=Features({"text": Value("string")}))
                            for split in ("test", "train", "validation")})
    standin = StandIn({("Salesforce/wikitext", "wikitext-2-raw-v1"): wikitext,
                       ("allenai/c4", None): c4_from_data_files})
    monkeypatch.setattr(datasets, "load_dataset", standin)
    lm._hub_split.cache_clear()  # the loader remembers the hub's answers for the process
    yield standin
    lm._hub_split.cache_clear()


def write_c4_shard(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"url": f"https://example.org/{i}", "text": doc,
                                "timestamp": "2019-04-25T12:57:54Z"}) + "\n")


def test_lm_corpora_from_the_hub_equal_their_files(lm_standin, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny.gpt2_tokenizer_dir())
    (tmp_path / "wiki.train.raw").write_text(WIKI_RAW, encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(WIKI_RAW, encoding="utf-8")
    write_c4_shard(tmp_path / "c4-train.00000-of-01024.json.gz", C4_DOCS["train"])
    write_c4_shard(tmp_path / "c4-validation.00000-of-00008.json.gz", C4_DOCS["validation"])
    local = str(tmp_path)

    assert lm.eval_text("wikitext2") == lm.eval_text("wikitext2", local) == "\n\n".join(wikitext_rows(WIKI_RAW))
    assert "\n\n\n\n = = Gameplay" in lm.eval_text("wikitext2")  # the blank rows joined as GPTQ does
    assert lm.eval_text("c4-new") == lm.eval_text("c4-new", local) == " ".join(C4_DOCS["validation"][:1100])
    assert list(lm.train_text("c4-new")) == C4_DOCS["train"]
    for task in ("wikitext2", "c4-new"):
        hub = lm.calibration_windows(task, tokenizer, 3, 16, seed=5)
        assert torch.equal(hub, lm.calibration_windows(task, tokenizer, 3, 16, seed=5, data_dir=local))
    # Without files, a standard run reports every set the hub has (PTB has no hub loader).
    assert lm.available_eval_sets("wikitext2") == ["wikitext2", "c4-new"]
    with pytest.raises(UserError, match="ptb.train.txt"):
        lm.train_text("ptb-new")
    asked = {(path, name, split, json.dumps(files)) for path, name, split, files in lm_standin.calls}
    assert asked == {("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "null"),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "null"),
                     ("allenai/c4", None, "validation", json.dumps({"validation": C4_SHARDS["validation"]})),
                     ("allenai/c4", None, "train", json.dumps({"train": C4_SHARDS["train"]}))}
