"""The dense-score cache (utils/cache.py): entries found by their key, written whole."""
import json
import os

from utils.cache import DenseCache, fingerprint


def test_a_value_comes_back_for_its_key_only(tmp_path):
    cache = DenseCache(str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"accuracy": 0.75}

    key = {"checkpoint": [["model.safetensors", 10, 1]], "task": "sst2"}
    assert cache.get_or_compute(key, compute) == ({"accuracy": 0.75}, False)
    assert cache.get_or_compute(key, compute) == ({"accuracy": 0.75}, True)
    assert len(calls) == 1
    other = dict(key, checkpoint=[["model.safetensors", 10, 2]])  # the weights rewritten
    assert cache.get_or_compute(other, compute) == ({"accuracy": 0.75}, False)
    assert len(calls) == 2
    # nothing but the entries is left in the folder (written through a temporary file)
    assert sorted(p.name for p in (tmp_path / ".dense_cache").iterdir()) == sorted(
        [os.path.basename(cache.path(key)), os.path.basename(cache.path(other))])


def test_damaged_or_foreign_entries_count_as_absent(tmp_path):
    cache = DenseCache(str(tmp_path))
    key = {"task": "sst2"}
    cache.store(key, 1.5)
    path = tmp_path / ".dense_cache" / os.path.basename(cache.path(key))
    entry = json.loads(path.read_text())
    entry["key"]["task"] = "mrpc"  # an entry that is not this key's
    path.write_text(json.dumps(entry))
    assert cache.lookup(key) is None
    path.write_text('{"key": ')  # a half-written file
    assert cache.lookup(key) is None


def test_disabled_cache_computes_and_rewrites(tmp_path):
    key = {"task": "sst2"}
    DenseCache(str(tmp_path)).store(key, 1.0)
    assert DenseCache(str(tmp_path), enabled=False).get_or_compute(key, lambda: 2.0) == (2.0, False)
    assert DenseCache(str(tmp_path)).lookup(key) == 2.0


def test_fingerprint_is_of_the_content():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint(b"\x00\x01") != fingerprint(b"\x00\x02")
