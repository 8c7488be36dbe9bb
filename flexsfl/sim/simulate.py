"""``flexsfl simulate`` and ``flexsfl demo``: a whole federation on one machine.

One run = partition a data set among K clients, pick each client's split point (pinned, or from
a device profile through the split selection), export one bundle per split point, start the
server, and start every client as a **separate process** (``flexsfl edge run``) talking to the
server over loopback websockets. ``--in-process`` runs the clients as tasks of this process
instead (same websocket transport), which is only meant for fast tests.

After every round the server evaluates, on the union test set, the global model and (every
``eval_every`` rounds) each client's personal model — its uploaded adapters with the global
tail — which is what alignment is meant to improve; clients report personalized accuracy on
their own test split themselves. Results (:mod:`flexsfl.sim.results`): ``rounds.jsonl`` (one
row per round), ``summary.json``, the server's ``metrics.jsonl`` and SQLite state, client logs,
and ``accuracy_vs_time.png``. The run is configured by :class:`~flexsfl.sim.config.SimConfig`;
``flexsfl simulate`` and ``demo`` are :mod:`flexsfl.cli.simulate` and :mod:`flexsfl.cli.demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import flexsfl.export as export
from flexsfl.core.atomic import atomic_write_text
from flexsfl.core.bundle import load_bundle
from flexsfl.core.cost import ModelCost
from flexsfl.core.errors import ConfigError, FlexSFLError
from flexsfl.core.model_config import read_model_config
from flexsfl.core.planner import choose_split
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import choose_u_split
from flexsfl.edge_runtime.client import run_edge
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.export.config import ExportConfig
from flexsfl.model.loading import load_model
from flexsfl.server_backend.clients import ClientRegistry, add_client
from flexsfl.server_backend.server import FlexServer, ServerConfig
from flexsfl.server_backend.state import ServerState
from flexsfl.server_backend.strategy import STRATEGIES, TrainConfig, every_nth_and_last, make_strategy
from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost
from flexsfl.sim.bundles import export_cached, export_missing
from flexsfl.sim.config import SimConfig
from flexsfl.sim.data import cache_dir, prepare
from flexsfl.sim.data.text_corpus import text_dataset
from flexsfl.sim.eager_backend import full_model_trainer
from flexsfl.sim.evaluation import Evaluator, accuracy_of, label_prior_accuracies
from flexsfl.sim.results import collect, plot

__all__ = ["simulate", "bundle_for"]

log = logging.getLogger("flexsfl.simulate")


def _per_client(values: tuple[int, ...] | None, k: int) -> list[int | None]:
    """One value per client from a pinned list (one for all, or one each), or None each."""
    if values is None:
        return [None] * k
    return list(values) * (k if len(values) == 1 else 1)


def _choose_splits(cfg: SimConfig) -> tuple[list[int], list[int] | None, list[dict]]:
    """Per-client split points, top blocks (U-shaped; None for head/tail), and the profile +
    prediction behind each (logged). ``--splits`` pins the splits (a U-shaped client's top is then
    ``--tops``, else 0); otherwise the planner chooses from ``--profiles``, keeping ``--tops`` if given."""
    u = cfg.topology == "u"
    top_pins = _per_client(cfg.tops, cfg.clients)
    if cfg.splits is not None:
        pins = _per_client(cfg.splits, cfg.clients)
        tops = [t or 0 for t in top_pins] if u else None
        return pins, tops, [{"pinned": s, **({"top": t} if u else {})} for s, t in zip(pins, tops or pins)]
    if cfg.profiles is None:
        raise ConfigError("give --splits (one per client) or --profiles (device profile names) to choose split points")
    # num_labels not known yet (inferred from the data): 2; the classifier's width barely moves the costs
    cost = ModelCost.from_config(read_model_config(cfg.model), task=cfg.task, num_labels=cfg.num_labels or 2)
    splits, tops, why = [], [], []
    kw = dict(batch=cfg.batch_size, seq=cfg.max_seq, optimizer=cfg.optimizer, runtime=cfg.backend, encoding=cfg.encoding,
              align=cfg.align_lambda > 0)
    for name, pin_top in zip(cfg.profiles, top_pins):
        if name not in EXAMPLE_PROFILES:
            raise ConfigError(f"unknown device profile {name!r}; choose from {', '.join(EXAMPLE_PROFILES)}")
        if u:
            choice = choose_u_split(cost, EXAMPLE_PROFILES[name], pin_top=pin_top, **kw)
            log.info("%s: split %d, top %d (%s)", name, choice.split, choice.top, choice.reason)
            tops.append(choice.top)
        else:
            choice = choose_split(cost, EXAMPLE_PROFILES[name], **kw)
            log.info("%s: split %d (%s)", name, choice.split, choice.reason)
        splits.append(choice.split)
        why.append({"profile": name, "split": choice.split, **({"top": choice.top} if u else {}), "reason": choice.reason,
                    "predicted": choice.chosen.to_json()})
    return splits, tops if u else None, why


def _bundle_for(cfg: SimConfig, split: int, cache: pathlib.Path, top: int | None = None, *,
                jobs: list | None = None) -> pathlib.Path:
    """Export (or reuse) the bundle for one split point (and, U-shaped, its top blocks). With
    ``jobs``, a missing bundle is appended to it as ``(path, ExportConfig)`` instead, for
    :func:`~flexsfl.sim.bundles.export_missing` to export all at once in parallel."""
    # ExecuTorch plans its memory for the bundle's max batch: the training batch (export/config.py)
    max_batch = cfg.batch_size if cfg.backend == "executorch" else max(32, cfg.batch_size)
    seed = cfg.seed if cfg.bundle_seed is None else cfg.bundle_seed
    key = json.dumps([cfg.model, split, cfg.backend, cfg.num_labels, cfg.max_seq, seed, _code_version()]
                     + ([cfg.task] if cfg.task != "seq_cls" else []) + ([top] if top is not None else [])
                     + ([max_batch] if cfg.backend == "executorch" else []))
    name = f"{pathlib.Path(cfg.model).name}-s{split}" + (f"-u{top}" if top is not None else "")
    path = cache / f"{name}-{cfg.backend}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (path / "manifest.json").exists():
        return path
    config = ExportConfig(model=cfg.model, split=split, top=top, out=str(path), backend=cfg.backend, task=cfg.task,
                          num_labels=cfg.num_labels,
                          batch_size=cfg.batch_size, max_batch=max_batch, max_seq=cfg.max_seq, seed=seed,
                          optimizer=cfg.optimizer, lr=cfg.lr, ort_training_artifacts=False)
    if jobs is not None:
        jobs.append((path, config))
    else:
        export_cached(config)
    return path


def _code_version() -> str:
    """Bundles are cached per version of the export code, so a fix re-exports them."""
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(export.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class _RoundEval:
    """The server's end-of-round evaluation (runs on its compute thread)."""

    def __init__(self, host, encoder, partition, cfg: SimConfig) -> None:
        self.ev = Evaluator(host, encoder)
        self.union = partition.test
        self.own = {f"c{c.client}": c.test for c in partition.clients}
        # where each client's own test split lies in the union test set (partition.test: client by client)
        ends = np.cumsum([len(c.test) for c in partition.clients])
        self.spans = {f"c{c.client}": (int(e - len(c.test)), int(e)) for c, e in zip(partition.clients, ends)}
        self.clients = partition.clients
        self.cfg = cfg
        self.personal: dict[str, dict] = {}
        self.lm = cfg.task == "causal_lm"
        # Causal LM: the pretrained model's perplexity on each client's own held-out text, before any round.
        self.pretrained = {cid: self.ev.perplexity(t).perplexity for cid, t in self.own.items()} if self.lm else {}

    def _lm(self) -> dict:
        """Per client: perplexity of its personal, the global and the pretrained model on its own held-out
        text, of its personal model on the other clients' texts (generalization), and bytes per token."""
        out = {}
        for cid, own in sorted(self.own.items()):
            others = [e for c, t in self.own.items() if c != cid for e in t]
            personal = self.personal.get(cid)
            mine = self.ev.perplexity(own, personal)
            out[cid] = {"personal_ppl": mine.perplexity, "global_ppl": self.ev.perplexity(own).perplexity,
                        "pretrained_ppl": self.pretrained[cid], "bytes_per_token": mine.bytes_per_token,
                        "generalization_ppl": self.ev.perplexity(others, personal).perplexity if others else None}
        return out

    def _due(self, r: int) -> bool:
        """Whether the server scores round ``r``: every ``eval_every``-th and the last (``eval_every`` 0: the last only)."""
        return every_nth_and_last(r, self.cfg.eval_every, self.cfg.rounds)

    def __call__(self, r: int, uploads: dict) -> dict:
        cfg = self.cfg
        if self.lm:
            for cid, u in uploads.items():
                self.personal[cid] = u.params
            return {"lm": self._lm()} if self._due(r) else {}
        if STRATEGIES[cfg.strategy].uploads_own_model:  # else (Ditto) the personal model never leaves the device
            for cid, u in uploads.items():
                self.personal[cid] = u.params
        last = cfg.rounds - 1
        due = self._due(r)
        out: dict[str, Any] = {}
        if cfg.global_every_round or due:
            # The global model once on the union test set, which is the clients' own splits one after another:
            # its rows also give each client's own-split scores below.
            glob = self.ev.logits(self.union)
            if cfg.global_every_round or r == last:
                out["global_acc"] = accuracy_of(glob, self.union)
        if due:
            gen, own = {}, {}
            for cid, params in sorted(self.personal.items()):
                gen[cid] = self.ev.accuracy(self.union, params)
                if cfg.eval_every:  # the clients report their own-split accuracy; no table or plot needs this copy
                    own[cid] = self.ev.accuracy(self.own[cid], params)
            out["generalization"] = gen
            if own:
                out["personal_server"] = own
            rows = {cid: glob[a:b] for cid, (a, b) in self.spans.items()}
            out["label_prior"] = label_prior_accuracies(self.ev, self.clients, cfg.num_labels, rows)  # the floor
            # the global model itself on each client's own split, beside what the client ends its round with
            out["global_own"] = {cid: accuracy_of(rows[cid], t) for cid, t in sorted(self.own.items())}
        return out


