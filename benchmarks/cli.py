"""``flexsfl bench latency|server|wire|accuracy``: the benchmarks, with JSON, CSV and PNG under ``--out``.

Each command prints a markdown summary when it ends (the tables in ``benchmarks/README.md`` are
pasted from it). Parsers import nothing heavy; each handler imports its benchmark when it runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _run(which: str):
    def handler(args: argparse.Namespace) -> int:
        import importlib

        from flexsfl.benchmarks.machine import machine_info

        mod = importlib.import_module(f"benchmarks.{which}")
        cfg = mod.config_from_args(args) if hasattr(mod, "config_from_args") else args
        run = {"latency": "run_latency", "server": "run_server_bench", "wire": "run_wire", "accuracy": "run_accuracy"}[which]
        _, summary = getattr(mod, run)(cfg)
        m = machine_info()
        print(summary)
        print(f"machine: {m['cpu']} ({m['arch']}, {m['usable_cores']} cores, {m['memory_mb']} MB"
              f"{', ' + m['board'] if m['board'] else ''}), load {m['load_avg']}, commit {m['commit']}")
        return 0

    return handler


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flexsfl.benchmarks import accuracy, latency, server, wire

    p = sub.add_parser("bench", help="benchmarks: client step latency, server throughput, wire cost")
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="BENCHMARK")
    for name, mod, text in (
        ("latency", latency, "client training step per backend (and split point, batch, sequence)"),
        ("server", server, "server steps/s with N concurrent client processes, with and without cross-client batching"),
        ("wire", wire, "bytes and round-trip time of Z and g per transfer encoding over a loopback websocket"),
        ("accuracy", accuracy, "accuracy vs time and bytes: FlexP-SFL against its baselines on the demo's setting"),
    ):
        q = bsub.add_parser(name, help=text, description=text)
        mod.add_arguments(q)
        q.set_defaults(func=_run(name))
