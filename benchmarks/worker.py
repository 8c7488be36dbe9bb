"""Benchmark subprocesses: each measured party runs in its own process, driven by JSON lines.

Why processes: peak RSS is per process, and thread settings (``OMP_NUM_THREADS``, torch's and
ONNX Runtime's pools) are only clean in a process that set them before importing anything. A
:class:`Worker` starts ``python -m flexsfl.benchmarks.worker MODULE:FUNCTION`` with the thread variables
pinned; the function gets a :class:`Channel` and talks to the parent in JSON lines::

    w = Worker("flexsfl.benchmarks.latency:backend_worker", threads=1)
    w.send({"backend": "ort", ...}); ready = w.recv()      # the worker loads and warms up
    w.send({"reps": 10}); times = w.recv()                 # ... as often as the parent likes
    w.close()                                              # {"stop": true}; waits for exit

The protocol runs over a private copy of the child's stdout; the child's own fd 1 is pointed at
its stderr (a log file), so a library that prints cannot corrupt it. A worker that raises sends
``{"error": ...}``, which :meth:`Worker.recv` turns into a :class:`BackendError` naming the
worker and the log file.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import select
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from flexsfl.core.errors import BackendError

__all__ = ["Worker", "Channel", "thread_env"]

_REPO = pathlib.Path(__file__).resolve().parent.parent


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that must use ``threads`` compute threads, and no hub."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    # The worker imports benchmarks.* and the project from the repository it belongs to.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Worker:
    """One benchmark subprocess running ``target`` (``"module:function"``)."""

    def __init__(self, target: str, *, threads: int = 1, name: str | None = None, log_dir: str | os.PathLike | None = None):
        self.target = target
        self.name = name or target.rpartition(":")[2]
        log_dir = pathlib.Path(log_dir or tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexsfl.benchmarks.worker", target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=thread_env(threads), cwd=_REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The worker's next message; BackendError if it failed, exited or stayed silent too long."""
        if timeout is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise BackendError(f"benchmark worker {self.name} said nothing for {timeout:.0f} s; see {self.log_path}")
        line = self.proc.stdout.readline()
        if not line:
            raise self._died()
        msg = json.loads(line)
        if "error" in msg:
            raise BackendError(f"benchmark worker {self.name} failed: {msg['error']} (log: {self.log_path})")
        return msg

    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.send(msg)
        return self.recv(timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Ask the worker to stop and wait for it (killed if it does not exit in ``timeout``).
        The log file is removed if the worker exited cleanly."""
        if self.proc.poll() is None:
            try:
                self.send({"stop": True})
            except BackendError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()
        self._log.close()
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)  # kept only when the worker failed

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _died(self) -> BackendError:
        code = self.proc.wait()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.exists() else []
        why = f": {tail[0]}" if tail else ""
        return BackendError(f"benchmark worker {self.name} exited with status {code}{why} (log: {self.log_path})")


class Channel:
    """The child's end: JSON lines in on stdin, out on a private copy of stdout."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # anything printed now lands in the log, not in the protocol
        sys.stdout = sys.stderr
        self._in = sys.stdin

    def recv(self) -> dict[str, Any] | None:
        """The parent's next message, or None when it asks to stop (or went away)."""
        line = self._in.readline()
        if not line:
            return None
        msg = json.loads(line)
        return None if msg.get("stop") else msg

    def send(self, msg: dict[str, Any]) -> None:
        self._out.write(json.dumps(msg) + "\n")


def _main(target: str) -> int:
    chan = Channel()
    try:
        mod, _, fn = target.partition(":")
        func: Callable[[Channel], None] = getattr(importlib.import_module(mod), fn)
        func(chan)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it as a BackendError
        traceback.print_exc()
        chan.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
