"""``flexsfl bench wire``: what moving Z and g costs, per transfer encoding.

For each encoding (fp32, fp16, bf16, int8) one step's traffic goes through the real protocol over
a real loopback websocket (``compression=None``, as the server and client use it): the client
builds and serializes an ``Activations`` with Z [B, T, d], an echo server in **another process**
parses and validates it exactly as the server does (``Connection.receive`` +
``check_activations``) and answers a ``Gradients`` with g of the same shape, which the client
parses. Per step we record::

    bytes_per_step    Activations frame + Gradients frame
    rtt_ms            client: build + serialize Z ... parse g   (p50, p90)
    codec_ms          serialize + parse on both sides           (p50 of the sum)
    transport_ms      rtt - codec: websocket framing, loopback, event loops, scheduling
    z_rel_err, g_rel_err   ||decoded - sent|| / ||sent||

``overhead_frac`` = rtt / the client's training step at the same B and T (taken from the latency
benchmark's JSON, ``--step-ms``, or measured here with the eager head). The target is <= 0.10.
``--accuracy`` also runs a short ``simulate`` per encoding (same data, seeds and order) and records
the accuracies it reaches and its final training loss.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import pathlib
import threading
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError
from flexsfl.core.wire import (
    ENCODINGS,
    Activations,
    Bye,
    Connection,
    Gradients,
    Hello,
    Limits,
    Role,
    RoundConfig,
    Welcome,
    check_activations,
)

from flexsfl.benchmarks.report import Column, markdown_table, summarize, write_results

__all__ = ["WireConfig", "run_wire", "echo_worker", "add_arguments", "config_from_args"]

log = logging.getLogger("flexsfl.bench.wire")



@dataclasses.dataclass(frozen=True)
class WireConfig:
    batch: int = 8  # B
    seq: int = 128  # T
    hidden: int = 384  # d (MiniLM)
    # std of the synthetic g. Real ones are tiny: the MiniLM tail at split 3, B=8, T=128 returns a
    # median |g| of 5.6e-6 (bench server), i.e. a std of ~8e-6 for a normal with that median.
    g_scale: float = 8e-6
    encodings: tuple[str, ...] = ENCODINGS
    reps: int = 60  # timed steps per encoding
    warmup: int = 10  # untimed steps first
    step_ms: float | None = None  # the client's training step at (B, T); None: from latency_json or measured
    latency_json: str | None = None  # a latency benchmark result to take the step time from
    step_model: str = "minilm"  # if the step is measured here: eager head of this model ...
    step_split: int = 3  # ... at this split
    accuracy: bool = False  # also run a short simulate per encoding
    sim_data: str = "rotten"
    sim_clients: int = 2
    sim_rounds: int = 4
    sim_local_steps: int = 25  # τ: long enough that the classifier leaves the majority class
    sim_lr: float = 1e-3
    out: str = "results/bench"

    def __post_init__(self) -> None:
        bad = [e for e in self.encodings if e not in ENCODINGS]
        if bad or not self.encodings:
            raise ConfigError(f"--encodings {','.join(bad) or '(none)'} not supported; choose from {', '.join(ENCODINGS)}")
        for name in ("batch", "seq", "hidden", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.g_scale > 0:
            raise ConfigError(f"--g-scale must be > 0, got {self.g_scale}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.step_ms is not None and not self.step_ms > 0:
            raise ConfigError(f"--step-ms must be > 0, got {self.step_ms}")


def _rel_err(decoded: np.ndarray, sent: np.ndarray) -> float:
    return float(np.linalg.norm(decoded - sent) / max(np.linalg.norm(sent), 1e-30))


def _tensors(batch: int, seq: int, hidden: int, g_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Z, mask, labels and g; both sides rebuild the same ones from the seed."""
    rng = np.random.default_rng(1234)
    z = rng.standard_normal((batch, seq, hidden), dtype=np.float32)
    mask = np.ones((batch, seq), np.int64)
    labels = rng.integers(0, 2, batch).astype(np.int64)
    g = (g_scale * rng.standard_normal((batch, seq, hidden), dtype=np.float32)).astype(np.float32)
    return z, mask, labels, g


# --- the echo server (runs in its own process) ----------------------------------------------------


