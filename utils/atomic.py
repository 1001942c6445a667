"""Files and folders written whole: into a temporary name beside the target, renamed into place
once complete. A kill, an out-of-memory or a full disk while writing leaves the previous version
(or nothing), never a half-written file or a folder that looks like a checkpoint and is not.

The temporary names start with a dot and lie in the target's own folder, because a rename is
atomic, and free, only within one file system. A process killed outright (SIGKILL) leaves its
`.<name>.tmp-*` behind, beside an intact target: it can be deleted.
"""
import contextlib
import os
import shutil
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file name beside `path`, for writers that open their file themselves: the file
    written there replaces `path` when the block ends, and is removed if the block raises."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.tmp-")
    os.close(fd)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # what open() would give: mkstemp makes it owner-only
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@contextlib.contextmanager
def atomic_file(path, mode="w", **open_args):
    """A file object (open(..., mode, **open_args), mode "w" or "wb") on a temporary file beside
    `path`: it replaces `path` when the block ends, and is removed if the block raises."""
    with atomic_path(path) as temporary, open(temporary, mode, **open_args) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path):
    """A new empty folder beside `path` to write into: it takes the place of `path` (replacing a
    folder there) when the block ends; if the block raises, it is removed and `path` is untouched.
    A symbolic link at `path` is followed: the folder it points to is the one replaced."""
    path = os.path.realpath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~_umask())  # what makedirs would give: mkdtemp makes it owner-only
        _rename_over(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _rename_over(new, path):
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    # os.rename cannot replace a folder that has files: the old one steps aside (renamed onto an
    # empty folder, which rename allows), and is deleted only once the new one is in place.
    parent, name = os.path.split(path)
    aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
    try:
        os.rename(path, aside)
    except BaseException:
        os.rmdir(aside)
        raise
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)
