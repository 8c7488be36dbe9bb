"""Where ``flexsfl demo`` spends its CPU and wall time from a cold bundle cache, per phase and per role.

    python -m flexsfl.benchmarks.demo_phases [--out results/demo_phases] [--keep-cache] [-- DEMO FLAGS]

Runs ``flexsfl -v demo`` as ``make demo`` does (``OMP_NUM_THREADS=1``), with ``FLEXSFL_CACHE`` set
to a fresh directory holding only the VADER archive (copied from the usual cache, fetched there
first if missing), so both bundles are exported. While it runs, every process of its tree is
sampled from ``/proc`` every 0.2 s; each process's own CPU time (user + system) is kept from its
last sample after it ends, so the CPU of the export workers and the client processes is counted
once, by role (``main``: the demo process, which hosts the server; ``export``: its spawned export
workers; ``client``: the ``flexsfl edge run`` processes). Each line the demo logs is timestamped;
the phases are the spans between the first log lines that mark them (:data:`MARKS`), so a phase
is "until this happened", and the CPU of a phase is what the whole tree used in that span.

CPU seconds are the robust figure on a shared machine (other processes lengthen the wall time,
not the work); the 1-minute load before and after travels with every result. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from flexsfl.benchmarks.machine import machine_info

__all__ = ["MARKS", "TreeSampler", "phase_table", "main"]

# (phase, regex of the log line that ends it): the first match of each, in the order they happen.
MARKS = (
    ("start-up, data, model", r"flexsfl\.models INFO loaded"),
    ("server listening", r"server listening"),
    ("clients connected", r"round 0: "),
    ("rounds (training + per-round eval)", r"round \d+ done in"),  # the last round's line (see phase_table)
    ("table, plot, exit", r"$^"),  # the process's exit
)

_TICK = os.sysconf("SC_CLK_TCK")


class TreeSampler:
    """Own CPU seconds of every process under ``root``, sampled from ``/proc`` (kept after exit)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}  # pid -> own utime + stime, s (last sample)
        self.role: dict[int, str] = {}
        self.samples: list[tuple[float, float]] = []  # (perf_counter, total CPU s of the tree)

    def _stat(self, pid: int) -> tuple[int, float] | None:
        try:
            raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        f = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... utime is field 14
        return int(f[1]), (int(f[11]) + int(f[12])) / _TICK

    def _classify(self, pid: int) -> str:
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if pid == self.root:
            return "main"
        if " edge run" in cmd:
            return "client"
        if "multiprocessing" in cmd:
            return "export"
        return "other"

    def sample(self) -> None:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and (s := self._stat(int(d))) is not None:
                stats[int(d)] = s
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in tree:
                    tree.add(c)
                    frontier.append(c)
        for pid in tree:
            if pid in stats:
                if pid not in self.role:
                    self.role[pid] = self._classify(pid)
                self.cpu[pid] = stats[pid][1]
        self.samples.append((time.perf_counter(), sum(self.cpu.values())))

    def at(self, t: float) -> float:
        """Total CPU s of the tree at time ``t`` (the last sample at or before it)."""
        best = 0.0
        for ts, c in self.samples:
            if ts > t:
                break
            best = c
        return best

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, c in self.cpu.items():
            out[self.role[pid]] = out.get(self.role[pid], 0.0) + c
        return {k: round(v, 1) for k, v in sorted(out.items())}


def phase_table(lines: list[tuple[float, str]], sampler: TreeSampler, t0: float, t_end: float) -> list[dict]:
    """Per phase of :data:`MARKS` found in ``lines`` (``(perf_counter, text)``): end time, wall and CPU s."""
    ends = []
    for name, pattern in MARKS:
        if name.startswith("rounds"):
            hits = [t for t, s in lines if re.search(pattern, s)]
            t = hits[-1] if hits else None
        elif pattern == r"$^":
            t = t_end
        else:
            t = next((t for t, s in lines if re.search(pattern, s)), None)
        if t is not None:
            ends.append((t, name))
    ends.sort()
    rows, prev = [], t0
    for t, name in ends:
        rows.append({"phase": name, "ends_s": round(t - t0, 1), "wall_s": round(t - prev, 1),
                     "cpu_s": round(sampler.at(t) - sampler.at(prev), 1)})
        prev = t
    return rows


def _cold_cache(where: pathlib.Path) -> pathlib.Path:
    from flexsfl.sim.data.sources import cache_dir, fetch_vader

    archive = fetch_vader(cache_dir())
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, where / archive.name)
    return where


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo_phases", help="results directory (the demo's own under OUT/demo)")
    ap.add_argument("--keep-cache", action="store_true", help="leave the cold bundle cache behind (default: removed)")
    ap.add_argument("demo_args", nargs="*", help="flags passed on to flexsfl demo (after --)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = _cold_cache(pathlib.Path(tempfile.mkdtemp(prefix="flexsfl-cold-")))
    before = machine_info()
    env = {**os.environ, "FLEXSFL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flexsfl", "-v", "demo", "--out", str(out / "demo"), *args.demo_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    sampler = TreeSampler(proc.pid)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        sampler.sample()
        time.sleep(0.2)
    t_end = time.perf_counter()
    reader.join(timeout=10)
    rows = phase_table(lines, sampler, t0, t_end)
    result = {"command": cmd, "exit": proc.returncode, "wall_s": round(t_end - t0, 1),
              "cpu_s": round(sum(sampler.cpu.values()), 1), "cpu_by_role": sampler.by_role(), "phases": rows,
              "machine_before": before, "load_after": round(os.getloadavg()[0], 2)}
    (out / "demo_phases.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out / "demo.log").write_text("".join(f"{t - t0:8.2f} {s}\n" for t, s in lines))
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"flexsfl demo, cold bundle cache: exit {proc.returncode}, wall {result['wall_s']} s, CPU {result['cpu_s']} s "
          f"({', '.join(f'{k} {v}' for k, v in result['cpu_by_role'].items())}); load {before['load_avg']} -> "
          f"{result['load_after']}, commit {before['commit']}")
    for r in rows:
        print(f"  {r['phase']:<38} ends {r['ends_s']:7.1f} s   wall {r['wall_s']:6.1f} s   CPU {r['cpu_s']:6.1f} s")
    print(f"log: {out / 'demo.log'}; result: {out / 'demo_phases.json'}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
