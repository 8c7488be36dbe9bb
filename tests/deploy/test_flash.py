"""`flexsfl flash` against a real OpenSSH server on loopback (the ``sshd`` fixture in conftest.py).

The "device" is this machine seen through sshd as a throwaway user, so the tests read the device
directory straight from that user's home to check what the flash left there. Nothing is mocked:
bundles are real files with real sha256s, uploads go through ssh, interruptions kill real
processes. Most tests flash small hand-made bundles (real files and manifests) without the
runtime; one module fixture exports a real bundle from a tiny GPT-2, installs the runtime venv
with pip on the "device" and the tests that use it run the head and ``flexsfl edge run`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from flexsfl.core.bundle import MANIFEST_NAME, load_bundle
from flexsfl.core.errors import ConfigError, FlashError
from flexsfl.core.targets import TARGETS, TargetProfile
from flexsfl.export.bundle_writer import tar_bundle
from flexsfl.cli.flash import add_parser
from flexsfl.deploy.flash import ClientSettings, flash, rollback
from flexsfl.deploy.service import render_unit
from flexsfl.deploy.ssh import Remote
from flexsfl.deploy.upload import Progress

from .conftest import SSHServer, bundle_files, descendants, free_port, write_bundle

REPO = pathlib.Path(__file__).resolve().parents[2]


def remote(sshd: SSHServer, directory: str, *, key: pathlib.Path | None = None, port: int | None = None) -> Remote:
    return Remote.parse(sshd.destination(directory), port=port or sshd.port, identity=str(key or sshd.key),
                        ssh_options=sshd.options)


@pytest.fixture
def device(sshd, request):
    """A fresh device directory name (under the ssh user's home) and its path as seen from here."""
    name = "flexsfl-" + re.sub(r"[^A-Za-z0-9]", "", request.node.name)[:24] + "-" + secrets.token_hex(3)
    path = sshd.home / name
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def current(path: pathlib.Path, link: str = "current") -> str | None:
    p = path / link
    return os.readlink(p).removeprefix("bundles/") if p.is_symlink() else None


def settings(sshd: SSHServer, tmp_path: pathlib.Path, device_path: pathlib.Path, data: str = "data.csv",
             server: str = "ws://127.0.0.1:8765") -> ClientSettings:
    """Complete client settings; the data file is put on the device, owned by the ssh user."""
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    device_path.mkdir(exist_ok=True)
    (device_path / data).write_text("text,label\na fine day,1\na dull film,0\n")
    for p in (device_path, device_path / data):
        os.chown(p, sshd.uid, -1)
    return ClientSettings(server=server, client_id="pi-7", token_file=str(token), data=data)


# -- settings (no ssh) ------------------------------------------------------------------------------



def test_client_settings_refuse_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="ws://"):
        ClientSettings(server="http://x")
    with pytest.raises(ConfigError, match="--backend"):
        ClientSettings(backend="tflite")
    for bad in ("x;y", "a b", "-lead", "x" * 129, "$(id)"):
        with pytest.raises(ConfigError, match="--client-id"):  # the wire's rule: Hello would refuse it
            ClientSettings(client_id=bad)
    assert ClientSettings(client_id="pi-7.kitchen_2").client_id == "pi-7.kitchen_2"
    empty = tmp_path / "t"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="one line"):
        ClientSettings(token_file=str(empty)).read_token()
    with pytest.raises(ConfigError, match="cannot read"):
        ClientSettings(token_file=str(tmp_path / "missing")).read_token()



# -- flashing over ssh -----------------------------------------------------------------------------


