"""What the loopback A/B benchmarks share: pinning, alternating runs, the client's round metrics, medians.

``align_overlap`` (λ > 0 vs λ = 0), ``u_loopback`` (U vs head/tail) and ``align_top`` (U with and without
``--align-top``) each run a real ``flexsfl simulate`` with one ``flexsfl edge run`` client process per run,
alternating two settings ``--pairs`` times so that load on the machine falls on both alike, and compare
the medians of the client's own round metrics (``server/metrics.jsonl``) side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
from typing import Callable, Sequence

__all__ = ["add_common", "apply_pin", "client_rows", "medians", "pin_client_to", "run_pairs", "write_result"]


def client_rows(out: pathlib.Path) -> list[dict]:
    """The client's metrics of every round after the first (whose first steps warm up), in order."""
    rows = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines() if line]
    return [r["metrics"] for r in rows if r.get("event") == "client_metrics" and r.get("round", 0) > 0]


def pin_client_to(cpus: set[int]) -> None:
    """Spawned ``flexsfl edge run`` processes go on ``cpus``: the device's own core, as on real hardware."""
    from flexsfl.sim import simulate as sim

    spawn = getattr(sim._spawn_client, "__wrapped__", sim._spawn_client)

    def pinned(*args, **kwargs):
        proc = spawn(*args, **kwargs)
        os.sched_setaffinity(proc.pid, cpus)
        return proc

    pinned.__wrapped__ = spawn
    sim._spawn_client = pinned


def add_common(ap: argparse.ArgumentParser, *, what: str, out: str, steps: int = 10) -> None:
    """The flags every loopback A/B benchmark takes."""
    ap.add_argument("--pairs", type=int, default=3, help=f"{what} run pairs, alternating (default: 3)")
    ap.add_argument("--steps", type=int, default=steps, help=f"local steps per round (default: {steps})")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is not counted (default: 3)")
    ap.add_argument("--pin", action="store_true",
                    help="server on the last CPU, the device process on the first (a device and a server that do not "
                         "share cores, as deployed; needs ≥ 2 CPUs)")
    ap.add_argument("--out", default=out)


def apply_pin(pin: bool) -> None:
    """Fix one thread per process and, with ``pin``, this process (the server) and the clients to their own CPUs."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not pin:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("error: --pin needs at least 2 CPUs; run without it")
    os.sched_setaffinity(0, {cpus[-1]})
    pin_client_to({cpus[0]})


def run_pairs(names: Sequence[str], pairs: int, run: Callable[[str, int], dict], *, fmt: str = ".1f") -> dict[str, list[dict]]:
    """``run(name, i)`` for every name, ``pairs`` times, alternating; each result printed as it comes."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(pairs):
        for name in names:
            r = run(name, i)
            runs[name].append(r)
            print(f"pair {i} {name}: " + ", ".join(f"{k} {v:{fmt}}" for k, v in r.items()), flush=True)
    return runs


def medians(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per setting, the median over runs of every metric."""
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def write_result(path: pathlib.Path, runs: dict, med: dict, base: str, other: str, **extra) -> tuple[float, list[float]]:
    """``other``/``base`` device step ratio (medians and per pair), written with the runs to ``path``."""
    ratio = med[other]["step_ms"] / med[base]["step_ms"]
    per_pair = [b["step_ms"] / a["step_ms"] for a, b in zip(runs[base], runs[other])]
    path.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "per_pair": per_pair, **extra},
                               indent=2, sort_keys=True))
    return ratio, per_pair
