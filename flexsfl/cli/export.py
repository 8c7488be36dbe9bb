"""``flexsfl export``: cut a model at a split point and build an on-device training bundle.

The flags are :class:`~flexsfl.export.config.ExportConfig`'s fields (help, defaults and choices
come from there).
"""

from __future__ import annotations

import argparse

from flexsfl.cli.config_args import add_config_args, config_from_args
from flexsfl.export.config import ExportConfig

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Build the bundle; print its summary (and the tarball's path)."""
    # The export stack needs torch, transformers and the runtimes' exporters: loaded only here.
    from flexsfl.export.pipeline import export_bundle

    bundle, where = export_bundle(config_from_args(ExportConfig, args), progress=not args.quiet)
    print(bundle.summary())
    if where != bundle.root:
        print(f"tarball  {where}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="cut a model at a split point and build an on-device training bundle")
    add_config_args(p, ExportConfig)  # every field with a flag, in the config's order
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
