"""Dense scores, computed once: a dense checkpoint's metrics (encoders) or perplexity per
evaluation set (decoders), kept under <output_dir>/.dense_cache/ so that a sweep over seeds
and budgets scores the dense model once.

The pipelines make the key: everything the score depends on, namely the checkpoint's identity
(the names, sizes and modification times of its weight files and config), a hash of the
evaluation inputs themselves (tokens, labels, windows: whatever the source of the data), and the
settings of the forward passes (batch size, dtype, kind of device). The code is added here: the
git commit, and whether tracked files had uncommitted changes (after editing evaluation code
without committing, pass --no_cache). Each entry is one JSON file, written through a temporary
file and os.replace, so a crash leaves no half-written entry; an entry that cannot be read
counts as absent.
"""
import hashlib
import json
import os

from utils.atomic import atomic_file
from utils.results import git_state

CACHE_DIR = ".dense_cache"


def fingerprint(value):
    """sha256 of a JSON-able value (dict keys sorted) or of bytes."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


class DenseCache:
    """get_or_compute(key, compute) -> (value, whether it came from the cache)."""

    def __init__(self, output_dir, enabled=True):
        self.folder = os.path.join(output_dir, CACHE_DIR)
        self.enabled = enabled

    def path(self, key):
        return os.path.join(self.folder, fingerprint(self._full_key(key)) + ".json")

    @staticmethod
    def _full_key(key):
        commit, dirty = git_state()
        return {**key, "git_commit": commit, "git_dirty": dirty}

    def lookup(self, key):
        try:
            with open(self.path(key), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(self._full_key(key))):
            return None  # another key with the same hash, or a damaged file
        return entry.get("value")

    def store(self, key, value):
        os.makedirs(self.folder, exist_ok=True)
        with atomic_file(self.path(key), "w", encoding="utf-8") as f:
            json.dump({"key": self._full_key(key), "value": value}, f)

    def get_or_compute(self, key, compute):
        if self.enabled:
            value = self.lookup(key)
            if value is not None:
                return value, True
        value = compute()
        self.store(key, value)
        return value, False
