"""Nothing half-written (utils/atomic.py): a checkpoint save (save_pruned, LayerStore.save,
save_quantized) that fails at any point leaves the previous checkpoint intact, or none, and no
temporary folder; result records, dense-cache entries and other files are whole or absent."""
import json
import os
import shutil
import stat

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import tiny
from prerequisites import streaming
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import MODELING_FILE, load_model, save_pruned
from prerequisites.streaming import load_streamed
from quantize import storage
from quantize.sequential import quantize_model
from quantize.storage import QUANTIZED, save_quantized
from test_adapters import shrink
from utils.atomic import atomic_file, atomic_folder
from utils.cache import DenseCache
from utils.results import append_result, read_jsonl

BATCHES = tiny.random_batches(n_batches=1, batch=2, length=10, vocab=1000, pad=False)


class Injected(Exception):
    """The failure a test injects (not an OSError, which the code under test may handle)."""


def inject(monkeypatch, owner, name, after=False, when=lambda *args: True):
    """Make owner.<name> raise Injected at its first call that `when(*args)` accepts, before it
    does its work or (after) once it has done it. Returns the list of the failed calls, so that
    a test can check that the point was reached."""
    real = getattr(owner, name)
    failed = []

    def failing(*args, **kwargs):
        if failed or not when(*args):
            return real(*args, **kwargs)
        failed.append(args)
        if after:
            real(*args, **kwargs)
        raise Injected(name)

    monkeypatch.setattr(owner, name, failing)
    return failed


def ends(suffix):
    return lambda *args: str(args[1]).endswith(suffix)


# where a save can fail: (owner, name, after, when) with `target` the checkpoint's real path
POINTS = {
    "config": lambda target, tokenizer: (transformers.PreTrainedConfig, "save_pretrained", False, None),
    "modeling file": lambda target, tokenizer: (shutil, "copyfile", False, ends(MODELING_FILE)),
    "tokenizer, once written": lambda target, tokenizer: (tokenizer, "save_pretrained", True, None),
    "renaming the old one aside": lambda target, tokenizer: (os, "rename", False, lambda src, dst: src == target),
    "renaming the new one into place": lambda target, tokenizer: (os, "rename", False, lambda src, dst: dst == target),
}
WEIGHTS = {  # each saver writes its weights its own way
    "pruned": {"weights": lambda target, tokenizer: (transformers.modeling_utils, "safe_save_file", False, None),
               "weights, once written": lambda target, tokenizer: (transformers.modeling_utils, "safe_save_file",
                                                                   True, None)},
    "streamed": {
        "a changed layer's file": lambda target, tokenizer: (os, "link", False, None),
        "an unchanged layer's file": lambda target, tokenizer: (streaming, "save_file", False,
                                                                ends("model-00002-of-00004.safetensors.tmp")),
        "the last shard, once written": lambda target, tokenizer: (streaming, "save_file", True,
                                                                   ends("model-00004-of-00004.safetensors"))},
    "quantized": {"weights": lambda target, tokenizer: (storage, "save_file", False, None),
                  "weights, once written": lambda target, tokenizer: (storage, "save_file", True, None)},
}
NO_MODELING_FILE = {"quantized"}  # a packed checkpoint has none


def points_of(saver, previous):
    names = [*POINTS, *WEIGHTS[saver]]
    return [(saver, name) for name in names
            if not (saver in NO_MODELING_FILE and name == "modeling file")
            and not (name == "renaming the old one aside" and not previous)]


def inject_point(monkeypatch, saver, point, target, tokenizer):
    owner, name, after, when = {**POINTS, **WEIGHTS[saver]}[point](os.path.realpath(target), tokenizer)
    return inject(monkeypatch, owner, name, after, when or (lambda *args: True))


def scaled_layer(layer, factor=0.5):
    """A change to one layer's weights (what pruning or quantizing does, in short)."""
    weight = layer.mlp.down_proj.weight
    layer.mlp.down_proj.weight = torch.nn.Parameter(weight.detach() * factor)


def tokenizer():
    return AutoTokenizer.from_pretrained(tiny.gpt2_tokenizer_dir())


class Pruned:
    """save_pruned of a pruned Llama."""

    def __init__(self, tmp_path, seed=0):
        self.model = shrink(tiny.llama(vocab=1000, seed=seed), [2, 1, 2], [40, 9, 17])
        self.expected = tiny.logits(self.model, BATCHES)

    def save(self, path, tokenizer=None):
        save_pruned(self.model, path, tokenizer)


