"""An emulated Raspberry Pi 4: an arm64 Debian root run under qemu-user, with an sshd on loopback.

Contract:

* :func:`unavailable_reason` says in one line why emulation cannot work here (not Linux, not
  root, no binfmt_misc, qemu-user-static not installable), or returns None. Tests skip with it.
* :func:`ensure_root` builds the root once (debootstrap, CA certificates, openssh-server, a venv
  with the edge runtime's dependencies) under ``${XDG_CACHE_HOME:-~/.cache}/flexsfl/arm64-root``
  and records the recipe in ``ROOT/.flexsfl-stamp.json``; a root whose stamp matches the recipe
  is reused as is, any other is rebuilt. The build goes to a sibling folder that is renamed into
  place when it is complete, so an interrupted build never looks finished.
* :class:`Device` (a context manager) mounts proc, a Pi 4 ``/proc/cpuinfo``, sys and dev into the
  root, and starts sshd there on a free loopback port with a throwaway key. Leaving the context,
  :meth:`Device.stop`, the atexit hook, and ``tools/emulated_device.py stop`` all call
  :func:`stop_all`, which kills every process whose root is the device's and unmounts everything
  under it, deepest first. Nothing stays mounted or running.

Emulation is 100-300x slower than the host: use it for correctness and installability only.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

__all__ = [
    "RECIPE",
    "Device",
    "cache_dir",
    "ensure_root",
    "host_debian_source",
    "stop_all",
    "unavailable_reason",
]

STAMP_NAME = ".flexsfl-stamp.json"
VENV = "/opt/edge-venv"  # the root's own venv with the edge runtime's dependencies (not the flashed one)
# What the root holds; a change here rebuilds cached roots (the stamp records it).
RECIPE = {
    "harness": 1,
    "arch": "arm64",
    "variant": "minbase",
    "include": ["python3", "python3-venv", "python3-pip", "ca-certificates"],
    "apt": ["openssh-server"],
    "pip": ["onnxruntime", "numpy", "tokenizers", "websockets==17.4", "safetensors", "rich"],
}
QEMU_ENV = {"QEMU_CPU": "cortex-a72"}  # qemu's default "max" CPU makes ONNX Runtime about 3x slower
_HOST_TOOLS = ("qemu-user-static", "binfmt-support", "debootstrap")
_BINFMT = pathlib.Path("/proc/sys/fs/binfmt_misc")
# A Raspberry Pi 4 (BCM2711, 4x Cortex-A72). ONNX Runtime's CPU detection segfaults on the host's x86
# /proc/cpuinfo, which qemu-user passes through; this one is bind-mounted over it.
_CPU = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n")
PI4_CPUINFO = "".join(_CPU.format(n=n) for n in range(4)) + (
    "Hardware\t: BCM2835\nRevision\t: c03112\nSerial\t\t: 10000000flexsfl0\nModel\t\t: Raspberry Pi 4 Model B Rev 1.2\n")


def cache_dir() -> pathlib.Path:
    """``${XDG_CACHE_HOME:-~/.cache}/flexsfl``."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "flexsfl"


def default_root() -> pathlib.Path:
    return cache_dir() / "arm64-root"


def _apt_install(packages: Sequence[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return True
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def _binfmt_ready() -> bool:
    entry = _BINFMT / "qemu-aarch64"
    return entry.exists() and "enabled" in entry.read_text() and re.search(r"flags: \w*F", entry.read_text()) is not None


def unavailable_reason(*, install: bool = True) -> str | None:
    """One line saying why an emulated arm64 device cannot run here, or None when it can.

    With ``install`` (the default) it installs qemu-user-static, binfmt-support and debootstrap
    with apt-get when they are missing, mounts binfmt_misc and enables the qemu-aarch64 handler.
    """
    if sys.platform != "linux":
        return f"emulated arm64 device needs Linux (this is {sys.platform})"
    if os.uname().machine == "aarch64":
        return "this machine is aarch64 already: run the edge runtime natively instead of emulating it"
    if os.geteuid() != 0:
        return "emulated arm64 device needs root (chroot, mounts, binfmt_misc): run `sudo make test-arm64`"
    if not _BINFMT.is_dir():
        return "this kernel has no binfmt_misc (/proc/sys/fs/binfmt_misc): qemu-user cannot run arm64 binaries here"
    missing = [t for t, exe in zip(_HOST_TOOLS, ("qemu-aarch64-static", "update-binfmts", "debootstrap"))
               if shutil.which(exe) is None]
    if missing and not (install and shutil.which("apt-get") and _apt_install(missing)):
        return f"{' and '.join(missing)} not installed and not installable here: `apt-get install {' '.join(missing)}`"
    if not (_BINFMT / "register").exists():
        if not install or subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(_BINFMT)],
                                         capture_output=True).returncode != 0:
            return "binfmt_misc is not mounted and cannot be: `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc`"
    if not _binfmt_ready() and install:
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not _binfmt_ready():
        return "the qemu-aarch64 binfmt handler is missing or lacks the F flag: `update-binfmts --enable qemu-aarch64`"
    return None