def test_first_flash_installs_bundle_config_token_and_unit(sshd, device, tmp_path):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(1))
    sha = load_bundle(bundle).manifest_sha256
    seen: list[Progress] = []
    report = flash(bundle, remote(sshd, name), settings=settings(sshd, tmp_path, path), install=False,
                   on_progress=seen.append)

    assert set(report.uploaded) == {*load_bundle(bundle).manifest.files, MANIFEST_NAME}
    assert report.verified == len(report.uploaded) and report.reused == ()
    assert seen[-1].done == seen[-1].total == report.upload_bytes
    # Layout: current -> bundles/<manifest sha>, no previous, no staging left over.
    assert os.readlink(path / "current") == f"bundles/{sha}"
    assert current(path, "previous") is None
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".staging")) == []
    assert load_bundle(path / "current").manifest_sha256 == sha  # the device copy passes our own reader
    # What `flexsfl edge run --config DIR/config.json` reads.
    d = str(path)
    assert json.loads((path / "config.json").read_text()) == {
        "server": "ws://127.0.0.1:8765", "client_id": "pi-7", "token_file": f"{d}/token",
        "bundle": f"{d}/current", "data": f"{d}/data.csv", "backend": "ort", "state_dir": f"{d}/state",
    }
    token = path / "token"
    assert token.read_text() == "s3cret-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.stat().st_uid == sshd.uid
    unit = sshd.home / ".config/systemd/user/flexsfl-edge.service"
    assert report.unit == str(unit)
    assert unit.read_text() == render_unit(d, user=sshd.user, system=False)
    if not report.device.systemd:
        assert "not started: systemd is not running" in report.service
        assert report.commands == (f"{d}/venv/bin/flexsfl edge run --config {d}/config.json",)
    assert "no runtime in" in " ".join(report.notes)


def test_reflash_of_the_same_bundle_copies_nothing(sshd, device, tmp_path):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(2))
    flash(bundle, remote(sshd, name), install=False)
    inode = (path / "current" / "ort/forward.onnx").stat().st_ino
    seen: list[Progress] = []
    again = flash(bundle, remote(sshd, name), install=False, on_progress=seen.append)
    assert again.uploaded == () and again.upload_bytes == 0 and seen == []
    assert again.verified == 5  # every file checked again, in place
    assert again.current == again.bundle and again.previous is None  # not "previous = itself"
    assert (path / "current" / "ort/forward.onnx").stat().st_ino == inode


def test_changed_bundle_sends_only_changed_files(sshd, device, tmp_path):
    name, path = device
    files = bundle_files(3)
    old = write_bundle(tmp_path / "old", files)
    new = write_bundle(tmp_path / "new", {**files, "adapter/adapter_model.safetensors": b"retrained" * 100})
    first = flash(old, remote(sshd, name), install=False)
    second = flash(new, remote(sshd, name), install=False)
    assert second.uploaded == ("adapter/adapter_model.safetensors", MANIFEST_NAME)
    assert set(second.reused) == {"ort/forward.onnx", "tokenizer/tokenizer.json", "adapter/adapter_config.json"}
    assert (second.current, second.previous) == (second.bundle, first.bundle)
    # Unchanged files are hard links to the previous bundle's, not copies.
    a, b = (path / "bundles" / sha / "ort/forward.onnx" for sha in (first.bundle, second.bundle))
    assert a.stat().st_ino == b.stat().st_ino
    assert load_bundle(path / "current").manifest_sha256 == second.bundle
    assert load_bundle(path / "previous").manifest_sha256 == first.bundle


def test_rollback_switches_back_and_forth(sshd, device, tmp_path):
    name, path = device
    with pytest.raises(FlashError, match="does not exist"):
        rollback(remote(sshd, name))
    one = flash(write_bundle(tmp_path / "1", bundle_files(4)), remote(sshd, name), install=False)
    with pytest.raises(FlashError, match="no previous bundle"):
        rollback(remote(sshd, name))
    two = flash(write_bundle(tmp_path / "2", bundle_files(5)), remote(sshd, name), install=False)
    back = rollback(remote(sshd, name))
    assert (back.current, back.previous) == (one.bundle, two.bundle)
    assert (current(path), current(path, "previous")) == (one.bundle, two.bundle)
    assert load_bundle(path / "current").manifest_sha256 == one.bundle
    forth = rollback(remote(sshd, name))
    assert (forth.current, forth.previous) == (two.bundle, one.bundle)
    # A third bundle prunes the oldest: the device keeps current and previous, and what it did not put there.
    (path / "bundles/notes").mkdir()
    three = flash(write_bundle(tmp_path / "3", bundle_files(6)), remote(sshd, name), install=False)
    assert sorted(p.name for p in (path / "bundles").iterdir()) == sorted([two.bundle, three.bundle, "notes"])


def test_tar_gz_bundle_flashes_like_its_directory(sshd, device, tmp_path):
    name, path = device
    root = write_bundle(tmp_path / "b", bundle_files(7))
    tarball = tar_bundle(root, tmp_path / "b.tar.gz")
    report = flash(tarball, remote(sshd, name), install=False)
    assert report.bundle == load_bundle(root).manifest_sha256 == current(path)


