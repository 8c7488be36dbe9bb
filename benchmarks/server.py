"""``flexsfl bench server``: steps/s of one server under N concurrent clients, with and without
cross-client batching.

The server is the real one (:class:`~flexsfl.server_backend.server.FlexServer` with a
:class:`~flexsfl.server_backend.tail_host.TailHost`, FlexP-SFL strategy, no client registry), run in this
process. Each client is a **separate process** (:func:`client_worker`) that speaks the real
protocol over a loopback websocket but computes nothing: it sends a fixed random Z [B, T, d]
with random labels for each of its τ steps, waits for g, uploads the adapters it was sent, and
reports metrics, so what is measured is the server's work, not the clients'.

Per configuration (batching on/off × number of clients) the server runs ``rounds`` rounds of
τ steps; the first is a warm-up. Each configuration is run ``repeats`` times, interleaved with the
others. Over the later rounds::

    steps_per_s     steps answered / (last g received - first Z sent), all clients together;
                    the median repeat, with the slowest and fastest beside it
    latency_ms      each step's Z-sent -> g-received time at the client (p50, p90)
    batch_mean      steps per TailHost.train_batch call (cross-client batching at work)
    server_steps_per_step  the tail's optimizer steps per client step: 1/K under the fixed
                    schedule (--server-step-every K, as flexsfl serve), whatever the batching
    busy_frac       the compute thread's busy time / the window
    cpu_ms_per_step the server process's CPU time per step: what a step costs the server,
                    whatever share of a shared machine it got (steps/s is not robust to that)

With ``--workers 1,2`` each configuration also runs with the tail on that many Ray actors
(:mod:`~flexsfl.server_backend.workers`); then the server's CPU includes the actors' processes and
two more columns appear::

    rss_mb_per_client  the front end's RSS growth per connected client (MB)
    front_cpu_ms_per_step  this process's CPU per step (with Ray workers: the front end alone)
    worker_rss_mb      the Ray workers' RSS, summed (MB)

The clients are :mod:`~flexsfl.benchmarks.synthetic`'s, ``--clients-per-process`` of them in each
client process (one process per client with 1).

``speedup`` (batched steps/s over per-request steps/s at the same client count) is the number the
issue asks for; the target is >= 2x at 16 clients. ``--profile`` samples the server process with
py-spy during the headline configuration and writes the hottest functions (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import pathlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError, OrderError
from flexsfl.core.wire import ENCODINGS

from flexsfl.benchmarks.report import Column, int_list, line_plot, markdown_table, summarize, write_results

__all__ = ["ServerBenchConfig", "run_server_bench", "client_worker", "add_arguments", "config_from_args"]

log = logging.getLogger("flexsfl.bench.server")

_FP16_MIN_NORMAL = 2.0**-14


@dataclasses.dataclass(frozen=True)
class ServerBenchConfig:
    model: str = "minilm"
    split: int = 3  # every client's split point (MiniLM has 6 blocks: a mid split)
    batch: int = 8  # B of every client step
    seq: int = 128  # T
    clients: tuple[int, ...] = (1, 2, 4, 8, 16)  # the sweep
    modes: tuple[str, ...] = ("batched", "per-request")
    local_steps: int = 4  # τ per round
    rounds: int = 2  # the first is a warm-up, not measured
    repeats: int = 3  # runs per configuration, interleaved; rows give the median run
    threads: int = 1  # torch threads of the server's compute worker (of each Ray worker)
    workers: tuple[int, ...] = (1,)  # Ray workers hosting the tail (1: the one local compute thread)
    clients_per_process: int = 16  # synthetic clients per client process
    encoding: str = "fp32"
    profile: bool = False  # py-spy the server during the largest configuration of each mode
    server_step_every: int = 1  # the server's fixed optimizer schedule: one step per K client steps
    out: str = "results/bench"

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1:
            raise ConfigError(f"--clients must be positive counts, got {list(self.clients)}")
        bad = [m for m in self.modes if m not in ("batched", "per-request")]
        if bad or not self.modes:
            raise ConfigError(f"--modes {bad or '(none)'}: choose batched and/or per-request")
        if self.rounds < 2:
            raise ConfigError(f"--rounds must be >= 2 (the first is a warm-up), got {self.rounds}")
        if not self.workers or min(self.workers) < 1:
            raise ConfigError(f"--workers must be positive counts, got {list(self.workers)}")
        for name in ("split", "batch", "seq", "local_steps", "threads", "repeats", "clients_per_process"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")


# --- the synthetic clients: benchmarks/synthetic.py, many per process -------------------------------


def client_worker(chan) -> None:
    """Worker: one client (kept for callers of the one-process-per-client form)."""
    from flexsfl.benchmarks.synthetic import clients_worker

    clients_worker(chan)


# --- one configuration --------------------------------------------------------------------------


class _PySpy:
    """py-spy sampling this process while a configuration runs (``--profile``)."""

    def __init__(self, path: pathlib.Path) -> None:
        exe = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
        if not pathlib.Path(exe).exists():
            raise ConfigError("--profile needs py-spy: pip install py-spy")
        self.path = path
        self.proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "200", "--threads",
                                      "--format", "raw", "--output", str(path), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        return hot_functions(self.path)


def hot_functions(raw: pathlib.Path, top: int = 12) -> dict[str, Any]:
    """Per thread, from py-spy's raw (collapsed stack) output: the share of samples inside each
    function (inclusive) and at each leaf function (self). Frames in >= 98% of a thread's
    samples (thread bootstrap, the worker loop) say nothing and are left out."""
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread, *frames = stack.split(";")
        n = int(count)
        totals[thread] += n
        names = [f.split(" (")[0] for f in frames]
        for f in set(names):
            incl[thread][f] += n
        if names:
            leaf[thread][names[-1]] += n
    out = {}
    for thread in sorted(totals, key=totals.get, reverse=True):
        n = totals[thread]
        out[thread] = {
            "samples": n,
            "inclusive": [(f, round(c / n, 3)) for f, c in incl[thread].most_common() if c < 0.98 * n][:top],
            "self": [(f, round(c / n, 3)) for f, c in leaf[thread].most_common(top)],
        }
    return out


def _rss_cpu(pids: list[int]) -> tuple[float, float]:
    """Summed RSS (bytes) and CPU seconds (user + system) of these processes. This process's own
    CPU comes from ``time.process_time`` (ns resolution): psutil reads /proc in 10 ms ticks, and a
    tiny model's timed window could measure 0 CPU (a division by zero in the speedup)."""
    import psutil

    rss = cpu = 0.0
    for pid in pids:
        p = psutil.Process(pid)
        rss += p.memory_info().rss
        if pid == os.getpid():
            cpu += time.process_time()
        else:
            t = p.cpu_times()
            cpu += t.user + t.system
    return rss, cpu