class _Echo:
    """A protocol peer that answers every train Activations with a Gradients of the same shape,
    doing the server's parsing and validation but no model work."""

    def __init__(self, hidden: int, max_batch: int, max_seq: int, g_scale: float) -> None:
        self.hidden, self.max_batch, self.max_seq, self.g_scale = hidden, max_batch, max_seq, g_scale
        self.limits = Limits(max_frame_bytes=int(1.1 * max_batch * max_seq * hidden * 4) + (1 << 20))
        self.stats: dict[str, dict[str, Any]] = {}  # encoding -> parse/serialize seconds, errors

    async def handle(self, ws) -> None:
        conn = Connection(Role.SERVER, self.limits)
        hello = conn.receive(await ws.recv())
        if not isinstance(hello, Hello):  # the client said Bye or Error first
            return
        enc = hello.encodings[0]
        await ws.send(conn.send(Welcome(session_id="bench", encoding=enc, max_frame_bytes=self.limits.max_frame_bytes)))
        await ws.send(conn.send(RoundConfig(round_id=0, local_steps=1, batch_size=self.max_batch, lr=1e-3, optimizer="sgd",
                                            align_lambda=0.0, adapters=False)))
        st = self.stats[enc] = {"parse_s": [], "serialize_s": [], "z_rel_err": None}
        g_cache: dict[tuple[int, ...], np.ndarray] = {}
        async for data in ws:
            t0 = time.perf_counter()
            msg = conn.receive(data)
            if isinstance(msg, Bye):
                break
            check_activations(msg, hidden_size=self.hidden, max_batch=self.max_batch, max_seq=self.max_seq, num_labels=2,
                              task="seq_cls")
            t1 = time.perf_counter()
            shape = msg.z.shape
            if shape not in g_cache:
                z, _, _, g = _tensors(*shape, self.g_scale)
                g_cache[shape] = g
                st["z_rel_err"] = _rel_err(np.asarray(msg.z), z)
            frame = conn.send(Gradients(round_id=msg.round_id, step_id=msg.step_id, loss=0.5, g=g_cache[shape], encoding=enc))
            t2 = time.perf_counter()
            await ws.send(frame)
            st["parse_s"].append(t1 - t0)
            st["serialize_s"].append(t2 - t1)


def echo_worker(chan) -> None:
    """Worker: ``{"hidden", "max_batch", "max_seq", "g_scale"}`` -> ``{"port"}``; then ``{"stats": enc}`` -> that
    encoding's server-side timings."""
    from websockets.asyncio.server import serve

    spec = chan.recv()
    echo = _Echo(spec["hidden"], spec["max_batch"], spec["max_seq"], spec["g_scale"])
    loop = asyncio.new_event_loop()
    started = threading.Event()
    port: list[int] = []

    async def main() -> None:
        async with serve(echo.handle, "127.0.0.1", 0, compression=None, max_size=echo.limits.max_frame_bytes) as server:
            port.append(server.sockets[0].getsockname()[1])
            started.set()
            await asyncio.Future()

    threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True).start()
    started.wait(30)
    chan.send({"port": port[0]})
    while (msg := chan.recv()) is not None:
        st = echo.stats.get(msg["stats"])
        chan.send({"parse_s": st["parse_s"], "serialize_s": st["serialize_s"], "z_rel_err": st["z_rel_err"]} if st else {})


# --- the client side (this process) ---------------------------------------------------------------


async def _client(port: int, enc: str, cfg: WireConfig) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    z, mask, labels, g_sent = _tensors(cfg.batch, cfg.seq, cfg.hidden, cfg.g_scale)
    limits = Limits(max_frame_bytes=int(1.1 * z.nbytes) + (1 << 20))
    conn = Connection(Role.CLIENT, limits)
    rtt, codec, sizes = [], [], {}
    async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=limits.max_frame_bytes) as ws:
        await ws.send(conn.send(Hello(client_id="bench", token="", layout_hash="0" * 64, split=1, backend="bench", encodings=(enc,))))
        conn.receive(await ws.recv())
        conn.receive(await ws.recv())  # RoundConfig
        g = None
        for i in range(cfg.warmup + cfg.reps):
            t0 = time.perf_counter()
            frame = conn.send(Activations(round_id=0, step_id=i, mode="train", z=z, attention_mask=mask, labels=labels, encoding=enc))
            t1 = time.perf_counter()
            await ws.send(frame)
            data = await ws.recv()
            t2 = time.perf_counter()
            g = conn.receive(data)
            t3 = time.perf_counter()
            if i >= cfg.warmup:
                rtt.append(t3 - t0)
                codec.append((t1 - t0) + (t3 - t2))
            sizes = {"z_frame_bytes": len(frame), "g_frame_bytes": len(data)}
        await ws.send(conn.send(Bye(reason="done")))
    return {"rtt_s": rtt, "codec_s": codec, **sizes, "g_rel_err": _rel_err(np.asarray(g.g), g_sent)}


