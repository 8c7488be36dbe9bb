"""``flexsfl edge run`` and ``flexsfl edge probe``: the device's commands.

Nothing here imports torch for the ``ort`` backend. ``--full-model`` (the FedAvg and local-only
baselines) and ``--backend torch`` (the eager reference) need torch and load it from
:mod:`flexsfl.sim` only when chosen.
"""

from __future__ import annotations

import argparse
import json
import logging

from flexsfl.core.bundle import load_bundle
from flexsfl.core.cost import ModelCost, head_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import write_profile
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.client import edge_settings, run_edge
from flexsfl.edge_runtime.probe import DEFAULT_BUDGET_FRACTION, measure_head_throughput, probe_device

__all__ = ["add_parser"]

log = logging.getLogger("flexsfl.edge.probe")


def _run(args: argparse.Namespace) -> int:
    cfg = edge_settings(args)
    make_trainer = None
    if cfg.get("full_model") or cfg.get("backend") == "torch":
        # The one lazy import: it needs torch, which a device running the ort backend lacks.
        from flexsfl.sim import eager_backend  # registers the "torch" backend

        if cfg.get("full_model"):
            make_trainer = eager_backend.full_model_trainer
    return run_edge(cfg, make_trainer=make_trainer)


def _probe(args: argparse.Namespace) -> int:
    """``flexsfl edge probe``: print this device's profile as JSON (and write it with ``--json``)."""
    head_gflops, backend_name = None, ""
    if args.bundle:
        bundle = load_bundle(args.bundle)
        m = bundle.manifest
        backend_name = args.backend or (m.target.preferred_backend if m.target.preferred_backend in m.backend else m.backend[0])
        batch = min(8, m.max_batch) if args.batch is None else args.batch
        seq = min(128, m.max_seq) if args.seq is None else args.seq
        if not (1 <= batch <= m.max_batch and 2 <= seq <= m.max_seq):
            raise ConfigError(
                f"--batch/--seq must be within the bundle's limits (batch <= {m.max_batch}, 2 <= seq <= {m.max_seq})"
            )
        cost = ModelCost.from_manifest(m)
        backend = open_backend(backend_name, bundle, threads=args.threads)
        t = measure_head_throughput(
            backend, batch=batch, seq=seq, reps=args.reps, vocab_size=m.model.vocab_size,
            step_flops=head_step_flops(cost, m.split, batch=batch, seq=seq),
        )
        head_gflops = round(t.gflops, 3)
        log.info("head step (split %d, batch %d, seq %d, %s): median %.1f ms over %d reps -> %.2f GFLOP/s",
                 m.split, batch, seq, backend_name, t.median_s * 1e3, t.reps, t.gflops)
    profile = probe_device(
        name=args.name, memory_budget_mb=args.memory_budget_mb, head_gflops=head_gflops, backend=backend_name,
        uplink_mbps=args.uplink_mbps, downlink_mbps=args.downlink_mbps, rtt_ms=args.rtt_ms,
    )
    if args.json:
        write_profile(profile, args.json)
    print(json.dumps(profile.to_json(), indent=2, sort_keys=True))
    return 0


def _add_probe(edge_sub: argparse._SubParsersAction) -> None:
    p = edge_sub.add_parser("probe", help="measure this device (memory, cores, head speed) and print its profile")
    p.add_argument("--bundle", help="bundle whose head is timed for head_gflops (without it, no speed is measured)")
    p.add_argument("--backend", choices=["ort", "executorch", "torch"], help="default: the target's preferred one")
    p.add_argument("--threads", type=int, help="threads for the runtime")
    p.add_argument("--batch", type=int, help="batch size of the timed steps (default: min(8, bundle max))")
    p.add_argument("--seq", type=int, help="sequence length of the timed steps (default: min(128, bundle max))")
    p.add_argument("--reps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--uplink-mbps", dest="uplink_mbps", type=float, help="device -> server bandwidth, Mbit/s")
    p.add_argument("--downlink-mbps", dest="downlink_mbps", type=float, help="server -> device bandwidth, Mbit/s")
    p.add_argument("--rtt-ms", dest="rtt_ms", type=float, help="round-trip time to the server, ms")
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=int,
                   help=f"memory training may use (default: {DEFAULT_BUDGET_FRACTION * 100:.0f}%% of what is available now)")
    p.add_argument("--name", help="label for this device (default: the hostname)")
    p.add_argument("--json", metavar="FILE", help="also write the profile to FILE")
    p.set_defaults(func=_probe)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="device commands (no torch needed with the ort backend)")
    esub = p.add_subparsers(dest="edge_cmd", required=True)
    r = esub.add_parser("run", help="train this device's head against a server")
    r.add_argument("--config", help="JSON settings (written by `flexsfl flash`); flags override it")
    r.add_argument("--bundle", help="bundle directory or .tar.gz")
    r.add_argument("--server", help="ws://host:port or wss://host:port")
    r.add_argument("--ca-file", dest="ca_file", metavar="PEM",
                   help="CA certificates (PEM) that signed the server's certificate, for wss:// with a private CA")
    r.add_argument("--data", help="local training data: CSV or JSONL with text,label")
    r.add_argument("--test-data", dest="test_data", help="local test data for personalized accuracy")
    r.add_argument("--client-id", dest="client_id")
    r.add_argument("--token", help="client token (prefer --token-file: flags show up in `ps`)")
    r.add_argument("--token-file", dest="token_file")
    r.add_argument("--backend", choices=["ort", "executorch", "torch"], help="default: the target's preferred one")
    r.add_argument("--threads", type=int, help="threads for the runtime")
    r.add_argument("--state-dir", dest="state_dir", help="where the personal head is kept between runs")
    r.add_argument("--encodings", help="preferred transfer encodings for Z and g, e.g. fp16,fp32")
    r.add_argument("--max-retries", dest="max_retries", type=int,
                   help="failed reconnects in a row before giving up (a connection up 10 s starts the count again; "
                        "0 = forever)")
    r.add_argument("--seed", type=int, help="data order seed")
    r.add_argument("--align-every", dest="align_every", type=int,
                   help="compute the alignment reference Z' (and apply the alignment term) every N-th step only (default: 1)")
    r.add_argument("--full-model", dest="full_model", action="store_const", const=True,
                   help="train the whole model here with torch (the FedAvg / local-only baselines)")
    r.add_argument("--profile", help="device profile JSON (from `flexsfl edge probe --json`) to report to the server")
    r.set_defaults(func=_run)
    _add_probe(esub)
