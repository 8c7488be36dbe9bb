"""Server persistence (SQLite + safetensors + JSONL) and the client registry."""

import json
import os
import stat

import numpy as np
import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.server_backend.clients import ClientRegistry, add_client, hash_token
from flexsfl.server_backend.state import ServerState

LAYOUT = {"model": "minilm", "revision": "sha256:abc", "strategy": "flexpsfl"}


def test_state_round_trip_and_resume(tmp_path):
    st = ServerState(tmp_path, LAYOUT)
    assert st.load_global() is None
    tensors = {"a.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    st.start_round(0, ["c0", "c1"])
    st.save_global(0, tensors)
    st.save_personal("c0", 0, {"a.lora_A.weight": tensors["a.lora_A.weight"] * 2})
    st.client_seen("c0", 2, "ort", {"memory_mb": 512})
    st.client_trained("c0", 40)
    st.finish_round(0, {"clients": ["c0"], "seconds": 1.5})
    st.log("step", client="c0", loss=np.float32(0.5))
    st.close()

    again = ServerState(tmp_path, LAYOUT)  # a restarted server
    last, got = again.load_global()
    assert last == 0 and set(got) == set(tensors)
    np.testing.assert_array_equal(got["a.lora_A.weight"], tensors["a.lora_A.weight"])
    np.testing.assert_array_equal(again.load_personal("c0")["a.lora_A.weight"], tensors["a.lora_A.weight"] * 2)
    assert again.load_personal("nobody") is None
    rounds = again.rounds()
    assert rounds[0]["clients"] == ["c0", "c1"] and rounds[0]["summary"]["seconds"] == 1.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "step" and rows[-1]["loss"] == 0.5
    again.close()


def test_state_dir_of_another_model_is_refused(tmp_path):
    ServerState(tmp_path, LAYOUT).close()
    with pytest.raises(ConfigError, match="belongs to another model.*revision"):
        ServerState(tmp_path, {**LAYOUT, "revision": "sha256:def"})


def test_damaged_global_state_is_a_clear_error(tmp_path):
    st = ServerState(tmp_path, LAYOUT)
    st.save_global(3, {"x": np.zeros(3, np.float32)})
    (tmp_path / "global.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="global.safetensors: unreadable"):
        st.load_global()
    st.close()


def test_clients_registry_tokens(tmp_path):
    path = tmp_path / "clients.json"
    tok = add_client(path, "pi-kitchen")
    assert len(tok) >= 40
    data = json.loads(path.read_text())
    assert data["clients"]["pi-kitchen"]["token_sha256"] == hash_token(tok)
    assert tok not in path.read_text()  # only the hash is stored
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reg = ClientRegistry.load(path)
    assert reg.authenticate("pi-kitchen", tok)
    assert not reg.authenticate("pi-kitchen", tok + "x")
    assert not reg.authenticate("nobody", tok)
    with pytest.raises(ConfigError, match="already exists"):
        add_client(path, "pi-kitchen")
    new = add_client(path, "pi-kitchen", rotate=True)
    assert ClientRegistry.load(path).authenticate("pi-kitchen", new) and not ClientRegistry.load(path).authenticate("pi-kitchen", tok)
    with pytest.raises(ConfigError, match="client id 'bad id!' is invalid"):
        add_client(path, "bad id!")
