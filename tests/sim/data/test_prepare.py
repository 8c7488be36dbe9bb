"""flexsfl.sim.data.prepare: the per-client files, the summary, no clobbering."""

from __future__ import annotations

import json
import os

import pytest

from flexsfl.edge_runtime.data import read_examples
from flexsfl.core.errors import DataError
from flexsfl.sim import data as ds


def test_prepare_writes_clients_union_test_and_summary(vader, tmp_path):
    out = tmp_path / "prep"
    part = ds.prepare(vader, "dirichlet", 3, out, seed=5, alpha=0.3, max_train=100, max_test=40)
    summary = json.loads((out / "partition.json").read_text())
    assert summary["format"] == 1 and summary["dataset"] == "vader" and summary["alpha"] == 0.3
    assert summary["files"]["union_test"] == "test.jsonl"
    for c in part.clients:
        files = summary["files"][f"client_{c.client}"]
        assert read_examples(out / files["train"]) == list(c.train)
        assert read_examples(out / files["test"]) == list(c.test)
        row = summary["per_client"][c.client]
        assert (row["train"], row["test"]) == (len(c.train), len(c.test))
    assert read_examples(out / "test.jsonl") == list(part.test)
    assert summary["load_notes"] == {"dropped_neutral": 383, "html_unescaped": 236}
    assert sorted(os.listdir(tmp_path)) == ["prep"]  # no staging directory left

    # byte-identical on a rerun with the same seed
    again = tmp_path / "again"
    ds.prepare(vader, "dirichlet", 3, again, seed=5, alpha=0.3, max_train=100, max_test=40)
    for f in ["partition.json", "test.jsonl", "client_2/train.jsonl"]:
        assert (out / f).read_bytes() == (again / f).read_bytes()


def test_prepare_refuses_to_clobber(vader, tmp_path):
    out = tmp_path / "prep"
    ds.prepare(vader, "iid", 2, out, max_train=10, max_test=5)
    with pytest.raises(DataError, match="already exists; choose another --out or pass --overwrite"):
        ds.prepare(vader, "iid", 2, out)
    ds.prepare(vader, "iid", 3, out, max_train=10, max_test=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_0", "client_1", "client_2", "partition.json", "test.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared data directory"):
        ds.prepare(vader, "iid", 2, mine, overwrite=True)
    assert (mine / "precious.txt").read_text() == "keep me"

