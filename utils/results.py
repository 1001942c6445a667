"""Result files: a human-readable .txt block and one JSON object per run in the .jsonl beside it.

Each file is rewritten whole through a temporary file and os.replace, so an interrupted run
never leaves a half-written line or block behind; and runs that finish at the same moment (a
seed sweep in parallel) take turns under a lock on the folder, so none loses another's record.
"""
import contextlib
import datetime
import fcntl
import functools
import importlib.metadata
import json
import os
import platform
import subprocess

from utils.atomic import atomic_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def _folder_lock(folder):
    # The lock is on the folder, not on the files: os.replace gives a file a new inode, which a
    # waiting process's lock on the old one would not cover.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _append_atomically(path, text):
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(old + text)


def append_result(stem, record, block):
    """Append `record` as one JSON line to <stem>.jsonl and `block` to <stem>.txt."""
    folder = os.path.dirname(os.path.abspath(stem))
    os.makedirs(folder, exist_ok=True)
    with _folder_lock(folder):
        _append_atomically(stem + ".jsonl", json.dumps(record, sort_keys=False) + "\n")
        _append_atomically(stem + ".txt", block.rstrip("\n") + "\n\n")


def now():
    """The time a record is written, to the second."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def provenance(command):
    """How a record was made: the command line, the code (git commit, and whether the tree had
    uncommitted changes) and the versions of the libraries that change results."""
    commit, dirty = git_state()
    return {"argv": list(command), "git_commit": commit, "git_dirty": dirty, "versions": _versions()}


@functools.lru_cache(maxsize=1)
def git_state():
    """(commit, whether tracked files have uncommitted changes), or (None, None) outside git."""

    def git(*args):
        return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:  # not a git checkout (an unpacked archive)
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None, None


@functools.lru_cache(maxsize=1)
def _versions():
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "numpy", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
