"""The client registry follows its file: rotation and revocation without a restart."""

import json
import logging

from flexsfl.server_backend.clients import ClientRegistry, add_client, hash_token


def test_rotation_and_revocation_take_effect_at_the_next_lookup(tmp_path):
    path = tmp_path / "clients.json"
    old = add_client(path, "alice")
    reg = ClientRegistry.load(path)
    assert reg.authenticate("alice", old) and reg.still_valid("alice", hash_token(old))
    new = add_client(path, "alice", rotate=True)
    assert reg.authenticate("alice", new) and not reg.authenticate("alice", old)
    assert not reg.still_valid("alice", hash_token(old)) and reg.still_valid("alice", hash_token(new))
    data = json.loads(path.read_text())
    del data["clients"]["alice"]
    path.write_text(json.dumps(data))
    assert not reg.authenticate("alice", new) and not reg.still_valid("alice", hash_token(new))


def test_a_broken_file_keeps_the_last_good_registry(tmp_path, caplog):
    path = tmp_path / "clients.json"
    tok = add_client(path, "bob")
    reg = ClientRegistry.load(path)
    path.write_text("{half")
    with caplog.at_level(logging.ERROR, "flexsfl.server"):
        assert reg.authenticate("bob", tok)
    assert "keeping the 1 clients read before" in caplog.text
    reg.reload()  # SIGHUP: re-read even when unchanged
    assert reg.authenticate("bob", tok)
