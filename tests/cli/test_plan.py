"""``flexsfl plan``: the table, a profile file, a pin, JSON, a bad profile."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import write_profile
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.cli.plan import add_parser


def _plan(argv):
    parser = argparse.ArgumentParser(prog="flexsfl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_cli_help_renders(capsys):
    with pytest.raises(SystemExit) as e:
        _plan(["--help"])
    assert e.value.code == 0 and "--server-gflops" in capsys.readouterr().out


def test_plan_prints_a_table_and_the_choice(capsys):
    assert _plan(["--model", "minilm", "--profile", "rpi5"]) == 0
    out = capsys.readouterr().out
    budget = EXAMPLE_PROFILES["rpi5"].memory_budget_mb
    assert re.search(rf"^split 3: fastest of the splits that fit {budget} MB", out, re.M)
    assert re.search(r"3 .*yes.*chosen", out) and re.search(r"4 .*no", out)


def test_plan_reads_a_profile_file_pins_and_prints_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    write_profile(dataclasses.replace(EXAMPLE_PROFILES["jetson-orin"], name="my-jetson"), path)
    assert _plan(["--model", "minilm", "--profile", str(path), "--pin", "2", "--json", "--encoding", "fp16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["split"], out["pinned"], out["profile"]["name"]) == (2, True, "my-jetson")
    assert [e["split"] for e in out["estimates"]] == [1, 2, 3, 4, 5]


def test_plan_refuses_a_bad_profile_naming_the_field(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**EXAMPLE_PROFILES["rpi4"].to_json(), "head_gflops": "fast"}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: field 'head_gflops' must be a number > 0"):
        _plan(["--model", "minilm", "--profile", str(path)])



def test_plan_topology_u_prints_the_pair_and_why(capsys):
    assert _plan(["--model", "minilm", "--profile", "rpi5", "--topology", "u"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    budget = EXAMPLE_PROFILES["rpi5"].memory_budget_mb
    assert "U-shaped" in out and f"split 2, top 1: fastest of the (split, top) pairs that fit {budget} MB" in out
    assert "head/tail would take split 3" in out and "keeps the labels on the device" in out


def test_plan_pins_split_and_top_as_json(capsys):
    assert _plan(["--model", "minilm", "--profile", "jetson-orin", "--split", "2", "--top", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["topology"], got["split"], got["top"], got["pinned"]) == ("u", 2, 2, ["split", "top"])
    assert len(got["estimates"]) == 15 and got["head_tail"]["split"] == 5
    with pytest.raises(ConfigError, match="top 5 does not fit split 1 .* choose 0..4"):
        _plan(["--model", "minilm", "--profile", "rpi5", "--top", "5"])


def test_plan_says_the_largest_head_that_fits_1_2_and_4_gb(capsys):
    from flexsfl.core.cost import ModelCost
    from flexsfl.core.memory import memory_mb
    from flexsfl.core.model_config import read_model_config

    assert _plan(["--model", "smollm2", "--profile", "jetson-orin", "--json"]) == 0
    fits = json.loads(capsys.readouterr().out)["largest_split_by_gb"]
    cost = ModelCost.from_config(read_model_config("smollm2"))
    for gb, s in fits.items():
        assert memory_mb(cost, s, batch=8, seq=128) <= 1000 * int(gb)
        assert s + 1 == cost.num_blocks or memory_mb(cost, s + 1, batch=8, seq=128) > 1000 * int(gb)
    assert fits["1"] < fits["2"] <= fits["4"]
    assert _plan(["--model", "smollm2", "--profile", "jetson-orin"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"largest head that trains in 1 / 2 / 4 GB (ort, batch 8, seq 128): split {fits['1']} / split {fits['2']}" in out


def test_plan_trades_accuracy_against_step_time_from_earlier_runs(tmp_path, capsys):
    from tests.core.test_planner_accuracy import write_summary

    write_summary(tmp_path / "runs" / "s1", [(1, None, 0.80), (1, None, 0.80)])
    write_summary(tmp_path / "runs" / "s3", [(3, None, 0.85), (3, None, 0.85)])
    base = ["--model", "minilm", "--profile", "rpi4", "--batch", "8", "--seq", "48", "--calibrate-from", str(tmp_path / "runs")]
    assert _plan([*base, "--save-calibration", str(tmp_path / "cal.json")]) == 0  # W = 0: the fastest, split 1
    out = " ".join(capsys.readouterr().out.split())
    assert "split 1 by accuracy and time: accuracy weight 0: the planner's choice" in out and "0.850" in out
    assert _plan([*base[:-1], str(tmp_path / "cal.json"), "--accuracy-weight", "1000"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "utility = 1000 x accuracy" in out and "split 3 by accuracy and time: largest utility" in out
    assert _plan([*base, "--accuracy-weight", "1000", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["split"] == 1 and (got["trade_off"]["split"], got["trade_off"]["changed"]) == (3, True)
    with pytest.raises(ConfigError, match="^--accuracy-weight and --save-calibration need --calibrate-from"):
        _plan(["--model", "minilm", "--profile", "rpi4", "--accuracy-weight", "2"])
    with pytest.raises(ConfigError, match="calibrated on model 'minilm', planning for 'smollm2'"):
        _plan(["--model", "smollm2", "--profile", "rpi4", "--calibrate-from", str(tmp_path / "runs")])
