"""``flexsfl simulate`` and ``flexsfl demo``: a whole federation on one machine.

One run = partition a data set among K clients, pick each client's split point (pinned, or from
a device profile through the split selection), export one bundle per split point, start the
server, and start every client as a **separate process** (``flexsfl edge run``) talking to the
server over loopback websockets. ``--in-process`` runs the clients as tasks of this process
instead (same websocket transport), which is only meant for fast tests.

After every round the server evaluates, on the union test set, the global model and (every
``eval_every`` rounds) each client's personal model — its uploaded adapters with the global
tail — which is what alignment is meant to improve; clients report personalized accuracy on
their own test split themselves. Results: ``rounds.jsonl`` (one row per round), ``summary.json``,
the server's ``metrics.jsonl`` and SQLite state, client logs, and ``accuracy_vs_time.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from flexsfl.core.errors import ConfigError, FlexSFLError

__all__ = ["SimConfig", "simulate", "add_parser", "add_demo_parser", "DEMO"]

log = logging.getLogger("flexsfl.simulate")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    strategy: str = "flexpsfl"  # flexpsfl | splitfed | fedavg | local
    model: str = "minilm"
    data: str = "vader"  # vader | rotten | a CSV/JSONL file
    partition: str = "natural"  # natural | dirichlet | iid
    alpha: float = 0.5
    clients: int = 4
    rounds: int = 8
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    align_lambda: float = 0.0
    splits: tuple[int, ...] | None = None  # one per client (or one for all); None: from profiles
    profiles: tuple[str, ...] | None = None  # device profile names (split selection), one per client
    backend: str = "ort"
    encoding: str = "fp32"  # transfer encoding of Z and g
    max_train: int | None = 400  # per client
    max_test: int | None = 100  # per client
    max_seq: int = 64
    eval_every: int = 1  # evaluate personal models on the union test set every N rounds (0: last only)
    seed: int = 0
    out: str = "results/simulate"
    in_process: bool = False
    threads: int = 1  # per client process and for the server's tail
    batching: bool = True
    target_acc: float = 0.75  # for "time/bytes to reach" in the summary
    num_labels: int = 2
    bundle_cache: str | None = None  # reuse exported bundles across runs (default: <cache>/bundles)

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"--clients must be >= 1, got {self.clients}")
        if self.splits is not None and len(self.splits) not in (1, self.clients):
            raise ConfigError(f"--splits needs 1 or {self.clients} values, got {len(self.splits)}")
        if self.profiles is not None and len(self.profiles) != self.clients:
            raise ConfigError(f"--profiles needs {self.clients} names (one per client), got {len(self.profiles)}")


# The README's main command: 4 VADER domains as 4 devices of different kinds, so splits differ.
DEMO = SimConfig(
    strategy="flexpsfl", model="minilm", data="vader", partition="natural", clients=4, rounds=5, local_steps=15,
    batch_size=8, lr=2e-3, optimizer="adamw", align_lambda=0.1, profiles=("rpi4", "rpi4", "rpi5", "jetson-orin"),
    backend="ort", max_train=300, max_test=80, max_seq=48, eval_every=0, out="results/demo",
)


def _choose_splits(cfg: SimConfig) -> tuple[list[int], list[dict]]:
    """Per-client split points, and the profile + prediction behind each (logged)."""
    if cfg.splits is not None:
        splits = list(cfg.splits) * (cfg.clients if len(cfg.splits) == 1 else 1)
        return splits, [{"pinned": s} for s in splits]
    if cfg.profiles is None:
        raise ConfigError("give --splits (one per client) or --profiles (device profile names) to choose split points")
    from flexsfl.core.planner import EXAMPLE_PROFILES, ModelCost, choose_split, read_model_config

    cost = ModelCost.from_config(read_model_config(cfg.model), num_labels=cfg.num_labels)
    splits, why = [], []
    for name in cfg.profiles:
        if name not in EXAMPLE_PROFILES:
            raise ConfigError(f"unknown device profile {name!r}; choose from {', '.join(EXAMPLE_PROFILES)}")
        choice = choose_split(cost, EXAMPLE_PROFILES[name], batch=cfg.batch_size, seq=cfg.max_seq, optimizer=cfg.optimizer,
                              runtime=cfg.backend, encoding=cfg.encoding, align=cfg.align_lambda > 0)
        log.info("%s: split %d (%s)", name, choice.split, choice.reason)
        splits.append(choice.split)
        why.append({"profile": name, "split": choice.split, "reason": choice.reason,
                    "predicted": choice.chosen.to_json()})
    return splits, why


def _bundle_for(cfg: SimConfig, split: int, cache: pathlib.Path) -> pathlib.Path:
    """Export (or reuse) the bundle for one split point."""
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    key = json.dumps([cfg.model, split, cfg.backend, cfg.num_labels, cfg.max_seq, cfg.seed, _code_version()])
    path = cache / f"{pathlib.Path(cfg.model).name}-s{split}-{cfg.backend}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (path / "manifest.json").exists():
        return path
    export_bundle(ExportConfig(model=cfg.model, split=split, out=str(path), backend=cfg.backend, num_labels=cfg.num_labels,
                               max_batch=max(32, cfg.batch_size), max_seq=cfg.max_seq, seed=cfg.seed,
                               optimizer=cfg.optimizer, lr=cfg.lr, ort_training_artifacts=False), progress=False)
    return path


def _code_version() -> str:
    """Bundles are cached per version of the export code, so a fix re-exports them."""
    import flexsfl.export as export

    h = hashlib.sha256()
    for f in sorted(pathlib.Path(export.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class _RoundEval:
    """The server's end-of-round evaluation (runs on its compute thread)."""

    def __init__(self, host, encoder, partition, cfg: SimConfig) -> None:
        from flexsfl.sim.evaluation import Evaluator

        self.ev = Evaluator(host, encoder)
        self.union = partition.test
        self.own = {f"c{c.client}": c.test for c in partition.clients}
        self.cfg = cfg
        self.personal: dict[str, dict] = {}

    def __call__(self, r: int, uploads: dict) -> dict:
        cfg = self.cfg
        for cid, u in uploads.items():
            self.personal[cid] = u.params
        out: dict[str, Any] = {"global_acc": self.ev.accuracy(self.union)}
        last = cfg.rounds - 1
        if (cfg.eval_every and r % cfg.eval_every == cfg.eval_every - 1) or r == last:
            gen, own = {}, {}
            for cid, params in sorted(self.personal.items()):
                gen[cid] = self.ev.accuracy(self.union, params)
                own[cid] = self.ev.accuracy(self.own[cid], params)
            out["generalization"] = gen
            out["personal_server"] = own
        return out


