"""``flexsfl bench latency|memory|server|wire|accuracy|status|top``: the benchmarks, with JSON, CSV and PNG under ``--out``.

Each command prints a markdown summary when it ends (the tables in ``benchmarks/README.md`` are
pasted from it), then the machine it ran on. The benchmark modules import nothing heavy at their
top; each one loads torch or the runtimes inside its run function.
"""

from __future__ import annotations

import argparse
import functools
from types import ModuleType
from typing import Any, Callable

from flexsfl.benchmarks import accuracy, latency, memory, server, status_load, top, wire
from flexsfl.benchmarks.machine import machine_info

__all__ = ["add_parser", "BENCHMARKS"]

# name -> (module, its run function, one line of help)
BENCHMARKS: dict[str, tuple[ModuleType, Callable[[Any], tuple[Any, str]], str]] = {
    "latency": (latency, latency.run_latency, "client training step per backend (and split point, batch, sequence)"),
    "memory": (memory, memory.run_memory, "client step peak RSS per runtime (fresh process each) vs its lower bound "
                                          "and the planner's prediction"),
    "server": (server, server.run_server_bench,
               "server steps/s with N concurrent client processes, with and without cross-client batching"),
    "wire": (wire, wire.run_wire, "bytes and round-trip time of Z and g per transfer encoding over a loopback websocket"),
    "accuracy": (accuracy, accuracy.run_accuracy,
                 "accuracy vs time and bytes: FlexP-SFL against its baselines on the demo's setting"),
    "status": (status_load, status_load.run_status_load,
               "client step time with and without a bounded flood of status-page and /metrics requests"),
    "top": (top, top.run_top, "U-shaped topology: the top program's step time and memory; bytes and step time per "
                              "step U vs head/tail under the planner's model"),
}


def _run(name: str, args: argparse.Namespace) -> int:
    mod, run, _ = BENCHMARKS[name]
    cfg = mod.config_from_args(args) if hasattr(mod, "config_from_args") else args
    _, summary = run(cfg)
    m = machine_info()
    print(summary)
    print(f"machine: {m['cpu']} ({m['arch']}, {m['usable_cores']} cores, {m['memory_mb']} MB"
          f"{', ' + m['board'] if m['board'] else ''}), load {m['load_avg']}, commit {m['commit']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: client step latency, server throughput, wire cost")
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="BENCHMARK")
    for name, (mod, _, text) in BENCHMARKS.items():
        q = bsub.add_parser(name, help=text, description=text)
        mod.add_arguments(q)
        q.set_defaults(func=functools.partial(_run, name))
