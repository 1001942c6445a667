"""Result files: parallel runs keep every record, files are readable by others, a failed
write leaves the files as they were."""
import multiprocessing
import os
import stat

import pytest

from utils.results import append_result, read_jsonl


def _writer(stem, worker, count):
    for i in range(count):
        append_result(stem, {"worker": worker, "i": i}, f"block {worker} {i}")


def test_parallel_runs_keep_every_record(tmp_path):
    stem = str(tmp_path / "out" / "model")
    processes = [multiprocessing.get_context("fork").Process(target=_writer, args=(stem, w, 40)) for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    assert all(p.exitcode == 0 for p in processes)
    records = read_jsonl(stem + ".jsonl")
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(40)]
    with open(stem + ".txt") as f:
        assert f.read().count("block ") == 160


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        append_result(str(tmp_path / "m"), {"a": 1}, "block")
    finally:
        os.umask(old)
    for suffix in (".jsonl", ".txt"):
        assert stat.S_IMODE(os.stat(tmp_path / f"m{suffix}").st_mode) == 0o644


def test_a_failed_write_changes_nothing(tmp_path):
    stem = str(tmp_path / "m")
    append_result(stem, {"a": 1}, "first")
    with pytest.raises(TypeError):
        append_result(stem, {"a": object()}, "second")  # not JSON-serialisable
    assert read_jsonl(stem + ".jsonl") == [{"a": 1}]
    assert open(stem + ".txt").read() == "first\n\n"
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "m.txt"]


def test_provenance_names_the_command_the_code_and_the_versions():
    import subprocess

    from utils.results import REPO_ROOT, provenance

    record = provenance(["prune_bert.py", "--mu", "0.5"])
    assert record["argv"] == ["prune_bert.py", "--mu", "0.5"]
    head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    import torch
    import transformers

    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or \
        record["versions"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] == transformers.__version__
