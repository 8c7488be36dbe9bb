"""In-process clients open their ORT sessions from threads at once; the process's one shared arena
is registered once however many ask together.

Found by a simulation whose four in-process clients opened their backends at the same moment: two
passed the "not yet registered" check, the second registration raised ONNX Runtime's "An allocator
for this device has already been registered for sharing", and that client died. Each case runs in a
fresh interpreter (the arena is process-wide) with the real onnxruntime; the registration is slowed
by 0.2 s so that the threads' race is certain rather than a matter of scheduling.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, threading, time, types
from flexsfl.edge_runtime.backends import ort as backend
ort = backend.import_onnxruntime()
calls = []
def slow_register(info, cfg):
    calls.append(1)
    time.sleep(0.2)  # widen the window between the check and the registration
    ort.create_and_register_allocator(info, cfg)
proxy = types.SimpleNamespace(**{n: getattr(ort, n) for n in dir(ort) if not n.startswith("__")})
proxy.create_and_register_allocator = slow_register
{setup}
start, errors = threading.Barrier(8), []
def open_one():
    start.wait()
    try:
        opts = ort.SessionOptions()
        backend.use_shared_arena(proxy, opts)
    except Exception as e:
        errors.append(str(e).splitlines()[0])
threads = [threading.Thread(target=open_one) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"registrations": len(calls), "errors": errors}))
"""


def _run(setup: str = "") -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("{setup}", setup)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_threads_register_the_arena_once():
    got = _run()
    assert got == {"registrations": 1, "errors": []}


def test_without_the_lock_the_threads_race():
    # What the lock prevents (so the test above is not vacuous): the same threads, the lock replaced by a no-op.
    got = _run("import contextlib; backend._ARENA_LOCK = contextlib.nullcontext()")
    assert got["registrations"] > 1
    assert any("already been registered" in e for e in got["errors"])
