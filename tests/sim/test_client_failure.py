"""A simulation whose in-process client dies ends with that client's error, promptly, and leaves no
thread behind. It used to close the server's state while the server still served: the other
clients were welcomed and failed (1011) in a loop, and the process never exited.

The simulation runs in a child process (a hang fails the test by its timeout instead of hanging the
suite); its client c1 raises once c0 and c2 are connected (the server's own log says so).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.sim.test_inprocess_keepalive import _csv

SCRIPT = textwrap.dedent("""
    import json, pathlib, sys, threading, time
    import flexsfl.sim.simulate as sm
    from flexsfl.core.errors import FlexSFLError
    from flexsfl.sim.config import SimConfig

    model, data, out = sys.argv[1:4]
    real = sm._run_edge_quiet

    def hellos():
        log = pathlib.Path(out) / "server" / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        return {e.get("client") for e in map(json.loads, lines) if e.get("event") == "hello"}

    def dies_once_the_others_are_in(args, *rest):
        if args["client_id"] != "c1":
            return real(args, *rest)
        deadline = time.monotonic() + 120
        while hellos() != {"c0", "c2"} and time.monotonic() < deadline:
            time.sleep(0.1)
        raise FlexSFLError("test: c1's device failed")

    sm._run_edge_quiet = dies_once_the_others_are_in
    cfg = SimConfig(strategy="flexpsfl", model=model, data=data, partition="iid", clients=3, rounds=50, local_steps=2,
                    batch_size=4, splits=(1,), max_train=24, max_test=12, max_seq=16, in_process=True, out=out)
    try:
        sm.simulate(cfg, show=False)
    except FlexSFLError as e:
        left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        print("raised:", e, "| peers seen:", sorted(hellos()), "| threads left (not daemon):", left, flush=True)
""")


def test_a_dead_in_process_client_ends_the_simulation_with_its_error(tiny_model_dirs, tmp_path):
    data = _csv(tmp_path / "d.csv")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {"FLEXSFL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dirs["bert"]), str(data), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    line = next((x for x in done.stdout.splitlines() if x.startswith("raised:")), None)
    assert line == "raised: test: c1's device failed | peers seen: ['c0', 'c2'] | threads left (not daemon): []", tail
    assert "retrying" not in done.stdout + done.stderr, tail  # stopped at the lost connection, no reconnect loop
