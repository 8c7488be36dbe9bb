"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes for later reading (manifests, state, adapters, profiles, the
client registry) goes through here: the bytes go to a temporary file in the same directory, are
flushed to disk, and the temporary name is renamed over the target (``os.replace`` is atomic
within one file system). A file and its sidecar (safetensors + JSON metadata) are written with
:func:`atomic_write_many`, data first and the sidecar last, so a sidecar never describes data
that is not on disk.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Callable, Iterator, Mapping

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_many"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``safetensors.numpy.save_file``, ``sqlite3``, ``tarfile``).
    ``mode`` sets the permission bits before the rename (e.g. ``0o600`` for secrets).
    """
    target = pathlib.Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_many(writers: Mapping[str | os.PathLike, Callable[[pathlib.Path], None]]) -> None:
    """Write several files, each atomically, in the mapping's order (data first, sidecar last).

    ``writers`` maps a target path to a function that writes the file at the temporary path it
    is given. If one writer fails, the files not yet replaced keep their old contents.
    """
    for target, write in writers.items():
        with atomic_path(target) as tmp:
            write(tmp)
