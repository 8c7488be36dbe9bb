"""What machine a result came from, and how fast its cores can multiply matrices.

:func:`machine_info` describes the device (CPU model, cores, memory, architecture, Raspberry Pi /
Jetson detection), the library versions and the git commit; every benchmark row carries it.
:func:`gemm_peak` measures this machine's fp32 GEMM rate (numpy, and torch where installed) at a
few sizes, best of N, in a fresh single-threaded process, so the achieved fraction of peak of a
training step is measured against this machine, in the same run, not a datasheet.

The hardware facts come from :func:`flexsfl.edge_runtime.probe.probe_device` (the device probe clients
report in Hello), so a benchmark row and a device profile describe a machine the same way.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import time
from typing import Any

from flexsfl.edge_runtime.probe import probe_device

__all__ = ["machine_info", "gemm_peak", "measure_gemm_peak", "gemm_worker", "LIBRARIES"]

# Distributions whose versions every result records (absent ones are left out).
LIBRARIES = (
    "numpy", "torch", "executorch", "onnxruntime-training", "onnxruntime", "onnx", "transformers", "peft", "websockets",
)

_REPO = pathlib.Path(__file__).resolve().parent.parent


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@functools.cache
def _static_info() -> dict[str, Any]:
    versions = {}
    for dist in LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    p = probe_device()
    board = p.device_model or None
    return {
        "cpu": p.cpu_model or platform.processor() or p.arch,
        "cores": os.cpu_count(),
        "usable_cores": p.cores,
        "memory_mb": p.memory_mb,
        "arch": p.arch,
        "board": board,
        "raspberry_pi": bool(board and "raspberry pi" in board.lower()),
        # L4T's release file makes the probe report CUDA; an aarch64 board with CUDA is a Jetson
        "jetson": bool(board and "jetson" in board.lower()) or (p.accelerator == "cuda" and p.arch == "aarch64"),
        "accelerator": p.accelerator,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "commit": _git_commit(),
    }


def machine_info() -> dict[str, Any]:
    """This machine, its libraries and the code's commit; ``load_avg`` is the 1-minute load now
    (a busy machine makes every number here slower, so it travels with them)."""
    return {**_static_info(), "load_avg": round(os.getloadavg()[0], 2)}


def _best_rate(matmul, a, b, n: int, reps: int) -> float:
    """Best GFLOP/s of ``reps`` timed products of two n x n matrices (after one untimed)."""
    matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def gemm_peak(sizes: tuple[int, ...] = (256, 512, 1024, 2048), reps: int = 5) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s in this process at each size, numpy and (if installed) torch.

    Uses whatever thread count the process has; call it where threads are pinned (see
    :func:`measure_gemm_peak`). ``peak_gflops`` is the best rate over libraries and sizes.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    rates: dict[str, dict[str, float]] = {"numpy": {}}
    mats = {n: (rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)) for n in sizes}
    for n, (a, b) in mats.items():
        rates["numpy"][str(n)] = round(_best_rate(np.matmul, a, b, n, reps), 2)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        rates["torch"] = {}
        for n, (a, b) in mats.items():
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            rates["torch"][str(n)] = round(_best_rate(torch.mm, ta, tb, n, reps), 2)
    peak = max(r for lib in rates.values() for r in lib.values())
    return {"peak_gflops": peak, "gflops": rates, "reps": reps}


def gemm_worker(chan) -> None:
    """Worker: answer each request ``{"sizes": [...], "reps": n}`` with :func:`gemm_peak`."""
    while (msg := chan.recv()) is not None:
        chan.send(gemm_peak(tuple(msg.get("sizes", (256, 512, 1024, 2048))), int(msg.get("reps", 5))))


def measure_gemm_peak(threads: int = 1, *, sizes: tuple[int, ...] = (256, 512, 1024, 2048), reps: int = 5,
                      times: int = 1, log_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """:func:`gemm_peak` in a fresh process with ``threads`` threads; best of ``times`` calls."""
    from flexsfl.benchmarks.worker import Worker

    with Worker("flexsfl.benchmarks.machine:gemm_worker", threads=threads, name="gemm-peak", log_dir=log_dir) as w:
        runs = [w.request({"sizes": list(sizes), "reps": reps}, timeout=600) for _ in range(times)]
    best = max(runs, key=lambda r: r["peak_gflops"])
    return {**best, "threads": threads}
