"""``flexsfl simulate``: run a federation on this machine (clients as separate processes).

The flags are :class:`~flexsfl.sim.config.SimConfig`'s fields; a flag not given keeps the
config's default.
"""

from __future__ import annotations

import argparse

from flexsfl.cli.config_args import add_config_args, config_from_args
from flexsfl.sim.config import SimConfig

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    # The simulation exports bundles and hosts the tails: torch, loaded only when it runs.
    from flexsfl.sim.results import table
    from flexsfl.sim.simulate import simulate

    cfg = config_from_args(SimConfig, args, base=SimConfig())
    summary = simulate(cfg)
    print(table(summary))
    print(f"results in {cfg.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federation on this machine (clients as separate processes)")
    add_config_args(p, SimConfig, base=SimConfig())
    p.set_defaults(func=run)
