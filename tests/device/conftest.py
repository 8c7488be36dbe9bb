"""Fixtures for the emulated Raspberry Pi 4 tests (``make test-arm64``; marker ``arm64``).

``arm64_device`` (session) builds or reuses the cached arm64 root and starts it with sshd on
loopback (tests/device/harness.py); it skips every test with the harness's one-line reason where
emulation cannot run. ``minilm_bundle`` is a real MiniLM split-1 bundle exported here on x86 with
``--backend ort --target rpi4``. ``device_python`` is the root's own venv with this checkout's
wheel installed, for tests that run the runtime directly rather than through a flash.
"""

from __future__ import annotations

import pathlib
import shutil
import time

import pytest

from tests.device import harness


@pytest.fixture(scope="session")
def arm64_device():
    reason = harness.unavailable_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    root = harness.ensure_root(log=lambda s: print(f"[arm64] {s}", flush=True))
    print(f"[arm64] root ready in {time.monotonic() - t0:.0f} s", flush=True)
    with harness.Device.start(root) as dev:
        yield dev


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory) -> pathlib.Path:
    """A MiniLM split-1 ort bundle for the rpi4 target, exported here (x86, our pinned ONNX tooling)."""
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("minilm") / "minilm-s1-rpi4"
    export_bundle(ExportConfig(model="minilm", split=1, out=str(out), backend="ort", target="rpi4", max_batch=4,
                               max_seq=32, ort_training_artifacts=False), progress=False)
    return out


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> pathlib.Path:
    from flexsfl.deploy.wheel import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def device_python(arm64_device, wheel) -> str:
    """Python of the root's venv (onnxruntime, numpy, tokenizers, ...) with this checkout's flexsfl."""
    inside = f"/tmp/{wheel.name}"
    shutil.copyfile(wheel, arm64_device.root / inside.lstrip("/"))
    arm64_device.run([f"{harness.VENV}/bin/pip", "install", "-q", "--no-deps", "--force-reinstall", inside],
                     timeout=900)
    return f"{harness.VENV}/bin/python"


def to_device(device: harness.Device, src: pathlib.Path, name: str) -> str:
    """Copy ``src`` (file or folder) into the device's /tmp; returns its path there."""
    dest = device.root / "tmp" / name
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dest)
    return f"/tmp/{name}"
