"""``flexsfl bundle verify``: check a bundle's schema and every checksum, print a summary (no torch)."""

from __future__ import annotations

import argparse

from flexsfl.core.bundle import load_bundle

__all__ = ["add_parser", "verify"]


def verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.path)
    print(bundle.summary())
    print("ok: every checksum matches")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="inspect bundles")
    bsub = p.add_subparsers(dest="bundle_cmd", required=True)
    v = bsub.add_parser("verify", help="check a bundle's schema and every checksum, print a summary")
    v.add_argument("path", help="bundle directory or .tar.gz")
    v.set_defaults(func=verify)
