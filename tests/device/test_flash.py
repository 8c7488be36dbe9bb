"""`flexsfl flash` of a real MiniLM bundle onto the emulated Raspberry Pi 4 over ssh, then a training round.

The device is the arm64 root's sshd on loopback, logged in as its root user, so the device
directory is ``/root/<name>`` there and ``ROOT/root/<name>`` here. Nothing is mocked: the flash
probes the device, checks it against the ``rpi4`` target, uploads, verifies sha256s with the
device's Python, installs ``flexsfl[edge]`` with pip on aarch64 Debian, and finds no systemd.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time

import pytest

from flexsfl.core.bundle import MANIFEST_NAME, load_bundle
from flexsfl.core.errors import FlashError
from flexsfl.core.targets import TARGETS
from flexsfl.deploy.flash import ClientSettings, flash, rollback
from flexsfl.deploy.ssh import Remote

pytestmark = pytest.mark.arm64  # make test-arm64; deselected from make test

TOKEN = "arm64-s3cret"


def remote(dev, name: str) -> Remote:
    return Remote.parse(f"{dev.user}@{dev.host}:{name}", port=dev.port, identity=str(dev.key),
                        ssh_options=dev.ssh_options)


@pytest.fixture(scope="module")
def flashed(arm64_device, minilm_bundle, wheel, tmp_path_factory):
    """The MiniLM bundle flashed with its runtime; yields (report, DIR name, DIR here, server URL, seconds)."""
    from tests.integration.harness import free_port

    dev, tmp = arm64_device, tmp_path_factory.mktemp("flash")
    name = f"flexsfl-{secrets.token_hex(3)}"
    here = dev.root / "root" / name
    here.mkdir(parents=True)
    (here / "data.csv").write_text("text,label\n" + "".join(
        f"{w} film number {i},{i % 2}\n" for i, w in enumerate(["a fine", "a dull", "a lovely", "a boring"] * 2)))
    (tmp / "token").write_text(TOKEN + "\n")
    server = f"ws://127.0.0.1:{free_port()}"
    settings = ClientSettings(server=server, client_id="pi-4", token_file=str(tmp / "token"), data="data.csv",
                              backend="ort", threads=1)
    t0 = time.monotonic()
    report = flash(minilm_bundle, remote(dev, name), settings=settings, wheel=wheel)
    seconds = time.monotonic() - t0
    print(f"first flash of {minilm_bundle.name} with runtime install: {seconds:.0f} s")
    yield report, name, here, server, seconds
    shutil.rmtree(here, ignore_errors=True)


def test_flash_passes_rpi4_checks_installs_onnxruntime_without_torch_and_verifies_on_the_device(
        arm64_device, flashed, minilm_bundle):
    report, name, here, _, _ = flashed
    dev, d = arm64_device, f"/root/{name}"
    target = TARGETS["rpi4"]
    assert load_bundle(minilm_bundle).manifest.target == target
    assert (report.device.arch, report.device.python) == ("aarch64", "3.11.2")
    assert report.device.memory_mb >= target.memory_mb * 0.85
    files = load_bundle(minilm_bundle).manifest.files
    assert set(report.uploaded) == {*files, MANIFEST_NAME} and report.verified == len(report.uploaded)
    assert report.runtime == f"flexsfl[edge] in {d}/venv: installed"
    # The device's own reader verifies every sha256 of what landed there.
    py = f"{d}/venv/bin/python"
    check = dev.ssh(f"{py} -c 'from flexsfl.core.bundle import load_bundle; print(load_bundle(\"{d}/current\").manifest_sha256)'")
    assert check.stdout.strip() == report.bundle == report.current
    pip = json.loads(dev.ssh(f"{d}/venv/bin/pip list --format=json").stdout)
    have = {p["name"].lower(): p["version"] for p in pip}
    assert "onnxruntime" in have and "onnxruntime-training" not in have and "torch" not in have, sorted(have)
    print(f"device venv: onnxruntime {have['onnxruntime']}, numpy {have['numpy']}, {len(have)} packages")
    assert dev.ssh(f"{py} -c 'import torch'", check=False).returncode != 0
    # No systemd in the emulated root: the unit is written, not started, and the report says how to run it.
    assert not report.device.systemd
    assert "not started: systemd is not running" in report.service
    assert report.commands == (f"{d}/venv/bin/flexsfl edge run --config {d}/config.json",)
    config = json.loads((here / "config.json").read_text())
    assert (config["backend"], config["bundle"], config["threads"]) == ("ort", f"{d}/current", 1)


def test_reflash_copies_nothing_and_keeps_the_runtime(arm64_device, flashed, minilm_bundle, wheel):
    report, name, here, _, _ = flashed
    t0 = time.monotonic()
    again = flash(minilm_bundle, remote(arm64_device, name), wheel=wheel)
    print(f"re-flash: {time.monotonic() - t0:.0f} s")
    assert again.uploaded == () and again.upload_bytes == 0
    assert again.verified == len(load_bundle(minilm_bundle).manifest.files) + 1
    assert again.runtime == f"flexsfl[edge] in /root/{name}/venv: up to date"
    assert (again.current, again.previous) == (report.bundle, None)


def test_flashed_runtime_completes_a_training_round_against_the_host_server(arm64_device, flashed, tmp_path):
    from flexsfl.server_backend.clients import hash_token

    from tests.integration.harness import events, flexsfl, wait_listening

    report, name, here, server, _ = flashed
    port = int(server.rsplit(":", 1)[1])
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"version": 1, "clients": {"pi-4": {"token_sha256": hash_token(TOKEN)}}}))
    log = tmp_path / "server.log"
    srv = flexsfl("serve", "--model", "minilm", "--num-labels", "2", "--port", str(port), "--clients", str(clients),
                  "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--local-steps", "2", "--batch-size", "2",
                  "--threads", "1", log=log)
    d = f"/root/{name}"
    try:
        wait_listening(port, srv, log, timeout=300)
        t0 = time.monotonic()
        run = arm64_device.ssh(f"cd {d} && timeout 900 {d}/venv/bin/flexsfl edge run --config {d}/config.json",
                               check=False, timeout=960)
        print(f"emulated round (2 local steps, batch 2): {time.monotonic() - t0:.0f} s")
        assert run.returncode == 0, run.stderr[-3000:]
        assert "done: 1 rounds" in run.stdout
        assert srv.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if srv.poll() is None:
            srv.kill()
    rounds = events(tmp_path / "state", "round")
    assert rounds[0]["clients"] == ["pi-4"] and rounds[0]["steps"] == 2
    assert (here / "state" / "personal.safetensors").exists()


def test_a_bundle_for_another_architecture_is_refused_before_copying(arm64_device, minilm_bundle, tmp_path):
    name = f"flexsfl-{secrets.token_hex(3)}"
    other = tmp_path / "x86"
    shutil.copytree(minilm_bundle, other)
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["target"] = TARGETS["generic-x86_64"].to_json()
    (other / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(FlashError, match="the device is aarch64 but the bundle is built for x86_64") as err:
        flash(other, remote(arm64_device, name), install=False)
    assert "\n" not in str(err.value)
    here = arm64_device.root / "root" / name
    assert not here.exists() or not any(here.rglob("*.onnx"))  # nothing was copied
    shutil.rmtree(here, ignore_errors=True)


def test_rollback_switches_to_the_previous_bundle_and_back(arm64_device, flashed, minilm_bundle, tmp_path):
    report, name, here, _, _ = flashed
    second = tmp_path / "second"
    shutil.copytree(minilm_bundle, second)  # same files, another manifest: another bundle, every file reused
    manifest = json.loads((second / MANIFEST_NAME).read_text())
    manifest["created"] = "2030-01-01T00:00:00+00:00"
    (second / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    two = flash(second, remote(arm64_device, name), install=False)
    assert two.uploaded == (MANIFEST_NAME,) and (two.current, two.previous) == (two.bundle, report.bundle)
    back = rollback(remote(arm64_device, name))
    assert (back.current, back.previous) == (report.bundle, two.bundle)
    assert load_bundle(here / "current").manifest_sha256 == report.bundle
    forth = rollback(remote(arm64_device, name))
    assert (forth.current, forth.previous) == (two.bundle, report.bundle)
