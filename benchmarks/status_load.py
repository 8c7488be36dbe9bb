"""``flexsfl bench status``: does a flood of status requests slow the clients' training steps?

The status page, ``/api/status`` and ``/metrics`` are answered on the server's event loop, the
same loop that moves every client's Z and g. This benchmark measures what a bounded flood of them
costs the clients. Per run, the real server (:class:`~flexsfl.server_backend.server.FlexServer`, in
this process, as in ``bench server``) trains ``rounds`` rounds of τ steps with N synthetic clients
(:func:`flexsfl.benchmarks.server.client_worker`, one process each: real protocol, fixed Z, no
compute of their own), which time every step from Z sent to g received. In ``flood`` runs a
separate process (:func:`flood_worker`) keeps ``concurrency`` loopback connections busy with
``GET /api/status`` (every 10th request ``GET /metrics``), capped at ``rate`` requests/s — far
beyond what any number of open pages (one request per 2 s each) or a Prometheus scraper sends.

``quiet`` and ``flood`` runs alternate (order swapped every repeat) so both see the same drift of
a shared machine; the first round of each run is a warm-up. Reported per mode: step latency
p50/p90 over every timed step of every repeat, the median of per-repeat p50s, and for the flood
the requests actually answered per second and their latency. ``slowdown`` = flood p50 / quiet p50
(median of the per-repeat ratios); the issue's bound is 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError

from flexsfl.benchmarks.report import Column, markdown_table, summarize, write_results

__all__ = ["StatusLoadConfig", "run_status_load", "flood_worker", "add_arguments", "config_from_args"]

log = logging.getLogger("flexsfl.bench.status")

MODES = ("quiet", "flood")


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})  # the flag's help lives on the field


@dataclasses.dataclass(frozen=True)
class StatusLoadConfig:
    model: str = _f("minilm", "minilm, smollm2 or a local Hugging Face model directory")
    split: int = _f(3, "every client's split point")
    batch: int = _f(8, "B of every client step")
    seq: int = _f(128, "T of every client step")
    clients: int = _f(4, "synthetic client processes")
    local_steps: int = _f(8, "τ, steps per client per round")
    rounds: int = _f(3, "rounds per run; the first is a warm-up, not timed")
    repeats: int = _f(3, "quiet/flood pairs, interleaved")
    threads: int = _f(1, "torch threads of the server's compute worker")
    rate: float = _f(50.0, "flood cap in requests/s: 100 open pages polling every 2 s, or a scrape every 15 s from 750 Prometheus servers")
    concurrency: int = _f(16, "flood connections in flight")
    out: str = _f("results/bench", "results directory")

    def __post_init__(self) -> None:
        if self.rounds < 2:
            raise ConfigError(f"--rounds must be >= 2 (the first is a warm-up), got {self.rounds}")
        for name in ("split", "batch", "seq", "clients", "local_steps", "repeats", "threads", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.rate > 0:
            raise ConfigError(f"--rate must be > 0 requests/s, got {self.rate}")


# --- the flood (its own process) -----------------------------------------------------------------


async def _get(port: int, path: str) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()  # the server closes after each answer
        return data.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def _flood(port: int, rate: float, concurrency: int, stop: threading.Event) -> dict[str, Any]:
    sent = 0
    ok = errors = 0
    latencies: list[float] = []
    t_start = time.perf_counter()

    async def one_connection() -> None:
        nonlocal sent, ok, errors
        while not stop.is_set():
            k = sent
            sent += 1
            delay = t_start + k / rate - time.perf_counter()  # the cap: request k goes out at k / rate
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                good = await _get(port, "/metrics" if k % 10 == 9 else "/api/status")
            except OSError:
                good = False
            latencies.append(time.perf_counter() - t0)
            ok, errors = ok + good, errors + (not good)

    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    seconds = time.perf_counter() - t_start
    return {"requests": ok, "errors": errors, "seconds": seconds,
            "latency_ms_p50": round(1e3 * float(np.median(latencies)), 3) if latencies else None}


def flood_worker(chan) -> None:
    """Worker: ``{"port", "rate", "concurrency"}`` -> ``{"ready"}``; floods until the parent's
    stop message -> the flood's counts."""
    spec = chan.recv()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(asyncio.run(_flood(spec["port"], spec["rate"], spec["concurrency"], stop)))

    t = threading.Thread(target=run)
    t.start()
    chan.send({"ready": True})
    chan.recv()  # {"report": true}
    stop.set()
    t.join()
    chan.send(result)
    chan.recv()  # stop


