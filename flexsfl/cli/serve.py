"""``flexsfl serve``: host the tail for every client and run FlexP-SFL rounds.

The client optimizer defaults to :data:`~flexsfl.core.constants.TRAIN_OPTIMIZER`, as in
``flexsfl simulate`` and ``demo`` (a bundle's own default, ``flexsfl export --optimizer``, is SGD;
the server names the optimizer of every round).

The parser imports nothing heavy; the handlers import the server's modules, which load torch
(the tail host), when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal

from flexsfl.core.constants import OPTIMIZERS, TASKS, TRAIN_OPTIMIZER
from flexsfl.server_backend import guards as s_limits  # numpy only: the defaults of the limits
from flexsfl.server_backend.aggregation import AGGREGATIONS
from flexsfl.server_backend.strategy import STRATEGIES, TrainConfig

__all__ = ["add_parser", "build_server", "add_model_args", "add_train_args", "train_config", "load_server_model",
           "model_loader", "add_compute_args"]

log = logging.getLogger("flexsfl.server")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="minilm, smollm2, or a local Hugging Face model directory")
    p.add_argument("--task", choices=TASKS, default=TASKS[0])
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: attention q,v)")
    p.add_argument("--seed", type=int, default=0, help="seed of new weights; must match the bundles' export seed")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The round flags; their defaults are :class:`TrainConfig`'s, but the client optimizer's
    (:data:`TRAIN_OPTIMIZER`, the default of every command that trains a federation)."""
    d = TrainConfig()
    p.add_argument("--strategy", default="flexpsfl", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds to run (0 = until stopped)")
    p.add_argument("--min-clients", type=int, default=d.min_clients, help="clients to wait for before a round starts")
    p.add_argument("--clients-per-round", type=int, default=d.clients_per_round, help="0 = every connected client")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="tau: client steps per round")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="client learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=TRAIN_OPTIMIZER, help=f"client optimizer (default: {TRAIN_OPTIMIZER})")
    p.add_argument("--server-lr", type=float, default=None, help="tail learning rate (default: --lr)")
    p.add_argument("--server-optimizer", choices=OPTIMIZERS, default=None, help="default: --optimizer")
    p.add_argument("--server-step-every", type=int, default=1, metavar="K",
                   help="one server optimizer step per K client steps, in the order received (default 1: sequential "
                        "split learning; a group's step uses the mean of its clients' gradients)")
    p.add_argument("--align-lambda", type=float, default=d.align_lambda, help="weight of the alignment term")
    p.add_argument("--align-top", action="store_true",
                   help="U-shaped clients: the alignment term also at the top's input H (needs --align-lambda > 0)")
    p.add_argument("--align", dest="alignment", choices=("feature-kl", "logit-kl"), default="feature-kl",
                   help="where the alignment term is computed: feature-kl (on the device, at the head's features Z) or "
                        "logit-kl (here, at the tail's logits; head/tail devices send Z' with Z) (default: feature-kl)")
    p.add_argument("--round-timeout", type=float, default=d.round_timeout)
    p.add_argument("--fedrep-head-steps", type=int, default=d.fedrep_head_steps,
                   help="strategy fedrep: of each round's local steps, the first N train the task head alone")
    p.add_argument("--ditto-mu", type=float, default=d.ditto_mu,
                   help="strategy ditto: proximal weight of each personal model towards the round's global model")
    p.add_argument("--score-every", type=int, default=d.score_every, metavar="N",
                   help="devices score their own test split every N-th round and in the last (a big model's scoring can "
                        "cost more than its training; default: every round)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation,
                   help="how uploads combine, tensor by tensor, keeping the layer-wise rule (median/trimmed-mean: robust "
                        "to a minority of bad uploads, ignore sample counts)")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def model_loader(args: argparse.Namespace, attn: str = "sdpa"):
    """A picklable no-argument callable that loads the server's model (Ray workers load their own copy)."""
    import functools

    from flexsfl.model.loading import LoraSettings, load_model

    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
    return functools.partial(load_model, args.model, task=args.task, num_labels=args.num_labels, seed=args.seed,
                             attn_implementation=attn,
                             lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets))


def load_server_model(args: argparse.Namespace, attn: str = "sdpa"):
    return model_loader(args, attn)()


