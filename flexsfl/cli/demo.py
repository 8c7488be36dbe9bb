"""``flexsfl demo``: the README's demo, 4 devices of different kinds on 4 VADER domains, MiniLM, FlexP-SFL.

The same flags as ``flexsfl simulate`` (:class:`~flexsfl.sim.config.SimConfig`'s fields); a flag
not given keeps :data:`~flexsfl.sim.config.DEMO`'s value.
"""

from __future__ import annotations

import argparse

from flexsfl.cli.config_args import add_config_args, config_from_args
from flexsfl.sim.config import DEMO, SimConfig

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    # The simulation exports bundles and hosts the tails: torch, loaded only when it runs.
    from flexsfl.sim.results import table
    from flexsfl.sim.simulate import simulate

    cfg = config_from_args(SimConfig, args, base=DEMO)
    summary = simulate(cfg)
    print(table(summary))
    print(f"results: {cfg.out}/summary.json, rounds.jsonl, accuracy_vs_time.png, server/metrics.jsonl")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the README's demo: 4 devices, 4 VADER domains, MiniLM, FlexP-SFL")
    add_config_args(p, SimConfig, base=DEMO)
    p.set_defaults(func=run)