async def _serve_one(loaded, cfg: ServerBenchConfig, mode: str, n: int, logs: pathlib.Path, profile: bool,
                     workers: int = 1) -> dict[str, Any]:
    import functools

    from flexsfl.core.bundle import layout_fingerprint
    from flexsfl.model.loading import load_model
    from flexsfl.server_backend.workers import HostSpec, make_compute
    from flexsfl.server_backend.server import FlexServer, ServerConfig, frame_limit
    from flexsfl.server_backend.state import ServerState
    from flexsfl.server_backend.strategy import TrainConfig, make_strategy
    from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost

    from flexsfl.benchmarks.worker import Worker

    info = loaded.info
    opt = OptimizerConfig("sgd", 1e-4, server_step_every=cfg.server_step_every)
    host = TailHost(loaded, opt)
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=cfg.rounds, min_clients=n, local_steps=cfg.local_steps,
                                                     batch_size=cfg.batch, lr=1e-4, round_timeout=3600))
    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-server-"))
    state = ServerState(state_dir, {"model": info.id, "bench": True})
    server = FlexServer(host, strategy, None, state,
                        ServerConfig(port=0, batching=mode == "batched", max_batch=cfg.batch, max_seq=cfg.seq,
                                     encodings=(cfg.encoding,), hello_timeout=300),
                        compute=make_compute(host, HostSpec(functools.partial(load_model, cfg.model, attn_implementation="sdpa"),
                                                            opt) if workers > 1 else None,
                                             workers=workers, batching=mode == "batched", threads=cfg.threads))
    serving = asyncio.create_task(server.serve())
    procs: list[Worker] = []
    spy = None
    try:
        await server.ready.wait()
        pids = [os.getpid()] + (await server.worker.worker_pids() if workers > 1 else [])
        rss0, _ = _rss_cpu([os.getpid()])
        spec = {
            "url": f"ws://127.0.0.1:{server.port}", "layout_hash": layout_fingerprint(info, loaded.lora, cfg.split),
            "split": cfg.split, "hidden": info.hidden_size, "batch": cfg.batch, "seq": cfg.seq, "encoding": cfg.encoding,
            "max_frame_bytes": frame_limit(host, cfg.batch, cfg.seq), "prefix": "bench",
        }
        for first in range(0, n, cfg.clients_per_process):
            k = min(cfg.clients_per_process, n - first)
            w = Worker("flexsfl.benchmarks.synthetic:clients_worker", threads=1, name=f"clients{first}", log_dir=logs)
            procs.append(w)
            w.send({**spec, "clients": k, "first": first})
        for w in procs:
            await asyncio.to_thread(w.recv, 300)
        # The warm-up round ends when the server moves on to round 1: the timed counters start there.
        while server.round_id < 1 and not serving.done():
            await asyncio.sleep(0.005)
            dead = [w.name for w in procs if w.proc.poll() not in (None, 0)]
            if dead:
                raise OrderError(f"client process(es) {', '.join(dead)} failed during the warm-up; see {logs}")
        w = server.worker
        # every client is connected (the warm-up round is over): memory now, CPU from now
        front_rss, worker_rss = _rss_cpu([os.getpid()])[0], _rss_cpu(pids[1:])[0]
        cpu0, front0 = _rss_cpu(pids)[1], _rss_cpu(pids[:1])[1]
        start = (w.busy_seconds, w.steps, w.batches, cpu0, w.server_steps)
        if profile:
            spy = _PySpy(logs / f"server-{mode}-{n}.pyspy.txt")
        await serving
        busy, steps, batches = w.busy_seconds - start[0], w.steps - start[1], w.batches - start[2]
        server_steps = w.server_steps - start[4]
        cpu = _rss_cpu(pids)[1] - start[3]
        front_cpu = _rss_cpu(pids[:1])[1] - front0
        hot = spy.stop() if spy else None
        spy = None
        results = [c for w in procs for c in (await asyncio.to_thread(w.recv, 300))["clients"]]
    finally:
        if spy is not None:
            spy.stop()
        if not serving.done():
            serving.cancel()
        for w in procs:
            w.close()
        state.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    timed = [(t0, t1) for r in results for rnd, t0, t1 in r["steps"] if rnd >= 1]
    window = max(t1 for _, t1 in timed) - min(t0 for t0, _ in timed)
    run = {
        "steps": len(timed), "window_s": window, "latency_s": [t1 - t0 for t0, t1 in timed],
        # timed rounds: steps per TailHost.train_batch call, and the compute thread's busy share
        # (which includes the aggregation and persistence between rounds)
        "batch_mean": steps / max(batches, 1), "busy_frac": busy / window,
        "server_steps_per_step": server_steps / max(steps, 1),  # optimizer steps per client step (the schedule)
        # CPU seconds of this process (the server: event loop + compute thread) per step: unlike
        # steps/s, it does not depend on how much of the shared machine the server got
        "cpu_ms_per_step": 1e3 * cpu / max(steps, 1),
        "rss_mb_per_client": (front_rss - rss0) / 2**20 / n, "worker_rss_mb": worker_rss / 2**20,
        # this process alone: with Ray workers, the front end's own cost per step (websockets, codec, routing)
        "front_cpu_ms_per_step": 1e3 * front_cpu / max(steps, 1),
        "g_abs_median": float(np.median([r["g_abs_median"] for r in results])),
        "g_frac_below_fp16_normal": float(np.mean([r["g_frac_below_fp16_normal"] for r in results])),
    }
    if hot is not None:
        run["profile"] = hot
    return run


