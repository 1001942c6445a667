"""Decoder data layer (dataset/lm.py): small files in the real formats, written here."""
import gzip
import json
import os
import random

import pytest
import torch
from transformers import AutoTokenizer

from dataset import lm
from utils.errors import UserError

GPT2_BPE = os.path.join(lm.REPO_ROOT, "data", "gpt2-bpe")
LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(GPT2_BPE)


def prose(n_sentences, seed=0):
    """Plain English-ish filler, different for each seed."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while his dog ran to our old red house by the sea".split()
    sentences = (" ".join(rng.choice(words) for _ in range(8)) + " ." for _ in range(n_sentences))
    return " ".join(sentences)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_lines(path, texts):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:00:00Z",
                                "url": f"https://example.org/{i}"}) + "\n")


# wiki.*.raw as in wikitext-2-raw-v1: blank lines are " \n", headings " = Title = \n".
WIKI_TEST = " \n = Robert Boulter = \n \n Robert Boulter is an English film actor .\n \n"


def write_wikitext(data_dir):
    write(data_dir / "wiki.train.raw", " \n = Train = \n \n" + "".join(
        f" {prose(3, seed)}\n \n" for seed in range(5)))
    write(data_dir / "wiki.test.raw", WIKI_TEST)


def write_ptb(data_dir):
    write(data_dir / "ptb.train.txt", "".join(f" {prose(1, seed)} \n" for seed in range(20)))
    write(data_dir / "ptb.test.txt", " no it was n't black monday \n but while the <unk> N \n")


def write_c4(data_dir, suffix=".json.gz"):
    write_json_lines(str(data_dir / ("c4-train.00000-of-01024" + suffix)),
                     ["short one.", prose(30, 1), "tiny", prose(30, 2)])
    write_json_lines(str(data_dir / ("c4-validation.00000-of-00008" + suffix)),
                     [f"doc{i}" for i in range(1105)])


# ---------------------------------------------------------------------------------------------
# Loaders


def test_wikitext_local_rows_follow_the_hub(tmp_path):
    write_wikitext(tmp_path)
    # The hub rows of these lines: newline kept, whitespace-only lines as "".
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film actor .\n", ""]
    assert lm.eval_text("wikitext2", str(tmp_path)) == "\n\n".join(rows)
    assert lm.train_text("wikitext2", str(tmp_path)).startswith(
        "\n\n".join(["", " = Train = \n", "", " "]))


def test_ptb_sentences_joined_with_spaces(tmp_path):
    write_ptb(tmp_path)
    expected = "no it was n't black monday but while the <unk> N"
    assert lm.eval_text("ptb-new", str(tmp_path)) == expected


@pytest.mark.parametrize("suffix", [".json.gz", ".json"])
def test_c4_first_1100_validation_documents(tmp_path, suffix):
    write_c4(tmp_path, suffix)
    assert lm.eval_text("c4-new", str(tmp_path)) == " ".join(f"doc{i}" for i in range(1100))
    assert len(lm.train_text("c4-new", str(tmp_path))) == 4


def test_text_files_read_as_they_are(tmp_path):
    write(tmp_path / "train.txt", "Line one.\n\nLine two.\n")
    write(tmp_path / "test.txt", "  Test text\nwith lines.\n")
    assert lm.train_text("text", str(tmp_path)) == "Line one.\n\nLine two.\n"
    assert lm.eval_text("text", str(tmp_path)) == "  Test text\nwith lines.\n"


def test_hub_rows_are_read_like_local_files(monkeypatch, tmp_path):
    import datasets

    def fake_hub(task, split):
        if task == "wikitext2":
            return datasets.Dataset.from_dict({"text": ["", " = A = \n", "", " b .\n"]})
        return datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(1200)]})

    monkeypatch.setattr(lm, "_hub_split", fake_hub)
    assert lm.eval_text("wikitext2") == "\n\n".join(["", " = A = \n", "", " b .\n"])
    assert lm.eval_text("c4-new") == " ".join(f"doc{i}" for i in range(1100))
    documents = lm.train_text("c4-new")
    assert len(documents) == 1200 and documents[7] == "doc7"
    # A file in --data_dir wins over the hub.
    write_wikitext(tmp_path)
    assert lm.eval_text("wikitext2", str(tmp_path)).startswith("\n\n = Robert Boulter")


# ---------------------------------------------------------------------------------------------
# Calibration windows


@pytest.fixture
def text_dir(tmp_path):
    write(tmp_path / "train.txt", prose(40, 0))
    write(tmp_path / "test.txt", prose(20, 1))
    return tmp_path


def is_slice(window, ids):
    n = window.numel()
    return any(torch.equal(ids[s:s + n], window) for s in range(ids.numel() - n + 1))


def test_calibration_windows_are_seeded_slices(tokenizer, text_dir):
    windows = lm.calibration_windows("text", tokenizer, 8, 16, seed=0, data_dir=str(text_dir))
    assert windows.shape == (8, 16) and windows.dtype == torch.long
    again = lm.calibration_windows("text", tokenizer, 8, 16, seed=0, data_dir=str(text_dir))
    assert torch.equal(windows, again)
    other = lm.calibration_windows("text", tokenizer, 8, 16, seed=1, data_dir=str(text_dir))
    assert not torch.equal(windows, other)
    ids = lm.tokenize(tokenizer, lm.train_text("text", str(text_dir)))[0]
    assert all(is_slice(window, ids) for window in windows)


def test_calibration_leaves_global_random_state_alone(tokenizer, text_dir):
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    lm.calibration_windows("text", tokenizer, 4, 16, seed=0, data_dir=str(text_dir))
    assert (random.random(), torch.rand(1)) == expected


def test_calibration_needs_seqlen_plus_one_tokens(tokenizer, tmp_path):
    write(tmp_path / "test.txt", "unused")
    write(tmp_path / "train.txt", "one two three four five")  # 5 tokens
    windows = lm.calibration_windows("text", tokenizer, 3, 4, seed=0, data_dir=str(tmp_path))
    assert windows.tolist() == [lm.tokenize(tokenizer, "one two three four")[0].tolist()] * 3
    with pytest.raises(UserError, match="5 tokens"):
        lm.calibration_windows("text", tokenizer, 3, 5, seed=0, data_dir=str(tmp_path))


def test_c4_windows_come_from_long_documents(tokenizer, tmp_path):
    write_c4(tmp_path)
    windows = lm.calibration_windows("c4-new", tokenizer, 6, 32, seed=0, data_dir=str(tmp_path))
    assert windows.shape == (6, 32)
    long_docs = [lm.tokenize(tokenizer, prose(30, seed))[0] for seed in (1, 2)]
    assert all(any(is_slice(window, ids) for ids in long_docs) for window in windows)
    again = lm.calibration_windows("c4-new", tokenizer, 6, 32, seed=0, data_dir=str(tmp_path))
    assert torch.equal(windows, again)
    with pytest.raises(UserError, match="no train document"):
        lm.calibration_windows("c4-new", tokenizer, 1, 10_000, seed=0, data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Evaluation tokens and windows


def test_eval_windows_drop_the_tail():
    tokens = torch.arange(103).unsqueeze(0)
    windows = lm.eval_windows(tokens, 10)
    assert torch.equal(windows, torch.arange(100).reshape(10, 10))
    assert lm.eval_windows(tokens, 10, max_windows=3).shape == (3, 10)
    assert lm.eval_windows(torch.arange(103), 103).shape == (1, 103)
    with pytest.raises(UserError, match="fewer than one window"):
        lm.eval_windows(tokens, 104)


def test_c4_eval_is_capped_at_256_windows():
    tokens = torch.arange(300 * 4 + 3).unsqueeze(0)
    assert lm.MAX_EVAL_WINDOWS["c4-new"] == 256
    windows = lm.eval_windows(tokens, 4, lm.MAX_EVAL_WINDOWS.get("c4-new"))
    assert torch.equal(windows, torch.arange(256 * 4).reshape(256, 4))
    assert lm.eval_windows(tokens, 4, lm.MAX_EVAL_WINDOWS.get("wikitext2")).shape == (300, 4)


def test_eval_sets_of_a_run(tokenizer, tmp_path):
    write_wikitext(tmp_path)
    write_ptb(tmp_path)
    write(tmp_path / "test.txt", "unused")
    data_dir = str(tmp_path)
    # The hub is offline in tests: only the local files count.
    assert lm.available_eval_sets("wikitext2", data_dir) == ["wikitext2", "ptb-new"]
    assert lm.available_eval_sets("ptb-new", data_dir) == ["ptb-new", "wikitext2"]
    assert lm.available_eval_sets("text", data_dir) == ["text"]
    with pytest.raises(UserError, match="c4-validation"):
        lm.available_eval_sets("c4-new", data_dir)
    write_c4(tmp_path)
    assert lm.available_eval_sets("c4-new", data_dir) == ["c4-new", "wikitext2", "ptb-new"]

    streams = lm.eval_tokens("wikitext2", tokenizer, data_dir)
    assert list(streams) == ["wikitext2", "ptb-new", "c4-new"]
    expected = lm.tokenize(tokenizer, "\n\n".join(
        ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film actor .\n", ""]))
    assert torch.equal(streams["wikitext2"], expected)
    assert all(t.dim() == 2 and t.size(0) == 1 and t.dtype == torch.long for t in streams.values())


def test_no_too_long_warning_for_a_whole_corpus(text_dir):
    tokenizer = AutoTokenizer.from_pretrained(GPT2_BPE)
    tokenizer.model_max_length = 8
    lm.eval_tokens("text", tokenizer, str(text_dir))
    lm.calibration_windows("text", tokenizer, 2, 4, seed=0, data_dir=str(text_dir))
    assert LONG_WARNING not in tokenizer.deprecation_warnings
    tokenizer(prose(5))  # a plain call does warn: the check above means something
    assert LONG_WARNING in tokenizer.deprecation_warnings


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_task():
    for call in (lambda: lm.eval_text("wikitext103"), lambda: lm.available_eval_sets("ptb"),
                 lambda: lm.calibration_windows("c4", None, 1, 8, 0)):
        with pytest.raises(UserError, match="unknown language-model task"):
            call()


def test_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match=r"wiki\.test\.raw.*Salesforce/wikitext.*--data_dir"):
        lm.eval_text("wikitext2", str(tmp_path))
    with pytest.raises(UserError, match=r"ptb\.train\.txt.*--data_dir"):
        lm.train_text("ptb-new", str(tmp_path))
    with pytest.raises(UserError, match=r"c4-train\.00000-of-01024\.json\.gz"):
        lm.train_text("c4-new")
    with pytest.raises(UserError, match=r"no --data_dir given.*train\.txt and test\.txt"):
        lm.eval_text("text")
    with pytest.raises(UserError, match="data dir not found"):
        lm.eval_text("text", str(tmp_path / "nowhere"))


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "c4-validation.00000-of-00008.json"
    write(path, '{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(UserError, match=r"c4-validation.*json, line 2: not valid JSON"):
        lm.eval_text("c4-new", str(tmp_path))
    write(path, '{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"line 3: expected an object with a \"text\" string"):
        lm.eval_text("c4-new", str(tmp_path))
    write(tmp_path / "c4-validation.00000-of-00008.json.gz", "not gzip")
    with pytest.raises(UserError, match="cannot read"):
        lm.eval_text("c4-new", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The shipped demo corpus and tokenizer


def test_shipped_gpt2_tokenizer(tokenizer):
    assert tokenizer.is_fast
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_austen_task_uses_the_shipped_files(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from the repo root, not the current directory
    assert lm.available_eval_sets("austen") == ["austen"]
    streams = lm.eval_tokens("austen", tokenizer)
    assert list(streams) == ["prideprejudice"]
    assert 150_000 < streams["prideprejudice"].size(1) < 200_000
    assert tokenizer.decode(streams["prideprejudice"][0, :10]).startswith("PRIDE AND PREJUDICE")

    windows = lm.calibration_windows("austen", tokenizer, 4, 64, seed=0)
    assert windows.shape == (4, 64)
    train = lm.train_text("austen")
    assert train.startswith("EMMA") and "MANSFIELD PARK" in train
    # Byte-level BPE decodes a slice of the stream back to a substring of the (ASCII) text.
    assert all(tokenizer.decode(window) in train for window in windows)
