"""``flexsfl clients add|list``: the devices allowed to connect to a server (no torch)."""

from __future__ import annotations

import argparse
import pathlib

from flexsfl.core.atomic import atomic_write_text
from flexsfl.server_backend.clients import ClientRegistry, add_client

__all__ = ["add_parser"]


def _run_add(args: argparse.Namespace) -> int:
    token = add_client(args.clients, args.client_id, rotate=args.rotate)
    if args.token_file:
        tf = pathlib.Path(args.token_file)
        tf.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tf, token + "\n", mode=0o600)
    print(token)
    return 0


def _run_list(args: argparse.Namespace) -> int:
    reg = ClientRegistry.load(args.clients)
    for cid, entry in sorted(reg.clients.items()):
        print(f"{cid}\tcreated {entry.get('created', '?')}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clients", help="manage the devices allowed to connect to a server")
    csub = p.add_subparsers(dest="clients_cmd", required=True)
    a = csub.add_parser("add", help="register a client and print its new token (shown once)")
    a.add_argument("client_id")
    a.add_argument("--clients", required=True, help="clients file (created if missing)")
    a.add_argument("--rotate", action="store_true", help="issue a new token for an existing client")
    a.add_argument("--token-file", help="also write the token to this file (mode 0600)")
    a.set_defaults(func=_run_add)
    ls = csub.add_parser("list", help="list registered clients")
    ls.add_argument("--clients", required=True)
    ls.set_defaults(func=_run_list)