def _row(cfg: ServerBenchConfig, model_id: str, mode: str, n: int, runs: list[dict[str, Any]], workers: int = 1) -> dict[str, Any]:
    """One configuration's repeats -> its row: the median run's steps/s (min and max beside it),
    latency percentiles over every timed step of every repeat."""
    rates = sorted(r["steps"] / r["window_s"] for r in runs)
    row = {
        "mode": mode, "workers": workers, "clients": n, "model": model_id, "split": cfg.split, "batch": cfg.batch, "seq": cfg.seq,
        "threads": cfg.threads, "encoding": cfg.encoding, "local_steps": cfg.local_steps, "rounds": cfg.rounds,
        "repeats": len(runs), "steps_timed": sum(r["steps"] for r in runs),
        "steps_per_s": round(float(np.median(rates)), 3), "steps_per_s_min": round(rates[0], 3),
        "steps_per_s_max": round(rates[-1], 3), "steps_per_s_runs": [round(x, 3) for x in rates],
        **summarize([x for r in runs for x in r["latency_s"]], "latency"),
        "cpu_ms_per_step": round(float(np.median([r["cpu_ms_per_step"] for r in runs])), 2),
        "batch_mean": round(float(np.mean([r["batch_mean"] for r in runs])), 2),
        "server_step_every": cfg.server_step_every,
        "server_steps_per_step": round(float(np.mean([r["server_steps_per_step"] for r in runs])), 3),
        "busy_frac": round(float(np.mean([r["busy_frac"] for r in runs])), 3),
        "g_abs_median": float(np.median([r["g_abs_median"] for r in runs])),
        "g_frac_below_fp16_normal": float(np.mean([r["g_frac_below_fp16_normal"] for r in runs])),
        "load_avg": round(float(np.mean([r["load_avg"] for r in runs])), 2),
        "rss_mb_per_client": round(float(np.median([r["rss_mb_per_client"] for r in runs])), 3),
        "worker_rss_mb": round(float(np.median([r["worker_rss_mb"] for r in runs])), 1),
        "front_cpu_ms_per_step": round(float(np.median([r["front_cpu_ms_per_step"] for r in runs])), 2),
    }
    profiles = [r["profile"] for r in runs if "profile" in r]
    if profiles:
        row["profile"] = profiles[-1]
    return row


