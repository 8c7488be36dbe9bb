"""core.atomic on real files: a failed write keeps the old file and leaves no temporary file,
permission bits, and the order of a file and its sidecar."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from flexsfl.core.atomic import atomic_path, atomic_write_bytes, atomic_write_many, atomic_write_text


def _mode(p: pathlib.Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old\n")
    atomic_write_bytes(target, b"new\x00bytes")
    assert target.read_bytes() == b"new\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("fail_at", ["before", "half"])
def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path, fail_at):
    target = tmp_path / "global.safetensors"
    target.write_bytes(b"the old contents")
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            assert tmp.parent == tmp_path and tmp.name.startswith(".global.safetensors.") and tmp.exists()
            if fail_at == "half":
                tmp.write_bytes(b"the new con")  # half written
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"the old contents"
    assert not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global.safetensors"]


def test_an_interrupted_writer_is_cleaned_up_too(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_new_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "manifest.json") == 0o644  # what open(path, "w") gives: readable by a service user
    assert _mode(tmp_path / "private.json") == 0o600


def test_mode_sets_exact_bits_from_the_first_byte(tmp_path):
    target = tmp_path / "clients.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    modes = []
    with atomic_path(target, mode=0o600) as tmp:
        modes.append(_mode(tmp))  # before any content is written
        tmp.write_text("token hashes")
    assert modes == [0o600]
    assert _mode(target) == 0o600 and target.read_text() == "token hashes"
    atomic_write_bytes(target, b"x", mode=0o640)
    assert _mode(target) == 0o640


def test_many_writes_in_order_and_a_failure_stops_before_the_sidecar(tmp_path):
    data, sidecar = tmp_path / "personal.safetensors", tmp_path / "personal.json"
    order = []

    def writer(name: str, content: str):
        def write(tmp: pathlib.Path) -> None:
            order.append((name, data.exists() and data.read_text(), sidecar.exists()))
            tmp.write_text(content)

        return write

    atomic_write_many({data: writer("data", "v1"), sidecar: writer("sidecar", "describes v1")})
    # the sidecar was written after the data was in place
    assert order == [("data", False, False), ("sidecar", "v1", False)]
    assert (data.read_text(), sidecar.read_text()) == ("v1", "describes v1")

    def broken(tmp: pathlib.Path) -> None:
        raise OSError("no space left on device")

    calls = []
    with pytest.raises(OSError, match="no space left"):
        atomic_write_many({data: broken, sidecar: lambda tmp: calls.append(tmp)})
    assert calls == []  # the sidecar is never written for data that did not land
    assert (data.read_text(), sidecar.read_text()) == ("v1", "describes v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["personal.json", "personal.safetensors"]


def test_a_writer_may_replace_the_temporary_file(tmp_path):
    """Libraries such as safetensors and tarfile truncate or recreate the path they are given."""
    target = tmp_path / "bundle.tar"
    with atomic_path(target) as tmp:
        tmp.unlink()
        tmp.write_bytes(b"recreated")
    assert target.read_bytes() == b"recreated" and [p.name for p in tmp_path.iterdir()] == ["bundle.tar"]


def test_the_directory_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x.json", "{}")
