"""Durable file writes: the one rule every writer of the project follows (the kernel library, the model, the trainer,
the benchmarks; `dreamzero.atomic` re-exports this module).

A file is written to a temporary file in the same folder (so the final rename never crosses file systems), flushed
and fsynced, renamed over its final name with os.replace, and then the folder is fsynced (so the rename itself
survives a power cut). A reader sees the old file or the new one, never half of one; a write that fails leaves the
old file as it was and no temporary file behind.

    with atomic_write(path, "w") as f:          # an open file (text "w" or binary "wb")
        json.dump(obj, f)
    with atomic_output(path) as tmp:            # a path, for writers that open it themselves (PyAV, pyarrow,
        save_file(tensors, tmp)                 # safetensors); it ends in the final name's extension
    atomic_write_json(path, obj); atomic_write_text(path, text)

A folder written as a whole (a training checkpoint) is written under a temporary name, `fsync_tree`d, renamed, and
its parent `fsync_dir`ed.

Standard library only: the benchmarks and the data tools import it without torch, and it sits in dz_kernels (the
bottom floor) so the kernel library writes its files by the same rule without importing the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def fsync_dir(folder: str) -> None:
    """fsync a directory (so a rename inside it is durable); a no-op where the OS does not allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file and directory under `folder` (best effort, as fsync_dir)."""
    for dirpath, _, files in os.walk(folder):
        for fn in files:
            try:
                _fsync_file(os.path.join(dirpath, fn))
            except OSError:
                pass
        fsync_dir(dirpath)


def _temp_beside(path: str, suffix: str) -> tuple[str, str]:
    """(folder, temporary file path) for `path`: a hidden name in the same folder, created empty."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    return folder, tmp


def remove_quietly(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_output(path) -> Iterator[str]:
    """A temporary path beside `path` (ending in the same extension, for writers that pick the format from it) for
    a writer that opens the file itself; when the block ends without an exception, the file is fsynced, replaces
    `path` and the folder is fsynced. On an exception it is removed and `path` is untouched."""
    path = os.fspath(path)
    folder, tmp = _temp_beside(path, ".tmp" + os.path.splitext(path)[1])
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kw) -> Iterator[Any]:
    """An open file (mode "w" or "wb") that replaces `path` as atomic_output does when the block ends without an
    exception (closed, fsynced, renamed, folder fsynced); on an exception `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_output(path) as tmp, open(tmp, mode, **open_kw) as f:
        yield f


def atomic_write_json(path, obj: Any, indent: int | None = 2) -> None:
    """json.dump(obj) to `path`, atomically and durably."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)


def atomic_write_text(path, text: str) -> None:
    """`text` to `path`, atomically and durably."""
    with atomic_write(path, "w") as f:
        f.write(text)