class Streamed:
    """LayerStore.save (--low_memory) of a Llama whose first layer changed, its store's folder
    beside the target as pipelines/decoder.py puts it."""

    def __init__(self, tmp_path, seed=0):
        dense = str(tmp_path / "dense")
        tiny.llama(vocab=1000, seed=seed).save_pretrained(dense)
        in_memory = load_model(dense)
        scaled_layer(adapter_for(in_memory).layers(in_memory)[0])
        self.expected = tiny.logits(in_memory, BATCHES)
        self.model, self.store = load_streamed(dense, str(tmp_path / "out" / ".stat-layers-work"))
        self.store.fetch(0)
        scaled_layer(adapter_for(self.model).layers(self.model)[0])
        self.store.release(0, changed=True)

    def save(self, path, tokenizer=None):
        self.store.save(path, tokenizer)


class Quantized:
    """save_quantized of a pruned OPT quantized to 4 bits."""

    def __init__(self, tmp_path, seed=0):
        self.model = shrink(tiny.opt(vocab=1000, seed=seed), [4, 2, 1], [50, 9, 17])
        self.quantized = quantize_model(self.model, adapter_for(self.model), BATCHES, "cpu", 4, groupsize=16,
                                        nearest=True, progress=False)
        self.expected = tiny.logits(self.model, BATCHES)

    def save(self, path, tokenizer=None):
        save_quantized(self.model, self.quantized, path, tokenizer, {"wbits": 4})


SAVERS = {"pruned": Pruned, "streamed": Streamed, "quantized": Quantized}


def loaded_logits(path):
    return tiny.logits(load_model(path, formats=[QUANTIZED]), BATCHES)


