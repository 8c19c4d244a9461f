"""Crash-safe file primitives: every visible change to a dataset is one rename or one link.

A process killed with ``kill -9`` must never leave a half-written file under a name nnU-Net reads,
so files are written to a temporary sibling, flushed, and then moved into place in one step.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

TMP_SUFFIX = ".tmp"  # never ends in an image ending, so nnU-Net's folder scan ignores it


class DatasetBusyError(RuntimeError):
    """Another process holds the folder's write lock; waiting for it is the fix, not a bug."""


def tmp_path_for(path: Path) -> Path:
    """The temporary sibling ``path`` is staged under (fixed name: a rerun overwrites a stale one)."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (renames/links) - needed for power loss, harmless otherwise."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> Path:
    """Write ``data`` (bytes, or a function writing to an open binary file) fully and durably to
    ``path``'s temporary sibling; return that sibling."""
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` by ``data`` in one rename: readers see the old or the new file, never a mix.

    ``data`` may be a function that writes to the open temporary file (``torch.save``, ``np.save``,
    ``Image.save`` with an explicit format), so every kind of file is published the same way.
    """
    path = Path(path)
    tmp = write_tmp(path, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    # indent=4 matches nnU-Net's own save_json, so files we write look like the ones it writes
    return (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def publish_no_clobber(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` atomically, refusing to replace an existing ``final``.

    ``os.link`` fails when the target exists, so a file that appeared meanwhile is never overwritten
    (``os.replace`` would silently clobber it). Filesystems without hard links fall back to an
    existence check followed by a rename.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(final)) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def unlink_if_present(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive_dir_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` itself (no lock file to leave behind).

    The kernel drops a ``flock`` when its process dies, so a killed writer never blocks a rerun.
    """
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a folder")
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a single writer is assumed there
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetBusyError(
                f"another process is already {what} {directory}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