def host_debian_source() -> tuple[str, str]:
    """(suite, mirror) that the host's apt is configured with, for debootstrap to use the same."""
    codename = None
    for line in pathlib.Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    texts = [p.read_text() for p in sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:  # deb822 stanzas
        for stanza in text.split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and codename in suites and fields.get("URIs"):
                return codename, fields["URIs"].split()[0]
    legacy = pathlib.Path("/etc/apt/sources.list")
    if legacy.exists():
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", legacy.read_text(), flags=re.M):
            if m.group(2) == codename:
                return codename, m.group(1)
    raise RuntimeError("cannot find the host's Debian suite and mirror in /etc/apt: the arm64 root needs both")


def _recipe() -> dict:
    suite, mirror = host_debian_source()
    return {**RECIPE, "suite": suite, "mirror": mirror}


def read_stamp(root: pathlib.Path) -> dict | None:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}


def chroot(root: pathlib.Path, argv: Sequence[str], *, env: dict | None = None, check: bool = True,
           log: Callable[[str], None] | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside ``root`` (arm64 programs run under qemu through binfmt_misc)."""
    full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **QEMU_ENV, **_proxy_env(), **(env or {})}
    proc = subprocess.run(["chroot", str(root), *argv], env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if log:
        log((proc.stdout + proc.stderr)[-4000:])
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in the arm64 root ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return proc


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _mount_points(root: pathlib.Path) -> list[str]:
    """Mount points at or under ``root``, in mount order."""
    prefix = str(root.resolve())
    points = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def _root_processes(root: pathlib.Path) -> list[int]:
    """Host pids of the processes whose root directory is ``root``."""
    target, pids = str(root.resolve()), []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == target:
                    pids.append(int(entry.name))
    return pids


def stop_all(root: pathlib.Path | None = None) -> list[str]:
    """Kill every process running in ``root`` and unmount everything under it; returns what was unmounted."""
    root = root or default_root()
    if not root.exists():
        return []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _root_processes(root)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while pids and _root_processes(root) and time.monotonic() < deadline:
            time.sleep(0.1)
    done = []
    for point in reversed(_mount_points(root)):  # deepest (most recent) first
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        done.append(point)
    return done


def _mount_system(root: pathlib.Path) -> None:
    """proc with a Pi 4 cpuinfo over it, sys, and dev (rslave so that unmounting never reaches the host)."""
    _mount("-t", "proc", "proc", str(root / "proc"))
    cpuinfo = root / "etc" / "flexsfl-cpuinfo"
    cpuinfo.write_text(PI4_CPUINFO)
    _mount("--bind", str(cpuinfo), str(root / "proc" / "cpuinfo"))
    _mount("--rbind", "/sys", str(root / "sys"))
    _mount("--make-rslave", str(root / "sys"))
    _mount("--rbind", "/dev", str(root / "dev"))
    _mount("--make-rslave", str(root / "dev"))
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")


def _build(root: pathlib.Path, recipe: dict, log: Callable[[str], None]) -> None:
    """debootstrap + certificates + openssh-server + the edge venv into ``root`` (a fresh folder)."""
    t0 = time.monotonic()
    log(f"debootstrap {recipe['suite']} ({recipe['mirror']}) into {root}: 5-15 minutes")
    boot = subprocess.run(["debootstrap", f"--arch={recipe['arch']}", f"--variant={recipe['variant']}",
                           f"--include={','.join(recipe['include'])}", recipe["suite"], str(root), recipe["mirror"]],
                          capture_output=True, text=True)
    if boot.returncode != 0:
        stop_all(root)  # debootstrap mounts proc and sys in the root itself
        raise RuntimeError(f"debootstrap failed ({boot.returncode}; see {root}/debootstrap/debootstrap.log): "
                           f"{(boot.stdout + boot.stderr).strip().splitlines()[-1:]}")
    # The host's extra CA certificates (a TLS-inspecting proxy), or pip fails CERTIFICATE_VERIFY_FAILED.
    extra = root / "usr" / "local" / "share" / "ca-certificates"
    extra.mkdir(parents=True, exist_ok=True)
    for crt in pathlib.Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copyfile(crt, extra / crt.name)
    # No service starts at install time: there is no init in a chroot.
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        _mount_system(root)
        chroot(root, ["update-ca-certificates"])
        log(f"apt-get install {' '.join(recipe['apt'])} ({time.monotonic() - t0:.0f} s so far)")
        chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *recipe["apt"]])
        chroot(root, ["apt-get", "clean"])
        log(f"venv {VENV} + pip install {' '.join(recipe['pip'])} ({time.monotonic() - t0:.0f} s so far)")
        chroot(root, ["python3", "-m", "venv", VENV])
        chroot(root, [f"{VENV}/bin/pip", "install", "-q", "--only-binary=:all:", *recipe["pip"]])
        freeze = chroot(root, [f"{VENV}/bin/pip", "freeze"]).stdout.split()
        python = chroot(root, ["python3", "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    finally:
        stop_all(root)
    stamp = {**recipe, "python": python, "installed": freeze, "build_s": round(time.monotonic() - t0),
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (root / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    log(f"arm64 root ready in {time.monotonic() - t0:.0f} s: Python {python}, "
        f"{next((p for p in freeze if p.startswith('onnxruntime==')), 'no onnxruntime')}")


def ensure_root(root: pathlib.Path | None = None, *, log: Callable[[str], None] = print) -> pathlib.Path:
    """The cached arm64 root, built first if missing or built from another recipe (see the module doc)."""
    root = root or default_root()
    recipe = _recipe()
    stamp = read_stamp(root)
    if stamp is not None and all(stamp.get(k) == v for k, v in recipe.items()):
        return root
    partial = root.with_name(root.name + ".partial")
    for stale in (partial, root):
        if stale.exists():
            stop_all(stale)
            if _mount_points(stale):
                raise RuntimeError(f"{stale} still has mounts: unmount them, then retry")
            shutil.rmtree(stale)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _build(partial, recipe, log)
    partial.rename(root)
    return root


@dataclasses.dataclass
class Device:
    """A started emulated device: the root with system mounts, and sshd on ``127.0.0.1:port`` as root.

    Use as ``with Device.start(root) as dev: ...``; :meth:`stop` is idempotent and also runs at exit.
    """

    root: pathlib.Path
    port: int
    key: pathlib.Path  # the client's private key
    known_hosts: pathlib.Path
    tmp: pathlib.Path
    user: str = "root"
    host: str = "127.0.0.1"

    @classmethod
    def start(cls, root: pathlib.Path | None = None, *, timeout: float = 120.0) -> Device:
        root = root or default_root()
        stop_all(root)  # whatever an earlier, killed run left
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="flexsfl-arm64-"))
        dev = cls(root=root, port=0, key=tmp / "client", known_hosts=tmp / "known_hosts", tmp=tmp)
        atexit.register(dev.stop)
        try:
            _mount_system(root)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flexsfl-arm64", "-f",
                            str(dev.key)], check=True)
            ssh = root / "root" / ".ssh"
            ssh.mkdir(mode=0o700, exist_ok=True)
            (ssh / "authorized_keys").write_text((tmp / "client.pub").read_text())
            (ssh / "authorized_keys").chmod(0o600)
            etc = root / "etc" / "ssh"
            for p in etc.glob("flexsfl_host*"):
                p.unlink()
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "flexsfl_host")], check=True)
            (root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
            dev.port = _free_port()
            (etc / "flexsfl_sshd_config").write_text(
                f"ListenAddress 127.0.0.1:{dev.port}\nHostKey /etc/ssh/flexsfl_host\nPermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "MaxSessions 20\nMaxStartups 50\nSetEnv QEMU_CPU=cortex-a72\n")
            # Environment of the sshd process reaches the sessions' qemu (QEMU_CPU is read by qemu itself).
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **QEMU_ENV, **_proxy_env()}
            with open(tmp / "sshd.log", "wb") as out:
                subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/flexsfl_sshd_config"],
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", dev.port), timeout=1).close()
                    break
                if time.monotonic() > deadline or not _root_processes(root):
                    raise RuntimeError(f"sshd did not start in the arm64 root: {(tmp / 'sshd.log').read_text()[-1000:]}")
                time.sleep(0.2)
            dev.known_hosts.write_text(f"[127.0.0.1]:{dev.port} {(etc / 'flexsfl_host.pub').read_text()}")
        except BaseException:
            dev.stop()
            raise
        return dev

    @property
    def ssh_options(self) -> tuple[str, ...]:
        return (f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes",
                "IdentityAgent=none")

    def ssh(self, command: str, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a shell command on the device over ssh (as a flash would)."""
        argv = ["ssh", "-p", str(self.port), "-i", str(self.key)]
        for o in self.ssh_options:
            argv += ["-o", o]
        proc = subprocess.run([*argv, f"{self.user}@{self.host}", command], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ssh {command!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in the device's root directly (chroot, no ssh)."""
        return chroot(self.root, argv, **kwargs)

    def stop(self) -> None:
        """Kill, unmount, and empty the root's /tmp (as a reboot would); safe to call twice."""
        stop_all(self.root)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not _mount_points(self.root):
            for p in (self.root / "tmp").iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
