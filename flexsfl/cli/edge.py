"""``flexsfl edge run`` and ``flexsfl edge probe``: the device's commands.

Nothing here imports torch for the ``ort`` backend. ``--full-model`` (the FedAvg and local-only
baselines) and ``--backend torch`` (the eager reference) need torch and load it from
:mod:`flexsfl.sim` only when chosen.
"""

from __future__ import annotations

import argparse

from flexsfl.edge_runtime.client import edge_settings, run_edge
from flexsfl.edge_runtime.probe import add_parser as add_probe_parser

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    cfg = edge_settings(args)
    make_trainer = None
    if cfg.get("full_model") or cfg.get("backend") == "torch":
        from flexsfl.sim import eager_backend  # needs torch; registers the "torch" backend

        if cfg.get("full_model"):
            make_trainer = eager_backend.full_model_trainer
    return run_edge(cfg, make_trainer=make_trainer)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="device commands (no torch needed with the ort backend)")
    esub = p.add_subparsers(dest="edge_cmd", required=True)
    r = esub.add_parser("run", help="train this device's head against a server")
    r.add_argument("--config", help="JSON settings (written by `flexsfl flash`); flags override it")
    r.add_argument("--bundle", help="bundle directory or .tar.gz")
    r.add_argument("--server", help="ws://host:port or wss://host:port")
    r.add_argument("--data", help="local training data: CSV or JSONL with text,label")
    r.add_argument("--test-data", dest="test_data", help="local test data for personalized accuracy")
    r.add_argument("--client-id", dest="client_id")
    r.add_argument("--token", help="client token (prefer --token-file: flags show up in `ps`)")
    r.add_argument("--token-file", dest="token_file")
    r.add_argument("--backend", choices=["ort", "executorch", "torch"], help="default: the target's preferred one")
    r.add_argument("--threads", type=int, help="threads for the runtime")
    r.add_argument("--state-dir", dest="state_dir", help="where the personal head is kept between runs")
    r.add_argument("--encodings", help="preferred transfer encodings for Z and g, e.g. fp16,fp32")
    r.add_argument("--max-retries", dest="max_retries", type=int, help="reconnect attempts before giving up (0 = forever)")
    r.add_argument("--seed", type=int, help="data order seed")
    r.add_argument("--full-model", dest="full_model", action="store_const", const=True,
                   help="train the whole model here with torch (the FedAvg / local-only baselines)")
    r.add_argument("--profile", help="device profile JSON (from `flexsfl edge probe --json`) to report to the server")
    r.set_defaults(func=_run)
    add_probe_parser(esub)