# --- one run -------------------------------------------------------------------------------------


async def _run_once(loaded, cfg: StatusLoadConfig, mode: str, logs: pathlib.Path) -> dict[str, Any]:
    from flexsfl.core.bundle import layout_fingerprint
    from flexsfl.server_backend.server import FlexServer, ServerConfig, frame_limit
    from flexsfl.server_backend.state import ServerState
    from flexsfl.server_backend.strategy import TrainConfig, make_strategy
    from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost

    from flexsfl.benchmarks.worker import Worker

    info = loaded.info
    host = TailHost(loaded, OptimizerConfig("sgd", 1e-4))
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=cfg.rounds, min_clients=cfg.clients, local_steps=cfg.local_steps,
                                                     batch_size=cfg.batch, lr=1e-4, round_timeout=3600))
    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-status-"))
    state = ServerState(state_dir, {"model": info.id, "bench": True})
    server = FlexServer(host, strategy, None, state, ServerConfig(port=0, max_batch=cfg.batch, max_seq=cfg.seq,
                                                                  encodings=("fp32",), hello_timeout=300, linger=600),
                        compute_threads=cfg.threads)
    serving = asyncio.create_task(server.serve())
    workers: list[Worker] = []
    flood = None
    try:
        await server.ready.wait()
        if mode == "flood":
            flood = Worker("flexsfl.benchmarks.status_load:flood_worker", threads=1, name="flood", log_dir=logs)
            await asyncio.to_thread(flood.request, {"port": server.port, "rate": cfg.rate, "concurrency": cfg.concurrency}, 120)
        spec = {
            "url": f"ws://127.0.0.1:{server.port}", "layout_hash": layout_fingerprint(info, loaded.lora, cfg.split),
            "split": cfg.split, "hidden": info.hidden_size, "batch": cfg.batch, "seq": cfg.seq, "encoding": "fp32",
            "max_frame_bytes": frame_limit(host, cfg.batch, cfg.seq),
        }
        for k in range(cfg.clients):
            w = Worker("flexsfl.benchmarks.server:client_worker", threads=1, name=f"client{k}", log_dir=logs)
            workers.append(w)
            w.send({**spec, "client_id": f"bench{k}", "seed": k})
        for w in workers:
            await asyncio.to_thread(w.recv, 300)
        # The warm-up round ends when the server moves on to round 1: the CPU count starts there.
        while server.round_id < 1 and not serving.done():
            await asyncio.sleep(0.005)
        cpu0, steps0 = time.process_time(), server.worker.steps
        while server.round_id < cfg.rounds and not serving.done():
            await asyncio.sleep(0.005)
        cpu, steps = time.process_time() - cpu0, server.worker.steps - steps0
        # The server lingers after its Bye (the clients report then): every flood request meets a
        # listening server, and the run ends by cancelling it.
        flooded = await asyncio.to_thread(flood.request, {"report": True}, 120) if flood else None
        results = [await asyncio.to_thread(w.recv, 300) for w in workers]
    finally:
        serving.cancel()  # still lingering (or failed): its own cleanup stops the compute thread
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        for w in [*workers, *([flood] if flood else [])]:
            w.close()
        state.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    latency = [t1 - t0 for r in results for rnd, t0, t1 in r["steps"] if rnd >= 1]
    # CPU seconds of this process (the server: event loop + compute thread) per timed step: what a
    # step costs the server whatever share of the shared machine it got
    return {"latency_s": latency, "flood": flooded, "cpu_ms_per_step": 1e3 * cpu / max(steps, 1), "steps": steps}


