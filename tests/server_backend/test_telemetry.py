"""Fleet and Telemetry from a scripted event stream: what the page and /metrics say about it.

The events are the server's own metrics events (the rows ``ServerState.log`` writes), fed the way
the server feeds them; the Prometheus side is read back with prometheus_client's parser.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flexsfl.server_backend.fleet import Fleet
from flexsfl.server_backend.telemetry import Telemetry


def _samples(tel: Telemetry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(tel.exposition().decode()) for s in fam.samples}


def _make(live=None, depth=0):
    fleet = Fleet(rounds_total=3, local_steps=2, registered=["a", "b", "c"])
    live = {} if live is None else live
    return fleet, Telemetry(fleet, live=lambda: live, queue_depth=lambda: depth), live


def _round(tel: Telemetry, r: int, clients: dict[str, int], *, acc: dict[str, float]) -> None:
    tel.observe("phase", {"phase": "training", "round": r, "clients": sorted(clients)})
    for step in range(2):
        for cid in clients:
            tel.observe("step", {"client": cid, "round": r, "step": step, "loss": 0.5, "batch": 4, "seq": 16, "server_ms": 20.0})
        tel.observe("batch", {"steps": [f"{c}:{r}:{step}" for c in clients], "ms": 15.0})
    tel.observe("round", {"round": r, "seconds": 1.5, "steps": 2 * len(clients), "server_steps": 2 * len(clients) - 1,
                          "dropped": []})
    for cid in clients:
        tel.observe("client_metrics", {"client": cid, "round": r, "split": clients[cid], "metrics": {
            "steps": 2, "loss": 0.4, "client_compute_ms": 30.0, "roundtrip_ms": 50.0, "personal_acc": acc[cid]}})


def test_counters_histograms_and_status_follow_the_events():
    fleet, tel, live = _make(depth=3)
    tel.observe("phase", {"phase": "waiting", "round": 0})
    for cid, split in (("a", 1), ("b", 2)):
        tel.observe("hello", {"client": cid, "split": split, "backend": "ort",
                              "profile": {"target": "rpi5", "arch": "aarch64", "secret_note": "x" * 10}})
        live[cid] = (100, 50)
    _round(tel, 0, {"a": 1, "b": 2}, acc={"a": 0.5, "b": 0.7})
    _round(tel, 1, {"a": 1, "b": 2}, acc={"a": 0.6, "b": 0.9})
    tel.observe("refused", {"client": "mallory", "code": "UNAUTHORIZED"})
    tel.observe("eval", {"round": 1, "global_acc": 0.8})
    m = _samples(tel)
    assert m[("flexsfl_steps_total", (("client", "a"),))] == 4
    assert m[("flexsfl_server_optimizer_steps_total", ())] == 6  # the rounds' server_steps, 3 + 3
    assert m[("flexsfl_refused_total", (("reason", "UNAUTHORIZED"),))] == 1
    assert m[("flexsfl_server_step_seconds_count", ())] == 8 and m[("flexsfl_server_step_seconds_sum", ())] == pytest.approx(0.16)
    assert m[("flexsfl_server_compute_seconds_count", ())] == 4
    assert m[("flexsfl_compute_batch_requests_sum", ())] == 8
    assert m[("flexsfl_step_batch_size_sum", ())] == 32
    # client compute as reported; wire = round trip - the server's mean step time (50 - 20 ms)
    assert m[("flexsfl_client_compute_seconds_sum", (("client", "b"),))] == pytest.approx(0.06)
    assert m[("flexsfl_wire_seconds_sum", (("client", "b"),))] == pytest.approx(0.06)
    assert m[("flexsfl_client_personal_accuracy", (("client", "b"),))] == 0.9
    assert m[("flexsfl_round_personal_accuracy", ())] == pytest.approx(0.75)
    assert m[("flexsfl_eval", (("metric", "global_acc"),))] == 0.8
    assert m[("flexsfl_clients_connected", ())] == 2 and m[("flexsfl_clients_registered", ())] == 3
    assert m[("flexsfl_compute_queue_depth", ())] == 3
    assert m[("flexsfl_round", ())] == 1
    assert m[("flexsfl_round_phase", (("flexsfl_round_phase", "training"),))] == 1
    assert m[("flexsfl_round_phase", (("flexsfl_round_phase", "waiting"),))] == 0
    assert m[("flexsfl_bytes_received_total", (("client", "a"),))] == 100

    s = fleet.snapshot(live)
    rows = {c["id"]: c for c in s["clients"]}
    assert rows["a"]["split"] == 1 and rows["a"]["target"] == "rpi5" and rows["a"]["connected"]
    assert rows["c"] == {**rows["c"], "split": None, "connected": False, "registered": True, "steps_total": 0}
    assert "secret_note" not in str(s)  # only the profile's target and arch are shown
    assert rows["b"]["steps_round"] == 2 and rows["b"]["personal_acc"] == 0.9
    assert s["round"] == {**s["round"], "id": 1, "phase": "training", "steps_done": 4, "steps_expected": 4, "rounds_done": 1}
    h = s["history"]
    assert [r["round"] for r in h] == [0, 1]
    assert h[1]["personal_acc"] == pytest.approx(0.75) and h[1]["acc_by_client"] == {"a": 0.6, "b": 0.9}
    assert h[1]["server_ms"] == pytest.approx(20.0) and h[1]["wire_ms"] == pytest.approx(30.0)
    assert h[1]["eval"] == {"global_acc": 0.8} and h[0]["seconds"] == 1.5
    assert s["totals"]["refused"] == {"UNAUTHORIZED": 1} and s["totals"]["steps"] == 8


def test_bytes_stay_monotonic_across_reconnects():
    fleet, tel, live = _make()
    live["a"] = (1000, 400)
    before = _samples(tel)[("flexsfl_bytes_received_total", (("client", "a"),))]
    fleet.retire("a", 1000, 400)  # the connection closes...
    del live["a"]
    live["a"] = (10, 5)  # ...and a new one starts counting from its Hello
    after = _samples(tel)
    assert before == 1000 and after[("flexsfl_bytes_received_total", (("client", "a"),))] == 1010
    assert after[("flexsfl_bytes_sent_total", (("client", "a"),))] == 405


def test_steps_this_round_reset_and_p50_is_the_step_interval():
    fleet, tel, _ = _make()
    tel.observe("phase", {"phase": "training", "round": 0, "clients": ["a"]})
    for step in range(5):
        tel.observe("step", {"client": "a", "round": 0, "step": step, "loss": 1.0, "batch": 2, "server_ms": 1.0})
    row = fleet.snapshot({})["clients"][0]
    assert row["steps_round"] == 5 and row["step_ms_p50"] is not None and row["step_ms_p50"] >= 0
    tel.observe("phase", {"phase": "training", "round": 1, "clients": ["a"]})
    assert fleet.snapshot({})["clients"][0]["steps_round"] == 0  # a new round, no step yet
    tel.observe("step", {"client": "a", "round": 1, "step": 0, "loss": 1.0, "batch": 2, "server_ms": 1.0})
    snap = fleet.snapshot({})
    assert snap["clients"][0]["steps_round"] == 1 and snap["clients"][0]["steps_total"] == 6
    assert snap["round"]["steps_done"] == 1 and snap["round"]["steps_expected"] == 2


def test_two_servers_in_one_process_keep_their_own_metrics():
    _, t1, _ = _make()
    _, t2, _ = _make()
    t1.observe("step", {"client": "a", "round": 0, "step": 0, "loss": 1.0, "batch": 2, "server_ms": 1.0})
    assert _samples(t1)[("flexsfl_steps_total", (("client", "a"),))] == 1
    assert ("flexsfl_steps_total", (("client", "a"),)) not in _samples(t2)


def test_non_finite_client_values_do_not_break_the_status():
    fleet, tel, _ = _make()
    tel.observe("client_metrics", {"client": "a", "round": 0, "metrics": {"loss": math.nan, "personal_acc": 0.5}})
    assert math.isnan(fleet.snapshot({})["clients"][0]["loss"])  # the HTTP layer turns it into null
    assert "flexsfl_round_loss NaN" in tel.exposition().decode()
