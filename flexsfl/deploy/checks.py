"""What a device must offer before anything is copied: architecture, Python, venv support, memory, disk."""

from __future__ import annotations

from flexsfl.core.bundle import Manifest
from flexsfl.core.errors import FlashError
from flexsfl.deploy.ssh import Remote

__all__ = ["check_device", "check_disk", "venv_disk_mb"]

_MB = 1 << 20
# MemTotal is below the nominal RAM: the kernel, firmware and GPU carve-outs keep some (a 4 GB
# Raspberry Pi 4 reports about 3.8 GB, an 8 GB Jetson Orin Nano about 7.4 GB).
_MEMORY_SLACK = 0.85
_DISK_MARGIN_MB = 64


def venv_disk_mb(backend: str, arch: str) -> int:
    """Disk a new runtime venv takes, pip's cached downloads included.

    ort on x86_64 was measured (onnxruntime-training is a CUDA build: 1.1 GB installed plus a
    0.3 GB wheel in pip's cache); the others are estimates from their wheels' sizes.
    """
    if backend == "ort":
        return 1500 if arch == "x86_64" else 400
    return 3000  # torch + executorch and their dependencies


def check_device(remote: Remote, manifest: Manifest, dev: dict, install: bool) -> None:
    """Refuse a device the bundle cannot run on. Runs before anything is copied."""
    t = manifest.target
    if dev["arch"] != t.arch:
        hint = " (a 32-bit OS: install a 64-bit one)" if dev["arch"].startswith("armv") else ""
        raise FlashError(
            f"{remote}: the device is {dev['arch']}{hint} but the bundle is built for {t.arch} (target "
            f"{t.name}); export a bundle for this device's target or flash a {t.arch} device"
        )
    if dev["python_bits"] != 64:
        raise FlashError(
            f"{remote}: {dev['python_path']} is a {dev['python_bits']}-bit Python on a {dev['arch']} kernel; "
            "install a 64-bit OS or pass --python with a 64-bit interpreter"
        )
    version = tuple(dev["python"])
    if version[:2] < t.min_python:
        need = ".".join(map(str, t.min_python))
        raise FlashError(
            f"{remote}: {dev['python_path']} is Python {'.'.join(map(str, version))}, the bundle needs >= {need}; "
            "install a newer python3 there or pass --python PATH"
        )
    if not dev["writable"]:
        raise FlashError(f"{remote}: {dev['user']} may not write to {dev['dir']}; pick another DIR or fix its owner")
    if install and not dev["venv_ok"]:
        raise FlashError(
            f"{remote}: {dev['python_path']} cannot create virtual environments (no venv/ensurepip); install "
            "them there (Debian, Raspberry Pi OS: sudo apt install python3-venv)"
        )
    if dev["memory"] < t.memory_mb * _MB * _MEMORY_SLACK:
        raise FlashError(
            f"{remote}: the device has {dev['memory'] // _MB} MB of RAM but the bundle's target {t.name} needs "
            f"{t.memory_mb} MB; export for this device's target or with a smaller split"
        )


def check_disk(remote: Remote, dev: dict, upload_bytes: int, venv_mb: int) -> None:
    need_mb = upload_bytes // _MB + venv_mb + _DISK_MARGIN_MB
    if dev["free"] // _MB < need_mb:
        venv = f" + about {venv_mb} MB for the runtime venv" if venv_mb else ""
        raise FlashError(
            f"{remote}: {dev['free'] // _MB} MB free in {dev['dir']} but the flash needs about {need_mb} MB "
            f"({upload_bytes / 1e6:.1f} MB of bundle files{venv}); free some space or pick another DIR"
        )
