"""Server state on disk: SQLite for rounds and clients, safetensors for tensors, JSONL for metrics.

Layout of ``--state-dir``::

    meta.json               model id/revision/task and LoRA layout this state belongs to
    state.sqlite            rounds (id, times, participants, summary) and clients (split, last seen)
    global.safetensors      φ and the task head after the last finished round (atomic replace)
    personal/<id>.safetensors   the latest personal adapters θ_k each client uploaded
    metrics.jsonl           one JSON object per event (steps, uploads, rounds, client metrics);
                            rotated to metrics.jsonl.1 past ``metrics_max_bytes``

Every tensor file is written to a temporary name and renamed, so a crash leaves the previous
round's state whole; restarting ``flexsfl serve`` with the same state dir resumes after the last
finished round. A state dir made for another model is refused, and so is one whose files are
garbage (unreadable, no tensors, NaN, a bad round_id, a corrupt SQLite): one line names the file
and what is wrong, and nothing is overwritten.
"""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from flexsfl.core.atomic import atomic_path, atomic_write_text
from flexsfl.core.errors import ConfigError

__all__ = ["ServerState", "METRICS_MAX_BYTES"]

METRICS_MAX_BYTES = 64 << 20  # metrics.jsonl rotates to metrics.jsonl.1 past this (so <= 2x on disk)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    clients TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    split INTEGER,
    backend TEXT,
    profile TEXT,
    last_seen REAL,
    rounds INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0
);
"""


def _save_tensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp), metadata=meta)


def _load_tensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError and OSError
        raise ConfigError(f"{path}: unreadable state file ({e}); restore it from a backup or start a new --state-dir") from None


class ServerState:
    """One server's persistent state. Thread-safe for the short writes the server makes."""

    def __init__(self, state_dir: str | os.PathLike, layout: Mapping[str, Any], *,
                 metrics_max_bytes: int = METRICS_MAX_BYTES) -> None:
        self.dir = pathlib.Path(state_dir)
        (self.dir / "personal").mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        layout = json.loads(json.dumps(dict(layout), sort_keys=True))
        if meta.exists():
            try:
                have = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{meta}: unreadable ({type(e).__name__}: {e}); restore it from a backup or start "
                                  "a new --state-dir") from None
            if have != layout:
                diff = sorted(k for k in set(have) | set(layout) if have.get(k) != layout.get(k))
                raise ConfigError(
                    f"{self.dir}: this state dir belongs to another model/layout (differs in: {', '.join(diff)}); "
                    "use a new --state-dir"
                )
        else:
            atomic_write_text(meta, json.dumps(layout, indent=2, sort_keys=True) + "\n")
        self._lock = threading.Lock()
        self._db = _open_db(self.dir / "state.sqlite")
        self.metrics_max_bytes = metrics_max_bytes
        self._metrics_path = self.dir / "metrics.jsonl"
        self._metrics = open(self._metrics_path, "a", buffering=1)
        # Called with (event, row) after each log line, on the logging thread (the server's
        # telemetry); a listener must be quick and must not raise.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._metrics.close()

    # -- tensors -------------------------------------------------------------------------------
    def save_global(self, round_id: int, tensors: Mapping[str, np.ndarray]) -> None:
        _save_tensors(self.dir / "global.safetensors", tensors, {"round_id": str(round_id)})

    def load_global(self, specs: Mapping[str, tuple[int, ...]] | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(last finished round, tensors)`` or None for a fresh state dir.

        Refuses (:class:`ConfigError`, one line naming the file) a state that is not a whole, sane
        model: unreadable, no tensors, a round_id that is not an integer >= 0, non-finite values,
        or (with ``specs``, name -> shape of every trainable tensor) a missing or misshapen tensor.
        The file is never rewritten here: the operator decides what to do with it.
        """
        path = self.dir / "global.safetensors"
        if not path.exists():
            return None
        tensors, meta = _load_tensors(path)
        todo = "restore it from a backup or start a new --state-dir"
        rid = meta.get("round_id", "")
        if not (rid.isascii() and rid.isdigit() and len(rid) < 19):
            raise ConfigError(f"{path}: metadata round_id {rid[:40]!r} is not an integer >= 0; {todo}")
        if not tensors:
            raise ConfigError(f"{path}: holds no tensors; {todo}")
        for name, a in tensors.items():
            if not np.isfinite(a).all():
                raise ConfigError(f"{path}: tensor {name!r} has non-finite values; {todo}")
        for name, shape in (specs or {}).items():
            if name not in tensors:
                raise ConfigError(f"{path}: tensor {name!r} is missing ({len(tensors)} of {len(specs)} present); {todo}")
            if tuple(tensors[name].shape) != tuple(shape):
                raise ConfigError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the model needs "
                                  f"{tuple(shape)}; {todo}")
        return int(rid), tensors

    def save_personal(self, client_id: str, round_id: int, tensors: Mapping[str, np.ndarray]) -> None:
        _save_tensors(self.dir / "personal" / f"{client_id}.safetensors", tensors, {"round_id": str(round_id)})

    def load_personal(self, client_id: str) -> dict[str, np.ndarray] | None:
        path = self.dir / "personal" / f"{client_id}.safetensors"
        return _load_tensors(path)[0] if path.exists() else None

    # -- records -------------------------------------------------------------------------------
    def start_round(self, round_id: int, clients: list[str]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO rounds (round_id, started, clients) VALUES (?, ?, ?)",
                (round_id, time.time(), json.dumps(clients)),
            )

    def finish_round(self, round_id: int, summary: Mapping[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE rounds SET finished = ?, summary = ? WHERE round_id = ?",
                (time.time(), json.dumps(summary, sort_keys=True), round_id),
            )

    def rounds(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT round_id, started, finished, clients, summary FROM rounds ORDER BY round_id")
            return [
                {"round_id": r, "started": s, "finished": f, "clients": json.loads(c), "summary": json.loads(m) if m else None}
                for r, s, f, c, m in rows.fetchall()
            ]

    def client_seen(self, client_id: str, split: int, backend: str, profile: Mapping[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO clients (client_id, split, backend, profile, last_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(client_id) DO UPDATE SET split = excluded.split, backend = excluded.backend, "
                "profile = excluded.profile, last_seen = excluded.last_seen",
                (client_id, split, backend, json.dumps(dict(profile), sort_keys=True), time.time()),
            )

    def client_trained(self, client_id: str, samples: int) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE clients SET rounds = rounds + 1, samples = samples + ?, last_seen = ? WHERE client_id = ?",
                (samples, time.time(), client_id),
            )

    def log(self, event: str, **fields: Any) -> None:
        """Append one metrics event (``{"t": unix time, "event": ..., **fields}``) to metrics.jsonl.

        ``fields`` may not hold ``t`` or ``event`` (a caller's bug: TypeError). When the file passes
        ``metrics_max_bytes`` it is renamed to ``metrics.jsonl.1`` (replacing the previous one) and
        a new one is started, so the log takes at most twice that on disk.
        """
        if "t" in fields or "event" in fields:
            raise TypeError("state.log(): 't' and 'event' are set by the log itself")
        row = {"t": round(time.time(), 6), "event": event, **fields}
        line = json.dumps(row, sort_keys=True, default=_jsonable)
        with self._lock:
            if self.metrics_max_bytes and self._metrics.tell() + len(line) + 1 > self.metrics_max_bytes:
                self._metrics.close()
                os.replace(self._metrics_path, self._metrics_path.with_name("metrics.jsonl.1"))
                self._metrics = open(self._metrics_path, "a", buffering=1)
            self._metrics.write(line + "\n")
        for listener in self.listeners:
            listener(event, row)


def _open_db(path: pathlib.Path) -> sqlite3.Connection:
    """Open (or create) the SQLite file; a file that is not a sane flexsfl database is refused, never rewritten."""
    todo = "restore it from a backup or start a new --state-dir"
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        ok = db.execute("PRAGMA quick_check").fetchone()
        if not ok or ok[0] != "ok":
            db.close()
            raise ConfigError(f"{path}: SQLite integrity check failed ({ok[0] if ok else 'no answer'}); {todo}")
        for table, want in (("rounds", {"round_id", "started", "finished", "clients", "summary"}),
                            ("clients", {"client_id", "split", "last_seen", "rounds", "samples"})):
            cols = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if cols and not want <= cols:  # checked before the schema below may add anything
                db.close()
                raise ConfigError(f"{path}: table {table!r} is not a flexsfl one (columns {sorted(cols)}); {todo}")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{path}: not a readable SQLite database ({e}); {todo}") from None
    return db


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
