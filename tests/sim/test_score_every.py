"""``--score-every N``: the server asks its devices to score their own test split only every N-th
round and in the last (RoundConfig.evaluate); the other rounds train without scoring, so they carry
no personal accuracy and no evaluation traffic. Split devices score through the server's tail,
whole-model devices on their own: both skip when told (tiny model, real in-process federation)."""

from __future__ import annotations

import json

import pytest

from flexsfl.cli.main import main
from tests.sim.user_csv import simulate_args, ten_class_csv


@pytest.mark.parametrize("strategy", ["flexpsfl", "fedavg"])
def test_devices_score_only_the_rounds_the_server_asks(strategy, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    csv = ten_class_csv(tmp_path / "ten.csv")
    args = simulate_args(tmp_path, tiny_model_dirs["llama"], csv, "--strategy", strategy, "--score-every", "2")
    args[args.index("--rounds") + 1] = "3"
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["personal_acc"] is not None for r in rows] == [False, True, True]  # the 2nd round and the last
    for r in rows:
        scored = r["round"] > 0
        for c in r["clients"].values():
            assert ("personal_acc" in c) == scored
            assert (c.get("eval_bytes_sent", 0) > 0) == (scored and strategy == "flexpsfl")  # split: via the tail
    assert rows[0]["eval_bytes"] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["personal_acc"] is not None and summary["config"]["score_every"] == 2