async def _run(cfg: SimConfig, out: pathlib.Path, progress) -> dict:
    t_start = time.perf_counter()
    lm = cfg.task == "causal_lm"
    loaded = None
    if lm:  # a causal LM's own texts need its tokenizer (instruction rows: chat template)
        progress(f"loading {cfg.model}")
        loaded = load_model(cfg.model, task=cfg.task, seed=cfg.seed, attn_implementation="sdpa")
    progress("partitioning the data")
    data = cfg.data
    if lm and os.path.isfile(str(data)):
        data = text_dataset(data, tokenizer=loaded.tokenizer)
    partition = prepare(data, cfg.partition, cfg.clients, out / "data", cfg.seed, alpha=cfg.alpha,
                        max_train=cfg.max_train, max_test=cfg.max_test, overwrite=True, num_labels=None if lm else cfg.num_labels,
                        min_examples=cfg.min_examples)
    # A classifier has --num-labels classes, else as many as the data name (a label outside was refused above).
    cfg = dataclasses.replace(cfg, num_labels=cfg.num_labels or len(partition.label_names))
    if not lm:
        progress(f"loading {cfg.model} ({cfg.num_labels} classes)")
        loaded = load_model(cfg.model, task=cfg.task, num_labels=cfg.num_labels, seed=cfg.seed, attn_implementation="sdpa")
    splits, tops, why = _choose_splits(cfg)
    if cfg.strategy == "splitfed" and len(set(splits)) > 1:
        splits = [min(splits)] * cfg.clients  # SplitFed has one split for everyone: the smallest that fits
    layouts = list(zip(splits, tops or [None] * cfg.clients))  # (split, top) per client; top None: head/tail
    cache = pathlib.Path(cfg.bundle_cache) if cfg.bundle_cache else _default_cache()
    bundles, jobs = {}, []
    for s, u in sorted(set(layouts), key=lambda su: (su[0], -1 if su[1] is None else su[1])):
        bundles[s, u] = _bundle_for(cfg, s, cache, u, jobs=jobs)
    # One process (one thread) per missing bundle, side by side; cached ones are reused.
    export_missing(jobs, on_start=lambda paths: progress(f"exporting {len(paths)} {cfg.backend} bundle(s) in parallel: "
                                                          + ", ".join(p.name.rsplit("-", 2)[0] for p in paths)))
    encoder = TextEncoder.from_bundle(load_bundle(bundles[layouts[0]]))

    clients_file = out / "clients.json"
    clients_file.unlink(missing_ok=True)
    ids = [f"c{k}" for k in range(cfg.clients)]
    for cid in ids:
        token = add_client(clients_file, cid)
        tf = out / "tokens" / cid
        tf.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tf, token + "\n", mode=0o600)

    torch.set_num_threads(cfg.threads)
    train = TrainConfig(rounds=cfg.rounds, min_clients=cfg.clients, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                        lr=cfg.lr, optimizer=cfg.optimizer, align_lambda=cfg.align_lambda, seed=cfg.seed, round_timeout=1800,
                        align_top=cfg.align_top, alignment=cfg.alignment, fedrep_head_steps=cfg.fedrep_head_steps, ditto_mu=cfg.ditto_mu,
                        score_every=cfg.score_every)
    strategy = make_strategy(cfg.strategy, train)
    host = TailHost(loaded, OptimizerConfig(cfg.optimizer, cfg.lr, server_step_every=cfg.server_step_every))
    state_dir = out / "server"
    if state_dir.exists():
        shutil.rmtree(state_dir)
    # the devices' own state (personal heads, whole models) of an earlier run in this directory: not this run's start
    shutil.rmtree(out / "clients", ignore_errors=True)
    state = ServerState(state_dir, {"model": loaded.info.id, "strategy": strategy.name})

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
    stop = threading.Event()
    full = strategy.mode == "full"
    try:
        for k, cid in enumerate(ids):
            args = {
                "bundle": str(bundles[layouts[k]]), "server": url, "data": str(out / "data" / f"client_{k}" / "train.jsonl"),
                "test_data": str(out / "data" / f"client_{k}" / "test.jsonl"), "client_id": cid,
                "token_file": str(out / "tokens" / cid), "backend": cfg.backend, "threads": cfg.threads,
                "state_dir": str(out / "clients" / cid), "encodings": cfg.encoding, "max_retries": 5, "seed": cfg.seed + k,
                "align_every": cfg.align_every,
                "full_model": full or None,
            }
            if cfg.in_process:
                tasks.append(asyncio.create_task(asyncio.to_thread(_run_edge_quiet, args, stop)))
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
        stop.set()  # in-process clients: return at their next lost connection instead of reconnecting
        if not serve.done():
            # Wait for the server to close its connections and stop listening before its state closes: a
            # server still serving on a closed state welcomes clients and fails them (1011) forever.
            serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve
        await asyncio.gather(*tasks, return_exceptions=True)
        state.close()
    return collect(cfg, out, partition, splits, why, time.perf_counter() - t_start)