def contents(folder):
    """{file name: bytes} of a folder (checkpoints are flat)."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else None


def assert_store_still_works(case, target):
    """A failed LayerStore.save leaves the store as it was: every layer's file is where it
    says, and the model still saves, whole."""
    assert all(os.path.isfile(path) for path in case.store.written.values())
    case.save(target)
    assert torch.equal(loaded_logits(target), case.expected)
    assert listing(case.store.folder) == []  # the changed layer's file moved into the checkpoint


@pytest.mark.parametrize("saver,point", [p for saver in SAVERS for p in points_of(saver, previous=False)])
def test_a_failed_save_leaves_no_checkpoint(saver, point, tmp_path, monkeypatch):
    case = SAVERS[saver](tmp_path)
    parent = tmp_path / "out"
    parent.mkdir(exist_ok=True)
    target = str(parent / "model")
    before = listing(parent), listing(parent / ".stat-layers-work")
    tok = tokenizer()
    failed = inject_point(monkeypatch, saver, point, target, tok)
    with pytest.raises(Injected):
        case.save(target, tok)
    monkeypatch.undo()
    assert len(failed) == 1  # the point was reached
    assert not os.path.lexists(target)
    assert (listing(parent), listing(parent / ".stat-layers-work")) == before  # no temporary folder left
    if saver == "streamed":
        assert_store_still_works(case, target)


@pytest.mark.parametrize("saver,point", [p for saver in SAVERS for p in points_of(saver, previous=True)])
def test_a_failed_save_leaves_the_previous_checkpoint(saver, point, tmp_path, monkeypatch):
    parent = tmp_path / "out"
    target = str(parent / "model")
    SAVERS[saver](tmp_path / "previous", seed=1).save(target, tokenizer())
    old_files, old_logits = contents(target), loaded_logits(target)
    case = SAVERS[saver](tmp_path)
    assert not torch.equal(case.expected, old_logits)  # else the test could not tell them apart
    before = listing(parent), listing(parent / ".stat-layers-work")
    tok = tokenizer()
    failed = inject_point(monkeypatch, saver, point, target, tok)
    with pytest.raises(Injected):
        case.save(target, tok)
    monkeypatch.undo()
    assert len(failed) == 1
    assert contents(target) == old_files
    assert torch.equal(loaded_logits(target), old_logits)
    assert (listing(parent), listing(parent / ".stat-layers-work")) == before
    if saver == "streamed":
        assert_store_still_works(case, target)


@pytest.mark.parametrize("saver", SAVERS)
def test_a_save_replaces_the_previous_checkpoint(saver, tmp_path):
    parent = tmp_path / "out"
    target = str(parent / "model")
    SAVERS[saver](tmp_path / "previous", seed=1).save(target, tokenizer())
    (parent / "model" / "stale.txt").write_text("from the previous checkpoint")
    case = SAVERS[saver](tmp_path)
    case.save(target, tokenizer())
    assert torch.equal(loaded_logits(target), case.expected)
    assert "stale.txt" not in os.listdir(target) and "tokenizer_config.json" in os.listdir(target)
    assert [name for name in os.listdir(parent) if name.startswith(".model.")] == []
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~current_umask()  # not mkdtemp's 0o700


def test_a_streamed_model_saved_twice_keeps_both_checkpoints(tmp_path):
    case = Streamed(tmp_path)
    first, second = str(tmp_path / "out" / "first"), str(tmp_path / "out" / "second")
    case.save(first)
    case.save(first)  # over itself: the layers' files are read from it while it is rewritten
    case.save(second)
    for path in (first, second):
        assert torch.equal(loaded_logits(path), case.expected)
    assert all(os.path.dirname(path) == second for path in case.store.written.values())


def test_a_streamed_save_across_file_systems_copies_the_layers(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    case = Streamed(tmp_path)
    monkeypatch.setattr(os, "link", no_links)
    target = str(tmp_path / "out" / "model")
    case.save(target)
    assert torch.equal(loaded_logits(target), case.expected)
    assert listing(case.store.folder) == []


# --- the helpers themselves


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_writes_whole_with_normal_permissions(tmp_path):
    path = tmp_path / "table.tex"
    with atomic_file(path) as f:
        f.write("new")
        assert not path.exists()  # nothing at the target until the file is complete
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["table.tex"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~current_umask()
    with atomic_file(path, "wb") as f:
        f.write(b"bytes")
    assert path.read_bytes() == b"bytes"


@pytest.mark.parametrize("previous", [None, "old"])
@pytest.mark.parametrize("point", ["writing", "replacing"])
def test_a_failed_atomic_file_leaves_the_previous_file_or_none(previous, point, tmp_path, monkeypatch):
    path = tmp_path / "table.tex"
    if previous:
        path.write_text(previous)
    failed = inject(monkeypatch, os, "replace") if point == "replacing" else []
    with pytest.raises(Injected):
        with atomic_file(path) as f:
            f.write("half")
            if point == "writing":
                failed.append(f)
                raise Injected
    assert len(failed) == 1
    assert (path.read_text() if path.exists() else None) == previous
    assert os.listdir(tmp_path) == (["table.tex"] if previous else [])


def test_atomic_folder_creates_or_replaces(tmp_path):
    target = tmp_path / "parent" / "model"  # the parent is made too
    for content in ("first", "second"):
        with atomic_folder(target) as folder:
            assert os.path.dirname(folder) == os.path.realpath(tmp_path / "parent") and os.listdir(folder) == []
            (tmp_path / "parent" / folder / content).write_text(content)
            assert not (target / content).exists()  # nothing at the target until the block ends
        assert os.listdir(target) == [content]
    assert os.listdir(tmp_path / "parent") == ["model"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~current_umask()


@pytest.mark.parametrize("point", ["in the block", "renaming the old one aside", "renaming the new one into place"])
def test_a_failed_atomic_folder_leaves_the_previous_folder(point, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real = os.path.realpath(target)
    if point == "in the block":
        failed = []
    elif point == "renaming the old one aside":
        failed = inject(monkeypatch, os, "rename", when=lambda src, dst: src == real)
    else:
        failed = inject(monkeypatch, os, "rename", when=lambda src, dst: dst == real)
    with pytest.raises(Injected):
        with atomic_folder(target) as folder:
            (tmp_path / folder / "weights").write_text("new")
            if point == "in the block":
                failed.append(folder)
                raise Injected
    assert len(failed) == 1
    assert os.listdir(tmp_path) == ["model"] and contents(target) == {"weights": b"old"}


def test_atomic_folder_follows_a_link_to_the_folder(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "model").mkdir()
    (tmp_path / "model").symlink_to(tmp_path / "disk" / "model")
    with atomic_folder(tmp_path / "model") as folder:
        open(os.path.join(folder, "weights"), "w").close()
    assert os.path.islink(tmp_path / "model") and os.listdir(tmp_path / "disk" / "model") == ["weights"]
    assert sorted(os.listdir(tmp_path / "disk")) == ["model"]


# --- the other files a later run reads


@pytest.mark.parametrize("point", ["replace", "chmod"])
def test_a_failed_result_write_leaves_the_files_whole(point, tmp_path, monkeypatch):
    stem = str(tmp_path / "m")
    append_result(stem, {"a": 1}, "first")
    failed = inject(monkeypatch, os, point)
    with pytest.raises(Injected):
        append_result(stem, {"a": 2}, "second")
    monkeypatch.undo()
    assert len(failed) == 1
    assert read_jsonl(stem + ".jsonl") == [{"a": 1}] and open(stem + ".txt").read() == "first\n\n"
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "m.txt"]


def test_a_failed_cache_write_keeps_the_previous_entry(tmp_path):
    cache = DenseCache(str(tmp_path))
    key = {"checkpoint": "x", "set": "wikitext2"}
    cache.store(key, {"ppl": 10.0})
    with pytest.raises(TypeError):  # not JSON-serialisable: json.dump fails halfway through the file
        cache.store(key, {"ppl": object()})
    assert cache.lookup(key) == {"ppl": 10.0}
    assert len(os.listdir(cache.folder)) == 1
    entry = json.load(open(cache.path(key)))
    assert entry["value"] == {"ppl": 10.0}
