"""Unpacking a ``.tar.gz`` bundle into a private cache, safely.

The cache is a directory of this user only (mode 0700; by default
``$TMPDIR/flexsfl-bundles-<uid>``); a cache directory owned by someone else, or one that others
may write to, is refused. Each tarball is unpacked to ``<cache>/<sha256 of the tarball>``:

* **A directory already there is not trusted.** Its ``manifest.json`` must equal the tarball's
  byte for byte (the caller, :func:`~flexsfl.core.bundle.load_bundle`, then checks every file
  against the manifest's sha256); otherwise it is removed and the tarball unpacked again.
* **Size is capped before anything is written.** Each member's size is read from its header and
  the running total is checked before the member is written: over ``max_bytes``, over the free
  disk space, or more than :data:`MAX_RATIO` times the tarball (a "tar bomb": 1 MB of zeros
  compresses a GiB) is refused, as are more than :data:`MAX_MEMBERS` members.
* **Failures leave nothing behind.** Unpacking goes to a temporary sibling directory that is
  renamed into place only when complete, and removed whatever happens.

``tarfile``'s ``filter="data"`` refuses absolute paths, ``..``, links out of the tree and device
files. Torch-free.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import tarfile
import tempfile

from flexsfl.core.errors import BundleError

__all__ = ["extract_tar", "cache_dir", "MAX_EXTRACT_BYTES", "MAX_RATIO", "MAX_MEMBERS"]

MAX_EXTRACT_BYTES = 32 << 30  # 32 GiB: far above any head bundle, far below what a bomb wants
MAX_RATIO = 100  # unpacked / packed; weights and programs compress < 3x, zeros ~1000x
MAX_MEMBERS = 100_000
_SMALL = 64 << 20  # below this, the ratio is not checked (tiny bundles of JSON compress well)
_MANIFEST = "manifest.json"
_MANIFEST_MAX = 16 << 20


def cache_dir(base: str | os.PathLike | None = None) -> pathlib.Path:
    """The extraction cache, created 0700 if absent; refused unless this user owns it and only it may write."""
    private = base is None
    p = pathlib.Path(base) if base is not None else pathlib.Path(tempfile.gettempdir()) / f"flexsfl-bundles-{os.getuid()}"
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(p)
    except OSError as e:
        raise BundleError(f"{p}: cannot create the bundle cache ({e.strerror}); pass another cache directory") from None
    loose = 0o077 if private else 0o022
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & loose:
        raise BundleError(
            f"{p}: bundle cache is not a private directory of uid {os.getuid()} (owner {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}); remove it or point the cache elsewhere"
        )
    return p


def extract_tar(path: pathlib.Path, digest: str, cache: str | os.PathLike | None = None, *,
                max_bytes: int = MAX_EXTRACT_BYTES) -> pathlib.Path:
    """Unpack the tarball ``path`` (whose sha256 is ``digest``) and return the bundle's directory."""
    base = cache_dir(cache)
    dest = base / digest
    if os.path.lexists(dest):
        if _same_manifest(path, dest):
            return dest
        _remove(dest)  # planted, stale or half-deleted: never trusted
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
    try:
        _unpack(path, tmp, max_bytes=min(max_bytes, shutil.disk_usage(base).free))
        entries = list(tmp.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else tmp
        try:
            # A directory rename (atomic): the extracted bundle appears whole or not at all.
            os.replace(root, dest)
        except OSError:  # another process unpacked the same tarball first; load_bundle checks theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _unpack(path: pathlib.Path, out: pathlib.Path, *, max_bytes: int) -> None:
    packed = path.stat().st_size
    total = count = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # streaming: a header is read and checked before its data is written
                total += max(member.size, 0)
                count += 1
                if total > max_bytes:
                    raise BundleError(f"{path}: unpacks to more than {max_bytes / 2**20:.0f} MiB (the cap, or the free "
                                      "disk space); refused before writing it. Re-create it with `flexsfl export --tar`")
                if total > _SMALL and total > MAX_RATIO * packed:
                    raise BundleError(f"{path}: unpacks to over {MAX_RATIO}x its size ({total / 2**20:.0f} MiB from "
                                      f"{packed / 2**20:.1f} MiB): a tar bomb, not a bundle; refused before writing it")
                if count > MAX_MEMBERS:
                    raise BundleError(f"{path}: more than {MAX_MEMBERS} files; not a bundle")
                # filter="data" refuses absolute paths, links out of the tree and device files.
                tar.extract(member, out, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{path}: not a readable .tar.gz bundle ({e}); re-create it with `flexsfl export --tar`") from None


def _same_manifest(path: pathlib.Path, dest: pathlib.Path) -> bool:
    """Whether ``dest`` is a real directory whose manifest equals the tarball's."""
    if dest.is_symlink() or not dest.is_dir():
        return False
    have = dest / _MANIFEST
    if have.is_symlink() or not have.is_file():
        return False
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = pathlib.PurePosixPath(member.name).parts
                if member.isfile() and parts and parts[-1] == _MANIFEST and len(parts) <= 2 and member.size <= _MANIFEST_MAX:
                    f = tar.extractfile(member)
                    return f is not None and f.read() == have.read_bytes()
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


def _remove(p: pathlib.Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink()
    else:
        shutil.rmtree(p)
