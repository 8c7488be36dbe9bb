"""The ``flexsfl`` command.

Parsers are cheap to build and import nothing heavy; each handler imports what it needs when it
runs, so the edge-side commands (``edge``, ``bundle verify``, ``data``) work where torch is not
installed. Every :class:`~flexsfl.core.errors.FlexSFLError` becomes one line on stderr and exit
status 2; nothing prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from flexsfl import __version__
from flexsfl.core.errors import FlexSFLError

__all__ = ["main", "build_parser"]

log = logging.getLogger("flexsfl")


def _export(args: argparse.Namespace) -> int:
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    cfg = ExportConfig(
        model=args.model,
        split=args.split,
        backend=args.backend,
        target=args.target,
        task=args.task,
        num_labels=args.num_labels,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
        optimizer=args.optimizer,
        lr=args.lr,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        out=args.out,
        tar=args.tar,
        seed=args.seed,
        ort_training_artifacts=not args.no_ort_training_artifacts,
    )
    bundle, where = export_bundle(cfg, progress=not args.quiet)
    print(bundle.summary())
    if where != bundle.root:
        print(f"tarball  {where}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from flexsfl.core.bundle import load_bundle

    bundle = load_bundle(args.path)
    print(bundle.summary())
    print("ok: every checksum matches")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="cut a model at a split point and build an on-device training bundle")
    p.add_argument("--model", required=True, help="minilm, smollm2, or a local Hugging Face model directory")
    p.add_argument("--split", type=int, required=True, help="blocks on the device (1 <= S < L)")
    p.add_argument("--backend", choices=["ort", "executorch", "all"], default="ort")
    p.add_argument("--target", default="generic-x86_64", help="generic-x86_64, rpi4, rpi5 or jetson-orin")
    p.add_argument("--task", choices=["seq_cls", "causal_lm"], default="seq_cls")
    p.add_argument("--num-labels", type=int, default=2, help="classes for seq_cls")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: attention q,v)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default on-device optimizer")
    p.add_argument("--lr", type=float, default=1e-3, help="default on-device learning rate")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seed for new weights (task head, LoRA A)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--tar", action="store_true", help="also write OUT.tar.gz")
    p.add_argument("--no-ort-training-artifacts", action="store_true",
                   help="leave out ONNX Runtime's own training/eval/optimizer models and checkpoint (the edge runtime "
                        "trains with the forward/backward pair; the checkpoint is a second copy of the head's weights)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_export)


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="inspect bundles")
    bsub = p.add_subparsers(dest="bundle_cmd", required=True)
    v = bsub.add_parser("verify", help="check a bundle's schema and every checksum, print a summary")
    v.add_argument("path", help="bundle directory or .tar.gz")
    v.set_defaults(func=_bundle_verify)


# Each entry adds one subcommand; modules owned by a role add their own parsers.
def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    regs: list[Callable[[argparse._SubParsersAction], None]] = [_add_export, _add_bundle]
    for entry in _PLUGINS:
        mod, _, fn = entry.partition(":")
        regs.append(lambda sub, mod=mod, fn=fn or "add_parser": getattr(importlib.import_module(mod), fn)(sub))
    return regs


# ``module[:function]`` whose ``function(subparsers)`` (default ``add_parser``) registers a
# subcommand. Importing them must stay cheap and torch-free.
_PLUGINS: list[str] = [
    "flexsfl.sim.simulate:add_demo_parser",
    "flexsfl.sim.simulate",
    "flexsfl.server_backend.cli",
    "flexsfl.cli.edge",
    "flexsfl.server_backend.clients",
    "flexsfl.sim.datasets",
    "flexsfl.deploy.flash",
    "flexsfl.core.planner",
    "flexsfl.benchmarks.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexsfl",
        description="Flexible personalized split federated learning: fine-tune foundation models on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"flexsfl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for reg in _registrars():
        reg(sub)
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