async def _run(cfg: SimConfig, out: pathlib.Path, progress) -> dict:
    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.text import TextEncoder
    from flexsfl.model.loading import load_model

    from flexsfl.server_backend.clients import add_client
    from flexsfl.sim.datasets import prepare
    from flexsfl.server_backend.server import FlexServer, ServerConfig
    from flexsfl.server_backend.state import ServerState
    from flexsfl.server_backend.strategy import TrainConfig, make_strategy
    from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost

    t_start = time.perf_counter()
    progress("partitioning the data")
    partition = prepare(cfg.data, cfg.partition, cfg.clients, out / "data", cfg.seed, alpha=cfg.alpha,
                        max_train=cfg.max_train, max_test=cfg.max_test, overwrite=True)
    progress(f"loading {cfg.model}")
    loaded = load_model(cfg.model, num_labels=cfg.num_labels, seed=cfg.seed, attn_implementation="sdpa")
    splits, why = _choose_splits(cfg)
    if cfg.strategy == "splitfed" and len(set(splits)) > 1:
        splits = [min(splits)] * cfg.clients  # SplitFed has one split for everyone: the smallest that fits
    cache = pathlib.Path(cfg.bundle_cache) if cfg.bundle_cache else _default_cache()
    bundles = {}
    for s in sorted(set(splits)):
        progress(f"exporting the {cfg.backend} bundle for split {s}")
        bundles[s] = _bundle_for(cfg, s, cache)
    encoder = TextEncoder.from_bundle(load_bundle(bundles[splits[0]]))

    clients_file = out / "clients.json"
    clients_file.unlink(missing_ok=True)
    ids = [f"c{k}" for k in range(cfg.clients)]
    for cid in ids:
        token = add_client(clients_file, cid)
        tf = out / "tokens" / cid
        tf.parent.mkdir(parents=True, exist_ok=True)
        tf.write_text(token + "\n")
        os.chmod(tf, 0o600)

    import torch

    torch.set_num_threads(cfg.threads)
    train = TrainConfig(rounds=cfg.rounds, min_clients=cfg.clients, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                        lr=cfg.lr, optimizer=cfg.optimizer, align_lambda=cfg.align_lambda, seed=cfg.seed, round_timeout=1800)
    strategy = make_strategy(cfg.strategy, train)
    host = TailHost(loaded, OptimizerConfig(cfg.optimizer, cfg.lr))
    state_dir = out / "server"
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)
    state = ServerState(state_dir, {"model": loaded.info.id, "strategy": strategy.name})
    from flexsfl.server_backend.clients import ClientRegistry

    evaluator = _RoundEval(host, encoder, partition, cfg)
    server = FlexServer(host, strategy, ClientRegistry.load(clients_file), state,
                        ServerConfig(port=0, batching=cfg.batching, max_seq=max(cfg.max_seq, 8)),
                        compute_threads=cfg.threads, on_round_end=evaluator)
    serve = asyncio.create_task(server.serve())
    await server.ready.wait()
    url = f"ws://127.0.0.1:{server.port}"
    progress(f"server on {url}; starting {cfg.clients} clients")
    procs: list = []
    tasks: list = []
    full = strategy.mode == "full"
    try:
        for k, cid in enumerate(ids):
            args = {
                "bundle": str(bundles[splits[k]]), "server": url, "data": str(out / "data" / f"client_{k}" / "train.jsonl"),
                "test_data": str(out / "data" / f"client_{k}" / "test.jsonl"), "client_id": cid,
                "token_file": str(out / "tokens" / cid), "backend": cfg.backend, "threads": cfg.threads,
                "state_dir": str(out / "clients" / cid), "encodings": cfg.encoding, "max_retries": 5, "seed": cfg.seed + k,
                "full_model": full or None,
            }
            if cfg.in_process:
                tasks.append(asyncio.create_task(asyncio.to_thread(_run_edge_quiet, args)))
            else:
                procs.append(_spawn_client(args, out / "logs" / f"{cid}.log", cfg.threads))
        last_round = -1
        while not serve.done():
            await asyncio.sleep(0.5)
            for p in procs:
                if p.poll() not in (None, 0):
                    raise FlexSFLError(f"client process exited with {p.returncode}; see {out / 'logs'}")
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()
            if server.round_id - 1 > last_round:
                last_round = server.round_id - 1
                progress(f"round {last_round + 1}/{cfg.rounds} done", advance=True)
        await serve
        for p in procs:
            p.wait(timeout=60)
        for t in tasks:
            await t
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        if not serve.done():
            serve.cancel()
        state.close()
    return _collect(cfg, out, partition, splits, why, time.perf_counter() - t_start)


