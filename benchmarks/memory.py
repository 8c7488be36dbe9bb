"""``flexsfl bench memory``: peak RSS of the client's training step per runtime, against its lower bound.

Every configuration runs in a **fresh process** with one compute thread (:func:`memory_worker`),
so its peak resident set (``VmHWM``) is its own: import the runtime, open the bundle, run
``warmup + steps`` training steps (forward keeping what the backward needs, backward with a fixed
G, the bundle's optimizer), read the peak. The ORT processes run with torch made unimportable, as
on a device without it. Per (model, split) at one (B, T)::

    backend          ort            the edge runtime's ONNX Runtime backend: one copy of the weights
                     ort-separate   the same bundle with share_weights=False: each session its own copy
                     ort-before     a bundle exported before ort/weights.json (--before DIR): each session
                                    its own weights, the backward's transposed copies, per-session arenas
                     executorch     the .pte, memory planned for the bundle's max batch (= B here), run by
                                    flexsfl's C shim over ExecuTorch's C++ runtime (torch made unimportable)
                     executorch-resident  the same with FLEXSFL_EXECUTORCH_LOW_MEMORY=0 (both methods' planned
                                    memory kept resident: faster, more memory; not modelled by the planner)
                     executorch-bindings  the same .pte through ExecuTorch's torch-linked Python bindings
                                    (the fallback where the shim cannot be built; not modelled by the planner)
                     torch          eager PyTorch (the reference backend: the whole model, autograd)
    runtime_mb       RSS once the runtime is imported, before the bundle is opened
    weights_mb       the head's frozen weights once: 4 B x (embedding + s x block parameters)
    saved_mb         the forward's outputs at (B, T): Z and every activation the backward reads
    lower_bound_mb   runtime + weights + saved: what any runtime must hold at the backward's start
    peak_rss_mb      the process's peak RSS; vs_lower_bound = peak / lower bound; vs_ort = peak / ort's
    predicted_mb     :func:`flexsfl.core.memory.memory_mb` for this runtime (ort for the ort-* rows, none for
                     executorch-bindings);
                     pred_err = predicted / peak - 1

Targets (issue 13): ort <= 1.3x the lower bound at MiniLM splits 1, 3, 5 and SmolLM2 split 2;
executorch <= 1.5x ort at the training batch; the planner within +-10 % of every measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError

from flexsfl.benchmarks.report import Column, markdown_table, write_results

__all__ = ["MemoryConfig", "run_memory", "memory_worker", "lower_bound_mb", "add_arguments", "config_from_args",
           "BACKENDS"]

log = logging.getLogger("flexsfl.bench.memory")

BACKENDS = ("ort", "ort-separate", "executorch", "executorch-resident", "executorch-bindings", "torch")
_RUNTIME = {"ort": "ort", "ort-separate": "ort", "ort-before": "ort", "executorch": "executorch",
            "executorch-resident": "executorch", "executorch-bindings": "executorch", "torch": "torch"}
_PLANNED = {"ort": "ort", "ort-separate": "ort", "ort-before": "ort", "executorch": "executorch", "torch": "torch"}
_TORCH_FREE = ("ort", "ort-separate", "ort-before", "executorch", "executorch-resident")  # as on a device without torch
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    points: tuple[tuple[str, int], ...] = (("minilm", 1), ("minilm", 3), ("minilm", 5), ("smollm2", 2))
    backends: tuple[str, ...] = BACKENDS
    batch: int = 8
    seq: int = 128
    warmup: int = 2
    steps: int = 3
    before: tuple[str, ...] = ()  # bundles exported before the shared weights, measured as "ort-before"
    bundles: tuple[str, ...] = ()  # measure these (max batch = batch) instead of exporting the points
    json: str | None = None
    out: str = "results/bench"
    cache: str | None = None

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ConfigError(f"--backend {','.join(bad) or '(none)'}: choose from {', '.join(BACKENDS)}")
        if min(self.batch, self.seq, self.steps) < 1 or self.warmup < 0:
            raise ConfigError("--batch, --seq and --steps must be >= 1 and --warmup >= 0")


def memory_worker(chan) -> None:
    """Worker: ``{"backend", "bundle", "batch", "seq", "warmup", "steps"}`` -> the process's memory figures."""
    spec = chan.recv()
    name = spec["backend"]
    if name in _TORCH_FREE:
        sys.modules["torch"] = None  # type: ignore[assignment]  # as on a device: these paths never need it
    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.edge_runtime.optim import make_optimizer

    if _RUNTIME[name] == "ort":
        import onnxruntime  # noqa: F401
        from flexsfl.edge_runtime.backends import ort  # noqa: F401
    elif name in ("executorch", "executorch-resident"):
        from flexsfl.edge_runtime.backends import executorch

        os.environ[executorch.RUNTIME_ENV] = "shim"
        os.environ[executorch.LOW_MEMORY_ENV] = "0" if name == "executorch-resident" else "1"
        executorch.load_shim()  # the shim and ExecuTorch's libraries loaded (built first if not cached)
    elif name == "executorch-bindings":
        from flexsfl.edge_runtime.backends import executorch

        os.environ[executorch.RUNTIME_ENV] = "pybindings"
        import torch  # noqa: F401  # what the fallback imports: torch and the bindings' C++ module
        from executorch.extension.pybindings import _C  # noqa: F401
    else:
        from flexsfl.sim import eager_backend  # noqa: F401  (registers "torch")
    runtime_mb = _rss_mb()
    bundle = load_bundle(spec["bundle"])
    m = bundle.manifest
    if name == "ort-separate":
        from flexsfl.edge_runtime.backends.ort import OrtBackend

        backend = OrtBackend(bundle, threads=1, share_weights=False)
    else:
        backend = open_backend(_RUNTIME[name], bundle, threads=1)
    open_mb = _rss_mb()
    rng = np.random.default_rng(0)
    b, t = spec["batch"], spec["seq"]
    ids = rng.integers(1000, m.model.vocab_size, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    g = (1e-4 * rng.standard_normal((b, t, m.model.hidden_size))).astype(np.float32)
    opt = make_optimizer(m.optimizer.get("name", "sgd"), lr=float(m.optimizer.get("lr", 1e-3)))
    peaks = []
    for _ in range(spec["warmup"] + spec["steps"]):
        backend.forward(ids, mask, keep=True)
        opt.step(backend.params, backend.backward(g))
        peaks.append(_peak_rss_mb())
    chan.send({"runtime_mb": runtime_mb, "open_mb": open_mb, "peak_rss_mb": peaks[-1], "peak_per_step_mb": peaks,
               "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None})


def _rss_mb() -> float:
    return _status_mb("VmRSS:")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM:")


def _status_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024 * 1.048576  # kB -> MB (10^6 bytes)
    raise ConfigError("peak RSS needs Linux /proc/self/status")


def lower_bound_mb(bundle, batch: int, seq: int, runtime_mb: float) -> dict[str, float]:
    """The step's floor: the runtime as imported + the head's frozen weights once + the forward's outputs."""
    from flexsfl.core.cost import ModelCost

    m = bundle.manifest
    cost = ModelCost.from_manifest(m)
    weights = 4 * (cost.embedding_params + m.split * cost.block_params) / 1e6
    role = next(r for r in ("ort.forward", "executorch.forward") if r in m.outputs)
    saved = 0
    for o in m.outputs[role]:
        n = _DTYPE_BYTES[o.dtype]
        for d in o.shape:
            n *= batch if d == "batch" else seq if d == "seq" else int(d)
        saved += n
    saved_mb = saved / 1e6
    return {"runtime_mb": runtime_mb, "weights_mb": weights, "saved_mb": saved_mb,
            "lower_bound_mb": runtime_mb + weights + saved_mb}


def _measure(bundle, name: str, cfg: MemoryConfig, logs: pathlib.Path) -> dict[str, Any]:
    from flexsfl.benchmarks.worker import Worker

    w = Worker("flexsfl.benchmarks.memory:memory_worker", threads=1, name=f"memory-{name}", log_dir=logs)
    try:
        got = w.request({"backend": name, "bundle": str(bundle.root), "batch": cfg.batch, "seq": cfg.seq,
                         "warmup": cfg.warmup, "steps": cfg.steps}, timeout=3600)
    finally:
        w.close()
    return got


def run_memory(cfg: MemoryConfig) -> tuple[list[dict[str, Any]], str]:
    """Run the benchmark; write ``memory.json`` / ``.csv`` under ``cfg.out``."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.core.cost import ModelCost
    from flexsfl.core.memory import memory_mb

    from flexsfl.benchmarks.latency import export_cached
    from flexsfl.benchmarks.machine import machine_info

    out = pathlib.Path(cfg.out)
    logs = out / "logs"
    cache = pathlib.Path(cfg.cache) if cfg.cache else _default_cache()
    before = {}
    for path in cfg.before:
        b = load_bundle(path)
        before[(pathlib.Path(b.manifest.model.id).name.lower(), b.manifest.split)] = b
    rows: list[dict[str, Any]] = []
    given = [load_bundle(p) for p in cfg.bundles]
    todo = [(pathlib.Path(b.manifest.model.id).name.lower(), b.manifest.split, b) for b in given] or [
        (model, split, None) for model, split in cfg.points]
    for model, split, bundle in todo:
        if bundle is None:
            bundle = load_bundle(export_cached(model, split, max_batch=cfg.batch, max_seq=cfg.seq, cache=cache,
                                               backend="all" if "executorch" in cfg.backends else "ort"))
        cost = ModelCost.from_manifest(bundle.manifest)
        runs = [(name, bundle) for name in cfg.backends]
        old = next((b for (mid, s), b in before.items() if s == split and model.lower() in mid), None)
        if old is not None:
            runs.insert(1, ("ort-before", old))
        point: list[dict[str, Any]] = []
        for name, b in runs:
            log.info("%s split %d: %s", model, split, name)
            got = _measure(b, name, cfg, logs)
            lb = lower_bound_mb(b, cfg.batch, cfg.seq, got["runtime_mb"])
            predicted = memory_mb(cost, split, batch=cfg.batch, seq=cfg.seq, optimizer=bundle.manifest.optimizer.get("name", "sgd"),
                                  runtime=_PLANNED[name]) if name in _PLANNED else None
            point.append({"model": model, "split": split, "batch": cfg.batch, "seq": cfg.seq, "backend": name,
                          **{k: round(v, 1) for k, v in lb.items()}, "open_mb": round(got["open_mb"], 1),
                          "peak_rss_mb": round(got["peak_rss_mb"], 1), "peak_per_step_mb": got["peak_per_step_mb"],
                          "vs_lower_bound": round(got["peak_rss_mb"] / lb["lower_bound_mb"], 3),
                          "predicted_mb": None if predicted is None else round(predicted, 1),
                          "pred_err": None if predicted is None else round(predicted / got["peak_rss_mb"] - 1, 3),
                          "torch_loaded": got["torch_loaded"], "bundle": str(b.root)})
        ort = next((r for r in point if r["backend"] == "ort"), None)
        for r in point:
            r["vs_ort"] = round(r["peak_rss_mb"] / ort["peak_rss_mb"], 3) if ort else None
        rows += point
    machine = machine_info()
    paths = write_results(out, "memory", rows, machine, meta={"config": dataclasses.asdict(cfg)}, json_path=cfg.json)
    lines = [f"## memory: peak RSS of the client step, B={cfg.batch}, T={cfg.seq}, 1 thread, fresh process per row "
             f"({cfg.warmup} + {cfg.steps} steps)", "", markdown_table(rows, _COLUMNS), "",
             f"results: {paths['json']}, {paths['csv']}"]
    return rows, "\n".join(lines)


def _default_cache() -> pathlib.Path:
    from flexsfl.sim.data import cache_dir

    return cache_dir() / "bench-bundles"


_COLUMNS: list[Column] = [
    ("model", "model", "s"),
    ("split", "split", "d"),
    ("backend", "backend", "s"),
    ("runtime_mb", "runtime MB", ".0f"),
    ("weights_mb", "weights MB", ".0f"),
    ("saved_mb", "saved MB", ".0f"),
    ("lower_bound_mb", "lower bound MB", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("vs_lower_bound", "÷ lower bound", ".2f"),
    ("vs_ort", "÷ ort", ".2f"),
    ("predicted_mb", "planner MB", ".0f"),
    ("pred_err", "planner error", "+.0%"),
]


def _points(text: str) -> tuple[tuple[str, int], ...]:
    try:
        return tuple((p.split(":")[0], int(p.split(":")[1])) for p in text.split(","))
    except (ValueError, IndexError):
        raise ConfigError(f"--points must be MODEL:SPLIT,... (e.g. minilm:3,smollm2:2), got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = MemoryConfig()
    p.add_argument("--points", default=",".join(f"{m}:{s}" for m, s in d.points),
                   help="model:split pairs, comma-separated (default: %(default)s)")
    p.add_argument("--backend", default=",".join(BACKENDS), help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=d.batch, help=f"B, also the bundles' max batch (default {d.batch})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"T (default {d.seq})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"steps before the measured ones (default {d.warmup})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"measured steps (default {d.steps})")
    p.add_argument("--before", default="", metavar="DIR[,DIR]",
                   help="bundles exported before the shared weights (same model and split), measured as ort-before")
    p.add_argument("--bundles", default="", metavar="DIR[,DIR]",
                   help="measure these bundles (exported with --max-batch B) instead of exporting --points")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the JSON result here")
    p.add_argument("--out", default=d.out, help=f"results directory (default {d.out})")
    p.add_argument("--cache", default=None, help="where bundles are exported (default $FLEXSFL_CACHE/bench-bundles)")


def config_from_args(args: argparse.Namespace) -> MemoryConfig:
    return MemoryConfig(points=_points(args.points), backends=tuple(args.backend.split(",")), batch=args.batch,
                        seq=args.seq, warmup=args.warmup, steps=args.steps,
                        before=tuple(p for p in args.before.split(",") if p),
                        bundles=tuple(p for p in args.bundles.split(",") if p), json=args.json, out=args.out,
                        cache=args.cache)