def add_compute_args(p: argparse.ArgumentParser) -> None:
    """Where and how the tail computes (README: "Serving many devices")."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the tail trains (Z/g move per batch)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: every core, or OMP_NUM_THREADS; split among --workers)")
    p.add_argument("--no-batching", action="store_true", help="run every step on its own (no cross-client batching)")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="cross-client batching: at most this many tokens (sum of B x T) per batch (0: no cap)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="cross-client batching: wait up to this long for more steps once one is waiting "
                        "(0: never wait; a few ms pays on a GPU)")
    p.add_argument("--workers", type=int, default=1,
                   help="host the tail on N Ray actors, one tail copy each, averaged per round (pip install 'flexsfl[scale]')")
    p.add_argument("--ray-address", default=None,
                   help="run the --workers on an existing Ray cluster (e.g. ray://head:10001 or auto) instead of a local one")


def build_server(args: argparse.Namespace, loaded=None):
    """A ready :class:`FlexServer` from ``serve``'s arguments."""
    from flexsfl.server_backend.clients import ClientRegistry
    from flexsfl.server_backend.server import FlexServer, ServerConfig
    from flexsfl.server_backend.state import ServerState
    from flexsfl.server_backend.strategy import make_strategy
    from flexsfl.server_backend.schedule import check_step_every
    from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost, resolve_device
    from flexsfl.server_backend.workers import HostSpec, make_compute

    device = str(resolve_device(args.device))  # a one-line error before any loading when CUDA is missing
    check_step_every(args.server_step_every)  # likewise
    cfg = train_config(args)
    strategy = make_strategy(args.strategy, cfg)
    pool = args.workers > 1 or args.ray_address
    # With Ray workers the front end's global model stays on the CPU: the workers train on --device.
    loaded = loaded or load_server_model(args)
    optimizer = OptimizerConfig(args.server_optimizer or args.optimizer, args.server_lr or args.lr,
                                server_step_every=args.server_step_every)
    host = TailHost(loaded, optimizer, device="cpu" if pool else device)
    layout = {
        "model": loaded.info.id, "revision": loaded.info.revision, "task": loaded.info.task,
        "num_labels": loaded.info.num_labels, "lora": loaded.lora.to_json(), "strategy": strategy.name,
    }
    state = ServerState(args.state_dir, layout)
    registry = ClientRegistry.load(args.clients) if args.clients else None
    config = ServerConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_seq=args.max_seq,
        batching=not args.no_batching, tls_cert=args.tls_cert, tls_key=args.tls_key,
        exit_when_done=args.rounds > 0, admin_token_file=args.admin_token_file, linger=args.linger,
        max_connections=args.max_connections, max_unauthenticated=args.max_unauthenticated,
        step_timeout=args.step_timeout, upload_norm_factor=args.upload_norm_factor,
        middle_ttl=args.middle_ttl, middle_max_pending=args.middle_max_pending, middle_recompute=args.middle_recompute,
    )
    compute = make_compute(host, HostSpec(model_loader(args), optimizer, device) if pool else None, workers=args.workers,
                           ray_address=args.ray_address, batching=not args.no_batching, threads=args.threads,
                           max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                           on_batch=lambda tags, s: state.log("batch", steps=tags, ms=round(1e3 * s, 3)))
    return FlexServer(host, strategy, registry, state, config, compute=compute)


async def _serve(server) -> None:
    if server.registry is not None:
        # The clients file is also re-read when it changes; SIGHUP forces it (e.g. after editing it by hand).
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.registry.reload)
    await server.serve()


def _run(args: argparse.Namespace) -> int:
    server = build_server(args)
    try:
        asyncio.run(_serve(server))
    finally:
        server.state.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server: host the tails, run the rounds, persist state")
    add_model_args(p)
    add_train_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--clients", required=True, help="clients file from `flexsfl clients add`")
    p.add_argument("--state-dir", required=True, help="where rounds, adapters and metrics are kept (resumes from it)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-seq", type=int, default=512)
    add_compute_args(p)
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve wss://")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--admin-token-file", default=None,
                   help="operator token for the status page, /metrics and /api/status (without it they answer loopback only)")

    p.add_argument("--max-connections", type=int, default=s_limits.MAX_CONNECTIONS,
                   help="open websocket connections at most; more are closed at once (1013, retry later)")
    p.add_argument("--max-unauthenticated", type=int, default=s_limits.MAX_UNAUTHENTICATED,
                   help="connections that have not been welcomed yet, at most (each may send one small Hello frame)")
    p.add_argument("--step-timeout", type=float, default=s_limits.STEP_TIMEOUT,
                   help="seconds a client in a round may stay silent before it is dropped (the round goes on without it)")
    p.add_argument("--upload-norm-factor", type=float, default=s_limits.UPLOAD_NORM_FACTOR,
                   help="refuse an upload whose tensor norm is over this x the global adapter's (0: no bound)")
    p.add_argument("--middle-ttl", type=float, default=60.0,
                   help="U-shaped clients: seconds the middle keeps a step's forward for its dL/dH (later ones are refused)")
    p.add_argument("--middle-max-pending", type=int, default=256,
                   help="U-shaped clients: unfinished steps the middle keeps at most, over all clients")
    p.add_argument("--middle-recompute", action="store_true",
                   help="U-shaped clients: keep only Z and recompute the middle's forward at dL/dH (less memory per client)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="seconds to keep the status page and /metrics up after the last round (for a final scrape)")
    p.set_defaults(func=_run)