def _plot(rows: list[dict[str, Any]], path: pathlib.Path, cfg: ServerBenchConfig, machine: dict) -> pathlib.Path:
    series = {}
    for mode in cfg.modes:
        for w in cfg.workers:
            pts = sorted((r["clients"], r["steps_per_s"], 1e3 / r["cpu_ms_per_step"]) for r in rows
                         if r["mode"] == mode and r["workers"] == w)
            name = mode if len(cfg.workers) == 1 else f"{mode}, {w} worker(s)"
            series[f"{name}: steps per wall second"] = ([p[0] for p in pts], [p[1] for p in pts])
            series[f"{name}: steps per server CPU second"] = ([p[0] for p in pts], [p[2] for p in pts])
    return line_plot(path, series, xlabel="concurrent clients", ylabel="steps / s (server)",
                     title=f"server throughput: {cfg.model} split {cfg.split}, B={cfg.batch}, T={cfg.seq}",
                     subtitle=f"{machine['cpu']}, {cfg.threads} torch thread(s), commit {machine['commit']}")


_COLUMNS: list[Column] = [
    ("workers", "workers", "d"),
    ("clients", "clients", "d"),
    ("mode", "mode", "s"),
    ("steps_per_s", "steps/s", ".2f"),
    ("steps_per_s_min", "min", ".2f"),
    ("steps_per_s_max", "max", ".2f"),
    ("speedup", "batched / per-request", ".2f"),
    ("cpu_ms_per_step", "server CPU ms/step", ".0f"),
    ("speedup_cpu", "per-request / batched CPU", ".2f"),
    ("latency_ms_p50", "latency p50 ms", ".0f"),
    ("latency_ms_p90", "latency p90 ms", ".0f"),
    ("batch_mean", "steps per batch", ".1f"),
    ("busy_frac", "compute busy", ".0%"),
    ("front_cpu_ms_per_step", "front-end CPU ms/step", ".1f"),
    ("rss_mb_per_client", "front-end RSS MB/client", ".2f"),
    ("worker_rss_mb", "Ray workers RSS MB", ".0f"),
    ("load_avg", "load avg", ".1f"),
]


