"""The U-shaped topology's device cost: top program step time and memory, and per-step bytes/latency U vs head/tail.

    flexsfl bench top [--model minilm] [--split 1] [--tops 0,1,2] [--backend ort] [--batch 8] [--seq 128]
                      [--repeats 20] [--bundle B ...] [--profiles rpi4,rpi5,jetson-orin] [--out results/top]

Two tables:

1. **Measured, this machine**: for each ``(split, top)`` bundle (exported with ``--top`` into a
   cache, or given with ``--bundle``), one fresh process runs the head step (forward + backward)
   and the top's fused train step (``(H, mask, labels, θ_top) -> loss, logits, dL/dH, grads``)
   interleaved, ``--repeats`` times after a warm-up, and reports the median and p90 of each and
   their ratio (the device cost of the top, side by side, so machine load cancels out); another
   fresh process runs the head alone, and the difference of the two processes' peak RSS is the
   top's device memory, beside the planner's prediction (:func:`flexsfl.core.u_planner.top_memory_mb`).
2. **Planner's model, the demo's device profiles**: per profile, the layout each topology
   chooses, the bytes one step moves up and down, and the predicted network and step time
   (:mod:`flexsfl.core.u_planner` against :mod:`flexsfl.core.planner`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import statistics
import time

__all__ = ["add_arguments", "run_top", "measure_bundle", "planner_rows"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="model to export the bundles from (default: minilm)")
    p.add_argument("--split", type=int, default=1, help="head blocks of the exported bundles (default: 1)")
    p.add_argument("--tops", default="0,1,2", help="comma-separated top blocks, one bundle each (default: 0,1,2)")
    p.add_argument("--bundle", action="append", default=[], help="measure this bundle (exported with --top) instead; repeatable")
    p.add_argument("--backend", default="ort", choices=("ort", "executorch"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per program after 3 warm-up steps")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both programs")
    p.add_argument("--profiles", default="rpi4,rpi5,jetson-orin", help="device profiles for the planner's table")
    p.add_argument("--cache", default=None, help="bundle cache (default: <flexsfl cache>/bundles)")
    p.add_argument("--out", default="results/top")


def _vm_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in MB, from /proc (Linux)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def measure_bundle(bundle: str, backend: str, batch: int, seq: int, repeats: int, threads: int, with_top: bool) -> dict:
    """In this (fresh) process: head steps, and with ``with_top`` the top's train step interleaved with them.

    Returns ``{"head_ms": [...], "top_ms": [...], "rss_ready_mb", "peak_rss_mb"}``.
    """
    import numpy as np

    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.edge_runtime.top import open_top

    b = load_bundle(bundle)
    m = b.manifest
    head = open_backend(backend, b, threads=threads)
    top = open_top(b, backend, threads=threads) if with_top else None
    rng = np.random.default_rng(0)
    ids = rng.integers(5, min(m.model.vocab_size, 1000), (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    if m.model.task == "causal_lm":
        labels = ids.copy()
    else:
        labels = rng.integers(0, m.model.num_labels, (batch,), dtype=np.int64)
    rss_ready = _vm_mb("VmRSS")
    head_ms, top_ms = [], []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        z = head.forward(ids, mask)
        if top is not None:
            t1 = time.perf_counter()
            step = top.train_step(z, mask, labels)  # H: the head's Z has H's shape and scale
            t2 = time.perf_counter()
            g = step.grad_h
        else:
            g = np.full(z.shape, 1e-3, np.float32)
        head.backward(g)
        t3 = time.perf_counter()
        if i >= 3:
            top_ms.append(1e3 * (t2 - t1) if top is not None else 0.0)
            head_ms.append(1e3 * ((t3 - t0) - ((t2 - t1) if top is not None else 0.0)))
    return {"head_ms": head_ms, "top_ms": top_ms if top is not None else [], "rss_ready_mb": rss_ready,
            "peak_rss_mb": _vm_mb("VmHWM")}


def _fresh(fn, *args):
    """``fn(*args)`` in a new process (spawned: a clean address space for the RSS figures)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _export(model: str, split: int, top: int, backend: str, max_batch: int, max_seq: int, cache: pathlib.Path) -> pathlib.Path:
    """The ``(split, top)`` bundle, exported into ``cache`` unless there (keyed by the export code's version)."""
    from flexsfl.export.pipeline import ExportConfig, export_bundle
    from flexsfl.sim.simulate import _code_version

    key = json.dumps([model, split, top, max_batch, max_seq, backend, _code_version()])
    path = cache / f"{pathlib.Path(model).name}-s{split}-u{top}-{backend}-bench-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if not (path / "manifest.json").exists():
        export_bundle(ExportConfig(model=model, split=split, top=top, out=str(path), backend=backend, max_batch=max_batch,
                                   max_seq=max_seq, ort_training_artifacts=False, force=True), progress=False)
    return path


