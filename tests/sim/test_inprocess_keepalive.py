"""Whole-model clients in-process (the suites' setting) keep their connection while they compute, and
a round's Metrics lost with a connection reach the server after the reconnect.

Real server, real clients over loopback websockets (``simulate --in-process``), the tiny Llama. The
keepalive pings are made short (0.2 s, answered within 0.6 s) by passing other values to the same
websockets calls, and the device's evaluation is made slow by real compute (a chain of matmuls of
~2 s after the scoring itself, no sleep): an event loop that computes would miss its pings, the
server would close the connection and the client would reconnect (a second ``hello``).
"""

from __future__ import annotations

import json
import time

import pytest

import flexsfl.edge_runtime.transport as transport
import flexsfl.server_backend.server as server_mod
import flexsfl.sim.simulate as simulate_mod
from flexsfl.core.wire import Metrics
from flexsfl.sim.config import SimConfig
from flexsfl.sim.full_trainer import FullModelTrainer
from flexsfl.sim.simulate import simulate

BUSY_S = 2.0  # seconds of compute in each evaluation: > 3x the ping timeout


def _csv(path, n=96):
    words = ["good", "great", "fine", "bad", "dull", "poor"]
    path.write_text("text,label\n" + "".join(f"item {i} is {words[i % 6]},{int(i % 6 < 3)}\n" for i in range(n)))
    return path


class _SlowEval(FullModelTrainer):
    """The whole-model device, whose evaluation also runs ~BUSY_S s of matmuls (torch; it releases the GIL)."""

    def evaluate(self):
        import torch

        got = super().evaluate()
        a = torch.randn(256, 256)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < BUSY_S:
            a = torch.tanh(a @ a)
        return got


def _short_pings(monkeypatch):
    real_connect, real_serve = transport.connect, server_mod.serve
    fast = {"ping_interval": 0.2, "ping_timeout": 0.6}
    monkeypatch.setattr(transport, "connect", lambda *a, **kw: real_connect(*a, **{**kw, **fast}))
    monkeypatch.setattr(server_mod, "serve", lambda *a, **kw: real_serve(*a, **{**kw, **fast}))


def _events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_a_slow_whole_model_client_keeps_its_connection_and_reports(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    _short_pings(monkeypatch)
    monkeypatch.setattr(simulate_mod, "full_model_trainer",
                        lambda bundle, train, test, cfg: _SlowEval(bundle, train, test, seed=int(cfg.get("seed") or 0),
                                                                   state_dir=cfg.get("state_dir")))
    cfg = SimConfig(strategy="fedavg", model=str(tiny_model_dirs["llama"]), data=str(_csv(tmp_path / "d.csv")),
                    partition="iid", clients=2, rounds=2, local_steps=2, batch_size=4, splits=(1,), max_train=24,
                    max_test=12, max_seq=16, in_process=True, out=str(tmp_path / "fedavg"))
    t0 = time.perf_counter()
    summary = simulate(cfg, show=False)
    assert time.perf_counter() - t0 > 2 * BUSY_S  # the slow evaluations did run
    ev = _events(tmp_path / "fedavg")
    hellos = [e["client"] for e in ev if e["event"] == "hello"]
    assert sorted(hellos) == ["c0", "c1"], hellos  # one connection each: no ping went unanswered
    reported = {(e["round"], e["client"]) for e in ev if e["event"] == "client_metrics"}
    assert reported == {(r, c) for r in (0, 1) for c in ("c0", "c1")}
    assert all(c["personal_acc"] is not None for c in summary["per_client"])
    assert (tmp_path / "fedavg" / "clients" / "c0" / "full.safetensors").is_file()  # the device's state, per round


def test_metrics_lost_with_the_connection_are_sent_again(tiny_model_dirs, tmp_path, monkeypatch):
    """The server closes c0's connection on its round-0 Metrics without reading them (as a keepalive
    timeout would): c0 reconnects and sends them again; every round has every client's report.

    The server ends round 0 without them (the session closed) and is waiting in round 1, the last, when c0
    is back (its retry waits 0.5 s): c0 keeps them for after round 1's own. A RoundConfig on the new
    connection must not count as the server having read them (it did once: they were dropped)."""
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    real_dispatch = server_mod.FlexServer._dispatch
    lost = []

    async def lossy(self, s, msg):
        if isinstance(msg, Metrics) and msg.round_id == 0 and s.client_id == "c0" and not lost:
            lost.append(msg.round_id)
            await s.ws.close(1011, "test: the frame is lost with the connection")
            return
        await real_dispatch(self, s, msg)

    monkeypatch.setattr(server_mod.FlexServer, "_dispatch", lossy)
    cfg = SimConfig(strategy="fedavg", model=str(tiny_model_dirs["llama"]), data=str(_csv(tmp_path / "d.csv")),
                    partition="iid", clients=2, rounds=2, local_steps=2, batch_size=4, splits=(1,), max_train=24,
                    max_test=12, max_seq=16, in_process=True, out=str(tmp_path / "lossy"))
    summary = simulate(cfg, show=False)
    ev = _events(tmp_path / "lossy")
    assert lost == [0] and [e["client"] for e in ev if e["event"] == "hello"].count("c0") == 2  # it did reconnect
    reported = {(e["round"], e["client"]) for e in ev if e["event"] == "client_metrics"}
    assert reported == {(r, c) for r in (0, 1) for c in ("c0", "c1")}
    rows = [json.loads(line) for line in (tmp_path / "lossy" / "rounds.jsonl").read_text().splitlines()]
    assert sorted(rows[0]["clients"]) == ["c0", "c1"]
    assert all(c["personal_acc"] is not None for c in summary["per_client"])
