"""A real OpenSSH server on loopback for the flash tests, and small real bundles to flash.

``sshd`` (session scope) starts ``/usr/sbin/sshd -D -f <config>`` on a free port with a fresh host
key and key-only authentication. Run as root, it logs in a throwaway user made with ``useradd``
(removed afterwards), so the device directory, the user's systemd unit and pip's cache all land
in that user's home, as on a real device; otherwise it logs in the user running the tests. It
installs Debian's openssh-server when sshd is missing and it can, and skips only when it cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from flexsfl.core.bundle import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    LoraInfo,
    Manifest,
    ModelInfo,
    ParamSpec,
    TensorSpec,
)
from flexsfl.core.targets import TARGETS, TargetProfile
from flexsfl.deploy.wheel import build_wheel

SSHD = "/usr/sbin/sshd"


def _ensure_sshd() -> str | None:
    """Path of sshd, installing Debian's openssh-server if it is missing; None if that cannot work."""
    if os.path.exists(SSHD):
        return SSHD
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "openssh-server"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return SSHD if os.path.exists(SSHD) else None


def pytest_collection_modifyitems(items):
    # The pyproject's "ssh" marker, on every test that logs in to the loopback sshd.
    for item in items:
        if "sshd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ssh)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc."""
    kids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name is in parentheses and may hold spaces: split after the last ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


@dataclasses.dataclass
class SSHServer:
    """A running sshd and what a client needs to log in to it."""

    port: int
    user: str
    home: pathlib.Path
    uid: int
    key: pathlib.Path  # the client's private key (authorized)
    other_key: pathlib.Path  # a key the server does not know
    known_hosts: pathlib.Path
    pid: int

    host = "127.0.0.1"

    @property
    def options(self) -> tuple[str, ...]:
        """ssh -o options pinning the host key and the key to offer, whatever the runner's ~/.ssh says."""
        return (f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes",
                "IdentityAgent=none")

    def destination(self, directory: str) -> str:
        return f"{self.user}@{self.host}:{directory}"

    def sessions(self) -> list[int]:
        """Processes serving live connections (the listener's children)."""
        return children(self.pid)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    binary = _ensure_sshd()
    if binary is None:
        pytest.skip("no OpenSSH server: install it with `apt-get install -y openssh-server`")
    tmp = tmp_path_factory.mktemp("sshd")
    tmp.chmod(0o755)
    for name in ("host", "client", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(tmp / name)], check=True)
    made_user = None
    if os.geteuid() == 0:
        made_user = f"fsfl{secrets.token_hex(4)}"
        # "*" rather than useradd's locked "!": sshd refuses locked accounts even for key logins.
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", made_user], check=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    pw = pwd.getpwnam(made_user) if made_user else pwd.getpwuid(os.geteuid())
    home = pathlib.Path(pw.pw_dir)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    old_keys = keys.read_text() if keys.exists() else None
    keys.write_text((old_keys or "") + (tmp / "client.pub").read_text())
    keys.chmod(0o600)
    for p in (ssh_dir, keys):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {tmp / 'host'}\nPidFile {tmp / 'sshd.pid'}\n"
        f"AllowUsers {pw.pw_name}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nMaxSessions 20\nLogLevel VERBOSE\n"
    )
    with open(tmp / "sshd.log", "wb") as log:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(tmp / 'sshd.log').read_text()}")
            time.sleep(0.05)
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {(tmp / 'host.pub').read_text()}")
    try:
        yield SSHServer(port=port, user=pw.pw_name, home=home, uid=pw.pw_uid, key=tmp / "client",
                        other_key=tmp / "stranger", known_hosts=tmp / "known_hosts", pid=proc.pid)
    finally:
        for pid in descendants(proc.pid):  # sessions outlive the listener: end them and what they run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        if made_user:
            subprocess.run(["userdel", "--remove", "--force", made_user], capture_output=True)
        elif old_keys is None:
            keys.unlink()
        else:
            keys.write_text(old_keys)


def write_bundle(root: pathlib.Path, files: dict[str, bytes], *, target: TargetProfile = TARGETS["generic-x86_64"],
                 backend: tuple[str, ...] = ("ort",)) -> pathlib.Path:
    """A real bundle: ``files`` (artifacts, tokenizer, adapter) on disk and a manifest with their sha256.

    ``files`` must hold "ort/forward.onnx", "tokenizer/tokenizer.json" and the two adapter files;
    the bytes are whatever the test needs (large random data for transfer tests).
    """
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    d, r = 32, 4
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(id="test-bert", revision="sha256:" + "0" * 64, family="bert", num_blocks=4, hidden_size=d,
                        vocab_size=100, task="seq_cls", num_labels=2),
        split=2,
        backend=backend,
        target=target,
        optimizer={"name": "sgd", "lr": 0.01},
        lora=LoraInfo(r=r, alpha=8.0, dropout=0.0, target_modules=("query", "value")),
        max_batch=8,
        max_seq=32,
        inputs={"ort.forward": (TensorSpec("input_ids", "int64", ("batch", "seq")),  # + θ, named as below
                                TensorSpec("base_model.model.layer.0.query.lora_A.weight", "float32", (r, d)))},
        outputs={"ort.forward": (TensorSpec("z", "float32", ("batch", "seq", d)),)},
        trainable_parameters=(ParamSpec("base_model.model.layer.0.query.lora_A.weight", (r, d), "float32", 0),),
        artifacts={"ort.forward": "ort/forward.onnx"},
        step={"ort": "split"},
        tokenizer="tokenizer/tokenizer.json",
        adapter="adapter",
        files={rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())},
        created="2026-01-01T00:00:00Z",
    )
    (root / MANIFEST_NAME).write_text(manifest.dumps())
    return root


def bundle_files(seed: int, big_mb: float = 2.0) -> dict[str, bytes]:
    """Contents for :func:`write_bundle`: a random "artifact" of ``big_mb`` MB and small real-format files."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return {
        "ort/forward.onnx": rng.bytes(int(big_mb * 1e6)),
        "tokenizer/tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}}}',
        f"adapter/{ADAPTER_CONFIG_NAME}": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}',
        f"adapter/{ADAPTER_WEIGHTS_NAME}": save({"lora_A": rng.standard_normal((4, 32)).astype(np.float32)}),
    }


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> pathlib.Path:
    """This checkout's wheel, built once: the checkout may change between two builds."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))

