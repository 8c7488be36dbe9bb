"""``flexsfl bench latency``: the client's training step per backend, split point, batch and sequence.

For one bundle (``--bundle``), or a sweep over split points of one model (``--model --splits``,
bundles exported as needed into a cache), every backend runs in its **own process**
(:func:`backend_worker`) with its thread count pinned before anything is imported, so its peak
RSS is its own. Per (split, B, T) and backend::

    forward_ms        forward only (no activations kept), p50 / p90
    train_step_ms     the client's whole step: forward to Z keeping what the backward needs,
                      backward with a fixed G, optimizer step (numpy SGD/AdamW of the bundle's
                      default optimizer) — for eager PyTorch: one forward with the graph
                      retained, then autograd backward, then the same optimizer step
    peak_rss_mb       the backend process's peak resident memory (imports included; the ORT
                      process runs with torch made unimportable, as on a device without it)
    artifact_mb       the files the backend loads from the bundle
    bytes_per_step    the Activations (Z, mask, labels) and Gradients (g) frames, fp32
    export_s          ``flexsfl export``'s time lowering to this backend (for ``torch``: the
                      steps every bundle shares, from loading the model to the programs)
    flops_*           forward and backward FLOPs of the step, counted with
                      ``torch.utils.flop_counter.FlopCounterMode`` on the eager head (matmul,
                      attention and convolution FLOPs; elementwise ops are not counted)
    frac_of_peak      achieved FLOP/s of the train step / (threads x this machine's single-thread
                      fp32 GEMM peak, measured in the same run by :mod:`.machine`)
    vs_torch          train_step_ms_p50 / eager PyTorch's at the same point (targets: ORT <= 1.25,
                      ExecuTorch <= 1.5 at minilm split 3, B=8, T=128, one thread)

The workers stay alive side by side and take turns: each measures ``reps / rounds`` steps, then
the next backend does, in a rotating order, so that the ratios between backends see the same
machine load (this matters on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import pathlib
import resource
import sys
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError

from flexsfl.benchmarks.report import Column, int_list, line_plot, markdown_table, summarize, write_results

__all__ = ["LatencyConfig", "run_latency", "backend_worker", "export_cached", "measure_step", "add_arguments",
           "config_from_args", "BACKENDS"]

log = logging.getLogger("flexsfl.bench.latency")

BACKENDS = ("torch", "ort", "executorch")  # eager PyTorch is the reference


@dataclasses.dataclass(frozen=True)
class LatencyConfig:
    bundle: str | None = None  # one bundle ...
    model: str | None = None  # ... or a model to sweep over split points (bundles exported as needed)
    splits: tuple[int, ...] = (3,)
    backends: tuple[str, ...] = BACKENDS
    threads: int = 1  # compute threads of every backend
    batch: tuple[int, ...] = (8,)
    seq: tuple[int, ...] = (128,)
    reps: int = 24  # timed steps per backend and configuration (forward-only and train each)
    warmup: int = 3  # untimed steps per backend first
    rounds: int = 4  # the reps are taken in this many turns per backend, interleaved
    json: str | None = None  # also write the result here
    out: str = "results/bench"
    cache: str | None = None  # exported bundles for sweeps (default: $FLEXSFL_CACHE/bench-bundles)

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.model is None):
            raise ConfigError("give either --bundle B (one bundle) or --model M --splits S1,S2,... (a sweep)")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ConfigError(f"--backend {','.join(bad) or '(none)'}: choose from {', '.join(BACKENDS)}")
        for name in ("threads", "reps", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        for name in ("splits", "batch", "seq"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"--{name} must be positive integers, got {list(getattr(self, name))}")


# --- the worker: one backend in its own process -------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB. Linux: VmHWM of its own address space; ``ru_maxrss`` is not
    used there because it keeps the parent's high-water mark across (v)fork + exec."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


def backend_worker(chan) -> None:
    """Worker. Spec ``{"backend", "bundle", "threads", "batch", "seq", "warmup"}`` -> ready;
    ``{"reps": n}`` -> n forward-only and n train-step timings (alternating); ``{"flops": true}``
    -> forward/backward FLOPs (torch only); ``{"finish": true}`` -> peak RSS."""
    spec = chan.recv()
    if spec["backend"] == "ort":
        # As on a device, where the ORT client has no torch: onnxruntime-training imports torch
        # whenever it is installed (~200 MB of RSS that a device would not pay). This also proves
        # the ORT path never needs it.
        sys.modules["torch"] = None  # type: ignore[assignment]
    rss_start = _rss_mb()
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.optim import make_optimizer

    bundle = load_bundle(spec["bundle"])
    m = bundle.manifest
    t0 = time.perf_counter()
    if spec["backend"] == "torch":
        from flexsfl.sim import eager_backend  # noqa: F401  (registers the eager reference as "torch")
    backend = open_backend(spec["backend"], bundle, threads=spec["threads"])
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    b, t = spec["batch"], spec["seq"]
    ids = rng.integers(1000, m.model.vocab_size, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    z = backend.forward(ids, mask, keep=False)
    g = (1e-4 * rng.standard_normal(z.shape)).astype(np.float32)
    opt = make_optimizer(m.optimizer.get("name", "sgd"), lr=float(m.optimizer.get("lr", 1e-3)))

    def forward() -> None:
        backend.forward(ids, mask, keep=False)

    def train_step() -> None:
        backend.forward(ids, mask, keep=True)
        opt.step(backend.params, backend.backward(g))

    for _ in range(spec["warmup"]):
        forward()
        train_step()
    chan.send({"open_s": open_s, "rss_start_mb": rss_start, "rss_ready_mb": _rss_mb(), "z_shape": list(z.shape)})
    while (msg := chan.recv()) is not None:
        if "reps" in msg:
            fwd, step = [], []
            for _ in range(msg["reps"]):
                t0 = time.perf_counter()
                forward()
                t1 = time.perf_counter()
                train_step()
                fwd.append(t1 - t0)
                step.append(time.perf_counter() - t1)
            chan.send({"forward_s": fwd, "train_step_s": step})
        elif msg.get("flops"):
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                backend.forward(ids, mask, keep=True)
            fwd_flops = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                backend.backward(g)
            chan.send({"forward_flops": fwd_flops, "backward_flops": fc.get_total_flops()})
        elif msg.get("finish"):
            chan.send({"peak_rss_mb": _peak_rss_mb()})


# --- bundles -------------------------------------------------------------------------------------


def export_cached(model: str, split: int, *, max_batch: int, max_seq: int, cache: pathlib.Path, backend: str = "all") -> pathlib.Path:
    """The bundle for (model, split, limits), exported into ``cache`` unless it is already there
    (keyed by the export code's version too, so a fix to the exporter re-exports)."""
    from flexsfl.export.pipeline import ExportConfig, export_bundle
    from flexsfl.sim.simulate import _code_version

    key = json.dumps([model, split, max_batch, max_seq, backend, _code_version()])
    path = cache / f"{pathlib.Path(model).name}-s{split}-{backend}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if not (path / "manifest.json").exists():
        log.info("exporting %s split %d (%s) into %s", model, split, backend, path)
        export_bundle(ExportConfig(model=model, split=split, out=str(path), backend=backend, max_batch=max_batch,
                                   max_seq=max_seq, ort_training_artifacts=False, force=True), progress=False)
    return path


def _artifact_bytes(bundle, backend: str) -> int | None:
    """Bytes of the files a backend loads: its artifacts and the files beside them (external
    weights). None for eager torch, which rebuilds the head from the model instead."""
    if backend == "torch":
        return None
    roles = [rel for role, rel in bundle.manifest.artifacts.items()
             if role.split(".")[0] == backend and not rel.startswith(f"{backend}/training/")]  # ORT's own training files: unused
    stems = {rel.rsplit(".", 1)[0] for rel in roles}
    files = [f for f in bundle.manifest.files if f in roles or any(f.startswith(s + ".") for s in stems)]
    return sum((bundle.root / f).stat().st_size for f in files)


_LOWERING = {"ort": "ONNX", "executorch": "ExecuTorch"}  # how export's step names mention each backend


def _export_seconds(bundle, backend: str) -> float | None:
    """Seconds ``flexsfl export`` spent on this backend's lowering (``torch``: on the steps every
    bundle shares: load, cut, forward/backward programs, tokenizer, manifest)."""
    steps = bundle.manifest.extra.get("export_seconds", {})
    if not steps:
        return None
    if backend == "torch":
        return round(sum(s for name, s in steps.items() if not any(k in name for k in _LOWERING.values())), 3)
    return round(sum(s for name, s in steps.items() if _LOWERING[backend] in name), 3)


def _bytes_per_step(task: str, b: int, t: int, d: int) -> int:
    """Activations (fp32 Z, mask, labels) + Gradients (fp32 g) frame bytes for one step."""
    from flexsfl.core.wire import Activations, Gradients

    z = np.zeros((b, t, d), np.float32)
    labels = np.zeros((b, t) if task == "causal_lm" else (b,), np.int64)
    act = Activations(round_id=0, step_id=0, mode="train", z=z, attention_mask=np.ones((b, t), np.int64), labels=labels)
    return len(act.serialize()) + len(Gradients(round_id=0, step_id=0, loss=0.0, g=z).serialize())


# --- one configuration ---------------------------------------------------------------------------


def _measure(bundle, backends: list[str], b: int, t: int, cfg: LatencyConfig, logs: pathlib.Path, progress) -> list[dict[str, Any]]:
    from flexsfl.benchmarks.worker import Worker

    m = bundle.manifest
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    timings: dict[str, dict[str, list[float]]] = {k: {"forward_s": [], "train_step_s": []} for k in backends}
    spec = {"bundle": str(bundle.root), "threads": cfg.threads, "batch": b, "seq": t, "warmup": cfg.warmup}
    flops = None
    try:
        for name in backends:
            workers[name] = Worker("flexsfl.benchmarks.latency:backend_worker", threads=cfg.threads, name=f"latency-{name}", log_dir=logs)
            ready[name] = workers[name].request({**spec, "backend": name}, timeout=1800)
        per_round = [cfg.reps // cfg.rounds + (i < cfg.reps % cfg.rounds) for i in range(cfg.rounds)]
        for i, n in enumerate(per_round):
            order = backends[i % len(backends):] + backends[: i % len(backends)]
            for name in order:
                if n:
                    got = workers[name].request({"reps": n}, timeout=3600)
                    for k in timings[name]:
                        timings[name][k].extend(got[k])
                progress()
        if "torch" not in workers:
            workers["torch"] = Worker("flexsfl.benchmarks.latency:backend_worker", threads=cfg.threads, name="latency-flops", log_dir=logs)
            workers["torch"].request({**spec, "backend": "torch", "warmup": 0}, timeout=1800)
        flops = workers["torch"].request({"flops": True}, timeout=600)
        peaks = {name: workers[name].request({"finish": True}, timeout=60)["peak_rss_mb"] for name in backends}
    finally:
        for w in workers.values():
            w.close()
    step_flops = flops["forward_flops"] + flops["backward_flops"]
    rows = []
    for name in backends:
        row = {
            "backend": name, "model": m.model.id, "family": m.model.family, "split": m.split, "batch": b, "seq": t,
            "threads": cfg.threads,
            **summarize(timings[name]["forward_s"], "forward"), **summarize(timings[name]["train_step_s"], "train_step"),
            "peak_rss_mb": round(peaks[name], 1), "rss_ready_mb": round(ready[name]["rss_ready_mb"], 1),
            "open_s": round(ready[name]["open_s"], 3),
            "artifact_mb": None if (a := _artifact_bytes(bundle, name)) is None else round(a / 1e6, 3),
            "export_s": _export_seconds(bundle, name),
            "bytes_per_step": _bytes_per_step(m.model.task, b, t, m.model.hidden_size),
            "flops_forward": flops["forward_flops"], "flops_backward": flops["backward_flops"], "flops_step": step_flops,
            "bundle": str(bundle.root),
        }
        row["achieved_gflops"] = round(step_flops / (row["train_step_ms_p50"] / 1e3) / 1e9, 2)
        rows.append(row)
    ref = next((r for r in rows if r["backend"] == "torch"), None)
    for r in rows:
        r["vs_torch"] = round(r["train_step_ms_p50"] / ref["train_step_ms_p50"], 3) if ref else None
    return rows


def measure_step(model: str, split: int, batch: int, seq: int, *, backend: str = "torch", threads: int = 1,
                 cache: str | None = None, log_dir: str | pathlib.Path | None = None, reps: int = 8) -> dict[str, Any]:
    """One backend's latency row at one point (bundle exported into the cache if needed)."""
    from flexsfl.core.bundle import load_bundle

    cfg = LatencyConfig(model=model, splits=(split,), backends=(backend,), threads=threads, batch=(batch,), seq=(seq,),
                        reps=reps, rounds=1, cache=cache)
    bundle = load_bundle(export_cached(model, split, max_batch=max(32, batch), max_seq=max(128, seq), cache=_cache(cfg),
                                       backend=_export_backend(cfg.backends)))
    return _measure(bundle, [backend], batch, seq, cfg, pathlib.Path(log_dir or cfg.out) / "logs", lambda: None)[0]


def _export_backend(backends: tuple[str, ...]) -> str:
    """What to export for these backends (eager torch needs only a manifest: the smallest bundle)."""
    device = [b for b in backends if b != "torch"]
    return "all" if len(device) > 1 else device[0] if device else "ort"


def _cache(cfg: LatencyConfig) -> pathlib.Path:
    if cfg.cache:
        return pathlib.Path(cfg.cache)
    from flexsfl.sim.data import cache_dir

    return cache_dir() / "bench-bundles"


# --- the sweep -----------------------------------------------------------------------------------

_COLUMNS: list[Column] = [
    ("split", "split", "d"),
    ("batch", "B", "d"),
    ("seq", "T", "d"),
    ("backend", "backend", "s"),
    ("forward_ms_p50", "forward p50 ms", ".1f"),
    ("train_step_ms_p50", "train step p50 ms", ".1f"),
    ("train_step_ms_p90", "train step p90 ms", ".1f"),
    ("vs_torch", "vs torch", ".2f"),
    ("achieved_gflops", "GFLOP/s", ".1f"),
    ("frac_of_peak", "of peak", ".0%"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("artifact_mb", "artifact MB", ".1f"),
    ("bytes_per_step", "bytes/step", ",d"),
]


def run_latency(cfg: LatencyConfig) -> tuple[list[dict[str, Any]], str]:
    """Run the benchmark; write ``latency.json`` / ``.csv`` (/ ``.png`` for sweeps) under ``cfg.out``."""
    from rich.progress import Progress

    from flexsfl.core.bundle import load_bundle

    from flexsfl.benchmarks.machine import machine_info, measure_gemm_peak

    out = pathlib.Path(cfg.out)
    logs = out / "logs"
    if cfg.bundle is not None:
        bundles = [load_bundle(cfg.bundle)]
    else:
        bundles = [load_bundle(export_cached(cfg.model, s, max_batch=max(32, *cfg.batch), max_seq=max(128, *cfg.seq),
                                             cache=_cache(cfg), backend=_export_backend(cfg.backends)))
                   for s in cfg.splits]
    for bundle in bundles:
        m = bundle.manifest
        missing = [b for b in cfg.backends if b != "torch" and b not in m.backend]
        if missing:
            raise ConfigError(f"bundle {bundle.root} has no {', '.join(missing)} programs (has: {', '.join(m.backend)}); "
                              "export it with --backend all, or leave those out of --backend")
        for b in cfg.batch:
            for t in cfg.seq:
                if b > m.max_batch or t > m.max_seq:
                    raise ConfigError(f"batch {b} / seq {t} exceed bundle {bundle.root}'s limits "
                                      f"({m.max_batch} / {m.max_seq}); re-export with larger --max-batch / --max-seq")
    peaks = [measure_gemm_peak(1, log_dir=logs)]
    rows: list[dict[str, Any]] = []
    backends = list(cfg.backends)
    with Progress(transient=True) as bar:
        task = bar.add_task("latency", total=len(bundles) * len(cfg.batch) * len(cfg.seq) * cfg.rounds * len(backends))
        for bundle in bundles:
            for b in cfg.batch:
                for t in cfg.seq:
                    bar.update(task, description=f"split {bundle.manifest.split}, B={b}, T={t}")
                    load = machine_info()["load_avg"]
                    for r in _measure(bundle, backends, b, t, cfg, logs, lambda: bar.advance(task)):
                        rows.append({**r, "load_avg": load})
    peaks.append(measure_gemm_peak(1, log_dir=logs))
    peak = max(peaks, key=lambda p: p["peak_gflops"])
    for r in rows:
        r["peak_gflops"] = round(peak["peak_gflops"] * cfg.threads, 2)
        r["frac_of_peak"] = round(r["achieved_gflops"] / r["peak_gflops"], 4)
    machine = machine_info()
    meta = {"config": dataclasses.asdict(cfg), "gemm_peak_1thread": peak, "gemm_peak_runs": peaks,
            "flops_method": "torch.utils.flop_counter.FlopCounterMode on the eager head, forward and backward counted separately"}
    paths = write_results(out, "latency", rows, machine, meta=meta, json_path=cfg.json)
    png = None
    if len({r["split"] for r in rows}) > 1:
        png = _plot(rows, out / "latency.png", machine)
    lines = [
        f"## latency: {rows[0]['model']}, {cfg.threads} thread(s), median of {cfg.reps} after {cfg.warmup} warm-up "
        f"(interleaved in {cfg.rounds} turns)",
        "",
        markdown_table(rows, _COLUMNS),
        "",
        f"single-thread fp32 GEMM peak on this machine: {peak['peak_gflops']:.1f} GFLOP/s (best of {len(peaks)} runs: "
        + ", ".join(f"{p['peak_gflops']:.1f}" for p in peaks) + "); FLOPs: FlopCounterMode on the eager head",
        f"results: {paths['json']}, {paths['csv']}" + (f", {png}" if png else ""),
    ]
    return rows, "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: pathlib.Path, machine: dict) -> pathlib.Path:
    series = {}
    for (backend, b, t) in sorted({(r["backend"], r["batch"], r["seq"]) for r in rows}):
        pts = sorted((r["split"], r["train_step_ms_p50"]) for r in rows if (r["backend"], r["batch"], r["seq"]) == (backend, b, t))
        series[f"{backend} B={b} T={t}"] = ([p[0] for p in pts], [p[1] for p in pts])
    r0 = rows[0]
    return line_plot(path, series, xlabel="split point (blocks on the device)", ylabel="client train step, p50 (ms)",
                     title=f"client training step vs split: {r0['model']}, {r0['threads']} thread(s)",
                     subtitle=f"{machine['cpu']}, commit {machine['commit']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LatencyConfig(model="minilm")
    p.add_argument("--bundle", default=None, help="the bundle to measure (directory or .tar.gz)")
    p.add_argument("--model", default=None, help="sweep this model instead (minilm, smollm2, a HF directory); needs --splits")
    p.add_argument("--splits", default="3", help="split points of the sweep, comma-separated (default 3)")
    p.add_argument("--backend", default=",".join(BACKENDS), help="comma-separated: torch (eager reference), ort, executorch")
    p.add_argument("--threads", type=int, default=d.threads, help=f"compute threads per backend (default {d.threads})")
    p.add_argument("--batch", default="8", help="B, comma-separated for a sweep (default 8)")
    p.add_argument("--seq", default="128", help="T, comma-separated for a sweep (default 128)")
    p.add_argument("--reps", type=int, default=d.reps, help=f"timed steps per backend and point (default {d.reps})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default {d.warmup})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"interleaving turns the reps are split into (default {d.rounds})")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the JSON result here")
    p.add_argument("--out", default=d.out, help=f"results directory (default {d.out})")
    p.add_argument("--cache", default=None, help="where sweep bundles are exported (default $FLEXSFL_CACHE/bench-bundles)")


def config_from_args(args: argparse.Namespace) -> LatencyConfig:
    return LatencyConfig(bundle=args.bundle, model=args.model, splits=int_list("--splits", args.splits),
                         backends=tuple(args.backend.split(",")), threads=args.threads, batch=int_list("--batch", args.batch),
                         seq=int_list("--seq", args.seq), reps=args.reps, warmup=args.warmup, rounds=args.rounds,
                         json=args.json, out=args.out, cache=args.cache)