def _default_cache() -> pathlib.Path:
    from flexsfl.sim.datasets import cache_dir

    return cache_dir() / "bundles"


def _run_edge_quiet(args: dict) -> int:
    from flexsfl.edge_runtime.client import run_edge
    from flexsfl.sim.eager_backend import full_model_trainer

    return run_edge({k: v for k, v in args.items() if v is not None},
                    make_trainer=full_model_trainer if args.get("full_model") else None)


def _spawn_client(args: dict, log_path: pathlib.Path, threads: int) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = log_path.with_suffix(".json")
    cfg_path.write_text(json.dumps({k: v for k, v in args.items() if v is not None}, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "flexsfl", "-v", "edge", "run", "--config", str(cfg_path)]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


def _collect(cfg: SimConfig, out: pathlib.Path, partition, splits: list[int], why: list[dict], total_s: float) -> dict:
    """Join the server's events into one row per round, and a summary."""
    events = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines() if line]
    rounds: dict[int, dict] = {}
    server_ms: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e["event"] == "step":
            server_ms.setdefault((e["client"], e["round"]), []).append(e["server_ms"])
    for e in events:
        r = e.get("round")
        if e["event"] == "round":
            rounds.setdefault(r, {})["round_s"] = e["seconds"]
        elif e["event"] == "eval":
            rounds.setdefault(r, {}).update({k: v for k, v in e.items() if k not in ("t", "event", "round")})
        elif e["event"] == "client_metrics":
            m = {k: v for k, v in e.items() if k not in ("t", "event", "round", "client")}
            srv = server_ms.get((e["client"], r), [])
            if srv:
                m["server_ms"] = float(np.mean(srv))
                m["wire_ms"] = max(m.get("roundtrip_ms", 0.0) - m["server_ms"], 0.0)
            rounds.setdefault(r, {}).setdefault("clients", {})[e["client"]] = m
    rows, elapsed = [], 0.0
    for r in sorted(rounds):
        row = rounds[r]
        elapsed += row.get("round_s", 0.0)
        clients = row.get("clients", {})
        personal = [c["personal_acc"] for c in clients.values() if "personal_acc" in c]
        rows.append({
            "round": r, "strategy": cfg.strategy, "elapsed_s": round(elapsed, 3),
            "global_acc": row.get("global_acc"),
            "personal_acc": float(np.mean(personal)) if personal else None,
            "generalization_acc": float(np.mean(list(row["generalization"].values()))) if "generalization" in row else None,
            "bytes": int(sum(c.get("bytes_sent", 0) + c.get("bytes_received", 0) for c in clients.values())),
            **{k: row[k] for k in ("generalization", "personal_server") if k in row},
            "clients": clients,
        })
    with open(out / "rounds.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    last = rows[-1] if rows else {}
    per_client = []
    for k, s in enumerate(splits):
        cid = f"c{k}"
        c = last.get("clients", {}).get(cid, {})
        per_client.append({
            "client": cid, "groups": list(partition.clients[k].groups), "split": s, "choice": why[k],
            "personal_acc": c.get("personal_acc"), "generalization_acc": last.get("generalization", {}).get(cid),
            "step_ms": c.get("client_compute_ms", 0.0) + c.get("roundtrip_ms", 0.0),
            # the split selection's prediction for the device profile (not this machine)
            "predicted_step_ms": 1e3 * why[k]["predicted"]["time_s"] if "predicted" in why[k] else None,
            "client_compute_ms": c.get("client_compute_ms"), "wire_ms": c.get("wire_ms"), "server_ms": c.get("server_ms"),
            "bytes": c.get("bytes_sent", 0) + c.get("bytes_received", 0),
        })
    target = _time_to(rows, cfg.target_acc)
    summary = {
        "config": dataclasses.asdict(cfg), "total_s": round(total_s, 1), "rounds": len(rows),
        "final": {k: last.get(k) for k in ("global_acc", "personal_acc", "generalization_acc", "elapsed_s", "bytes")},
        "target": target, "per_client": per_client,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _time_to(rows: list[dict], target: float) -> dict:
    """Wall time and bytes until the mean personalized accuracy first reaches ``target``."""
    total_bytes = 0
    for row in rows:
        total_bytes = row["bytes"]  # client counters are cumulative
        if row.get("personal_acc") is not None and row["personal_acc"] >= target:
            return {"target_acc": target, "round": row["round"], "elapsed_s": row["elapsed_s"], "bytes": total_bytes}
    return {"target_acc": target, "round": None, "elapsed_s": None, "bytes": None}


def plot(summaries: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path) -> pathlib.Path:
    """Accuracy vs wall time, one line per run (rounds.jsonl of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, out in summaries:
        rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line]
        t = [r["elapsed_s"] for r in rows]
        axes[0].plot(t, [r["personal_acc"] for r in rows], marker="o", label=label)
        axes[1].plot(t, [r["global_acc"] for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("personalized accuracy (own test split)", "global model accuracy (union test)")):
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def simulate(cfg: SimConfig, *, show: bool = True) -> dict:
    """Run one federation; returns the summary (also in ``cfg.out``/summary.json)."""
    out = pathlib.Path(cfg.out).resolve()  # clients get absolute paths in their config files
    out.mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, quiet=not show)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"{cfg.strategy}: starting", total=cfg.rounds)

        def progress(msg: str, advance: bool = False) -> None:
            bar.update(task, description=f"{cfg.strategy}: {msg}", advance=1 if advance else 0)

        summary = asyncio.run(_run(cfg, out, progress))
    plot([(cfg.strategy, out)], out / "accuracy_vs_time.png")
    return summary


def table(summary: dict) -> str:
    """The per-client table printed at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['config']['strategy']} on {summary['config']['data']} "
                    f"({summary['rounds']} rounds, {summary['final']['elapsed_s']:.0f} s of training)")
    for col in ("client", "data", "profile", "split", "personal acc", "generalization acc", "step ms",
                "of which wire ms", "predicted ms", "MB"):
        t.add_column(col, justify="right" if col not in ("client", "data", "profile") else "left")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in summary["per_client"]:
        groups = c["groups"][0] + (f" +{len(c['groups']) - 1}" if len(c["groups"]) > 1 else "")
        pred = c.get("predicted_step_ms")
        t.add_row(c["client"], groups, c["choice"].get("profile", "pinned"), str(c["split"]), fmt(c["personal_acc"]),
                  fmt(c["generalization_acc"]), f"{c['step_ms']:.0f}", "-" if c["wire_ms"] is None else f"{c['wire_ms']:.1f}",
                  "-" if pred is None else f"{pred:.0f}", f"{c['bytes'] / 1e6:.1f}")
    f = summary["final"]
    console = Console(record=True, width=150, file=io.StringIO())
    console.print(t)
    console.print(f"global model accuracy {fmt(f['global_acc'])}; mean personalized {fmt(f['personal_acc'])}; "
                  f"mean generalization {fmt(f['generalization_acc'])}")
    if any(c.get("predicted_step_ms") for c in summary["per_client"]):
        console.print("step ms: measured here (client compute + round trip); predicted ms: the split selection's "
                      "estimate for the device profile, which this machine only plays")
    return console.export_text()


