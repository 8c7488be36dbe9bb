"""The client registry: which devices may connect, and the hash of each one's token.

The file is JSON, written atomically with mode 0600::

    {"version": 1, "clients": {"pi-kitchen": {"token_sha256": "…", "created": "2026-…"}}}

Tokens are 256-bit random strings shown once by ``flexsfl clients add``; only their sha256 is
stored (they are high-entropy secrets, so a fast hash is enough — no password stretching), and
they are compared in constant time. The server re-reads the file when it changes (see
:class:`ClientRegistry`): rotation and revocation need no restart.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import pathlib
import re
import secrets

from flexsfl.core.atomic import atomic_write_text
from flexsfl.core.errors import ConfigError

__all__ = ["ClientRegistry", "add_client", "hash_token", "CLIENT_ID_RE"]

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = 1

log = logging.getLogger("flexsfl.server")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ClientRegistry:
    """The clients file, re-read whenever it changes on disk.

    Every look-up (:meth:`authenticate`, :meth:`still_valid`, :attr:`clients`) first compares the
    file's (mtime, size, inode) with what was read last (one ``stat``, about a microsecond) and
    re-reads it if they differ, so ``flexsfl clients add ID --rotate`` on a running server takes
    effect at the next message: the new token works, the old one is refused. :meth:`reload`
    re-reads unconditionally (``flexsfl serve`` calls it on SIGHUP). A file that has turned
    unreadable or invalid is logged and the last good registry is kept, so a half-edited file
    never locks everyone out nor lets anyone in.
    """

    def __init__(self, path: pathlib.Path, clients: dict[str, dict], stamp: tuple | None = None) -> None:
        self.path = path
        self._clients = clients
        self._stamp = stamp

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClientRegistry":
        p = pathlib.Path(path)
        stamp = _stamp(p)
        return cls(p, _read(p), stamp)

    @property
    def clients(self) -> dict[str, dict]:
        self._refresh()
        return self._clients

    def reload(self) -> None:
        """Re-read the file now (SIGHUP)."""
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp
        try:
            clients = _read(self.path)
        except ConfigError as e:
            log.error("%s; keeping the %d clients read before", e, len(self._clients))
            return
        if clients != self._clients:
            log.info("re-read %s: %d clients", self.path, len(clients))
        self._clients = clients

    def authenticate(self, client_id: str, token: str) -> bool:
        entry = self.clients.get(client_id)
        # Hash even for unknown ids so timing does not tell which ids exist.
        want = entry["token_sha256"] if entry else "0" * 64
        ok = hmac.compare_digest(hash_token(token), want)
        return bool(entry) and ok

    def still_valid(self, client_id: str, token_sha256: str) -> bool:
        """Whether a session authenticated with this token hash may go on (not revoked, not rotated)."""
        entry = self.clients.get(client_id)
        return bool(entry) and hmac.compare_digest(entry["token_sha256"], token_sha256)


def _stamp(p: pathlib.Path) -> tuple | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read(p: pathlib.Path) -> dict[str, dict]:
    if not p.exists():
        raise ConfigError(f"{p}: no clients file; create one with `flexsfl clients add ID --clients {p}`")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not a readable clients file ({e})") from None
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("clients"), dict):
        raise ConfigError(f"{p}: not a flexsfl clients file (version {_VERSION}); recreate it with `flexsfl clients add`")
    for cid, entry in data["clients"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("token_sha256"), str):
            raise ConfigError(f"{p}: client {cid!r} has no token_sha256; re-add it with `flexsfl clients add {cid} --rotate`")
    return data["clients"]


def _write(path: pathlib.Path, clients: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0600 from the first byte: the registry holds token hashes, readable by the server's user only.
    atomic_write_text(path, json.dumps({"version": _VERSION, "clients": clients}, indent=2, sort_keys=True) + "\n", mode=0o600)


def add_client(path: str | os.PathLike, client_id: str, *, rotate: bool = False) -> str:
    """Register ``client_id`` (or give it a new token with ``rotate``) and return its fresh token."""
    if not CLIENT_ID_RE.match(client_id):
        raise ConfigError(f"client id {client_id!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    p = pathlib.Path(path)
    clients = dict(_read(p)) if p.exists() else {}
    if client_id in clients and not rotate:
        raise ConfigError(f"client {client_id!r} already exists in {p}; pass --rotate to issue a new token")
    token = secrets.token_urlsafe(32)
    clients[client_id] = {
        "token_sha256": hash_token(token),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write(p, clients)
    return token