def test_connection_cut_mid_upload_keeps_previous_bundle_and_resumes(sshd, device, tmp_path):
    name, path = device
    files = bundle_files(8)
    old = flash(write_bundle(tmp_path / "old", files), remote(sshd, name), install=False)
    big = 24_000_000
    new_files = {**files, "ort/big.bin": os.urandom(big), "ort/forward.onnx": os.urandom(8_000_000)}
    new = write_bundle(tmp_path / "new", new_files)
    killed = []

    def cut(p: Progress) -> None:
        # ssh keeps at most its 2 MB channel window in flight, so once 6 MB of the next file are
        # read here, big.bin is complete on the device.
        if not killed and p.done >= big + 6_000_000:
            killed.extend(descendants(sshd.pid))
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):  # already gone with its parent
                    os.kill(pid, signal.SIGKILL)

    with pytest.raises(FlashError, match="lost during the bundle upload.*previous bundle is still active"):
        flash(new, remote(sshd, name), install=False, on_progress=cut)
    assert killed
    assert current(path) == old.bundle and load_bundle(path / "current").manifest_sha256 == old.bundle
    staged = path / f".staging-{load_bundle(new).manifest_sha256}"
    assert (staged / "ort/big.bin").stat().st_size == big

    resumed = flash(new, remote(sshd, name), install=False)
    assert resumed.uploaded == ("ort/forward.onnx", MANIFEST_NAME)
    assert "ort/big.bin" in resumed.reused
    assert load_bundle(path / "current").manifest_sha256 == resumed.bundle
    assert not staged.exists()


def _cli(*argv: str) -> list[str]:
    """argv running `flexsfl flash ...` through this module's add_parser/run in a fresh python."""
    code = (
        "import argparse, sys; from flexsfl.cli.flash import add_parser; p = argparse.ArgumentParser(prog='flexsfl'); "
        "add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    return [sys.executable, "-c", code, "flash", *argv]


def _ssh_args(sshd: SSHServer) -> list[str]:
    return ["--port", str(sshd.port), "--identity", str(sshd.key)] + [a for o in sshd.options for a in ("-o", o)]


def test_killed_flash_process_keeps_previous_bundle_and_leaves_no_connection(sshd, device, tmp_path):
    name, path = device
    files = bundle_files(9)
    old = flash(write_bundle(tmp_path / "old", files), remote(sshd, name), install=False)
    new = write_bundle(tmp_path / "new", {**files, "ort/big.bin": os.urandom(64_000_000)})
    part = path / f".staging-{load_bundle(new).manifest_sha256}" / "ort/big.bin.part"
    proc = subprocess.Popen(_cli(str(new), sshd.destination(name), "--skip-install", *_ssh_args(sshd)),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not part.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the upload never started"
        time.sleep(0.001)
    # Hold the device side still so the upload is surely mid-way, then kill the flash outright.
    helpers = [pid for pid in descendants(sshd.pid) if b"python3" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    for pid in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    # Its ssh processes see their stdin close and end the connection: nothing lingers.
    deadline = time.monotonic() + 15
    while sshd.sessions():
        assert time.monotonic() < deadline, "the killed flash left its ssh connection open"
        time.sleep(0.05)
    assert current(path) == old.bundle and load_bundle(path / "current").manifest_sha256 == old.bundle
    assert current(path, "previous") is None


def test_sha256_mismatch_after_upload_is_sent_again(sshd, device, tmp_path):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(10))
    tokenizer = bundle / "tokenizer/tokenizer.json"
    good = tokenizer.read_bytes()

    def tamper_once(p: Progress) -> None:
        # The bundle changes here while it is being sent, after it was verified: the device's
        # copy then differs from the manifest. Restored before the retry reads it.
        if p.label == "bundle" and p.path == "adapter/adapter_config.json":
            tokenizer.write_bytes(good.upper())
        if p.label == "bundle" and p.done == p.total:
            tokenizer.write_bytes(good)

    report = flash(bundle, remote(sshd, name), install=False, on_progress=tamper_once)
    assert report.retried == ("tokenizer/tokenizer.json",)
    assert load_bundle(path / "current").manifest_sha256 == report.bundle


def test_sha256_mismatch_twice_is_refused_and_previous_stays_active(sshd, device, tmp_path):
    name, path = device
    old = flash(write_bundle(tmp_path / "old", bundle_files(11)), remote(sshd, name), install=False)
    bundle = write_bundle(tmp_path / "b", bundle_files(12))
    sha = load_bundle(bundle).manifest_sha256
    artifact = bundle / "ort/forward.onnx"  # the one file sent after the first progress report
    size = artifact.stat().st_size

    def tamper(p: Progress) -> None:
        if p.path != "ort/forward.onnx":
            artifact.write_bytes(b"X" * size)

    with pytest.raises(FlashError, match=r"sha256 mismatch on the device for ort/forward.onnx after the "
                                         r"upload and one retry; the previous bundle is still active"):
        flash(bundle, remote(sshd, name), install=False, on_progress=tamper)
    assert current(path) == old.bundle and load_bundle(path / "current").manifest_sha256 == old.bundle
    staging = path / f".staging-{sha}"
    assert not (staging / "ort/forward.onnx").exists()  # the bad copy is not kept for a resume


def test_damaged_bundle_on_the_device_is_repaired_by_a_reflash(sshd, device, tmp_path):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(13))
    first = flash(bundle, remote(sshd, name), install=False)
    target = path / "current/ort/forward.onnx"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit on the SD card
    target.write_bytes(bytes(data))
    report = flash(bundle, remote(sshd, name), install=False)
    assert report.retried == ("ort/forward.onnx",)
    assert report.current == first.bundle
    assert load_bundle(path / "current").manifest_sha256 == first.bundle


@pytest.mark.parametrize(
    "target, python, fragment",
    [
        (TARGETS["rpi4"], "python3", "the device is x86_64 but the bundle is built for aarch64 (target rpi4)"),
        (TargetProfile("future", "x86_64", 2, 4096, "ort", min_python=(3, 99)), "python3", "the bundle needs >= 3.99"),
        (TargetProfile("huge", "x86_64", 2, 10**8, "ort"), "python3", "needs 100000000 MB"),
        (TARGETS["generic-x86_64"], "python3.99", "no python3.99 on the device"),
    ],
    ids=["arch", "python-version", "memory", "no-python"],
)
def test_device_that_cannot_run_the_bundle_is_refused_before_copying(sshd, device, tmp_path, target, python, fragment):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(14), target=target)
    with pytest.raises(FlashError, match=re.escape(fragment)):
        flash(bundle, remote(sshd, name), python=python, install=False)
    assert not path.exists()


