"""``sim.results.collect``: the server's event log of a run -> its rounds and summary."""

from __future__ import annotations

import json
import types

import pytest

from flexsfl.sim.config import SimConfig
from flexsfl.sim.results import collect


def test_a_client_left_out_of_an_aggregation_is_in_the_summary(tmp_path):
    """A client that started a round but never uploaded (the server's round event lists it as dropped) is
    recorded per round and in the summary, so a suite can say the run trained on fewer client steps."""
    events = [
        {"event": "client_metrics", "client": "c0", "round": 0, "split": 1, "metrics": {"personal_acc": 0.5, "steps": 2}},
        {"event": "round", "round": 0, "seconds": 1.0, "server_steps": 2, "dropped": ["c1"]},
        {"event": "client_metrics", "client": "c0", "round": 1, "split": 1, "metrics": {"personal_acc": 0.6, "steps": 2}},
        {"event": "client_metrics", "client": "c1", "round": 1, "split": 1, "metrics": {"personal_acc": 0.7, "steps": 2}},
        {"event": "round", "round": 1, "seconds": 1.0, "server_steps": 4, "dropped": []},
    ]
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    cfg = SimConfig(clients=2, splits=(1,), rounds=2, local_steps=2, out=str(tmp_path))
    part = types.SimpleNamespace(clients=[types.SimpleNamespace(groups=("a",)), types.SimpleNamespace(groups=("b",))])
    summary = collect(cfg, tmp_path, part, [1, 1], [{"pinned": 1}, {"pinned": 1}], total_s=2.0)
    assert summary["dropped"] == {"0": ["c1"]}
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rounds] == [["c1"], []]
    assert summary["final"]["personal_acc"] == pytest.approx(0.65)  # the last round, both clients
