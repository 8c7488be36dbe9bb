"""Real processes for integration tests: ``flexsfl serve`` and ``flexsfl edge run`` over loopback."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), **(extra or {})}


def flexsfl(*args: str, log: pathlib.Path, extra_env: dict | None = None, python: list[str] | None = None) -> subprocess.Popen:
    """Start ``python -m flexsfl ARGS`` with its output in ``log``."""
    cmd = (python or [sys.executable]) + ["-m", "flexsfl", "-v", *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(extra_env), cwd=ROOT)


def wait_listening(port: int, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            # A short run can listen, train (a waiting client connects at once) and exit 0 between two polls.
            if proc.returncode == 0 and f"serving ws://127.0.0.1:{port}" in log.read_text():
                return
            raise AssertionError(f"server exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"server did not listen on {port} within {timeout} s:\n{log.read_text()[-3000:]}")


def finish(procs: dict[str, tuple[subprocess.Popen, pathlib.Path]], timeout: float = 300) -> None:
    """Wait for every process; fail with its log if one fails or hangs."""
    deadline = time.time() + timeout
    try:
        for name, (p, log) in procs.items():
            try:
                rc = p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
            assert rc == 0, f"{name} exited with {rc}:\n{log.read_text()[-4000:]}"
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()


def events(state_dir: pathlib.Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r["event"] == kind]


def load_global(state_dir: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(state_dir / "global.safetensors"))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
