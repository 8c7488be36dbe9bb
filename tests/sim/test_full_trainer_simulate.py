"""``flexsfl simulate --strategy fedrep`` and ``--strategy ditto`` end to end on the tiny Llama
(real server, clients over loopback websockets, few steps): every round reports finite metrics,
each named for the model it measures, and the device reports its own steps (Ditto: 2τ)."""

from __future__ import annotations

import json
import math

import pytest

from flexsfl.cli.main import main


def _csv(path, n=64):
    words = ["good", "great", "fine", "bad", "dull", "poor"]
    path.write_text("text,label\n" + "".join(f"item {i} is {words[i % 6]},{int(i % 6 < 3)}\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedrep-ditto")
    return root, _csv(root / "two.csv")


@pytest.mark.parametrize("strategy,steps", [("fedrep", 3), ("ditto", 6)])
def test_simulate_runs_the_baseline_end_to_end(strategy, steps, data, tiny_model_dirs, monkeypatch, capsys):
    root, csv = data
    monkeypatch.setenv("FLEXSFL_CACHE", str(root / "cache"))  # the bundle is exported once for both runs
    out = root / strategy
    assert main(["simulate", "--strategy", strategy, "--model", str(tiny_model_dirs["llama"]), "--data", str(csv),
                 "--partition", "iid", "--clients", "2", "--rounds", "2", "--local-steps", "3", "--batch-size", "4",
                 "--fedrep-head-steps", "1", "--ditto-mu", "0.5", "--splits", "1", "--max-train", "24", "--max-test",
                 "12", "--max-seq", "16", "--in-process", "--out", str(out)]) == 0
    assert "global acc" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["strategy"] == strategy
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("global_acc", "personal_acc", "global_own_acc", "label_prior_acc"):
            assert r[key] is not None and math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (key, r)
        for c in r["clients"].values():
            assert c["steps"] == steps and math.isfinite(c["loss"]) and c["eval_examples"] > 0
    named = summary["accuracy_of"]
    if strategy == "ditto":
        assert rows[-1]["generalization_acc"] is None and named["generalization_acc"].startswith("not measured")
        assert "v_k" in named["personal_acc"]
    else:
        assert 0.0 <= rows[-1]["generalization_acc"] <= 1.0 and named["personal_acc"].startswith("personal head")
