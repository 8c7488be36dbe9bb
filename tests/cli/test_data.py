"""``flexsfl data info|prepare`` (:mod:`flexsfl.cli.data`): tables, a user's CSV, one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest

from flexsfl.core.errors import DataError
from flexsfl.cli.data import add_parser


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flexsfl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_info_vader(capsys):
    assert _cli(["data", "info", "--dataset", "vader"]) == 0
    out = capsys.readouterr().out
    assert "vader: 23,320 examples, 2 labels (negative, positive), 4 groups" in out
    assert "tweets" in out and "4,196" in out and "2,897" in out
    assert "total" in out and "10,849" in out and "12,471" in out


def test_cli_info_rotten_limits_groups(capsys):
    assert _cli(["data", "info", "--dataset", "rotten", "--groups", "3"]) == 0
    out = capsys.readouterr().out
    assert "508 groups" in out and "... 505 more groups (2-35 examples each)" in out


def test_cli_prepare_user_csv_with_groups_and_string_labels(tmp_path, capsys):
    src = tmp_path / "reviews.csv"
    rows = [f'"review {i}, {"good" if i % 3 else "bad"}",{"pos" if i % 3 else "neg"},user{i % 3}' for i in range(60)]
    src.write_text("text,label,group\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--dataset", str(src), "--label-names", "neg,pos", "--partition", "natural",
            "--clients", "3", "--out", str(out), "--seed", "1"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "reviews: natural partition into 3 clients, seed 1" in printed
    summary = json.loads((out / "partition.json").read_text())
    assert summary["label_names"] == ["neg", "pos"]
    assert sorted(g for c in summary["per_client"] for g in c["groups"]) == ["user0", "user1", "user2"]
    user0 = next(c for c in summary["per_client"] if c["groups"] == ["user0"])
    assert user0["label_balance"] == [1.0, 0.0]  # i % 3 == 0 rows are all "bad"


def test_cli_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file, and not a packaged data set"):
        _cli(["data", "info", "--dataset", str(tmp_path / "nope.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,1\nbroken,x\n")
    with pytest.raises(DataError, match="bad.csv:3: label 'x' is not an integer"):
        _cli(["data", "prepare", "--dataset", str(bad), "--partition", "iid", "--clients", "2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

