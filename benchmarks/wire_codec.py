"""Time the wire codec on one step's smashed data: serialize + parse of an Activations per encoding.

    python -m flexsfl.benchmarks.wire_codec [--shape 8 128 384] [--repeat 50] [--warmup 5] [--json out.json]

Prints, per encoding, the median and p90 of ``serialize()``, ``parse()`` and both together over
``--repeat`` runs after ``--warmup`` runs, the frame size and the largest absolute error of the
decoded Z, plus one line naming the machine, library versions and commit. Threads are pinned to
one (numpy's BLAS plays no part, but the measurement should not depend on it either).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads its thread pools

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from flexsfl.core.wire import ENCODINGS, Activations, parse


def _environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "commit": commit,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _time(fn, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    return {"median_ms": 1e3 * statistics.median(ts), "p90_ms": 1e3 * ts[min(len(ts) - 1, int(0.9 * len(ts)))]}


def _cell(s: dict) -> str:
    return f"{s['median_ms']:7.3f} ({s['p90_ms']:.3f})"


def bench(shape: tuple[int, int, int], repeat: int, warmup: int) -> list[dict]:
    """One row per encoding for an Activations whose z has ``shape`` [B, T, d]."""
    rng = np.random.default_rng(0)
    b, t, _ = shape
    z = rng.standard_normal(shape, dtype=np.float32)
    mask = np.ones((b, t), np.int64)
    labels = rng.integers(0, 2, b)
    rows = []
    for enc in ENCODINGS:
        msg = Activations(round_id=0, step_id=0, mode="train", z=z, attention_mask=mask, labels=labels, encoding=enc)
        frame = msg.serialize()
        ser = _time(msg.serialize, repeat, warmup)
        par = _time(lambda: parse(frame), repeat, warmup)
        both = _time(lambda: parse(msg.serialize()), repeat, warmup)
        rows.append({
            "encoding": enc,
            "shape": list(shape),
            "frame_bytes": len(frame),
            "max_abs_err": float(np.abs(parse(frame).z - z).max()),
            "serialize": _stats(ser),
            "parse": _stats(par),
            "round_trip": _stats(both),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 128, 384), metavar=("B", "T", "D"), help="shape of Z (default: 8 128 384)")
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (default: 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and environment as JSON")
    args = ap.parse_args(argv)

    env = _environment()
    rows = bench(tuple(args.shape), args.repeat, args.warmup)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"Z = float32{list(args.shape)}, median (p90) of {args.repeat} after {args.warmup} warm-up")
    print(f"{'encoding':8} {'frame MB':>9} {'serialize ms':>15} {'parse ms':>15} {'both ms':>15} {'max |err|':>10}")
    for r in rows:
        print(
            f"{r['encoding']:8} {r['frame_bytes'] / 1e6:9.3f} {_cell(r['serialize']):>15} {_cell(r['parse']):>15} "
            f"{_cell(r['round_trip']):>15} {r['max_abs_err']:10.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
