"""The ``flexsfl`` command: one parser module per subcommand, registered here in help order.

Each module in :data:`COMMANDS` has ``add_parser(subparsers)``. Importing them is cheap and never
imports torch (a handler that needs torch imports it when it runs, with a comment saying so), so
the edge-side commands (``edge``, ``bundle verify``, ``data``) work where torch is not installed.
Every :class:`~flexsfl.core.errors.FlexSFLError` becomes one line on stderr and exit status 2;
nothing prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from flexsfl import __version__
from flexsfl.cli import adapters, bench, bundle, clients, data, demo, edge, export, flash, generate, plan, serve, simulate, status
from flexsfl.core.errors import FlexSFLError

__all__ = ["main", "build_parser", "COMMANDS"]

log = logging.getLogger("flexsfl")

# The subcommands, in the order `flexsfl --help` lists them.
COMMANDS = (export, bundle, demo, simulate, serve, status, edge, clients, data, flash, plan, bench, adapters, generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexsfl",
        description="Flexible personalized split federated learning: fine-tune foundation models on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"flexsfl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """Library chatter a user cannot act on (deprecations inside torch/transformers, torchvision
    not installed, torchao's CUDA kernels on a CPU machine) stays out of the output; -vv shows it."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*(TypedStorage|non-writable|experimental).*")
    for name in ("torch", "torchao", "onnxscript", "onnx_ir", "executorch", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch resets its loggers' levels from TORCH_LOGS when it is imported (later, lazily), and
    # worker processes inherit the setting; a user's own TORCH_LOGS wins.
    os.environ.setdefault("TORCH_LOGS", "-torch,-onnx,-export")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.verbose < 2:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except FlexSFLError as e:
        if args.debug:
            raise
        print(f"flexsfl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
