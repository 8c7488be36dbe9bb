"""Prometheus metrics of one server, fed by the same events as ``metrics.jsonl``.

Each :class:`Telemetry` owns its own :class:`prometheus_client.CollectorRegistry` (never the
process-wide default), so several servers in one process — tests, simulations — keep apart.
Event-driven metrics (steps, refusals, latencies, batch sizes, accuracy) are updated in
:meth:`Telemetry.observe`; values that are state, not events (clients connected, bytes of open
connections, compute queue depth, the round and its phase) are read when scraped.

Latency histograms, in seconds:

- ``flexsfl_client_compute_seconds``: head forward + backward per step, as the client reports it
  in its round's Metrics (the round's mean per step; one observation per client and round);
- ``flexsfl_wire_seconds``: the client's measured round trip per step minus the server's time
  for those steps (one per client and round);
- ``flexsfl_server_step_seconds``: one step on the server, queueing included (one per step);
- ``flexsfl_server_compute_seconds``: one compute batch on the torch thread (one per batch).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from flexsfl.server_backend.fleet import PHASES, Fleet

__all__ = ["Telemetry", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format

# Steps take milliseconds (tiny models, loopback) to seconds (a Pi over Wi-Fi).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Telemetry:
    """The metrics of one server.

    ``live()`` returns ``{client_id: (bytes_in, bytes_out)}`` of open connections and
    ``queue_depth()`` the requests waiting for the compute thread; both are called on scrape,
    from the event loop.
    """

    def __init__(self, fleet: Fleet, *, live: Callable[[], Mapping[str, tuple[int, int]]],
                 queue_depth: Callable[[], int]) -> None:
        self.fleet = fleet
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.steps = Counter("flexsfl_steps", "Training steps served", ["client"], registry=reg)
        self.refused = Counter("flexsfl_refused", "Connections or steps refused, by error code", ["reason"], registry=reg)
        self.rounds = Counter("flexsfl_rounds", "Rounds finished", registry=reg)
        self.server_steps = Counter("flexsfl_server_optimizer_steps", "Optimizer steps of the server's model (tail and "
                                    "middle; the fixed schedule, --server-step-every), counted at each round end",
                                    registry=reg)
        self.client_compute = Histogram("flexsfl_client_compute_seconds", "Head forward+backward per step (client-reported)",
                                        ["client"], buckets=_LATENCY, registry=reg)
        self.wire = Histogram("flexsfl_wire_seconds", "Client round trip per step minus server time",
                              ["client"], buckets=_LATENCY, registry=reg)
        self.server_step = Histogram("flexsfl_server_step_seconds", "One step on the server, queueing included",
                                     buckets=_LATENCY, registry=reg)
        self.server_compute = Histogram("flexsfl_server_compute_seconds", "One compute batch on the torch thread",
                                        buckets=_LATENCY, registry=reg)
        self.batch_size = Histogram("flexsfl_step_batch_size", "Examples per client step", buckets=_BATCH, registry=reg)
        self.batch_requests = Histogram("flexsfl_compute_batch_requests", "Client steps run together in one compute batch",
                                        buckets=_BATCH, registry=reg)
        self.round_seconds = Histogram("flexsfl_round_seconds", "Wall time of a round",
                                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=reg)
        self.round_loss = Gauge("flexsfl_round_loss", "Mean training loss the clients reported for the last round",
                                registry=reg)
        self.round_accuracy = Gauge("flexsfl_round_personal_accuracy", "Mean personal accuracy of the last round",
                                    registry=reg)
        self.client_accuracy = Gauge("flexsfl_client_personal_accuracy", "Personal accuracy a client last reported",
                                     ["client"], registry=reg)
        self.eval = Gauge("flexsfl_eval", "Server-side evaluation after the last round", ["metric"], registry=reg)
        reg.register(_LiveCollector(fleet, live, queue_depth))
        self._round_metrics: dict[int, dict[str, tuple[float, float | None]]] = {}

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Take one metrics event (see :meth:`.state.ServerState.log`); also feeds the fleet view."""
        self.fleet.observe(event, fields)
        if event == "step":
            self.steps.labels(fields["client"]).inc()
            self.server_step.observe(float(fields.get("server_ms", 0.0)) / 1e3)
            self.batch_size.observe(int(fields.get("batch", 0)))
        elif event == "batch":
            self.server_compute.observe(float(fields["ms"]) / 1e3)
            self.batch_requests.observe(len(fields["steps"]))
        elif event == "refused":
            self.refused.labels(str(fields.get("code", "?"))).inc()
        elif event == "client_metrics":
            self._client_metrics(fields)
        elif event == "round":
            self.rounds.inc()
            if isinstance(fields.get("server_steps"), int):
                self.server_steps.inc(fields["server_steps"])
            if isinstance(fields.get("seconds"), (int, float)):
                self.round_seconds.observe(fields["seconds"])
        elif event == "eval":
            for k, v in fields.items():
                if k != "round" and isinstance(v, (int, float)):
                    self.eval.labels(k).set(v)

    def _client_metrics(self, row: Mapping[str, Any]) -> None:
        cid = row["client"]
        f = {**row.get("metrics", {}), "round": row["round"]}  # what the client reported, nested under "metrics"
        if isinstance(f.get("client_compute_ms"), (int, float)):
            self.client_compute.labels(cid).observe(f["client_compute_ms"] / 1e3)
        server_ms = self.fleet.reported(int(f["round"]), cid).get("server_ms")  # the fleet saw this event first
        if isinstance(f.get("roundtrip_ms"), (int, float)) and server_ms is not None:
            self.wire.labels(cid).observe(max(0.0, f["roundtrip_ms"] - server_ms) / 1e3)
        if isinstance(f.get("personal_acc"), (int, float)):
            self.client_accuracy.labels(cid).set(f["personal_acc"])
        # The round's means, over the clients that have reported so far.
        per = self._round_metrics.setdefault(int(f["round"]), {})
        per[cid] = (float(f.get("loss", float("nan"))), f.get("personal_acc"))
        self._round_metrics = {r: v for r, v in self._round_metrics.items() if r >= int(f["round"]) - 1}
        self.round_loss.set(sum(v[0] for v in per.values()) / len(per))
        accs = [v[1] for v in per.values() if isinstance(v[1], (int, float))]
        if accs:
            self.round_accuracy.set(sum(accs) / len(accs))

    def exposition(self) -> bytes:
        """``GET /metrics``: every metric in Prometheus text format."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """State read at scrape time: clients, bytes (closed + open connections), queue, round, phase."""

    def __init__(self, fleet: Fleet, live: Callable[[], Mapping[str, tuple[int, int]]], queue_depth: Callable[[], int]):
        self.fleet, self.live, self.queue_depth = fleet, live, queue_depth

    def collect(self) -> Iterator[Any]:
        snap = self.fleet.snapshot(self.live())
        yield GaugeMetricFamily("flexsfl_clients_connected", "Clients with an open session", value=snap["totals"]["connected"])
        yield GaugeMetricFamily("flexsfl_clients_registered", "Clients in the clients file", value=snap["totals"]["registered"])
        bytes_in = CounterMetricFamily("flexsfl_bytes_received", "Websocket message bytes received", labels=["client"])
        bytes_out = CounterMetricFamily("flexsfl_bytes_sent", "Websocket message bytes sent", labels=["client"])
        for c in snap["clients"]:
            bytes_in.add_metric([c["id"]], c["bytes_in"])
            bytes_out.add_metric([c["id"]], c["bytes_out"])
        yield bytes_in
        yield bytes_out
        yield GaugeMetricFamily("flexsfl_compute_queue_depth", "Requests waiting for the compute thread",
                                value=self.queue_depth())
        yield GaugeMetricFamily("flexsfl_round", "The round in progress (or next to run)", value=snap["round"]["id"])
        yield GaugeMetricFamily("flexsfl_round_steps_done", "Steps served in the round in progress",
                                value=snap["round"]["steps_done"])
        yield GaugeMetricFamily("flexsfl_round_steps_expected", "Steps the round in progress will take",
                                value=snap["round"]["steps_expected"])
        phase = StateSetMetricFamily("flexsfl_round_phase", "What the round loop is doing")
        phase.add_metric([], {p: p == snap["round"]["phase"] for p in PHASES})
        yield phase
