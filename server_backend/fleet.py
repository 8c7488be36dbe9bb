"""What an operator sees of a federation: each client, the round in progress, and past rounds.

:class:`Fleet` is fed the server's metrics events (the same ``(event, fields)`` pairs that go to
``metrics.jsonl``, see :mod:`.state`) plus the live sessions, and answers :meth:`Fleet.snapshot`:
the JSON document behind ``GET /api/status``, the status page and ``flexsfl status``.

The snapshot holds ids, splits, backends, target names, timings, accuracies and byte counts —
never a token, and never a client's free-form profile (only its ``target`` and ``arch`` names).
Events arrive from the event loop and from the compute thread; a lock keeps the records whole.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import threading
import time
from typing import Any, Iterable, Mapping

__all__ = ["Fleet", "ClientRecord", "PHASES", "HISTORY_ROUNDS"]

# What the round loop is doing; "starting" until the server listens.
PHASES = ("starting", "waiting", "training", "aggregating", "evaluating", "finished")
HISTORY_ROUNDS = 500  # past rounds kept for the charts (a few hundred bytes each)
_STEP_WINDOW = 64  # recent step intervals per client behind its p50


@dataclasses.dataclass
class ClientRecord:
    """One client as the server knows it (connected or not)."""

    client_id: str
    split: int | None = None
    backend: str | None = None
    target: str | None = None
    arch: str | None = None
    topology: str = "head/tail"
    last_seen: float | None = None
    steps_total: int = 0
    steps_round: int = 0
    round_id: int | None = None  # the round ``steps_round`` counts
    last_step: float | None = None  # perf_counter of the last step in that round
    step_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=_STEP_WINDOW))
    server_s_round: float = 0.0  # server time of this round's steps (queue + compute), for the wire estimate
    loss: float | None = None
    personal_acc: float | None = None
    perplexity: float | None = None
    bytes_in_retired: int = 0  # bytes of closed connections; live ones are added at snapshot time
    bytes_out_retired: int = 0


class Fleet:
    """Records built from metrics events; :meth:`snapshot` is safe to call at any time."""

    def __init__(self, *, rounds_total: int, local_steps: int, registered: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self.rounds_total = rounds_total  # 0 = until stopped
        self.local_steps = local_steps
        self.clients: dict[str, ClientRecord] = {cid: ClientRecord(cid) for cid in registered}
        self.registered = set(self.clients)
        self.phase = "starting"
        self.round_id = 0
        self.round_clients: list[str] = []
        self.round_started: float | None = None
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_ROUNDS)
        self.refused: collections.Counter[str] = collections.Counter()
        self.started = time.time()

    # -- events ---------------------------------------------------------------------------------
    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Take one metrics event; unknown events are ignored."""
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            with self._lock:
                handler(fields)

    def _client(self, cid: str) -> ClientRecord:
        rec = self.clients.get(cid)
        if rec is None:
            rec = self.clients[cid] = ClientRecord(cid)
        rec.last_seen = time.time()
        return rec

    def _on_phase(self, f: Mapping[str, Any]) -> None:
        self.phase = f["phase"]
        self.round_id = int(f.get("round", self.round_id))
        if f["phase"] == "training":
            self.round_clients = list(f.get("clients", ()))
            self.round_started = time.time()

    def _on_hello(self, f: Mapping[str, Any]) -> None:
        rec = self._client(f["client"])
        profile = f.get("profile") or {}
        rec.split, rec.backend = int(f["split"]), str(f["backend"])
        rec.target, rec.arch = _name(profile.get("target")), _name(profile.get("arch"))
        rec.topology = _name(profile.get("topology")) or "head/tail"

    def _on_refused(self, f: Mapping[str, Any]) -> None:
        self.refused[str(f.get("code", "?"))] += 1

    def _on_step(self, f: Mapping[str, Any]) -> None:
        rec = self._client(f["client"])
        now = time.perf_counter()
        r = int(f["round"])
        if rec.round_id != r:
            rec.round_id, rec.steps_round, rec.last_step, rec.server_s_round = r, 0, None, 0.0
        if rec.last_step is not None:
            rec.step_s.append(now - rec.last_step)
        rec.last_step = now
        rec.steps_round += 1
        rec.steps_total += 1
        rec.server_s_round += float(f.get("server_ms", 0.0)) / 1e3
        rec.loss = float(f["loss"])

    def _on_client_metrics(self, row: Mapping[str, Any]) -> None:
        rec = self._client(row["client"])
        f = {**row.get("metrics", {}), "round": row["round"]}  # what the client reported, nested under "metrics"
        if "personal_acc" in f:
            rec.personal_acc = float(f["personal_acc"])
        if "perplexity" in f:
            rec.perplexity = float(f["perplexity"])
        if "loss" in f:
            rec.loss = float(f["loss"])
        row = self._round_row(int(f["round"]))
        row["clients"][rec.client_id] = {k: f[k] for k in ("personal_acc", "loss", "client_compute_ms", "roundtrip_ms")
                                         if isinstance(f.get(k), (int, float))}
        if rec.round_id == int(f["round"]) and rec.steps_round:
            row["clients"][rec.client_id]["server_ms"] = 1e3 * rec.server_s_round / rec.steps_round

    def _on_round(self, f: Mapping[str, Any]) -> None:
        row = self._round_row(int(f["round"]))
        row.update(seconds=f.get("seconds"), steps=f.get("steps"), dropped=list(f.get("dropped", ())))

    def _on_eval(self, f: Mapping[str, Any]) -> None:
        row = self._round_row(int(f["round"]))
        row["eval"] = {k: v for k, v in f.items() if k != "round" and isinstance(v, (int, float))}

    def _round_row(self, r: int) -> dict[str, Any]:
        if self.history and self.history[-1]["round"] == r:
            return self.history[-1]
        row = next((h for h in self.history if h["round"] == r), None)
        if row is None:
            row = {"round": r, "clients": {}}
            self.history.append(row)
        return row

    def reported(self, round_id: int, client_id: str) -> dict[str, float]:
        """What ``client_id`` reported for ``round_id`` (with the server's mean step time), or {}."""
        with self._lock:
            row = next((h for h in reversed(self.history) if h["round"] == round_id), None)
            return dict(row["clients"].get(client_id, {})) if row else {}

    # -- connections ----------------------------------------------------------------------------
    def retire(self, client_id: str, bytes_in: int, bytes_out: int) -> None:
        """A connection closed: keep its byte counts (the totals stay monotonic across reconnects)."""
        with self._lock:
            rec = self._client(client_id)
            rec.bytes_in_retired += bytes_in
            rec.bytes_out_retired += bytes_out

    # -- reading --------------------------------------------------------------------------------
    def snapshot(self, live: Mapping[str, tuple[int, int]], *, extra: Mapping[str, Any] = ()) -> dict[str, Any]:
        """The status document. ``live`` maps each connected client to its open connection's
        ``(bytes_in, bytes_out)``; ``extra`` is merged into ``server``."""
        with self._lock:
            clients = [self._client_row(rec, live.get(cid)) for cid, rec in sorted(self.clients.items())]
            history = [_history_row(h) for h in self.history]
            expected = self.local_steps * len(self.round_clients)
            done = sum(self.clients[c].steps_round for c in self.round_clients
                       if c in self.clients and self.clients[c].round_id == self.round_id)
            return {
                "server": {"started": self.started, "uptime_s": round(time.time() - self.started, 1), **dict(extra)},
                "round": {
                    "id": self.round_id, "phase": self.phase, "rounds_total": self.rounds_total,
                    "rounds_done": self.round_id,  # ids count from 0: rounds before the current one are done
                    "clients": list(self.round_clients), "steps_done": min(done, expected) if expected else done,
                    "steps_expected": expected, "started": self.round_started,
                },
                "clients": clients,
                "history": history,
                "totals": {
                    "connected": len(live), "registered": len(self.registered),
                    "steps": sum(c["steps_total"] for c in clients), "refused": dict(self.refused),
                    "bytes_in": sum(c["bytes_in"] for c in clients), "bytes_out": sum(c["bytes_out"] for c in clients),
                },
            }

    def _client_row(self, rec: ClientRecord, live: tuple[int, int] | None) -> dict[str, Any]:
        bi, bo = live or (0, 0)
        return {
            "id": rec.client_id, "connected": live is not None, "registered": rec.client_id in self.registered,
            "split": rec.split, "topology": rec.topology, "backend": rec.backend, "target": rec.target, "arch": rec.arch,
            "last_seen": rec.last_seen,
            "steps_round": rec.steps_round if rec.round_id == self.round_id else 0, "steps_total": rec.steps_total,
            "step_ms_p50": round(1e3 * statistics.median(rec.step_s), 2) if rec.step_s else None,
            "loss": rec.loss, "personal_acc": rec.personal_acc, "perplexity": rec.perplexity,
            "bytes_in": rec.bytes_in_retired + bi, "bytes_out": rec.bytes_out_retired + bo,
        }


