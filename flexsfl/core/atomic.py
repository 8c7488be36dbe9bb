"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes for later reading (manifests, state, adapters, profiles, the
client registry) goes through here: the bytes go to a temporary file in the same directory
(``.NAME.RANDOM.tmp``), are flushed to disk, and the temporary name is renamed over the target
(``os.replace`` is atomic within one file system); the directory is then synced so the rename
itself survives a power cut. If the writer fails, the temporary file is removed and the old
file is left as it was.

A file and its sidecar (safetensors + JSON metadata) are written with :func:`atomic_write_many`,
data first and the sidecar last, so a sidecar never describes data that is not on disk.

Permissions: a new file gets the usual ``0o666 & ~umask`` (what ``open(path, "w")`` gives),
unless ``mode`` is given; with ``mode`` (``0o600`` for secrets) the temporary file is created
with it, so the content is never readable with wider permissions, not even for a moment.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from typing import Callable, Iterator, Mapping

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_many"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``safetensors.numpy.save_file``, ``onnx.save``,
    ``tarfile``). The writer may replace the (empty) temporary file it is given but must write
    exactly that path. ``mode`` sets the permission bits (e.g. ``0o600`` for secrets); the parent
    directory must exist.
    """
    target = pathlib.Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never follow or reuse someone else's file; the mode applies from the first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    os.close(fd)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)  # exact bits, whatever the umask took away or the writer did
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(target.parent)


def _sync_dir(directory: pathlib.Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_many(writers: Mapping[str | os.PathLike, Callable[[pathlib.Path], None]], *,
                      mode: int | None = None) -> None:
    """Write several files, each atomically, in the mapping's order (data first, sidecar last).

    ``writers`` maps a target path to a function that writes the file at the temporary path it
    is given. If one writer fails, it and the files after it keep their old contents (those
    before it are already replaced): put the file that describes the others last.
    """
    for target, write in writers.items():
        with atomic_path(target, mode=mode) as tmp:
            write(tmp)
