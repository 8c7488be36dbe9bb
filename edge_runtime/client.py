"""Run the device's client: read its settings, open its bundle, backend and data, and train.

``flexsfl edge run`` (:mod:`flexsfl.cli.edge`) takes its settings from flags or from ``--config FILE`` (JSON written by
``flexsfl flash``: ``server``, ``client_id``, ``token_file``, ``bundle``, ``data``, and optionally
``test_data``, ``backend``, ``threads``, ``state_dir``, ``ca_file``); flags win over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import threading

from typing import Callable

from flexsfl.core.bundle import Bundle, load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import read_profile
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import read_examples
from flexsfl.edge_runtime.top import has_top, open_top
from flexsfl.edge_runtime.trainer import HeadTrainer, Trainer
from flexsfl.edge_runtime.u_trainer import UTrainer
from flexsfl.edge_runtime.transport import ClientOptions, run_client

__all__ = ["CONFIG_KEYS", "TrainerFactory", "edge_settings", "run_edge"]

log = logging.getLogger("flexsfl.edge")

CONFIG_KEYS = {"server", "client_id", "token_file", "token", "bundle", "data", "test_data", "backend", "threads",
                "state_dir", "encodings", "max_retries", "seed", "full_model", "profile", "ca_file", "align_every"}


def edge_settings(args: argparse.Namespace) -> dict:
    """Settings from ``--config FILE`` with the flags in ``args`` on top; a missing one is a ConfigError."""
    cfg: dict = {}
    if args.config:
        path = pathlib.Path(args.config)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the edge config ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: the edge config must be a JSON object")
        unknown = sorted(set(cfg) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
        base = path.parent
        for k in ("token_file", "bundle", "data", "test_data", "state_dir", "profile", "ca_file"):
            if isinstance(cfg.get(k), str):
                cfg[k] = str((base / cfg[k]).expanduser()) if not os.path.isabs(cfg[k]) else cfg[k]
    for k in CONFIG_KEYS:
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


# (bundle, train, test, settings) -> a Trainer; the default trains the head with the bundle's programs.
TrainerFactory = Callable[[Bundle, list, list, dict], Trainer]


def run_edge(cfg: dict, *, make_trainer: TrainerFactory | None = None, stop: threading.Event | None = None) -> int:
    """Train against ``cfg["server"]`` until it says Bye. ``make_trainer`` replaces the head trainer
    (the baselines' whole-model trainer comes from :mod:`flexsfl.sim`, which needs torch); ``stop``
    (set from another thread, e.g. a simulation that ends early): return at the next lost connection."""

    bundle = load_bundle(cfg["bundle"])
    m = bundle.manifest
    backend_name = cfg.get("backend") or (m.target.preferred_backend if m.target.preferred_backend in m.backend else m.backend[0])
    n = m.model.num_labels if m.model.task == "seq_cls" else None
    train = read_examples(cfg["data"], num_labels=n)
    test = read_examples(cfg["test_data"], num_labels=n) if cfg.get("test_data") else []
    seed = int(cfg.get("seed") or 0)
    if make_trainer is not None:
        trainer = make_trainer(bundle, train, test, cfg)
        backend_name = trainer.backend_name
    else:
        backend = open_backend(backend_name, bundle, threads=cfg.get("threads"))
        state_dir = cfg.get("state_dir") or str(pathlib.Path(cfg["bundle"]).resolve().parent / f"state-{cfg['client_id']}")
        if has_top(bundle):  # U-shaped (exported with --top): the top and the labels stay on this device
            top = open_top(bundle, backend_name, threads=cfg.get("threads"))
            trainer = UTrainer(bundle, backend, top, train, test, seed=seed, state_dir=state_dir)
        else:
            trainer = HeadTrainer(bundle, backend, train, test, seed=seed, state_dir=state_dir,
                                  align_every=int(cfg.get("align_every") or 1))
    encodings = cfg.get("encodings")
    if isinstance(encodings, str):
        encodings = tuple(e.strip() for e in encodings.split(",") if e.strip())
    if cfg.get("profile"):
        profile = read_profile(cfg["profile"]).to_json()
    else:
        profile = {"backend": backend_name, "arch": m.target.arch, "target": m.target.name}
    opts = ClientOptions(
        server=cfg["server"], client_id=cfg["client_id"], token=_token(cfg), profile=profile,
        max_retries=int(cfg.get("max_retries") or 0), ca_file=cfg.get("ca_file"),
        **({"encodings": tuple(encodings)} if encodings else {}),
    )
    report = asyncio.run(run_client(trainer, opts, stop=stop))
    print(f"done: {len(report.rounds)} rounds, {report.bytes_sent / 1e6:.1f} MB sent, "
          f"{report.bytes_received / 1e6:.1f} MB received ({report.reason or 'server closed'})")
    return 0