def _history_row(h: Mapping[str, Any]) -> dict[str, Any]:
    """One past round for the charts: per-client values and their means."""
    per = h["clients"]

    def mean(key: str) -> float | None:
        vals = [c[key] for c in per.values() if key in c]
        return round(statistics.fmean(vals), 4) if vals else None

    return {
        "round": h["round"], "seconds": h.get("seconds"), "steps": h.get("steps"), "dropped": h.get("dropped", []),
        "personal_acc": mean("personal_acc"), "loss": mean("loss"),
        "client_compute_ms": mean("client_compute_ms"), "server_ms": mean("server_ms"),
        "wire_ms": _wire_ms(per), "acc_by_client": {c: v["personal_acc"] for c, v in per.items() if "personal_acc" in v},
        "eval": dict(h.get("eval", {})),
    }


def _wire_ms(per: Mapping[str, Mapping[str, float]]) -> float | None:
    """Round trip the client measured minus the server's time for the step: the network's share."""
    vals = [max(0.0, c["roundtrip_ms"] - c["server_ms"]) for c in per.values() if "roundtrip_ms" in c and "server_ms" in c]
    return round(statistics.fmean(vals), 3) if vals else None


def _name(v: Any) -> str | None:
    return str(v)[:64] if isinstance(v, str) and v else None
