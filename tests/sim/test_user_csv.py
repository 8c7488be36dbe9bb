"""A user's 10-class CSV without a ``group`` column through ``flexsfl simulate`` end to end (tiny
model, few steps): the class count is inferred, the final table prints, traffic and device time
are accounted; with too small a ``--num-labels`` it stops in one line before any export."""

from __future__ import annotations

import json

import pytest

from flexsfl.cli.main import main
from tests.sim.user_csv import simulate_args, ten_class_csv


def test_ten_class_csv_without_groups_end_to_end(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    csv = ten_class_csv(tmp_path / "ten.csv")
    assert main(simulate_args(tmp_path, tiny_model_dirs["llama"], csv)) == 0
    out = capsys.readouterr().out
    assert "c0" in out and "c1" in out and "device time" in out  # the final table (no IndexError without groups)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["num_labels"] == 10 and summary["config"]["align_lambda"] == 0.1
    assert [c["groups"] for c in summary["per_client"]] == [[], []]
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["personal_acc"] <= 1.0 and 0.0 <= r["global_acc"] <= 1.0
        for c in r["clients"].values():
            assert c["eval_bytes_sent"] > 0 and c["eval_bytes_received"] > 0  # scored on the server, counted apart
            assert c["align_ratio"] == pytest.approx(0.1, abs=0.1 / 2 + 1e-9) and c["align_gap"] >= 0
    # training bytes exclude evaluation, and both are cumulative
    c0 = [r["clients"]["c0"] for r in rows]
    evals = sum(c["eval_bytes_sent"] + c["eval_bytes_received"] for c in c0)
    assert c0[-1]["train_bytes"] == c0[-1]["bytes_sent"] + c0[-1]["bytes_received"] - evals
    assert rows[-1]["eval_bytes"] > rows[0]["eval_bytes"] > 0 and rows[-1]["bytes"] > rows[0]["bytes"] > 0
    # the device clock: the Pi 4 is the straggler; device time grows by one slowest client per round
    assert all(r["straggler"] == "c0" for r in rows)
    assert rows[1]["device_s"] == pytest.approx(rows[0]["device_round_s"] + rows[1]["device_round_s"], abs=2e-3)
    assert summary["accuracy_of"]["personal_acc"].startswith("personal")
    assert 0.0 <= summary["final"]["label_prior_acc"] <= 1.0 and "global+prior acc" in out  # the floor, reported


def test_labels_outside_num_labels_are_refused_before_any_export(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    csv = ten_class_csv(tmp_path / "ten.csv")
    rc = main(simulate_args(tmp_path, tiny_model_dirs["llama"], csv, "--num-labels", "5"))
    err = capsys.readouterr().err
    assert rc != 0 and "label 5 is out of range; labels must be 0..4" in err, err
    assert not (tmp_path / "cache" / "bundles").exists()
