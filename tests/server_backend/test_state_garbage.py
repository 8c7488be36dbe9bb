"""A state dir with garbage in it is refused at resume with one line, and never overwritten."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from flexsfl.core.errors import ConfigError
from flexsfl.server_backend.state import ServerState

LAYOUT = {"model": "minilm", "strategy": "flexpsfl"}
SPECS = {"a": (2, 3), "b": (4,)}
GOOD = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def _refused(tmp_path, match: str, *, specs=SPECS) -> None:
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=match) as e:
        st = ServerState(tmp_path, LAYOUT)
        try:
            st.load_global(specs)
        finally:
            st.close()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(tmp_path) in msg and ("backup" in msg or "--state-dir" in msg)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("tensors, meta, match", [
    ({}, {"round_id": "3"}, "global.safetensors: holds no tensors"),
    ({"a": GOOD["a"]}, {"round_id": "3"}, "tensor 'b' is missing"),
    ({**GOOD, "b": np.full(4, np.nan, np.float32)}, {"round_id": "3"}, "tensor 'b' has non-finite values"),
    ({**GOOD, "a": np.full((2, 3), np.inf, np.float32)}, {"round_id": "3"}, "tensor 'a' has non-finite values"),
    ({**GOOD, "a": np.ones((3, 2), np.float32)}, {"round_id": "3"}, r"tensor 'a' has shape \(3, 2\)"),
    (GOOD, {"round_id": "-1"}, "round_id '-1' is not an integer"),
    (GOOD, {"round_id": "three"}, "round_id 'three' is not an integer"),
    (GOOD, {}, "round_id '' is not an integer"),
])
def test_garbage_global_state_is_refused(tmp_path, tensors, meta, match):
    ServerState(tmp_path, LAYOUT).close()
    save_file(tensors, str(tmp_path / "global.safetensors"), metadata=meta)
    _refused(tmp_path, match)


def test_good_state_resumes(tmp_path):
    st = ServerState(tmp_path, LAYOUT)
    st.save_global(7, GOOD)
    assert st.load_global(SPECS)[0] == 7
    st.close()


@pytest.mark.parametrize("content, match", [
    (b"this is not a database" * 100, "state.sqlite: not a readable SQLite database"),
    (b"SQLite format 3\x00" + b"\xff" * 4000, "state.sqlite: "),
])
def test_corrupt_sqlite_is_refused(tmp_path, content, match):
    ServerState(tmp_path, LAYOUT).close()
    (tmp_path / "state.sqlite").write_bytes(content)
    _refused(tmp_path, match)


def test_foreign_sqlite_is_refused(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.execute("CREATE TABLE rounds (x TEXT)")
    db.commit()
    db.close()
    _refused(tmp_path, "table 'rounds' is not a flexsfl one")


def test_unreadable_meta_is_refused(tmp_path):
    ServerState(tmp_path, LAYOUT).close()
    (tmp_path / "meta.json").write_text('{"model": ')
    _refused(tmp_path, "meta.json: unreadable")


def test_metrics_log_rotates_and_keeps_its_own_fields(tmp_path):
    st = ServerState(tmp_path, LAYOUT, metrics_max_bytes=4096)
    for i in range(200):
        st.log("refused", client="x", message="m" * 50, i=i)
    st.close()
    cur, old = tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.1"
    assert cur.stat().st_size <= 4096 and old.stat().st_size <= 4096
    rows = [json.loads(line) for line in cur.read_text().splitlines()]
    assert rows[-1]["i"] == 199 and all(r["event"] == "refused" for r in rows)
    with pytest.raises(TypeError, match="'t' and 'event'"):
        ServerState(tmp_path, LAYOUT).log("x", t=0)
