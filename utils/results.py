"""Result files: a human-readable .txt block and one JSON object per run in the .jsonl beside it.

Both are rewritten whole through a temporary file and os.replace, so an interrupted run never
leaves a half-written line or block behind.
"""
import json
import os
import tempfile


def _append_atomically(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(old + text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_result(stem, record, block):
    """Append `block` to <stem>.txt and `record` as one JSON line to <stem>.jsonl."""
    _append_atomically(stem + ".jsonl", json.dumps(record, sort_keys=False) + "\n")
    _append_atomically(stem + ".txt", block.rstrip("\n") + "\n\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
