"""Time the wire codec on one step's smashed data: serialize + parse of an Activations per encoding.

    python -m flexsfl.benchmarks.wire_codec [--shape 8 128 384] [--repeat 50] [--warmup 5] [--clock cpu] [--json out.json]

Prints, per encoding, the median and p90 of ``serialize()``, ``parse()`` and both together over
``--repeat`` runs after ``--warmup`` runs, the frame size and the largest absolute error of the
decoded Z, plus one line naming the machine, library versions, commit and load average.
``--clock cpu`` times with this thread's CPU time instead of wall time: on a machine shared with
other work, time spent preempted is left out (cache pollution is not). Threads are pinned to
one (numpy's BLAS plays no part, but the measurement should not depend on it either).

A second table times the tensor codec alone, before (the kernels of commit e3d2e88, which
allocated every temporary afresh: :mod:`.wire_codec_before`) and after (buffers reused,
:mod:`flexsfl.core.wire.codec`) side by side: encode and decode medians, measured round-robin
so that load on the machine falls on both alike, and the minor page faults per encode and per
decode (``getrusage``), each over ``--repeat`` calls. Inputs are Z-like (N(0,1)) and g-like
(N(0, 1e-6), mostly fp16 subnormals).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads its thread pools

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from flexsfl.benchmarks import wire_codec_before as before
from flexsfl.core.wire import ENCODINGS, Activations, decode, encode, parse


_now = time.perf_counter  # --clock cpu: time.thread_time


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
        "load": round(os.getloadavg()[0], 1),
        "clock": "cpu" if _now is time.thread_time else "wall",
    }


def _time(fn, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = _now()
        fn()
        out.append(_now() - t)
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


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _codec_pair(x: np.ndarray, enc: str) -> dict[str, dict]:
    """(encode, decode) callables for the codec before and after, on the same input."""
    header, parts = encode("z", x, enc)
    frame = b"".join(parts)
    old_parts = before.encode(x, enc)
    old_frames = tuple(np.frombuffer(p.tobytes(), p.dtype).reshape(p.shape) for p in old_parts)
    return {
        "before": {"encode": lambda: before.encode(x, enc), "decode": lambda: before.decode(old_frames, enc, x.shape)},
        "after": {"encode": lambda: encode("z", x, enc), "decode": lambda: decode(header, frame)},
    }


def bench_codec(shape: tuple[int, int, int], repeat: int, warmup: int) -> list[dict]:
    """One row per (input, encoding, before/after): encode/decode median ms and page faults per call."""
    rng = np.random.default_rng(1)
    inputs = {"Z N(0,1)": rng.standard_normal(shape, dtype=np.float32), "g N(0,1e-6)": rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-6)}
    cases = [(name, enc, impl, fns) for name, x in inputs.items() for enc in ENCODINGS for impl, fns in _codec_pair(x, enc).items()]
    times: dict[tuple, dict[str, list[float]]] = {c[:3]: {"encode": [], "decode": []} for c in cases}
    faults: dict[tuple, dict[str, float]] = {c[:3]: {} for c in cases}
    for *key, fns in cases:  # warm-up, then page faults per call over `repeat` calls
        for op in ("encode", "decode"):
            for _ in range(warmup):
                fns[op]()
            f0 = _faults()
            for _ in range(repeat):
                fns[op]()
            faults[tuple(key)][op] = (_faults() - f0) / repeat
    for _ in range(repeat):  # round-robin: every case once per round
        for *key, fns in cases:
            for op in ("encode", "decode"):
                t = _now()
                fns[op]()
                times[tuple(key)][op].append(_now() - t)
    return [
        {
            "input": k[0], "encoding": k[1], "impl": k[2],
            "encode_ms": 1e3 * statistics.median(times[k]["encode"]), "decode_ms": 1e3 * statistics.median(times[k]["decode"]),
            "encode_faults": faults[k]["encode"], "decode_faults": faults[k]["decode"],
        }
        for k in times
    ]


def _print_codec(rows: list[dict]) -> None:
    print("tensor codec alone, before (fresh temporaries) vs after (reused buffers); median ms, minor page faults per call")
    print(f"{'input':12} {'encoding':8} {'impl':7} {'encode ms':>10} {'decode ms':>10} {'both ms':>8} {'flt/enc':>8} {'flt/dec':>8}")
    for r in rows:
        print(
            f"{r['input']:12} {r['encoding']:8} {r['impl']:7} {r['encode_ms']:10.3f} {r['decode_ms']:10.3f} "
            f"{r['encode_ms'] + r['decode_ms']:8.3f} {r['encode_faults']:8.1f} {r['decode_faults']:8.1f}"
        )
    both = {(r["input"], r["encoding"], r["impl"]): r["encode_ms"] + r["decode_ms"] for r in rows}
    for inp in dict.fromkeys(r["input"] for r in rows):
        for impl in ("before", "after"):
            print(f"fp16 / bf16 codec time, {inp}, {impl}: {both[inp, 'fp16', impl] / both[inp, 'bf16', impl]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 128, 384), metavar=("B", "T", "D"), help="shape of Z (default: 8 128 384)")
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (default: 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this thread's CPU time (leaves out time preempted on a loaded machine)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and environment as JSON")
    args = ap.parse_args(argv)
    global _now
    _now = time.thread_time if args.clock == "cpu" else time.perf_counter

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
    codec_rows = bench_codec(tuple(args.shape), args.repeat, args.warmup)
    _print_codec(codec_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "codec": codec_rows}, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
