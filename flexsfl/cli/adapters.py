"""``flexsfl adapters merge``: a client's personalized model (personal head + global tail) as one PEFT adapter."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run_merge"]


def run_merge(args: argparse.Namespace) -> int:
    # torch, transformers and peft load here, when the command runs.
    from flexsfl.sim.adapters import merge_personal

    out = merge_personal(args.bundle, args.personal, args.server_state, args.out, full=args.merge, force=args.force)
    print(f"wrote {out} (PEFT adapter for the whole model; load it with PeftModel.from_pretrained)"
          + (f" and the merged model {out / 'merged'}" if args.merge else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="export a client's personalized model as one PEFT adapter")
    s = p.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    m = s.add_parser("merge", help="personal head (+ top) and the global tail as one PEFT adapter for the whole model")
    m.add_argument("--bundle", required=True, help="the bundle the client trained with")
    m.add_argument("--personal", required=True,
                   help="the device's --state-dir, an adapter dir, or the server's personal/<id>.safetensors")
    m.add_argument("--server-state", required=True, help="the server's --state-dir (global.safetensors)")
    m.add_argument("--out", required=True, help="directory to create")
    m.add_argument("--merge", action="store_true", help="also merge into the base weights: a full model in OUT/merged")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.set_defaults(func=run_merge)
