"""Checkpoints named by hub id (prerequisites/hub.py), offline: a Hugging Face cache written here.

The cache has huggingface_hub's layout: <cache>/models--<org>--<name>/refs/main holds a commit
hash, and snapshots/<hash>/ the files (plain files, as huggingface_hub writes them where
symlinks are not available; elsewhere they are links into blobs/).
"""
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import prune_opt
import tiny
from prerequisites.checkpoint import load_config, load_model
from prerequisites.hub import cached_folder, files_to_fetch, is_hub_id, resolve_checkpoint
from test_prune_bert_cli import write_sst2
from utils.cli import run_main
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFLINE = "neither a local folder nor in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1)"


def cache_model(cache, repo_id, model, tokenizer):
    """Put a model into a Hugging Face cache as a download would; returns its snapshot folder."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    bert_tokenizer = AutoTokenizer.from_pretrained(tiny.minilm_dir())
    snapshots = {
        "tiny-org/tiny-bert-sst2": cache_model(cache, "tiny-org/tiny-bert-sst2", tiny.bert(), bert_tokenizer),
        "tiny-org/tiny-opt": cache_model(cache, "tiny-org/tiny-opt", tiny.CHECKPOINTS["tiny-opt"](),
                                         AutoTokenizer.from_pretrained(tiny.gpt2_tokenizer_dir())),
    }
    return cache, snapshots


def test_a_cached_hub_id_resolves_to_its_snapshot_offline(hub_cache):
    cache, snapshots = hub_cache
    folder = resolve_checkpoint("tiny-org/tiny-bert-sst2", cache_dir=cache)
    assert folder == snapshots["tiny-org/tiny-bert-sst2"] == cached_folder("tiny-org/tiny-bert-sst2", cache)
    assert load_model(folder).config.architectures == ["BertForSequenceClassification"]


def test_offline_and_not_cached_says_so(hub_cache):
    cache, _ = hub_cache
    for name in ("tiny-org/not-downloaded", "bert-base-uncased"):  # legacy ids have no organisation
        with pytest.raises(UserError) as info:
            resolve_checkpoint(name, cache_dir=cache)
        assert str(info.value) == f"checkpoint {name} is {OFFLINE}"
    with pytest.raises(UserError) as info:
        resolve_checkpoint("tiny-org/x", "base model", cache_dir=cache)
    assert str(info.value) == f"base model tiny-org/x is {OFFLINE}"


def test_a_local_folder_wins_over_the_hub_id_of_the_same_name(hub_cache, tmp_path, monkeypatch):
    cache, snapshots = hub_cache
    monkeypatch.chdir(tmp_path)
    local = os.path.join("tiny-org", "tiny-bert-sst2")
    tiny.bert(num_labels=3).save_pretrained(local)  # not the cached model: 3 labels
    assert resolve_checkpoint("tiny-org/tiny-bert-sst2", cache_dir=cache) == local
    assert load_config(local).num_labels == 3
    assert load_config(snapshots["tiny-org/tiny-bert-sst2"]).num_labels == 2


def test_paths_that_are_no_hub_id_are_not_found():
    for path in ("models/nothing-here/sst2", "/no/such/folder", "./relative", "a--b/c"):
        assert not is_hub_id(path)
        with pytest.raises(UserError) as info:
            resolve_checkpoint(path)
        assert str(info.value) == f"checkpoint not found: {path}"
    assert is_hub_id("facebook/opt-125m") and is_hub_id("bert-base-uncased")


def test_files_to_fetch_take_one_copy_of_the_weights():
    # Listings of hub repositories (abridged): the files a PyTorch checkpoint needs, safetensors
    # preferred; never the TensorFlow, Flax, Rust, ONNX or Core ML copies, nor sub-folders.
    bert = [".gitattributes", "LICENSE", "README.md", "config.json", "coreml/fill-mask/float32_model.mlpackage/"
            "Manifest.json", "flax_model.msgpack", "model.onnx", "model.safetensors", "pytorch_model.bin",
            "rust_model.ot", "tf_model.h5", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert files_to_fetch(bert) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                    "vocab.txt"]
    opt = [".gitattributes", "LICENSE.md", "README.md", "config.json", "flax_model.msgpack", "generation_config.json",
           "merges.txt", "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer_config.json",
           "vocab.json"]
    assert files_to_fetch(opt) == ["config.json", "generation_config.json", "merges.txt", "pytorch_model.bin",
                                   "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    sharded = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model",
               "training_args.bin"]
    assert files_to_fetch(sharded) == ["config.json", "model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                       "tokenizer.model"]
    assert files_to_fetch(["config.json", "tf_model.h5", "vocab.txt"]) == []


def run_script(args, cache, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache)
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_prune_bert_reads_a_hub_id_from_the_cache(hub_cache, tmp_path):
    cache, _ = hub_cache
    write_sst2(str(tmp_path / "SST-2"), n_train=24, n_dev=12)
    proc = run_script(["prune_bert.py", "--model_name", "tiny-bert", "--task_name", "sst2", "--mu", "0.5",
                       "--model_dir", "tiny-org/tiny-bert-sst2", "--data_dir", "SST-2", "--sample_batch_size", "8",
                       "--batch_size", "8", "--device", "cpu"], cache, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "MACs kept" in open(tmp_path / "output" / "tiny-bert" / "sst2.txt").read()


def test_prune_opt_reads_a_hub_id_from_the_cache(hub_cache, tmp_path):
    cache, _ = hub_cache
    (tmp_path / "train.txt").write_text("The cat sat on the mat. " * 200)
    (tmp_path / "test.txt").write_text("A dog ran to the sea. " * 80)
    proc = run_script(["prune_opt.py", "--model_name", "tiny-org/tiny-opt", "--task", "text", "--data_dir", ".",
                       "--mu", "0.7", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"], cache, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity text: dense" in open(tmp_path / "output" / "opt" / "tiny-org" / "tiny-opt.txt").read()


@pytest.mark.parametrize("flag", ["--model_name", "--model_dir"])
def test_decoder_hub_id_offline_and_not_cached_is_one_line(tmp_path, capsys, flag):
    for name in ("train.txt", "test.txt"):  # the corpus is checked first: give it one
        (tmp_path / name).write_text("A dog ran to the sea. " * 80)
    argv = ["--model_name", "m", "--mu", "0.5", "--task", "text", "--data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), flag, "nobody-here/no-such-model"]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: prune_opt.main(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err == f"error: checkpoint nobody-here/no-such-model is {OFFLINE}"