def _row(cfg: StatusLoadConfig, model_id: str, mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    p50s = [float(np.median(r["latency_s"])) for r in runs]
    row = {"mode": mode, "model": model_id, "split": cfg.split, "batch": cfg.batch, "seq": cfg.seq, "clients": cfg.clients,
           "local_steps": cfg.local_steps, "rounds": cfg.rounds, "repeats": len(runs),
           **summarize([x for r in runs for x in r["latency_s"]], "step"),
           "step_ms_p50_runs": [round(1e3 * x, 2) for x in p50s],
           "cpu_ms_per_step": round(float(np.median([r["cpu_ms_per_step"] for r in runs])), 2)}
    floods = [r["flood"] for r in runs if r["flood"]]
    if floods:
        row.update(flood_rate_cap=cfg.rate, flood_concurrency=cfg.concurrency,
                   flood_req_per_s=round(float(np.median([f["requests"] / f["seconds"] for f in floods])), 1),
                   flood_errors=sum(f["errors"] for f in floods),
                   flood_latency_ms_p50=float(np.median([f["latency_ms_p50"] for f in floods])))
    return row


_COLUMNS: list[Column] = [
    ("mode", "mode", "s"),
    ("step_ms_p50", "client step p50 ms", ".1f"),
    ("step_ms_p90", "p90 ms", ".1f"),
    ("step_n", "steps timed", "d"),
    ("slowdown", "p50 flood / quiet", ".3f"),
    ("cpu_ms_per_step", "server CPU ms/step", ".1f"),
    ("cpu_ratio", "CPU flood / quiet", ".3f"),
    ("flood_req_per_s", "status req/s answered", ".0f"),
    ("flood_latency_ms_p50", "status req p50 ms", ".1f"),
    ("flood_errors", "errors", "d"),
]


def run_status_load(cfg: StatusLoadConfig) -> tuple[list[dict[str, Any]], str]:
    """Run the interleaved quiet/flood pairs; write ``status_load.json`` / ``.csv`` under ``cfg.out``."""
    import torch  # the benchmark hosts the real server in this process

    from flexsfl.model.loading import load_model

    from flexsfl.benchmarks.machine import machine_info

    torch.set_num_threads(cfg.threads)
    out = pathlib.Path(cfg.out)
    loaded = load_model(cfg.model, attn_implementation="sdpa")
    if not 1 <= cfg.split < loaded.info.num_blocks:
        raise ConfigError(f"--split {cfg.split} is outside 1..{loaded.info.num_blocks - 1} for {cfg.model}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for rep in range(cfg.repeats):
        for mode in MODES if rep % 2 == 0 else tuple(reversed(MODES)):
            log.info("status bench: %s, repeat %d/%d", mode, rep + 1, cfg.repeats)
            runs[mode].append(asyncio.run(_run_once(loaded, cfg, mode, out / "logs")))
    rows = [_row(cfg, loaded.info.id, mode, runs[mode]) for mode in MODES]
    ratios = [f / q for f, q in zip(rows[1]["step_ms_p50_runs"], rows[0]["step_ms_p50_runs"])]
    rows[1]["slowdown"] = round(float(np.median(ratios)), 4)
    rows[1]["slowdown_runs"] = [round(x, 4) for x in ratios]
    rows[1]["cpu_ratio"] = round(rows[1]["cpu_ms_per_step"] / rows[0]["cpu_ms_per_step"], 4)
    machine = machine_info()
    paths = write_results(out, "status_load", rows, machine, meta={"config": dataclasses.asdict(cfg)})
    verdict = "met" if rows[1]["slowdown"] <= 1.05 else "NOT met"
    lines = [
        f"## status load: {cfg.model} split {cfg.split}, B={cfg.batch}, T={cfg.seq}, {cfg.clients} clients, "
        f"τ={cfg.local_steps}, {cfg.rounds - 1} timed round(s); flood capped at {cfg.rate:.0f} req/s over "
        f"{cfg.concurrency} connections; {cfg.repeats} interleaved repeat(s)",
        "",
        markdown_table(rows, _COLUMNS),
        "",
        f"client step p50 with the flood / without: {rows[1]['slowdown']:.3f} (per repeat: "
        f"{', '.join(f'{x:.3f}' for x in ratios)}; bound <= 1.05: {verdict}); server CPU per step with the flood / "
        f"without: {rows[1]['cpu_ratio']:.3f}",
        f"results: {paths['json']}, {paths['csv']}",
    ]
    return rows, "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(StatusLoadConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")


def config_from_args(args: argparse.Namespace) -> StatusLoadConfig:
    return StatusLoadConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StatusLoadConfig)})


if __name__ == "__main__":
    from flexsfl.benchmarks.machine import machine_info

    parser = argparse.ArgumentParser(prog="python -m flexsfl.benchmarks.status_load", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _, summary = run_status_load(config_from_args(parser.parse_args()))
    print(summary)
    m = machine_info()
    print(f"machine: {m['cpu']} ({m['arch']}, {m['usable_cores']} cores, {m['memory_mb']} MB), load {m['load_avg']}, "
          f"commit {m['commit']}")
