"""benchmarks/gpu_check.sh: its CPU dry run prints batched and per-request steps/s at 1/16/64 clients."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HOME": str(pathlib.Path.home())}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_dry_run_prints_batched_and_per_request_rates(tiny_model_dirs):
    p = _run("--dry-run", "--model", str(tiny_model_dirs["gpt2"]))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", p.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 16, 64], p.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert "device cpu" in p.stdout


def test_missing_cuda_is_one_line():
    if torch.cuda.is_available():
        return  # a GPU machine: `--device cuda` is the real run, not an error
    p = _run("--device", "cuda", "--model", "unused")
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("gpu_check.sh: --device cuda: this torch")


def test_unknown_option_is_refused():
    p = _run("--fast")
    assert p.returncode == 2 and "unknown option --fast" in p.stderr