def _step_reference(cfg: WireConfig, log_dir: pathlib.Path) -> tuple[float, str]:
    """The client's training step at (B, T) in ms, and where the number came from."""
    if cfg.step_ms is not None:
        return cfg.step_ms, "--step-ms"
    path = pathlib.Path(cfg.latency_json) if cfg.latency_json else pathlib.Path(cfg.out) / "latency.json"
    if path.exists():
        rows = [r for r in json.loads(path.read_text())["rows"] if r["batch"] == cfg.batch and r["seq"] == cfg.seq]
        # The fastest on-device backend is the harshest denominator that is still a real client.
        device = [r for r in rows if r["backend"] != "torch"] or rows
        if device:
            best = min(device, key=lambda r: r["train_step_ms_p50"])
            return best["train_step_ms_p50"], f"{path} ({best['backend']}, split {best['split']}, {best['threads']} thread(s))"
    if cfg.latency_json:
        raise ConfigError(f"{path}: no latency row with batch {cfg.batch} and seq {cfg.seq}; run `flexsfl bench latency` with them")
    from flexsfl.benchmarks.latency import measure_step

    row = measure_step(cfg.step_model, cfg.step_split, cfg.batch, cfg.seq, backend="ort", log_dir=log_dir)
    return row["train_step_ms_p50"], f"ort ({cfg.step_model}, split {cfg.step_split}, 1 thread), measured here"


def _accuracy(cfg: WireConfig, enc: str) -> dict[str, Any]:
    from flexsfl.sim.config import SimConfig
    from flexsfl.sim.simulate import simulate

    out = pathlib.Path(cfg.out) / "wire-accuracy" / enc
    sim = SimConfig(data=cfg.sim_data, clients=cfg.sim_clients, rounds=cfg.sim_rounds, splits=(3,), encoding=enc,
                    local_steps=cfg.sim_local_steps, lr=cfg.sim_lr, batch_size=16, max_train=400, max_test=100,
                    eval_every=0, out=str(out))
    final = simulate(sim, show=False)["final"]
    # Same seeds, data and order for every encoding: the final training loss is a paired comparison
    # that moves long before accuracy does.
    last = json.loads((out / "rounds.jsonl").read_text().splitlines()[-1])
    losses = [c["loss"] for c in last["clients"].values()]
    return {"sim_global_acc": final["global_acc"], "sim_personal_acc": final["personal_acc"],
            "sim_final_loss": round(float(np.mean(losses)), 5), "sim_bytes": final["bytes"], "sim_train_s": final["elapsed_s"]}


_COLUMNS: list[Column] = [
    ("encoding", "encoding", "s"),
    ("bytes_per_step", "bytes/step", ",d"),
    ("rtt_ms_p50", "RTT p50 ms", ".2f"),
    ("rtt_ms_p90", "RTT p90 ms", ".2f"),
    ("codec_ms_p50", "codec ms", ".2f"),
    ("transport_ms_p50", "transport ms", ".2f"),
    ("overhead_frac", "of a step", ".1%"),
    ("z_rel_err", "Z rel err", ".1e"),
    ("g_rel_err", "g rel err", ".1e"),
    ("sim_final_loss", "sim final loss", ".4f"),
    ("sim_global_acc", "sim global acc", ".3f"),
    ("sim_personal_acc", "sim personal acc", ".3f"),
]