def _cfg_from_args(args: argparse.Namespace, base: SimConfig = SimConfig()) -> SimConfig:
    kw = {}
    for f in dataclasses.fields(SimConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    if isinstance(kw.get("splits"), str):
        kw["splits"] = tuple(int(s) for s in kw["splits"].split(","))
    if isinstance(kw.get("profiles"), str):
        kw["profiles"] = tuple(p.strip() for p in kw["profiles"].split(","))
    return dataclasses.replace(base, **kw)


def _run_simulate(args: argparse.Namespace) -> int:
    summary = simulate(_cfg_from_args(args))
    print(table(summary))
    print(f"results in {args.out or SimConfig.out}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    cfg = _cfg_from_args(args, DEMO)
    summary = simulate(cfg)
    print(table(summary))
    print(f"results: {cfg.out}/summary.json, rounds.jsonl, accuracy_vs_time.png, server/metrics.jsonl")
    return 0


def _add_sim_args(p: argparse.ArgumentParser, defaults: SimConfig) -> None:
    p.add_argument("--model", help=f"minilm, smollm2 or a HF directory (default {defaults.model})")
    p.add_argument("--data", help=f"vader, rotten, or a CSV/JSONL file (default {defaults.data})")
    p.add_argument("--partition", choices=["natural", "dirichlet", "iid"])
    p.add_argument("--alpha", type=float, help="Dirichlet concentration")
    p.add_argument("--clients", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", dest="local_steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--align-lambda", dest="align_lambda", type=float)
    p.add_argument("--splits", help="comma-separated split per client (or one for all)")
    p.add_argument("--profiles", help="comma-separated device profile per client (rpi4, rpi5, jetson-orin, ...)")
    p.add_argument("--backend", choices=["ort", "executorch"])
    p.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8"], help="transfer encoding of Z and g")
    p.add_argument("--max-train", dest="max_train", type=int, help="training examples per client")
    p.add_argument("--max-test", dest="max_test", type=int, help="test examples per client")
    p.add_argument("--max-seq", dest="max_seq", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help=f"results directory (default {defaults.out})")
    p.add_argument("--in-process", dest="in_process", action="store_const", const=True,
                   help="run clients as tasks of this process (fast tests only)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False)
    p.add_argument("--target-acc", dest="target_acc", type=float)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federation on this machine (clients as separate processes)")
    p.add_argument("--strategy", choices=["flexpsfl", "splitfed", "fedavg", "local"])
    _add_sim_args(p, SimConfig())
    p.set_defaults(func=_run_simulate)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the README's demo: 4 devices, 4 VADER domains, MiniLM, FlexP-SFL")
    p.add_argument("--strategy", choices=["flexpsfl", "splitfed", "fedavg", "local"])
    _add_sim_args(p, DEMO)
    p.set_defaults(func=_run_demo)
