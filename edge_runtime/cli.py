"""``flexsfl edge``: the device's commands. Nothing here imports torch (the ORT backend needs none).

``flexsfl edge run`` takes its settings from flags or from ``--config FILE`` (JSON written by
``flexsfl flash``: ``server``, ``client_id``, ``token_file``, ``bundle``, ``data``, and optionally
``test_data``, ``backend``, ``threads``, ``state_dir``); flags win over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib

from .errors import ConfigError

__all__ = ["add_parser", "run_edge"]

log = logging.getLogger("flexsfl.edge")

_CONFIG_KEYS = {"server", "client_id", "token_file", "token", "bundle", "data", "test_data", "backend", "threads",
                "state_dir", "encodings", "max_retries", "seed", "full_model", "profile"}


def _settings(args: argparse.Namespace) -> dict:
    cfg: dict = {}
    if args.config:
        path = pathlib.Path(args.config)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the edge config ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: the edge config must be a JSON object")
        unknown = sorted(set(cfg) - _CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}")
        base = path.parent
        for k in ("token_file", "bundle", "data", "test_data", "state_dir", "profile"):
            if isinstance(cfg.get(k), str):
                cfg[k] = str((base / cfg[k]).expanduser()) if not os.path.isabs(cfg[k]) else cfg[k]
    for k in _CONFIG_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    for k in ("server", "client_id", "bundle", "data"):
        if not cfg.get(k):
            raise ConfigError(f"missing --{k.replace('_', '-')} (or '{k}' in --config)")
    if not cfg.get("token") and not cfg.get("token_file"):
        raise ConfigError("missing --token-file (or --token / 'token_file' in --config)")
    return cfg


def _token(cfg: dict) -> str:
    if cfg.get("token"):
        return cfg["token"]
    path = pathlib.Path(cfg["token_file"])
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the token file ({e.strerror})") from None
    if not token:
        raise ConfigError(f"{path}: the token file is empty; get a token with `flexsfl clients add`")
    return token


def run_edge(cfg: dict) -> int:
    from .backends import open_backend
    from .bundle import load_bundle
    from .data import read_examples
    from .trainer import HeadTrainer
    from .transport import ClientOptions, run_client

    bundle = load_bundle(cfg["bundle"])
    m = bundle.manifest
    backend_name = cfg.get("backend") or (m.target.preferred_backend if m.target.preferred_backend in m.backend else m.backend[0])
    if backend_name not in m.backend and backend_name != "torch":
        raise ConfigError(f"backend {backend_name!r} is not in this bundle (has: {', '.join(m.backend)})")
    n = m.model.num_labels if m.model.task == "seq_cls" else None
    train = read_examples(cfg["data"], num_labels=n)
    test = read_examples(cfg["test_data"], num_labels=n) if cfg.get("test_data") else []
    seed = int(cfg.get("seed") or 0)
    if cfg.get("full_model"):
        from .full_trainer import FullModelTrainer  # needs torch: a baseline, not the edge path

        trainer = FullModelTrainer(bundle, train, test, seed=seed, threads=cfg.get("threads"))
        backend_name = trainer.backend_name
    else:
        backend = open_backend(backend_name, bundle, threads=cfg.get("threads"))
        state_dir = cfg.get("state_dir") or str(pathlib.Path(cfg["bundle"]).resolve().parent / f"state-{cfg['client_id']}")
        trainer = HeadTrainer(bundle, backend, train, test, seed=seed, state_dir=state_dir)
    encodings = cfg.get("encodings")
    if isinstance(encodings, str):
        encodings = tuple(e.strip() for e in encodings.split(",") if e.strip())
    if cfg.get("profile"):
        from .probe import read_profile

        profile = read_profile(cfg["profile"]).to_json()
    else:
        profile = {"backend": backend_name, "arch": m.target.arch, "target": m.target.name}
    opts = ClientOptions(
        server=cfg["server"], client_id=cfg["client_id"], token=_token(cfg), profile=profile,
        max_retries=int(cfg.get("max_retries") or 0),
        **({"encodings": tuple(encodings)} if encodings else {}),
    )
    report = asyncio.run(run_client(trainer, opts))
    print(f"done: {len(report.rounds)} rounds, {report.bytes_sent / 1e6:.1f} MB sent, "
          f"{report.bytes_received / 1e6:.1f} MB received ({report.reason or 'server closed'})")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_edge(_settings(args))


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
    from .probe import add_parser as add_probe

    add_probe(esub)