def run_wire(cfg: WireConfig) -> tuple[list[dict[str, Any]], str]:
    """Run the benchmark, write ``wire.json`` / ``wire.csv`` under ``cfg.out``; returns rows and a summary."""
    from flexsfl.benchmarks.machine import machine_info
    from flexsfl.benchmarks.worker import Worker

    out = pathlib.Path(cfg.out)
    logs = out / "logs"
    step_ms, step_src = _step_reference(cfg, logs)
    rows = []
    with Worker("flexsfl.benchmarks.wire:echo_worker", threads=1, name="wire-echo", log_dir=logs) as echo:
        port = echo.request({"hidden": cfg.hidden, "max_batch": cfg.batch, "max_seq": cfg.seq, "g_scale": cfg.g_scale},
                            timeout=120)["port"]
        for enc in cfg.encodings:
            machine = machine_info()
            got = asyncio.run(_client(port, enc, cfg))
            srv = echo.request({"stats": enc}, timeout=60)
            server_codec = np.add(srv["parse_s"], srv["serialize_s"])[-cfg.reps:]
            codec = np.add(got["codec_s"], server_codec)
            transport = np.subtract(got["rtt_s"], codec)
            row = {
                "encoding": enc, "batch": cfg.batch, "seq": cfg.seq, "hidden": cfg.hidden,
                "z_frame_bytes": got["z_frame_bytes"], "g_frame_bytes": got["g_frame_bytes"],
                "bytes_per_step": got["z_frame_bytes"] + got["g_frame_bytes"],
                **summarize(got["rtt_s"], "rtt"),
                **summarize(got["codec_s"], "client_codec"), **summarize(server_codec, "server_codec"),
                **summarize(codec, "codec"), **summarize(transport, "transport"),
                "z_rel_err": srv["z_rel_err"], "g_rel_err": got["g_rel_err"],
                "step_ms": step_ms, "step_source": step_src, "load_avg": machine["load_avg"],
            }
            row["overhead_frac"] = round(row["rtt_ms_p50"] / step_ms, 4)
            if cfg.accuracy:
                row.update(_accuracy(cfg, enc))
            rows.append(row)
            log.info("%s: %d bytes/step, rtt %.2f ms", enc, row["bytes_per_step"], row["rtt_ms_p50"])
    paths = write_results(out, "wire", rows, machine_info(), meta={"config": dataclasses.asdict(cfg)})
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    summary = "\n".join([
        f"## wire: Z and g of [{cfg.batch}, {cfg.seq}, {cfg.hidden}] over a loopback websocket "
        f"(median of {cfg.reps} after {cfg.warmup} warm-up)",
        "",
        markdown_table(rows, cols),
        "",
        f"training step for the overhead fraction: {step_ms:.1f} ms ({step_src}); target: overhead <= 10% of a step",
        f"results: {paths['json']}, {paths['csv']}",
    ])
    return rows, summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = WireConfig()
    p.add_argument("--batch", type=int, default=d.batch, help=f"B (default {d.batch})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"T (default {d.seq})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"d (default {d.hidden}, MiniLM)")
    p.add_argument("--encodings", default=",".join(d.encodings), help="comma-separated (default: all)")
    p.add_argument("--reps", type=int, default=d.reps, help=f"timed steps per encoding (default {d.reps})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default {d.warmup})")
    p.add_argument("--g-scale", type=float, default=d.g_scale, help=f"std of the synthetic gradient (default {d.g_scale:g})")
    p.add_argument("--step-ms", type=float, default=None, help="the client's training step in ms, for the overhead fraction")
    p.add_argument("--latency-json", default=None, help="take the step time from this `bench latency` result "
                                                        "(default: OUT/latency.json if present, else measure the eager head)")
    p.add_argument("--accuracy", action="store_true", help="also run a short simulate per encoding (minutes)")
    p.add_argument("--sim-data", default=d.sim_data, help=f"data set of the accuracy runs (default {d.sim_data})")
    p.add_argument("--sim-clients", type=int, default=d.sim_clients)
    p.add_argument("--sim-rounds", type=int, default=d.sim_rounds)
    p.add_argument("--sim-local-steps", type=int, default=d.sim_local_steps)
    p.add_argument("--sim-lr", type=float, default=d.sim_lr)
    p.add_argument("--out", default=d.out, help=f"results directory (default {d.out})")


def config_from_args(args: argparse.Namespace) -> WireConfig:
    return WireConfig(batch=args.batch, seq=args.seq, hidden=args.hidden, g_scale=args.g_scale,
                      encodings=tuple(args.encodings.split(",")), reps=args.reps, warmup=args.warmup, step_ms=args.step_ms,
                      latency_json=args.latency_json, accuracy=args.accuracy, sim_data=args.sim_data, sim_clients=args.sim_clients,
                      sim_rounds=args.sim_rounds, sim_local_steps=args.sim_local_steps, sim_lr=args.sim_lr, out=args.out)
