#!/usr/bin/env bash
# The server's tail on a GPU: batched vs per-request steps/s at 1, 16 and 64 clients.
#
#   benchmarks/gpu_check.sh                      # --device cuda, MiniLM split 3, B=8, T=128
#   benchmarks/gpu_check.sh --device cuda:1 --clients 1,16,64,128
#   benchmarks/gpu_check.sh --dry-run [--model DIR]   # CPU, tiny shapes: checks the script (CI runs this)
#
# What it times is the server's real TailHost.train_batch on --device, numpy in and numpy out (Z,
# mask and labels go to the device and g comes back every batch, as in `flexsfl serve --device`):
#   batched      the N clients' steps as one train_batch (what cross-client batching does under load)
#   per-request  the same N steps one train_batch each (--no-batching)
# steps/s = N x reps / seconds after one untimed warm-up (CUDA synchronised before each clock read).
# One line per client count; a CUDA device that is missing is a one-line error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
device=cuda model=minilm split=3 batch=8 seq=128 clients=1,16,64 reps=5
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) device=cpu batch=2 seq=16 reps=1 split=1
               [ "$model" = minilm ] && model=${GPU_CHECK_DRY_MODEL:-minilm} ;;
    --device) device=$2; shift ;;
    --model) model=$2; shift ;;
    --split) split=$2; shift ;;
    --batch) batch=$2; shift ;;
    --seq) seq=$2; shift ;;
    --clients) clients=$2; shift ;;
    --reps) reps=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1; see --help" >&2; exit 2 ;;
  esac
  shift
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" - "$device" "$model" "$split" "$batch" "$seq" "$clients" "$reps" <<'EOF'
import sys, time

import numpy as np
import torch

from flexsfl.core.errors import FlexSFLError
from flexsfl.model.loading import load_model
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost, resolve_device

device, model, split, b, t, clients, reps = sys.argv[1:]
split, b, t, reps = int(split), int(b), int(t), int(reps)
try:
    dev = resolve_device(device)
except FlexSFLError as e:
    sys.exit(f"gpu_check.sh: {e}")
host = TailHost(load_model(model, attn_implementation="sdpa"), OptimizerConfig("sgd", 1e-4), device=dev)
d = host.info.hidden_size
rng = np.random.default_rng(0)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reqs(n):
    return [StepRequest(split, rng.standard_normal((b, t, d), dtype=np.float32), np.ones((b, t), np.int64),
                        rng.integers(0, host.info.num_labels, b).astype(np.int64)) for _ in range(n)]


def rate(n, batched):
    rs = reqs(n)
    run = (lambda: host.train_batch(rs)) if batched else (lambda: [host.train_batch([r]) for r in rs])
    run()  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = run()
    sync()
    assert out, "no results"
    return n * reps / (time.perf_counter() - t0)


name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"gpu_check: {host.info.id} split {split}, B={b}, T={t}, device {dev} = {name}, {reps} timed rep(s)")
print(f"{'clients':>8} {'batched steps/s':>16} {'per-request steps/s':>20} {'speedup':>8}")
for n in (int(c) for c in clients.split(",")):
    bat, per = rate(n, True), rate(n, False)
    print(f"{n:>8} {bat:>16.1f} {per:>20.1f} {bat / per:>7.2f}x")
EOF
