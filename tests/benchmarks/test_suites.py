"""``bench accuracy --suite`` end to end on a tiny model: two strategies × two seeds, one export
per split and seed shared by the strategies, the seeds re-partition the data, a second call reuses
the finished runs, ``--report-only`` runs nothing, and the table, JSON and PNG hold the intervals
and paired differences.

The tiny model has no weights (its frozen body comes from the seed), so every seed exports its own
bundles here (``bundle_seed=None``); the suites' MiniLM has pretrained weights and shares one
export across seeds (``bundle_seed=0``): a bundle of another body is refused by the server's
layout hash, which the real runs would have hit at once."""

from __future__ import annotations

import argparse
import json

import pytest

from flexsfl.benchmarks import accuracy
from flexsfl.benchmarks.suites import SUITES, left_out_why, suite_runs
from flexsfl.core.errors import ConfigError


def _csv(path, n=240):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    lines = ["text,label"] + [f"item {i} is about {words[i % 6]} {words[(i * 5) % 6]},{i % 6}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(tmp_path, strategies="flexpsfl,splitfed", seeds=2, *extra):
    p = argparse.ArgumentParser()
    accuracy.add_arguments(p)
    return p.parse_args(["--suite", "supersense-a0.5", "--seeds", str(seeds), "--strategies", strategies,
                         "--rounds", "2", "--local-steps", "2", "--out", str(tmp_path / "suite"), *extra])


@pytest.mark.slow
def test_suite_two_seeds_end_to_end(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    tiny = dict(model=str(tiny_model_dirs["llama"]), data=str(_csv(tmp_path / "six.csv")), clients=2,
                profiles=("rpi4", "rpi5"), batch_size=4, max_seq=16, max_train=40, max_test=20, min_examples=30,
                in_process=True, bundle_cache=str(tmp_path / "bundles"), bundle_seed=None)
    rows, md = accuracy.run_accuracy(_args(tmp_path), **tiny)
    assert [(r["run"], r["seed"]) for r in rows] == [("flexpsfl", 0), ("flexpsfl", 1), ("splitfed", 0), ("splitfed", 1)]
    out = tmp_path / "suite"
    parts = [json.loads((out / "flexpsfl" / f"seed{s}" / "data" / "partition.json").read_text()) for s in (0, 1)]
    assert parts[0]["per_client"] != parts[1]["per_client"]  # each seed re-partitions
    same = json.loads((out / "splitfed" / "seed1" / "data" / "partition.json").read_text())
    assert same["per_client"] == parts[1]["per_client"]  # the same seed, the same partition, for every strategy
    # one export per split point and seed, shared by both strategies
    splits = {int(s) for r in rows for s in r["splits"].split(",")}
    bundles = [p for p in (tmp_path / "bundles").iterdir() if p.is_dir()]  # beside each: its export's lock file
    assert len(bundles) == 2 * len(splits)
    for r in rows:
        assert r["device_s"] > 0 and r["mb"] > 0 and r["eval_mb"] > 0 and 0 <= r["label_prior_acc"] <= 1
    saved = json.loads((out / "suite.json").read_text())
    assert saved["reference"] == "flexpsfl" and len(saved["rows"]) == 4
    d = saved["paired"]["splitfed"]["personal_acc"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(
        sum(a["personal_acc"] - b["personal_acc"] for a, b in zip(rows[:2], rows[2:])) / 2)
    assert "| flexpsfl |" in md and "Paired differences, flexpsfl − run" in md and md == (out / "suite.md").read_text()
    assert (out / "supersense-a0.5.png").stat().st_size > 10_000
    assert "2 rounds × τ = 2" in md  # the --rounds the runs had, not the suite's default
    capsys.readouterr()
    again, _ = accuracy.run_accuracy(_args(tmp_path), **tiny)  # finished runs are reused, not run again
    assert capsys.readouterr().out.count("(reused)") == 4 and again == rows
    # --report-only runs nothing: the unfinished runs are named and left out
    report, _ = accuracy.run_accuracy(_args(tmp_path, "flexpsfl,splitfed,local", 2, "--report-only"), **tiny)
    assert report == rows and not (out / "local").exists()
    assert "not finished, left out of the report: local seed 0, local seed 1" in capsys.readouterr().out


def test_unknown_or_unregistered_runs_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown nope"):
        suite_runs("flexpsfl,nope")
    names, missing = suite_runs(None)
    assert names[0] == "flexpsfl" and {"flexpsfl-l0", "flexpsfl-l1", "splitfed", "fedavg", "local"} <= set(names)
    assert not set(names) & set(missing)
    for suite in SUITES.values():  # ≥ 200 test examples per client, a device profile per client
        assert suite.config.max_test >= 200
        assert len(suite.config.profiles) == suite.config.clients


def test_the_lm_suite_runs_what_means_the_same_for_a_causal_lm():
    lm = SUITES["lm"]
    assert lm.lower_is_better and lm.config.model == "smollm2" and lm.config.partition == "natural"
    assert lm.config.bundle_seed == 0 and lm.config.in_process
    names, left = suite_runs(None, lm)
    assert names == ["flexpsfl", "flexpsfl-u", "splitfed", "fedavg", "local"] and set(left) == {"fedper", "fedrep", "ditto"}
    assert lm.run_config["flexpsfl-u"]["tops"] == (1,)  # a U top that has something to train (pinned splits: 0 else)
    assert all(why for why in left_out_why(lm, left).values())
    names, left = suite_runs("flexpsfl,ditto", lm)  # asked for, still left out, with its reason
    assert names == ["flexpsfl"] and left == ["ditto"] and "v_k" in left_out_why(lm, left)["ditto"]
    assert suite_runs(None, SUITES["domains"]) == suite_runs(None)  # the classification suites: unchanged
    assert "flexpsfl-k4" not in suite_runs(None)[0] and suite_runs("flexpsfl-k4", lm) == (["flexpsfl-k4"], [])  # on request
