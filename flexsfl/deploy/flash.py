"""``flexsfl flash``: put a verified bundle on an edge device over SSH and run the edge runtime there.

The transport is the system OpenSSH client (docs/flash.md says why): one connection per flash,
shared by every step through a control socket, and for each step the standard-library script
:mod:`flexsfl.deploy.flash_remote` run by the device's python3. The steps, in this order:

1. verify the bundle here (:func:`flexsfl.core.bundle.load_bundle`);
2. probe the device and refuse a wrong architecture, Python, memory or disk *before* copying;
3. send only the files the device has nowhere (the others are hard-linked there) into
   ``DIR/.staging-<sha>``, with a progress bar;
4. verify every sha256 on the device; send the files that do not match once more, then refuse;
5. install the runtime wheel into ``DIR/venv`` if its contents or extra changed;
6. switch ``DIR/current`` atomically; the bundle that was current becomes ``DIR/previous``;
7. write ``DIR/config.json``, ``DIR/token`` and the systemd unit, and (re)start the service.

Whatever fails before step 6, including a connection cut mid-upload, leaves the previous bundle
active and intact; the next flash resumes from the files that did arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import zipfile
from typing import BinaryIO
from collections.abc import Callable, Iterable

from flexsfl.core.bundle import MANIFEST_NAME, Bundle, Manifest, load_bundle, sha256_file
from flexsfl.core.errors import ConfigError, FlashError

from flexsfl.deploy import flash_remote

__all__ = [
    "DEFAULT_DIR",
    "UNIT_NAME",
    "Remote",
    "ClientSettings",
    "Progress",
    "DeviceInfo",
    "FlashReport",
    "flash",
    "rollback",
    "render_unit",
    "build_wheel",
    "wheel_digest",
    "add_parser",
    "run",
]

log = logging.getLogger("flexsfl.flash")
device_log = logging.getLogger("flexsfl.flash.device")  # output of programs run on the device (pip)

DEFAULT_DIR = "flexsfl"  # under the login user's home
UNIT_NAME = flash_remote.UNIT_NAME
EXTRAS = {"ort": "edge", "executorch": "edge-executorch"}  # pyproject extra per backend

_MB = 1 << 20
# MemTotal is below the nominal RAM: the kernel, firmware and GPU carve-outs keep some (a 4 GB
# Raspberry Pi 4 reports about 3.8 GB, an 8 GB Jetson Orin Nano about 7.4 GB).
_MEMORY_SLACK = 0.85
_DISK_MARGIN_MB = 64
_CONNECT_TIMEOUT_S = 15
_HELPER_SOURCE = pathlib.Path(flash_remote.__file__).read_text()

# Characters that need no quoting in a shell, a systemd unit or JSON: DIR ends up in all three.
_SAFE_DIR = re.compile(r"[A-Za-z0-9._/~+@-]+")
_SAFE_USER = re.compile(r"[A-Za-z0-9._-]+")
_SAFE_HOST = re.compile(r"[A-Za-z0-9._:%-]+")
_SSH_OPTION = re.compile(r"[A-Za-z]+=\S.*")


def _venv_mb(backend: str, arch: str) -> int:
    """Disk a new runtime venv takes, pip's cached downloads included.

    ort on x86_64 was measured (onnxruntime-training is a CUDA build: 1.1 GB installed plus a
    0.3 GB wheel in pip's cache); the others are estimates from their wheels' sizes.
    """
    if backend == "ort":
        return 1500 if arch == "x86_64" else 400
    return 3000  # torch + executorch and their dependencies


@dataclasses.dataclass(frozen=True)
class Remote:
    """Where to flash: an SSH login and the device directory. ``str(remote)`` is ``user@host:DIR``."""

    host: str
    user: str | None = None  # None: what ssh would use (~/.ssh/config, else your local name)
    directory: str = DEFAULT_DIR  # relative: under the login user's home
    port: int | None = None  # None: ssh's default (22, or ~/.ssh/config)
    identity: str | None = None  # private key file, as ``ssh -i``
    ssh_options: tuple[str, ...] = ()  # extra "Key=Value" options, as ``ssh -o``

    def __post_init__(self) -> None:
        # A host or user starting with "-" would reach ssh as an option (ProxyCommand=...).
        if not _SAFE_HOST.fullmatch(self.host) or self.host.startswith("-"):
            raise ConfigError(f"destination: bad host {self.host!r}; write user@host[:DIR]")
        if self.user is not None and (not _SAFE_USER.fullmatch(self.user) or self.user.startswith("-")):
            raise ConfigError(f"destination: bad user name {self.user!r}; write user@host[:DIR]")
        if not _SAFE_DIR.fullmatch(self.directory):
            raise ConfigError(
                f"destination: device directory {self.directory!r} may only hold letters, digits and ._/~+@-"
            )
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: not a TCP port (1..65535)")
        for opt in self.ssh_options:
            if not _SSH_OPTION.fullmatch(opt):
                raise ConfigError(f"-o {opt!r}: ssh options are Key=Value, e.g. -o StrictHostKeyChecking=accept-new")

    @classmethod
    def parse(cls, destination: str, **settings) -> Remote:
        """``user@host``, ``user@host:DIR`` or ``user@[v6addr]:DIR``; ``settings`` are the other fields."""
        user, at, rest = destination.rpartition("@")
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail and not tail.startswith(":"):
                raise ConfigError(f"destination {destination!r}: write user@[address]:DIR")
            directory = tail[1:]
        else:
            host, _, directory = rest.partition(":")
        return cls(host=host, user=user if at else None, directory=directory or DEFAULT_DIR, **settings)

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{self.directory}"

    def ssh_argv(self) -> list[str]:
        """``ssh`` and its options, before the login.

        It never prompts (BatchMode), never allocates a terminal (-T: the streams carry binary
        data), and ignores a RemoteCommand or port forwardings set for the host in ~/.ssh/config.
        """
        argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={_CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                "-o", "RemoteCommand=none", "-o", "ClearAllForwardings=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", str(self.identity)]
        for opt in self.ssh_options:
            argv += ["-o", opt]
        return argv


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """What the device's ``config.json`` gets besides the bundle path. ``None`` keeps the device's value."""

    server: str | None = None  # ws:// or wss:// URL of `flexsfl serve`
    client_id: str | None = None
    token_file: str | None = None  # a file HERE holding the client's token; copied to DIR/token (0600)
    data: str | None = None  # the data set's path ON THE DEVICE (relative: under DIR); it must exist there
    backend: str | None = None  # "ort" or "executorch"; None: the target's preferred one if the bundle has it
    threads: int | None = None  # intra-op threads of the runtime; None: the runtime decides

    def __post_init__(self) -> None:
        if self.server is not None and not re.fullmatch(r"wss?://\S+", self.server):
            raise ConfigError(f"--server {self.server!r}: give the server's ws:// or wss:// URL")
        if self.client_id is not None and not re.fullmatch(r"[^\s\x00-\x1f]+", self.client_id):
            raise ConfigError(f"--client-id {self.client_id!r}: must be non-empty, without spaces")
        if self.data is not None and not _SAFE_DIR.fullmatch(self.data):
            raise ConfigError(f"--data {self.data!r}: the path may only hold letters, digits and ._/~+@-")
        if self.backend is not None and self.backend not in EXTRAS:
            raise ConfigError(f"--backend {self.backend!r}: choose one of {', '.join(EXTRAS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")

    @property
    def given(self) -> bool:
        """Whether any connection setting was given (then the merged config must be complete)."""
        return any(v is not None for v in (self.server, self.client_id, self.token_file, self.data))

    def read_token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            token = pathlib.Path(self.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--token-file {self.token_file}: cannot read it ({e.__class__.__name__})") from None
        if not token or "\n" in token:
            raise ConfigError(f"--token-file {self.token_file}: must hold the token on one line")
        return token


@dataclasses.dataclass(frozen=True)
class Progress:
    """An upload's progress: ``done`` of ``total`` bytes of ``label`` sent; ``path`` is being sent now."""

    label: str  # "bundle", "bundle (retry)" or "runtime wheel"
    path: str
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the probe found on the device, before the flash changed anything."""

    arch: str
    python: str  # "3.11.2"
    python_path: str
    memory_mb: int
    free_mb: int  # free space on DIR's file system
    cores: int
    user: str
    root: bool
    systemd: bool  # systemd runs there (PID 1)
    directory: str  # DIR, absolute

    @classmethod
    def from_probe(cls, d: dict) -> DeviceInfo:
        return cls(
            arch=d["arch"], python=".".join(map(str, d["python"])), python_path=d["python_path"],
            memory_mb=d["memory"] // _MB, free_mb=d["free"] // _MB, cores=d["cores"], user=d["user"],
            root=d["uid"] == 0, systemd=d["systemd"], directory=d["dir"],
        )


@dataclasses.dataclass(frozen=True)
class FlashReport:
    """What a flash (or rollback) did, or with ``dry_run`` would do."""

    remote: str
    device: DeviceInfo
    bundle: str | None  # manifest sha256 of the flashed bundle: DIR/bundles/<bundle>
    current: str | None  # the bundle DIR/current names afterwards
    previous: str | None
    uploaded: tuple[str, ...] = ()  # bundle files sent over the network
    upload_bytes: int = 0
    reused: tuple[str, ...] = ()  # bundle files found on the device (linked, resumed, or in place)
    verified: int = 0  # files whose sha256 the device checked
    retried: tuple[str, ...] = ()  # files sent again after a sha256 mismatch
    runtime: str = ""  # one line: what happened to DIR/venv
    config: str | None = None  # config.json on the device, if written
    unit: str | None = None  # the unit file on the device, if written
    service: str = ""  # one line: what happened to the service
    commands: tuple[str, ...] = ()  # for the person to run next
    notes: tuple[str, ...] = ()
    dry_run: bool = False

    def summary(self) -> str:
        d = self.device
        lines = [
            f"device   {self.remote.rpartition(':')[0]} ({d.arch}, Python {d.python}, {d.memory_mb} MB RAM, "
            f"{d.cores} cores, {d.free_mb} MB free)",
            f"dir      {d.directory}",
        ]
        if self.bundle is not None:
            sent = f"{len(self.uploaded)} files, {_size(self.upload_bytes)}" if self.uploaded else "nothing"
            lines.append(f"upload   {sent} {'to send' if self.dry_run else 'sent'}; {len(self.reused)} files "
                         "already on the device")
            if self.retried:
                lines.append(f"retried  {', '.join(self.retried)} (sha256 mismatch after the first upload)")
            if not self.dry_run:
                lines.append(f"verified {self.verified} files by sha256 on the device")
        lines.append(f"active   current -> {_short(self.current)}, previous -> {_short(self.previous)}")
        if self.runtime:
            lines.append(f"runtime  {self.runtime}")
        if self.config:
            lines.append(f"config   {self.config}")
        if self.service:
            lines.append(f"service  {self.service}")
        lines += [f"note     {n}" for n in self.notes]
        lines += [f"run      {c}" for c in self.commands]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _short(sha: str | None) -> str:
    return f"bundles/{sha[:16]}" if sha else "(none)"


def render_unit(directory: str, *, user: str, system: bool) -> str:
    """The systemd unit running ``DIR/venv/bin/flexsfl edge run --config DIR/config.json``.

    ``directory`` is DIR, absolute. A ``system`` unit (root flashed) runs as ``user`` and gets the
    sandboxing options that need a privileged service manager; a user unit gets those that work
    unprivileged. None of them hides DIR, the data file (read-only) or /dev (a Jetson's GPU).
    """
    after = "After=network-online.target\nWants=network-online.target\n" if system else ""
    service = f"User={user}\n" if system else ""
    hardening = (
        "NoNewPrivileges=yes\nLockPersonality=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n"
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"
    )
    if system:
        hardening += (
            f"PrivateTmp=yes\nProtectSystem=strict\nProtectHome=read-only\nReadWritePaths={directory}\n"
            "ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\n"
        )
    return (
        "[Unit]\n"
        "Description=flexsfl edge runtime (FlexP-SFL client)\n"
        f"{after}"
        "\n[Service]\n"
        "Type=simple\n"
        f"{service}"
        f"WorkingDirectory={directory}\n"
        f"ExecStart={directory}/venv/bin/flexsfl edge run --config {directory}/{flash_remote.CONFIG}\n"
        "Restart=on-failure\n"
        "RestartSec=10\n"
        "Environment=PYTHONUNBUFFERED=1\n"  # log lines reach the journal as they are written
        f"Environment=XDG_CACHE_HOME={directory}/.cache\n"  # the one writable place besides DIR
        f"{hardening}"
        "\n[Install]\n"
        f"WantedBy={'multi-user.target' if system else 'default.target'}\n"
    )


# -- the runtime wheel -------------------------------------------------------------------------


def _source_root() -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[2]  # flexsfl/deploy/flash.py -> the checkout
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            "flexsfl does not run from a source checkout here (no pyproject.toml next to flexsfl/); "
            "pass --wheel FILE with a flexsfl wheel, or --skip-install"
        )
    return root


def build_wheel(out_dir: str | os.PathLike) -> pathlib.Path:
    """Build this checkout's wheel (``pip wheel --no-deps``) into ``out_dir`` and return its path.

    It builds from a copy of exactly what setuptools packs (the folders pyproject's
    ``tool.setuptools.package-dir`` maps into the ``flexsfl`` namespace), so stale ``build/``
    leftovers in the checkout never reach a device and the checkout is not touched.
    """
    root = _source_root()
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    folders = set(meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    readme = meta.get("project", {}).get("readme")
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="flexsfl-wheel-") as tmp:
        src = pathlib.Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(root / "pyproject.toml", src)
        if isinstance(readme, str) and (root / readme).is_file():
            shutil.copy2(root / readme, src)
        for name in sorted(folders):
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        log.info("building the flexsfl wheel from %s", root)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(src / "dist"), str(src)],
            capture_output=True, text=True,
        )
        wheels = sorted((src / "dist").glob("flexsfl-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no wheel written").splitlines()[-1]
            raise FlashError(f"building the flexsfl wheel failed: {last}; fix the build or pass --wheel FILE")
        out_dir.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(shutil.copy2(wheels[0], out_dir))


def wheel_digest(path: str | os.PathLike) -> str:
    """sha256 over a wheel's member names and contents.

    Two builds of the same sources differ in zip timestamps, so the file's own hash would
    reinstall the runtime on every flash; RECORD is left out because it only restates the hashes.
    """
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                if not name.endswith(".dist-info/RECORD"):
                    h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"--wheel {path}: not a readable wheel ({e}); build one with `pip wheel --no-deps .`"
        ) from None
    return h.hexdigest()


# -- SSH -----------------------------------------------------------------------------------------

_UNREACHABLE = ("Connection refused", "Connection timed out", "No route to host", "Could not resolve hostname",
                "Network is unreachable", "Name or service not known", "Operation timed out",
                "kex_exchange_identification", "Connection reset", "Connection closed by")
_AUTH_REFUSED = ("Permission denied", "Too many authentication failures", "Authentication failed")
_HOST_KEY = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")


def _last_line(lines: Iterable[str]) -> str:
    lines = [ln.strip() for ln in lines if ln.strip()]
    return lines[-1] if lines else "no message"


def _ssh_error(remote: Remote, stderr: list[str], during: str | None) -> FlashError:
    """One line for an ssh failure (exit status 255): while connecting, or ``during`` a step."""
    text, detail = "\n".join(stderr), _last_line(stderr)
    if during is not None:
        return FlashError(
            f"connection to {remote.login} lost during {during} ({detail}); the previous bundle is still "
            "active; run `flexsfl flash` again to resume"
        )
    if any(s in text for s in _HOST_KEY):
        return FlashError(
            f"the host key of {remote.host} is unknown or changed ({detail}); connect once with "
            f"`ssh {remote.login}` to check and accept it"
        )
    if any(s in text for s in _AUTH_REFUSED):
        return FlashError(
            f"authentication refused by {remote.login} ({detail}); install your key there with "
            f"`ssh-copy-id {remote.login}` or pass --identity KEY"
        )
    if any(s in text for s in _UNREACHABLE):
        return FlashError(
            f"cannot reach {remote.host} on port {remote.port or 22} ({detail}); check the address, that "
            "the device is on and that sshd runs there"
        )
    return FlashError(f"ssh {remote.login} failed ({detail})")


class _Session:
    """One OpenSSH connection to the device, shared by every step through a control socket.

    Use as a context manager; :meth:`call` runs one :mod:`flexsfl.deploy.flash_remote` operation.
    """

    def __init__(self, remote: Remote, python: str) -> None:
        self.remote = remote
        self.python = python
        self._tmp = tempfile.mkdtemp(prefix="flexsfl-ssh-")
        self._control = os.path.join(self._tmp, "control")
        self._errors = open(os.path.join(self._tmp, "master.err"), "wb")  # a file: a pipe could fill up and stall ssh
        self._master: subprocess.Popen | None = None

    def __enter__(self) -> _Session:
        # The master's remote command ends at EOF on its stdin, which only this process holds:
        # if we die, even by SIGKILL, the pipe closes and the connection goes with us.
        self._master = subprocess.Popen(
            self.remote.ssh_argv() + ["-M", "-S", self._control, "-o", "ControlPersist=no",
                                      self.remote.login, "cat >/dev/null"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors,
        )
        deadline = time.monotonic() + 4 * _CONNECT_TIMEOUT_S
        # The socket appears once the connection is authenticated.
        while not os.path.exists(self._control):
            if self._master.poll() is not None:
                err = pathlib.Path(self._errors.name).read_text(errors="replace").splitlines()
                self.close()
                raise _ssh_error(self.remote, err, None)
            if time.monotonic() > deadline:
                self.close()
                raise FlashError(
                    f"no answer from {self.remote.login} within {4 * _CONNECT_TIMEOUT_S} s; check the address"
                )
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                self._master.stdin.close()
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master = None
        self._errors.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def call(self, op: str, request: dict, payload: Callable[[BinaryIO], None] | None = None,
             what: str | None = None) -> dict:
        """Run operation ``op`` on the device and return its reply; ``payload`` writes the bytes after the request.

        ``what`` names the step in a lost-connection error. Raises :class:`FlashError` with the
        device's one-line refusal, or with what went wrong on the way.
        """
        cmd = f"{shlex.quote(self.python)} -c {shlex.quote(_HELPER_SOURCE)}"
        proc = subprocess.Popen(
            self.remote.ssh_argv() + ["-S", self._control, "-o", "ControlMaster=no", self.remote.login, cmd],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        stderr: list[str] = []

        def drain() -> None:  # in a thread, so a chatty step (pip) can never block on a full pipe
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                stderr.append(line)
                if op == "install" and line:
                    device_log.info("  %s", line)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            try:
                proc.stdin.write(json.dumps({"op": op, **request}).encode() + b"\n")
                if payload is not None:
                    payload(proc.stdin)
                proc.stdin.close()
            except BrokenPipeError:  # the far end is gone; ssh's exit status and stderr say why
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            out = proc.stdout.read().decode(errors="replace")
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join()
            proc.stdout.close()
            proc.stderr.close()
        return self._reply(op, proc.returncode, out, stderr, what or f"the {op} step")

    def _reply(self, op: str, status: int, out: str, stderr: list[str], what: str) -> dict:
        if status == 255:
            raise _ssh_error(self.remote, stderr, what)
        lines = out.strip().splitlines()
        try:
            reply = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            if status == 127:
                raise FlashError(
                    f"{self.remote.login}: no {self.python} on the device; install Python >= 3.11 there "
                    "or pass --python PATH"
                )
            if any("SyntaxError" in ln for ln in stderr):
                raise FlashError(
                    f"{self.remote.login}: {self.python} on the device is too old for flexsfl; install "
                    "Python >= 3.11 there or pass --python PATH"
                )
            raise FlashError(f"{self.remote.login}: the device's {op} step failed ({_last_line(stderr)})")
        if not reply.get("ok"):
            said = f" (its output ended: {_last_line(stderr)})" if any(ln.strip() for ln in stderr) else ""
            raise FlashError(f"{self.remote}: {reply.get('error', 'the device refused')}{said}")
        return reply


class _Counting:
    """A file whose reads are reported to ``on_read``: tarfile reads what it sends through this."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]) -> None:
        self._f, self._on_read = f, on_read

    def read(self, n: int = -1) -> bytes:
        block = self._f.read(n)
        self._on_read(len(block))
        return block


def _tar_payload(root: pathlib.Path, rels: Iterable[str], label: str,
                 on_progress: Callable[[Progress], None] | None) -> Callable[[BinaryIO], None]:
    """A payload that streams ``rels`` (paths under ``root``) as a tar, reporting progress per MB."""
    rels = list(rels)

    def write(pipe: BinaryIO) -> None:
        sizes = {rel: (root / rel).stat().st_size for rel in rels}
        total, done = sum(sizes.values()), 0
        with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = _MB
            for rel in rels:
                info = tarfile.TarInfo(rel)
                info.size, info.mode, info.mtime = sizes[rel], 0o644, int(time.time())

                def sent(n: int, rel: str = rel) -> None:
                    nonlocal done
                    done += n
                    if on_progress is not None:
                        on_progress(Progress(label, rel, done, total))

                with open(root / rel, "rb") as f:
                    tar.addfile(info, _Counting(f, sent))

    return write


# -- flashing ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a set of files gets onto the device."""

    files: dict[str, str]  # rel -> sha256 of every file that must end up there
    into: str  # where they are verified, relative to DIR: the staging directory, or where they already are
    staging: str  # where uploads and links go, relative to DIR
    upload: tuple[str, ...]  # sent over the network
    links: dict[str, str]  # rel -> absolute path of an identical file already on the device
    kept: tuple[str, ...]  # already in place

    @property
    def reused(self) -> tuple[str, ...]:
        return tuple(sorted((*self.links, *self.kept)))


def _bundle_plan(bundle: Bundle, dev: dict) -> _Plan:
    """Send only what the device has nowhere: a file with the same sha256 in a bundle already
    there is hard-linked, and complete files of an interrupted upload of this bundle are kept."""
    sha = bundle.manifest_sha256
    files = {**bundle.manifest.files, MANIFEST_NAME: sha}
    staging = f"{flash_remote.STAGING_PREFIX}{sha}"
    if sha in dev["bundles"]:  # re-flash: verify the copy that is there
        return _Plan(files, f"{flash_remote.BUNDLES}/{sha}", staging, (), {}, tuple(sorted(files)))
    there = {
        digest: posixpath.join(dev["dir"], flash_remote.BUNDLES, other, rel)
        for other, listed in dev["bundles"].items()
        for rel, digest in listed.items()
    }
    kept = tuple(sorted(rel for rel, digest in files.items() if dev["staging"].get(rel) == digest))
    links = {rel: there[digest] for rel, digest in files.items() if rel not in kept and digest in there}
    # The manifest goes last: a staging directory holding it has received everything before it.
    upload = tuple(sorted(rel for rel in files if rel not in kept and rel not in links and rel != MANIFEST_NAME))
    if MANIFEST_NAME not in kept:
        upload += (MANIFEST_NAME,)
    return _Plan(files, staging, staging, upload, links, kept)


def _send(session: _Session, root: pathlib.Path, plan: _Plan, label: str,
          on_progress: Callable[[Progress], None] | None) -> tuple[str, tuple[str, ...], int]:
    """Put ``plan`` on the device and verify it there; a mismatch is sent once more, then refused.

    Returns (where the verified files are, relative to DIR; the files sent again; files checked).
    """
    req = {"dir": session.remote.directory}
    if plan.upload or plan.links:
        session.call("receive", {**req, "into": plan.staging, "links": plan.links},
                     _tar_payload(root, plan.upload, label, on_progress), what=f"the {label} upload")
    into = plan.into
    checked = session.call("verify", {**req, "in": into, "files": plan.files, "delete_bad": into == plan.staging})
    if not checked["bad"]:
        return into, (), checked["checked"]
    bad = tuple(checked["bad"])
    log.warning("sha256 mismatch on the device for %s; sending it again", ", ".join(bad))
    # Files verified where they are (a bundle already on the device) are linked into staging.
    links = {} if into == plan.staging else {
        rel: posixpath.join(session.remote.directory, into, rel) for rel in plan.files if rel not in bad
    }
    session.call("receive", {**req, "into": plan.staging, "links": links},
                 _tar_payload(root, bad, f"{label} (retry)", on_progress), what=f"the {label} upload")
    checked = session.call("verify", {**req, "in": plan.staging, "files": plan.files, "delete_bad": True})
    if checked["bad"]:
        raise FlashError(
            f"{session.remote}: sha256 mismatch on the device for {', '.join(checked['bad'])} after the upload "
            "and one retry; the previous bundle is still active; check the device's storage (dmesg, free "
            "space) and the bundle here, then flash again"
        )
    return plan.staging, bad, checked["checked"]


def _choose_backend(manifest: Manifest, requested: str | None) -> str:
    if requested is not None:
        if requested not in manifest.backend:
            raise ConfigError(
                f"--backend {requested}: the bundle holds {', '.join(manifest.backend)}; export it with "
                f"--backend {requested}"
            )
        return requested
    preferred = manifest.target.preferred_backend
    return preferred if preferred in manifest.backend else manifest.backend[0]


def _check_device(remote: Remote, manifest: Manifest, dev: dict, install: bool) -> None:
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


def _check_disk(remote: Remote, dev: dict, upload_bytes: int, venv_mb: int) -> None:
    need_mb = upload_bytes // _MB + venv_mb + _DISK_MARGIN_MB
    if dev["free"] // _MB < need_mb:
        venv = f" + about {venv_mb} MB for the runtime venv" if venv_mb else ""
        raise FlashError(
            f"{remote}: {dev['free'] // _MB} MB free in {dev['dir']} but the flash needs about {need_mb} MB "
            f"({upload_bytes / 1e6:.1f} MB of bundle files{venv}); free some space or pick another DIR"
        )


def _client_config(remote: Remote, dev: dict, settings: ClientSettings, backend: str, token: str | None) -> dict | None:
    """The device's config.json after this flash, or None if it cannot be complete yet."""
    root = dev["dir"]
    old = dev["config"] if isinstance(dev["config"], dict) else {}
    # The personal adapters live outside bundles/, so switching or pruning bundles never loses them.
    cfg = {"state_dir": posixpath.join(root, flash_remote.STATE), **old,
           "bundle": posixpath.join(root, flash_remote.CURRENT), "backend": backend}
    for key, value in (("server", settings.server), ("client_id", settings.client_id), ("threads", settings.threads)):
        if value is not None:
            cfg[key] = value
    if token is not None or dev["token"]:
        cfg["token_file"] = posixpath.join(root, flash_remote.TOKEN)
    if settings.data is not None:
        cfg["data"] = dev["data"]["path"]
    missing = [k for k in ("server", "client_id", "token_file", "data") if not cfg.get(k)]
    if not missing:
        return cfg
    if settings.given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in missing)
        raise ConfigError(
            f"{remote}: the client config needs {flags} too (the device has no config.json with them yet)"
        )
    return None


def _remote_dir(remote: Remote, dev: dict) -> Remote:
    """``remote`` with DIR made absolute as the device resolved it, so every later step agrees."""
    return dataclasses.replace(remote, directory=dev["dir"])


def flash(
    bundle: str | os.PathLike,
    destination: str | Remote,
    *,
    settings: ClientSettings = ClientSettings(),
    python: str = "python3",
    wheel: str | os.PathLike | None = None,
    install: bool = True,
    service: bool = True,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> FlashReport:
    """Flash ``bundle`` (directory or .tar.gz) to ``destination`` (``user@host[:DIR]`` or a :class:`Remote`).

    ``python``: the device's interpreter that runs the steps and creates the venv. ``wheel``: the
    flexsfl wheel to install (default: built from this checkout); ``install=False`` leaves
    DIR/venv alone. ``service=False`` writes the config but no unit. ``dry_run`` probes, checks
    and plans, and changes nothing on the device. ``on_progress`` sees every upload's bytes.

    Raises :class:`ConfigError` for bad arguments and :class:`FlashError` for everything met on
    the way; both before the switch of DIR/current leave the previous bundle active.
    """
    remote = destination if isinstance(destination, Remote) else Remote.parse(destination)
    loaded = load_bundle(bundle)
    manifest, sha = loaded.manifest, loaded.manifest_sha256
    backend = _choose_backend(manifest, settings.backend)
    extra = EXTRAS[backend]
    token = settings.read_token()
    with tempfile.TemporaryDirectory(prefix="flexsfl-flash-") as tmp, _Session(remote, python) as session:
        log.info("probing %s", remote.login)
        dev = session.call("probe", {"dir": remote.directory, "bundle": sha, "data": settings.data})
        session.remote = remote = _remote_dir(remote, dev)
        device = DeviceInfo.from_probe(dev)
        _check_device(remote, manifest, dev, install)
        if settings.data is not None and not dev["data"]["exists"]:
            raise FlashError(
                f"{remote}: --data {dev['data']['path']} does not exist on the device; copy it there first "
                f"(scp FILE {remote.login}:{dev['data']['path']}) or fix --data"
            )
        config = _client_config(remote, dev, settings, backend, token)
        plan = _bundle_plan(loaded, dev)
        upload_bytes = sum((loaded.root / rel).stat().st_size for rel in plan.upload)

        runtime_plan = None
        venv_mb = 0
        if install:
            local_wheel = pathlib.Path(wheel) if wheel is not None else build_wheel(tmp)
            digest = wheel_digest(local_wheel)
            old = dev["runtime"] or {}
            if (old.get("digest"), old.get("extra")) != (digest, extra):
                runtime_plan = _Plan({local_wheel.name: sha256_file(local_wheel)}, "wheels", "wheels",
                                     (local_wheel.name,), {}, ())
                venv_mb = _venv_mb(backend, dev["arch"]) if old.get("extra") != extra else 0
        _check_disk(remote, dev, upload_bytes, venv_mb)

        unit_text = render_unit(dev["dir"], user=dev["user"], system=device.root) if service and config else None
        run_cmd = f"{dev['dir']}/venv/bin/flexsfl edge run --config {dev['dir']}/{flash_remote.CONFIG}"
        notes = _notes(dev, config, install)
        if install:
            state = ("would install" if dry_run else "installed") if runtime_plan else "up to date"
            runtime = f"flexsfl[{extra}] in {dev['dir']}/venv: {state}"
        else:
            runtime = "left alone (--skip-install)"
        report = FlashReport(
            remote=str(remote), device=device, bundle=sha, current=dev["current"], previous=dev["previous"],
            uploaded=plan.upload, upload_bytes=upload_bytes, reused=plan.reused, runtime=runtime, notes=notes,
        )
        if dry_run:
            return dataclasses.replace(report, dry_run=True, service=f"would write {UNIT_NAME}" if unit_text else "")

        if plan.upload:
            log.info("sending %d files (%s); %d already on the device", len(plan.upload), _size(upload_bytes),
                     len(plan.reused))
        else:
            log.info("nothing to send: checking the %d files on the device", len(plan.reused))
        verified_in, retried, verified = _send(session, loaded.root, plan, "bundle", on_progress)
        if runtime_plan is not None:
            log.info("installing flexsfl[%s] into %s/venv (pip on the device; minutes on a Pi)", extra, dev["dir"])
            _send(session, local_wheel.parent, runtime_plan, "runtime wheel", on_progress)
            session.call("install", {"dir": remote.directory, "wheel": f"wheels/{local_wheel.name}",
                                     "extra": extra, "digest": digest}, what="the runtime install")
        act = session.call("activate", {"dir": remote.directory, "bundle": sha,
                                        "staged": verified_in == plan.staging})
        if act["removed"]:
            log.info("pruned %s from %s/bundles", ", ".join(b[:16] for b in act["removed"]), dev["dir"])
        conf = session.call("configure", {
            "dir": remote.directory, "config": config, "token": token, "unit": unit_text,
            "changed": act["switched"] or runtime_plan is not None,
        })
    return dataclasses.replace(
        report,
        current=act["current"], previous=act["previous"],
        uploaded=tuple(dict.fromkeys((*plan.upload, *retried))),
        upload_bytes=upload_bytes + sum((loaded.root / rel).stat().st_size for rel in retried),
        verified=verified, retried=retried,
        config=posixpath.join(dev["dir"], flash_remote.CONFIG) if config else None,
        unit=conf["unit"],
        **_service_outcome(conf, device, run_cmd, service),
    )


def _notes(dev: dict, config: dict | None, install: bool) -> tuple[str, ...]:
    notes = []
    if config is None:
        notes.append(
            "no client config yet: flash again with --server URL --client-id ID --token-file F --data PATH "
            "to write config.json and install the service"
        )
    if not install and dev["runtime"] is None:
        notes.append(f"no runtime in {dev['dir']}/venv; flash without --skip-install to install it")
    return tuple(notes)


def _service_outcome(conf: dict, device: DeviceInfo, run_cmd: str, service: bool) -> dict:
    """The report's service line and the commands for the person, from the configure step's reply."""
    if conf["unit"] is None:  # --no-service, or no complete config yet (a note says so)
        return {"service": "not installed (--no-service)", "commands": (run_cmd,)} if not service else {}
    unit = f"{UNIT_NAME} ({'system' if device.root else 'user'} unit {conf['unit']})"
    if conf["started"]:
        verb = "restarted" if conf["changed"] else "running"
        return {"service": f"{unit} enabled, {verb}", "commands": (_follow_logs(device),)}
    if conf["error"]:
        return {"service": f"{unit} written, not started: {conf['error']}",
                "commands": (" && ".join(conf["commands"]), run_cmd)}
    return {"service": f"{unit} written, not started: systemd is not running on the device", "commands": (run_cmd,)}


def rollback(destination: str | Remote, *, python: str = "python3") -> FlashReport:
    """Switch DIR/current back to DIR/previous (and previous to what was current); restart the service."""
    remote = destination if isinstance(destination, Remote) else Remote.parse(destination)
    with _Session(remote, python) as session:
        dev = session.call("probe", {"dir": remote.directory})
        session.remote = remote = _remote_dir(remote, dev)
        result = session.call("rollback", {"dir": remote.directory})
    device = DeviceInfo.from_probe(dev)
    if result["restarted"]:
        service, commands = f"{UNIT_NAME} restarted", (_follow_logs(device),)
    elif result["error"]:
        service, commands = f"not restarted: {result['error']}", ()
    else:
        service, commands = "not restarted (no unit, or systemd is not running)", ()
    return FlashReport(remote=str(remote), device=device, bundle=None, current=result["current"],
                       previous=result["previous"], service=service, commands=commands)


def _follow_logs(device: DeviceInfo) -> str:
    return f"journalctl{'' if device.root else ' --user'} -u {UNIT_NAME.removesuffix('.service')} -f"


# -- command line ---------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``flexsfl flash`` to a CLI's subparsers; the handler is :func:`run` (also ``func`` default)."""
    p = subparsers.add_parser(
        "flash",
        help="put a bundle on an edge device over SSH and run the edge runtime there as a service",
        description=(
            "Copy a bundle to an edge device over SSH (only what changed), verify every sha256 there, "
            "switch DIR/current atomically, install the edge runtime in DIR/venv and run it as the "
            f"systemd service {UNIT_NAME}. Uses your ssh client and its config; keys only (BatchMode)."
        ),
    )
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle directory or .tar.gz from `flexsfl export`")
    p.add_argument("destination", nargs="?", metavar="user@host[:DIR]",
                   help=f"SSH login and device directory (default DIR: ~/{DEFAULT_DIR})")
    p.add_argument("--port", "-p", type=int, help="SSH port (default: ssh's)")
    p.add_argument("--identity", "-i", metavar="KEY", help="SSH private key file")
    p.add_argument("-o", dest="ssh_options", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ssh option, repeatable (e.g. -o StrictHostKeyChecking=accept-new)")
    c = p.add_argument_group("client config (DIR/config.json; omitted settings keep the device's)")
    c.add_argument("--server", metavar="URL", help="ws:// or wss:// URL of `flexsfl serve`")
    c.add_argument("--client-id", metavar="ID", help="this device's client id on the server")
    c.add_argument("--token-file", metavar="F",
                   help="local file with the client's token (copied to DIR/token, mode 0600)")
    c.add_argument("--data", metavar="PATH", help="the data set's path on the device (relative: under DIR)")
    c.add_argument("--backend", choices=sorted(EXTRAS), help="runtime backend (default: the target's preferred one)")
    c.add_argument("--threads", type=int, metavar="N", help="runtime threads (default: the runtime decides)")
    p.add_argument("--python", default="python3", metavar="PATH", help="python on the device (default: python3)")
    p.add_argument("--wheel", metavar="FILE", help="flexsfl wheel to install (default: built from this checkout)")
    p.add_argument("--skip-install", action="store_true", help="leave the runtime in DIR/venv as it is")
    p.add_argument("--no-service", action="store_true",
                   help="write the config but no systemd unit; print the run command")
    p.add_argument("--dry-run", action="store_true", help="probe, check and plan; change nothing on the device")
    p.add_argument("--rollback", action="store_true",
                   help="switch DIR/current back to the previous bundle (give only user@host[:DIR])")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle ``flexsfl flash``: steps and upload bars on stderr, the summary on stdout.

    Errors propagate as :class:`FlexSFLError` (the ``flexsfl`` main prints them as one line).
    """
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bars

    if args.rollback:
        if args.destination is not None or args.bundle is None:
            raise ConfigError("flexsfl flash --rollback takes one argument: user@host[:DIR]")
    elif args.bundle is None or args.destination is None:
        raise ConfigError("flexsfl flash needs BUNDLE and user@host[:DIR] (or --rollback user@host[:DIR])")
    remote = Remote.parse(args.bundle if args.rollback else args.destination, port=args.port,
                          identity=args.identity, ssh_options=tuple(args.ssh_options))
    console = Console(stderr=True)
    # A person waits on these steps (pip on a Pi takes minutes), so they show without -v; the
    # device's own output (pip's lines) shows with -v.
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    saved = log.level, log.propagate, device_log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    device_log.setLevel(logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    try:
        if args.rollback:
            report = rollback(remote, python=args.python)
        else:
            settings = ClientSettings(server=args.server, client_id=args.client_id, token_file=args.token_file,
                                      data=args.data, backend=args.backend, threads=args.threads)
            with Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=console) as bars:
                tasks: dict[str, int] = {}

                def show(p: Progress) -> None:
                    if p.label not in tasks:
                        tasks[p.label] = bars.add_task(p.label, total=p.total)
                    bars.update(tasks[p.label], completed=p.done, description=f"{p.label} {p.path}")

                report = flash(args.bundle, remote, settings=settings, python=args.python, wheel=args.wheel,
                               install=not args.skip_install, service=not args.no_service, dry_run=args.dry_run,
                               on_progress=show)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        device_log.setLevel(saved[2])
    print(report.summary())
    return 0
