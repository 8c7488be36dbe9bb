"""One OpenSSH connection to a device, and the standard-library helper script run through it.

The transport is the system OpenSSH client (docs/flash.md says why): one connection per flash,
shared by every step through a control socket. Each step sends the source of
:mod:`flexsfl.deploy.flash_remote` as ``python3 -c SOURCE`` with a JSON request on stdin (and an
optional byte payload after it) and reads one JSON reply. Every ssh failure becomes one
:class:`FlashError` line that says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from flexsfl.core.errors import ConfigError, FlashError
from flexsfl.deploy import flash_remote

__all__ = ["DEFAULT_DIR", "SAFE_PATH", "Remote", "Session", "last_line"]

# Every deploy module logs to the flash logger, which `flexsfl flash` shows; the device's own
# output (pip's lines) goes to its child and shows with -v.
log = logging.getLogger("flexsfl.flash")
device_log = logging.getLogger("flexsfl.flash.device")

DEFAULT_DIR = "flexsfl"  # under the login user's home
_CONNECT_TIMEOUT_S = 15
_HELPER_SOURCE = pathlib.Path(flash_remote.__file__).read_text()

# Characters that need no quoting in a shell, a systemd unit or JSON: DIR ends up in all three.
SAFE_PATH = re.compile(r"[A-Za-z0-9._/~+@-]+")
_SAFE_USER = re.compile(r"[A-Za-z0-9._-]+")
_SAFE_HOST = re.compile(r"[A-Za-z0-9._:%-]+")
_SSH_OPTION = re.compile(r"[A-Za-z]+=\S.*")


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
        if not SAFE_PATH.fullmatch(self.directory):
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


_UNREACHABLE = ("Connection refused", "Connection timed out", "No route to host", "Could not resolve hostname",
                "Network is unreachable", "Name or service not known", "Operation timed out",
                "kex_exchange_identification", "Connection reset", "Connection closed by")
_AUTH_REFUSED = ("Permission denied", "Too many authentication failures", "Authentication failed")
_HOST_KEY = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")


def last_line(lines: Iterable[str]) -> str:
    lines = [ln.strip() for ln in lines if ln.strip()]
    return lines[-1] if lines else "no message"


def _ssh_error(remote: Remote, stderr: list[str], during: str | None) -> FlashError:
    """One line for an ssh failure (exit status 255): while connecting, or ``during`` a step."""
    text, detail = "\n".join(stderr), last_line(stderr)
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


class Session:
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

    def __enter__(self) -> Session:
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
            raise FlashError(f"{self.remote.login}: the device's {op} step failed ({last_line(stderr)})")
        if not reply.get("ok"):
            said = f" (its output ended: {last_line(stderr)})" if any(ln.strip() for ln in stderr) else ""
            raise FlashError(f"{self.remote}: {reply.get('error', 'the device refused')}{said}")
        return reply