def test_too_little_disk_is_refused_before_copying(sshd, device, tmp_path):
    name, path = device
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the device's disk needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=8m,uid={sshd.uid}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("this container may not mount a tmpfs")
    try:
        bundle = write_bundle(tmp_path / "b", bundle_files(15, big_mb=16))
        refused = r"MB free in .* but the flash needs about \d+ MB \(16\.\d MB of bundle files\)"
        with pytest.raises(FlashError, match=refused):
            flash(bundle, remote(sshd, name), install=False)
        assert list(path.iterdir()) == []
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_unreachable_host_is_one_line(sshd, tmp_path):
    bundle = write_bundle(tmp_path / "b", bundle_files(16))
    with pytest.raises(FlashError, match=r"cannot reach 127\.0\.0\.1 on port \d+ \(.*Connection refused\)") as e:
        flash(bundle, remote(sshd, "x", port=free_port()), install=False)
    assert "\n" not in str(e.value)


def test_refused_key_is_one_line(sshd, tmp_path):
    bundle = write_bundle(tmp_path / "b", bundle_files(17))
    with pytest.raises(FlashError, match=r"authentication refused by .*Permission denied.*ssh-copy-id") as e:
        flash(bundle, remote(sshd, "x", key=sshd.other_key), install=False)
    assert "\n" not in str(e.value)


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = Remote.parse(sshd.destination("x"), port=sshd.port, identity=str(sshd.key),
                     ssh_options=(f"UserKnownHostsFile={empty}", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes"))
    with pytest.raises(FlashError, match="host key of 127.0.0.1 is unknown or changed"):
        flash(write_bundle(tmp_path / "b", bundle_files(18)), r, install=False)


def test_incomplete_client_config_and_missing_data_are_refused_before_copying(sshd, device, tmp_path):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(19))
    with pytest.raises(ConfigError, match="needs --client-id, --token-file, --data too"):
        flash(bundle, remote(sshd, name), settings=ClientSettings(server="ws://h:1"), install=False)
    assert not path.exists()
    full = settings(sshd, tmp_path, path)
    with pytest.raises(FlashError, match=r"--data .*/nope.csv does not exist on the device; copy it there first"):
        flash(bundle, remote(sshd, name), settings=dataclasses.replace(full, data="nope.csv"), install=False)
    assert not (path / "bundles").exists()


def test_later_flash_keeps_the_devices_client_config(sshd, device, tmp_path):
    name, path = device
    first = settings(sshd, tmp_path, path)
    flash(write_bundle(tmp_path / "1", bundle_files(20)), remote(sshd, name), settings=first, install=False)
    before = json.loads((path / "config.json").read_text())
    later = ClientSettings(threads=2)
    flash(write_bundle(tmp_path / "2", bundle_files(21)), remote(sshd, name), settings=later, install=False)
    assert json.loads((path / "config.json").read_text()) == {**before, "threads": 2}


def test_dry_run_plans_and_changes_nothing(sshd, device, tmp_path, capsys):
    name, path = device
    bundle = write_bundle(tmp_path / "b", bundle_files(22))
    p = argparse.ArgumentParser(prog="flexsfl")
    add_parser(p.add_subparsers())
    args = p.parse_args(["flash", str(bundle), sshd.destination(name), "--dry-run", "--skip-install", *_ssh_args(sshd)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "upload   5 files, 2.0 MB to send; 0 files already on the device" in out
    assert not path.exists()


def test_backend_picks_the_runtime_extra(sshd, device, tmp_path, wheel):
    name, path = device
    both = TargetProfile("x86-et", "x86_64", 2, 4096, "executorch")
    bundle = write_bundle(tmp_path / "b", bundle_files(23), target=both, backend=("ort", "executorch"))
    plan = flash(bundle, remote(sshd, name), wheel=wheel, dry_run=True)
    assert plan.runtime == f"flexsfl[edge-executorch] in {path}/venv: would install"  # the target's preference
    plan = flash(bundle, remote(sshd, name), wheel=wheel, dry_run=True, settings=ClientSettings(backend="ort"))
    assert plan.runtime == f"flexsfl[edge] in {path}/venv: would install"
    only_ort = write_bundle(tmp_path / "o", bundle_files(24))
    with pytest.raises(ConfigError, match="--backend executorch: the bundle holds ort"):
        flash(only_ort, remote(sshd, name), wheel=wheel, settings=ClientSettings(backend="executorch"))
    assert not path.exists()


def test_cli_refuses_wrong_arguments():
    p = argparse.ArgumentParser(prog="flexsfl")
    add_parser(p.add_subparsers())
    for argv in (["flash", "b"], ["flash", "--rollback", "b", "pi@h"], ["flash", "--rollback"]):
        args = p.parse_args(argv)
        with pytest.raises(ConfigError, match="flexsfl flash"):
            args.func(args)


# -- the runtime venv (pip on the device; once per module) ---------------------------------------


@pytest.fixture(scope="module")
def installed(sshd, wheel, tiny_bundles, tmp_path_factory):
    """A bundle exported from a (tiny, random) GPT-2 and flashed with flexsfl[edge] installed in DIR/venv.

    Yields (report, DIR name, DIR path, bundle, wheel, server URL, seconds the flash took).
    """
    from flexsfl.core.bundle import load_bundle

    tmp = tmp_path_factory.mktemp("installed")
    exported = load_bundle(tiny_bundles("gpt2", 1, "ort"))
    name = f"flexsfl-rt-{secrets.token_hex(3)}"
    path = sshd.home / name
    server = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    report = flash(exported.root, remote(sshd, name), settings=settings(sshd, tmp, path, server=server), wheel=wheel)
    yield report, name, path, exported.root, wheel, server, time.monotonic() - t0
    shutil.rmtree(path, ignore_errors=True)


def ssh_run(sshd: SSHServer, command: str) -> subprocess.CompletedProcess:
    argv = ["ssh", "-p", str(sshd.port), "-i", str(sshd.key), "-o", "BatchMode=yes"]
    argv += [a for o in sshd.options for a in ("-o", o)]
    return subprocess.run(argv + [f"{sshd.user}@{sshd.host}", command], capture_output=True, text=True, timeout=120)


def test_runtime_is_installed_without_torch_and_reads_the_bundle(sshd, installed):
    report, name, path, bundle, wheel, server, seconds = installed
    print(f"first flash with runtime install: {seconds:.1f} s")
    assert report.runtime == f"flexsfl[edge] in {path}/venv: installed"
    py = f"{path}/venv/bin/python"
    # The device's own runtime opens the flashed bundle and runs its head: Z is [B, T, d].
    head = ssh_run(sshd, f"{py} -c 'import numpy as np; from flexsfl.core.bundle import load_bundle; "
                         "from flexsfl.edge_runtime.backends import open_backend; "
                         f"b = load_bundle(\"{path}/current\"); ids = np.ones((2, 8), np.int64); "
                         "print(b.manifest_sha256, open_backend(\"ort\", b, threads=1).forward(ids, ids).shape)'")
    assert head.returncode == 0, head.stderr
    assert head.stdout.split(maxsplit=1) == [report.bundle, "(2, 8, 64)\n"]
    no_torch = ssh_run(sshd, f"{py} -c 'import torch'")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    cli = ssh_run(sshd, f"{path}/venv/bin/flexsfl edge run --help")  # what the unit's ExecStart runs
    assert cli.returncode == 0 and "--config" in cli.stdout, cli.stderr
    marker = json.loads((path / "venv/.flexsfl-wheel.json").read_text())
    assert marker["extra"] == "edge" and re.fullmatch(r"[0-9a-f]{64}", marker["digest"])
    assert list((path / "wheels").iterdir()) == []  # the uploaded wheel is removed once installed


def test_flashed_runtime_starts_from_its_config(sshd, installed):
    # What the unit runs: it reads config.json, the token, the data and the bundle, opens the
    # backend and then keeps trying to reach the server (nothing listens there), so 8 s later it
    # is still running and has named the server (it gets there in about a second).
    report, name, path, bundle, wheel, server, _ = installed
    run = ssh_run(sshd, f"cd {path} && timeout 8 {path}/venv/bin/flexsfl edge run --config {path}/config.json")
    assert run.returncode == 124, run.stderr  # still running: no config, bundle or data error
    assert server in run.stderr + run.stdout


def test_runtime_units_pass_systemd_analyze(sshd, installed, tmp_path):
    report, *_ = installed
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here")
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    check = subprocess.run(["systemd-analyze", "--user", "verify", report.unit], capture_output=True, text=True,
                           env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)})
    assert check.returncode == 0 and check.stderr == "", check.stderr
    # The unit root would get, for the same DIR (it names the real venv, so ExecStart must exist).
    system = tmp_path / "flexsfl-edge.service"
    system.write_text(render_unit(report.device.directory, user=sshd.user, system=True))
    check = subprocess.run(["systemd-analyze", "verify", str(system)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stderr == "", check.stderr


def test_runtime_is_not_reinstalled_for_the_same_wheel(sshd, installed, tmp_path):
    report, name, path, bundle, wheel, *_ = installed
    marker = path / "venv/.flexsfl-wheel.json"
    before = marker.stat().st_mtime_ns
    again = flash(bundle, remote(sshd, name), wheel=wheel)
    assert again.runtime == f"flexsfl[edge] in {path}/venv: up to date"
    assert again.uploaded == () and marker.stat().st_mtime_ns == before


def test_flashed_runtime_completes_a_training_round(sshd, installed, tiny_model_dirs, tmp_path):
    """The device's runtime, started as the unit starts it, trains a round against a real server."""
    from flexsfl.server_backend.clients import hash_token

    from tests.integration.harness import events, flexsfl, wait_listening

    report, name, path, bundle, wheel, server, _ = installed
    port = int(server.rsplit(":", 1)[1])
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"version": 1, "clients": {"pi-7": {"token_sha256": hash_token("s3cret-token")}}}))
    log = tmp_path / "server.log"
    srv = flexsfl("serve", "--model", str(tiny_model_dirs["gpt2"]), "--num-labels", "2", "--port", str(port),
                  "--clients", str(clients), "--state-dir", str(tmp_path / "state"), "--rounds", "1",
                  "--local-steps", "2", "--batch-size", "2", "--threads", "1", log=log)
    try:
        wait_listening(port, srv, log)
        run = ssh_run(sshd, f"cd {path} && timeout 100 {path}/venv/bin/flexsfl edge run --config {path}/config.json")
        assert run.returncode == 0, run.stderr[-3000:]
        assert "done: 1 rounds" in run.stdout
        assert srv.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if srv.poll() is None:
            srv.kill()
    rounds = events(tmp_path / "state", "round")
    assert rounds[0]["clients"] == ["pi-7"] and rounds[0]["steps"] == 2
    # the device kept its personal head where flash pointed the runtime's state
    assert (path / "state" / "personal.safetensors").exists()