def run_server_bench(cfg: ServerBenchConfig) -> tuple[list[dict[str, Any]], str]:
    """Run the sweep; write ``server.json`` / ``.csv`` / ``.png`` under ``cfg.out``; returns rows and a summary."""
    from flexsfl.model.loading import load_model

    from flexsfl.benchmarks.machine import machine_info

    out = pathlib.Path(cfg.out)
    logs = out / "logs"
    import torch

    torch.set_num_threads(cfg.threads)  # the event loop's own torch calls (none expected) stay in line
    loaded = load_model(cfg.model, attn_implementation="sdpa")
    if not 1 <= cfg.split < loaded.info.num_blocks:
        raise ConfigError(f"--split {cfg.split} is outside 1..{loaded.info.num_blocks - 1} for {cfg.model}")
    top = max(cfg.clients)
    keys = [(m, w, n) for n in sorted(cfg.clients) for w in cfg.workers for m in cfg.modes]
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {k: [] for k in keys}
    ray = None
    if max(cfg.workers) > 1:  # one local Ray cluster for the whole sweep
        from flexsfl.server_backend.workers import import_ray

        ray = import_ray()
        if ray.is_initialized():
            ray = None  # the caller's cluster: theirs to stop
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Interleave: every repeat visits every configuration, the modes side by side at each client
    # count (in alternating order), so all of them see the same drift in machine load.
    try:
        for rep in range(cfg.repeats):
            for n in sorted(cfg.clients):
                for w in cfg.workers:
                    for mode in cfg.modes if rep % 2 == 0 else tuple(reversed(cfg.modes)):
                        log.info("server bench: %s, %d worker(s), %d client(s), repeat %d/%d", mode, w, n, rep + 1, cfg.repeats)
                        load = machine_info()["load_avg"]
                        profile = cfg.profile and n == top and rep == cfg.repeats - 1
                        runs[(mode, w, n)].append({**asyncio.run(_serve_one(loaded, cfg, mode, n, logs, profile, w)),
                                                   "load_avg": load})
    finally:
        if ray is not None:
            ray.shutdown()
    rows = [_row(cfg, loaded.info.id, m, n, runs[(m, w, n)], w) for m, w, n in keys]
    per_req = {(r["workers"], r["clients"]): r for r in rows if r["mode"] == "per-request"}
    for r in rows:
        if r["mode"] == "batched" and (r["workers"], r["clients"]) in per_req:
            other = per_req[(r["workers"], r["clients"])]
            r["speedup"] = round(r["steps_per_s"] / other["steps_per_s"], 3)
            r["speedup_cpu"] = round(other["cpu_ms_per_step"] / r["cpu_ms_per_step"], 3)
    machine = machine_info()
    paths = write_results(out, "server", rows, machine, meta={"config": dataclasses.asdict(cfg)})
    png = _plot(rows, out / "server.png", cfg, machine) if len(cfg.clients) > 1 else None
    head = next((r for r in rows if r["clients"] == top and "speedup" in r), None)
    lines = [
        f"## server: {cfg.model} split {cfg.split}, B={cfg.batch}, T={cfg.seq}, {cfg.threads} torch thread(s), "
        f"τ={cfg.local_steps}, {cfg.rounds - 1} timed round(s); median of {cfg.repeats} interleaved repeat(s)",
        "",
        markdown_table(rows, _COLUMNS),
        "",
    ]
    if head is not None:
        verdict = "met" if head["speedup"] >= 2 else "NOT met"
        lines.append(f"cross-client batching at {top} clients: {head['speedup']:.2f}x steps/s (target >= 2x: {verdict}); "
                     f"{head['speedup_cpu']:.2f}x fewer server CPU seconds per step")
    for r in rows:
        for thread, prof in r.get("profile", {}).items():
            hot = ", ".join(f"{f} {s:.0%}" for f, s in prof["self"][:5])
            lines.append(f"profile {r['mode']} {r['clients']} clients, {thread} ({prof['samples']} samples): {hot}")
    lines.append(f"results: {paths['json']}, {paths['csv']}" + (f", {png}" if png else ""))
    return rows, "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerBenchConfig()
    p.add_argument("--model", default=d.model, help=f"minilm, smollm2 or a local HF directory (default {d.model})")
    p.add_argument("--split", type=int, default=d.split, help=f"every client's split point (default {d.split})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"B per client step (default {d.batch})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"T (default {d.seq})")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="client counts to sweep (default 1,2,4,8,16)")
    p.add_argument("--modes", default=",".join(d.modes), help="batched and/or per-request (default both)")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help=f"τ, steps per client per round (default {d.local_steps})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds per configuration, the first untimed (default {d.rounds})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"runs per configuration, interleaved (default {d.repeats})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads of the server, or of each Ray worker (default {d.threads})")
    p.add_argument("--workers", default="1", help="Ray worker counts to sweep, e.g. 1,2 (default 1: the one local compute thread)")
    p.add_argument("--clients-per-process", type=int, default=d.clients_per_process,
                   help=f"synthetic clients per client process (default {d.clients_per_process})")
    p.add_argument("--encoding", default=d.encoding, choices=ENCODINGS, help="transfer encoding of Z and g")
    p.add_argument("--profile", action="store_true", help="sample the server with py-spy at the largest client count")
    p.add_argument("--server-step-every", type=int, default=d.server_step_every, metavar="K",
                   help="the server's optimizer schedule: one step per K client steps (default 1, as flexsfl serve)")
    p.add_argument("--out", default=d.out, help=f"results directory (default {d.out})")


def config_from_args(args: argparse.Namespace) -> ServerBenchConfig:
    clients, workers = int_list("--clients", args.clients), int_list("--workers", args.workers)
    return ServerBenchConfig(model=args.model, split=args.split, batch=args.batch, seq=args.seq, clients=clients,
                             modes=tuple(args.modes.split(",")), local_steps=args.local_steps, rounds=args.rounds,
                             repeats=args.repeats, threads=args.threads, encoding=args.encoding, profile=args.profile, out=args.out,
                             workers=workers, clients_per_process=args.clients_per_process,
                             server_step_every=args.server_step_every)