def planner_rows(model: str, profiles: list[str], *, batch: int, seq: int, encoding: str = "fp32") -> list[dict]:
    """Per device profile: head/tail's and U's chosen layout, bytes per step and predicted times (the planner's model)."""
    from flexsfl.core.cost import ModelCost
    from flexsfl.core.model_config import read_model_config
    from flexsfl.core.planner import choose_split
    from flexsfl.core.profiles import EXAMPLE_PROFILES
    from flexsfl.core.u_planner import choose_u_split, step_bytes

    cost = ModelCost.from_config(read_model_config(model))
    rows = []
    for name in profiles:
        p = EXAMPLE_PROFILES[name]
        ht = choose_split(cost, p, batch=batch, seq=seq, encoding=encoding)
        u = choose_u_split(cost, p, batch=batch, seq=seq, encoding=encoding)
        ht_b, u_b = (step_bytes(cost, batch=batch, seq=seq, encoding=encoding, topology=t) for t in ("head-tail", "u"))
        rows.append({
            "profile": name, "batch": batch, "seq": seq,
            "head_tail": {"split": ht.split, "up_bytes": ht_b[0], "down_bytes": ht_b[1], "network_s": ht.chosen.network_s,
                          "step_s": ht.chosen.time_s, "memory_mb": ht.chosen.memory_mb},
            "u": {"split": u.split, "top": u.top, "up_bytes": u_b[0], "down_bytes": u_b[1], "network_s": u.chosen.network_s,
                  "step_s": u.chosen.time_s, "memory_mb": u.chosen.memory_mb},
        })
    return rows


def run_top(args: argparse.Namespace) -> tuple[dict, str]:
    """Both tables; writes ``top.json`` and ``top.md`` under ``args.out``; returns (results, markdown)."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.core.cost import ModelCost
    from flexsfl.core.errors import ConfigError
    from flexsfl.core.u_planner import top_memory_mb
    from flexsfl.sim.data import cache_dir

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        bundles = [pathlib.Path(b) for b in args.bundle]
    else:
        try:
            tops = [int(t) for t in args.tops.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--tops {args.tops!r}: give comma-separated ints, e.g. 0,1,2") from None
        cache = pathlib.Path(args.cache) if args.cache else cache_dir() / "bundles"
        bundles = [_export(args.model, args.split, u, args.backend, args.batch, args.seq, cache) for u in tops]
    measured = []
    for path in bundles:
        m = load_bundle(path).manifest
        if "top" not in m.extra:
            raise ConfigError(f"bundle {path} has no top programs; export it with --top U")
        both = _fresh(measure_bundle, str(path), args.backend, args.batch, args.seq, args.repeats, args.threads, True)
        alone = _fresh(measure_bundle, str(path), args.backend, args.batch, args.seq, args.repeats, args.threads, False)
        cost = ModelCost.from_manifest(m)
        u = m.extra["top"]["blocks"]
        predicted = sum(top_memory_mb(cost, u, batch=args.batch, seq=args.seq, runtime=args.backend).values())
        ratios = [t / h for t, h in zip(both["top_ms"], both["head_ms"])]
        measured.append({
            "bundle": str(path), "split": m.split, "top": u, "backend": args.backend, "batch": args.batch, "seq": args.seq,
            "head_ms_p50": statistics.median(both["head_ms"]), "top_ms_p50": statistics.median(both["top_ms"]),
            "top_ms_p90": _pct(both["top_ms"], 90), "top_over_head": statistics.median(ratios),
            "peak_rss_mb_head_only": alone["peak_rss_mb"], "peak_rss_mb_with_top": both["peak_rss_mb"],
            "top_rss_mb": both["peak_rss_mb"] - alone["peak_rss_mb"], "top_predicted_mb": predicted,
        })
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    planned = [r for seq in sorted({48, args.seq}) for r in planner_rows(args.model, profiles, batch=args.batch, seq=seq)]
    results = {"measured": measured, "planner": planned, "threads": args.threads, "repeats": args.repeats,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (out / "top.json").write_text(json.dumps(results, indent=2) + "\n")
    md = _markdown(results)
    (out / "top.md").write_text(md)
    return results, md


def _markdown(r: dict) -> str:
    lines = ["| split+top | backend | B×T | head step p50 ms | top step p50 / p90 ms | top / head | peak RSS head only → "
             "with top MB | top MB measured / predicted |", "|---|---|---|---|---|---|---|---|"]
    for m in r["measured"]:
        lines.append(f"| {m['split']}+{m['top']} | {m['backend']} | {m['batch']}×{m['seq']} | {m['head_ms_p50']:.1f} | "
                     f"{m['top_ms_p50']:.1f} / {m['top_ms_p90']:.1f} | {m['top_over_head']:.2f} | "
                     f"{m['peak_rss_mb_head_only']:.0f} → {m['peak_rss_mb_with_top']:.0f} | "
                     f"{m['top_rss_mb']:.0f} / {m['top_predicted_mb']:.0f} |")
    lines += ["", "| profile | B×T | head/tail: split, up/down KB, network s, step s | U: split+top, up/down KB, network s, "
              "step s | U / head-tail step |", "|---|---|---|---|---|"]
    for p in r["planner"]:
        h, u = p["head_tail"], p["u"]
        lines.append(f"| {p['profile']} | {p['batch']}×{p['seq']} | {h['split']}, {h['up_bytes'] / 1e3:.0f}/"
                     f"{h['down_bytes'] / 1e3:.0f}, {h['network_s']:.3f}, {h['step_s']:.3f} | {u['split']}+{u['top']}, "
                     f"{u['up_bytes'] / 1e3:.0f}/{u['down_bytes'] / 1e3:.0f}, {u['network_s']:.3f}, {u['step_s']:.3f} | "
                     f"{u['step_s'] / h['step_s']:.2f} |")
    return "\n".join(lines) + "\n"