def bundle_for(cfg: SimConfig, split: int, top: int | None = None) -> pathlib.Path:
    """The bundle a run of ``cfg`` exports (or reused) for ``split`` (and ``top``): what its clients there ran."""
    cfg = _with_run_labels(cfg)
    return _bundle_for(cfg, split, pathlib.Path(cfg.bundle_cache) if cfg.bundle_cache else _default_cache(), top)


def _with_run_labels(cfg: SimConfig) -> SimConfig:
    """``cfg`` with the class count its finished run inferred (from its summary.json), if it left it out."""
    if cfg.num_labels is not None:
        return cfg
    summary = json.loads((pathlib.Path(cfg.out) / "summary.json").read_text())
    return dataclasses.replace(cfg, num_labels=summary["config"]["num_labels"])


def _default_cache() -> pathlib.Path:
    return cache_dir() / "bundles"


def _run_edge_quiet(args: dict, stop: threading.Event | None = None) -> int:
    return run_edge({k: v for k, v in args.items() if v is not None},
                    make_trainer=full_model_trainer if args.get("full_model") else None, stop=stop)


def _spawn_client(args: dict, log_path: pathlib.Path, threads: int) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = log_path.with_suffix(".json")
    atomic_write_text(cfg_path, json.dumps({k: v for k, v in args.items() if v is not None}, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "flexsfl", "-v", "edge", "run", "--config", str(cfg_path)]
    # The client log is a live stream (a person tails it), not a file read back whole: no atomic write.
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)



def simulate(cfg: SimConfig, *, show: bool = True) -> dict:
    """Run one federation; returns the summary (also in ``cfg.out``/summary.json)."""
    out = pathlib.Path(cfg.out).resolve()  # clients get absolute paths in their config files
    out.mkdir(parents=True, exist_ok=True)

    console = Console(stderr=True, quiet=not show)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"{cfg.strategy}: starting", total=cfg.rounds)

        def progress(msg: str, advance: bool = False) -> None:
            bar.update(task, description=f"{cfg.strategy}: {msg}", advance=1 if advance else 0)

        summary = asyncio.run(_run(cfg, out, progress))
    plot([(cfg.strategy, out)], out / "accuracy_vs_time.png")
    return summary

