"""The emulated device's harness itself, on the host (normal suite: no arm64 root is built here)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.device import harness

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "emulated_device.py"


def test_root_goes_to_the_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert harness.default_root() == tmp_path / "flexsfl" / "arm64-root"


def test_debian_source_is_read_from_the_hosts_apt():
    if not pathlib.Path("/etc/os-release").exists() or not pathlib.Path("/etc/apt").exists():
        pytest.skip("not a Debian-like host")
    suite, mirror = harness.host_debian_source()
    text = "".join(p.read_text() for p in pathlib.Path("/etc/apt").rglob("*.sources")) + (
        pathlib.Path("/etc/apt/sources.list").read_text() if pathlib.Path("/etc/apt/sources.list").exists() else "")
    assert suite in text and mirror in text and mirror.startswith(("http://", "https://"))


def test_pi4_cpuinfo_names_four_cortex_a72s():
    assert harness.PI4_CPUINFO.count("CPU part\t: 0xd08") == 4 and "Raspberry Pi 4" in harness.PI4_CPUINFO


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_without_root_the_tool_refuses_in_one_line_and_stop_is_harmless():
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    home = pathlib.Path(tempfile.mkdtemp(prefix="flexsfl-nobody-"))  # pytest's tmp_path is root-only
    home.chmod(0o777)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(home)}
    check = subprocess.run([*nobody, sys.executable, str(TOOL), "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.count("\n") == 1 and "needs root" in check.stderr and "sudo make test-arm64" in check.stderr
    stop = subprocess.run([*nobody, sys.executable, str(TOOL), "stop"], capture_output=True, text=True, env=env)
    assert stop.returncode == 0 and "nothing mounted" in stop.stdout
    shutil.rmtree(home)


def test_stop_all_leaves_nothing_mounted_or_running(tmp_path):
    """A fake root with a bind mount and a process chrooted into it: stop_all ends both."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount, chroot)")
    root = tmp_path / "root"
    for d in ("bin", "lib", "lib64", "usr", "mnt"):
        (root / d).mkdir(parents=True)
    for d in ("/usr", "/lib", "/lib64", "/bin"):
        if pathlib.Path(d).is_dir() and not pathlib.Path(d).is_symlink():
            subprocess.run(["mount", "--bind", d, str(root / d.lstrip("/"))], check=True)
        elif pathlib.Path(d).is_symlink():
            (root / d.lstrip("/")).rmdir()
            (root / d.lstrip("/")).symlink_to(os.readlink(d))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "mnt")], check=True)
    proc = subprocess.Popen(["chroot", str(root), "sleep", "600"])
    try:
        assert len(harness._mount_points(root)) >= 2
        deadline = 50
        while not harness._root_processes(root) and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.1"])
        assert harness._root_processes(root) == [proc.pid]
        harness.stop_all(root)
        assert proc.wait(timeout=10) != 0
        assert harness._mount_points(root) == [] and harness._root_processes(root) == []
    finally:
        proc.kill()
        harness.stop_all(root)
