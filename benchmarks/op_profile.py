"""Where an ORT head step's time goes, by operator type: GEMMs against everything else.

    python -m flexsfl.benchmarks.op_profile --bundle DIR [--batch 8] [--seq 128] [--reps 10] [--json out.json]
    python -m flexsfl.benchmarks.op_profile --bundle DIR --fused [--reps 30]

Runs ``--reps`` train steps (forward, then backward with a fixed G) of the bundle's ORT programs
on one thread with ONNX Runtime's own profiler on, after two warm-up steps, and sums each node's
kernel time by operator type. Prints per program the share of MatMul/Gemm against the rest
(LayerNormalization, Softmax, Erf/GELU pieces, elementwise, transposes and copies), the step's
achieved GFLOP/s over the GEMMs alone (FLOPs from the nodes' shapes) and against the
single-thread fp32 GEMM peak measured in the same run (:mod:`.machine`): the ceiling a fused
LayerNorm/GELU/attention could lift the step to is ``GEMM time / step time`` of the peak ratio
the GEMMs themselves reach.

``--fused`` instead times the bundle's forward against the same forward with its GELU fused
(``flexsfl export --fused-ops``, :mod:`flexsfl.export.fuse_onnx`, written beside a link to the
bundle's weights), alternating one run of each, in this thread's CPU time (time preempted by
other processes on a shared machine is left out): per-run medians and their ratio. The backward is
the same program either way, so the forward's ratio is the whole difference (eval runs the forward
alone; a training step runs it plus the backward).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import collections
import glob
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

__all__ = ["profile_step", "fused_forward", "main"]

GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm"}


def _aggregate(trace: pathlib.Path) -> tuple[dict[str, float], float]:
    """(µs per op type, GEMM FLOPs) summed over a profile's kernel events."""
    per_op: dict[str, float] = collections.defaultdict(float)
    gemm_flops = 0.0
    for e in json.loads(trace.read_text()):
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        per_op[op] += float(e.get("dur", 0))
        if op in GEMM_OPS:
            shapes = [list(s.values())[0] for s in args.get("input_type_shape", [])]
            out = [list(s.values())[0] for s in args.get("output_type_shape", [])]
            if len(shapes) >= 2 and out:
                k = shapes[0][-1] if op != "Gemm" or not args.get("transA") else shapes[0][0]
                gemm_flops += 2.0 * float(np.prod(out[0])) * k
    return dict(per_op), gemm_flops


def profile_step(bundle_dir: str, batch: int, seq: int, reps: int, *, share_weights: bool = True) -> dict:
    import onnxruntime as ort

    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.backends.ort import OrtBackend

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="op_profile-"))
    real = ort.SessionOptions

    def profiled() -> ort.SessionOptions:  # every session the backend opens writes a profile
        opts = real()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / f"s{len(list(tmp.iterdir()))}")
        return opts

    ort.SessionOptions = profiled
    try:
        backend = OrtBackend(load_bundle(bundle_dir), threads=1, share_weights=share_weights)
    finally:
        ort.SessionOptions = real
    rng = np.random.default_rng(0)
    vocab = 1000
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    wall = []
    for i in range(reps + 2):
        t = time.perf_counter()
        z = backend.forward(ids, mask, keep=True)
        backend.backward(np.tanh(z) * np.float32(1e-3))
        if i >= 2:
            wall.append(time.perf_counter() - t)
    sessions = backend._sessions  # noqa: SLF001 - the profiler is ended per session
    out: dict = {"batch": batch, "seq": seq, "reps": reps, "step_ms_p50": 1e3 * float(np.median(wall)), "programs": {}}
    for name, sess in sessions.items():
        per_op, flops = _aggregate(pathlib.Path(sess.end_profiling()))
        total = sum(per_op.values())
        gemm = sum(v for k, v in per_op.items() if k in GEMM_OPS)
        out["programs"][name] = {
            "kernel_ms_per_step": total / 1e3 / (reps + 2), "gemm_ms_per_step": gemm / 1e3 / (reps + 2),
            "gemm_share": gemm / total if total else 0.0, "gemm_gflop_per_step": flops / (reps + 2) / 1e9,
            "top_ops_ms_per_step": {k: round(v / 1e3 / (reps + 2), 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:10]},
        }
    for f in glob.glob(str(tmp / "*")):
        os.unlink(f)
    return out


def fused_forward(bundle_dir: str, batch: int, seq: int, reps: int) -> dict:
    """Median CPU ms of the bundle's ``forward.onnx`` and of the same with its GELU fused, side by side."""
    import shutil

    import onnxruntime as ort

    from flexsfl.core.bundle import load_bundle
    from flexsfl.export.lower_onnx import WEIGHTS_NAME, fuse_program

    bundle = load_bundle(bundle_dir)
    plain = bundle.path("ort.forward")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="op_profile-fused-"))
    try:
        shutil.copy(plain, tmp / plain.name)
        (tmp / WEIGHTS_NAME).symlink_to(plain.parent.resolve() / WEIGHTS_NAME)  # external data, read in place
        fused = fuse_program(tmp / plain.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # kernels run in this thread, so its CPU time is theirs
        opts.log_severity_level = 3
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in (("plain", plain), ("fused", tmp / plain.name))}
        rng = np.random.default_rng(0)
        feed = {"input_ids": rng.integers(0, 1000, (batch, seq), dtype=np.int64), "attention_mask": np.ones((batch, seq), np.int64)}
        for i in sessions["plain"].get_inputs()[2:]:  # LoRA tensors
            feed[i.name] = (0.01 * rng.standard_normal([int(d) for d in i.shape])).astype(np.float32)
        outs = {k: s.run(None, feed) for k, s in sessions.items()}
        err = max(float(np.linalg.norm(f - p) / max(np.linalg.norm(p), 1e-12)) for p, f in zip(outs["plain"], outs["fused"]))
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(reps + 2):
            for k, s in sessions.items():
                t = time.thread_time()
                s.run(None, feed)
                if i >= 2:
                    times[k].append(time.thread_time() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    return {"batch": batch, "seq": seq, "reps": reps, "fused": fused, "max_rel_err": err, "forward_cpu_ms": ms,
            "fused_over_plain": ms["fused"] / ms["plain"], "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="an ORT bundle directory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-share", action="store_true", help="each session loads its own weights (no add_initializer)")
    ap.add_argument("--fused", action="store_true", help="time the forward plain vs with GELU fused (--fused-ops), side by side")
    args = ap.parse_args(argv)
    if args.fused:
        res = fused_forward(args.bundle, args.batch, args.seq, args.reps)
        ms = res["forward_cpu_ms"]
        print(f"B{args.batch} T{args.seq}, load {res['load']:.1f}: forward CPU ms p50 plain {ms['plain']:.1f}, fused "
              f"{ms['fused']:.1f} ({', '.join(f'{n} {op}' for op, n in res['fused'].items()) or 'nothing fused'}): "
              f"fused/plain {res['fused_over_plain']:.3f}; outputs rel err <= {res['max_rel_err']:.1e}")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True))
        return 0
    from flexsfl.benchmarks.machine import measure_gemm_peak

    peak_before = measure_gemm_peak(1)["peak_gflops"]
    res = profile_step(args.bundle, args.batch, args.seq, args.reps, share_weights=not args.no_share)
    peak = max(peak_before, measure_gemm_peak(1)["peak_gflops"])
    res["peak_gflops"] = peak
    flops = sum(p["gemm_gflop_per_step"] for p in res["programs"].values())
    gemm_ms = sum(p["gemm_ms_per_step"] for p in res["programs"].values())
    kern_ms = sum(p["kernel_ms_per_step"] for p in res["programs"].values())
    res["gemm_frac_of_peak"] = flops / (gemm_ms / 1e3) / peak if gemm_ms else 0.0
    res["step_gemm_flops_frac_of_peak"] = flops / (res["step_ms_p50"] / 1e3) / peak
    res["ceiling_if_non_gemm_were_free"] = res["gemm_frac_of_peak"]
    print(f"B{args.batch} T{args.seq}: step p50 {res['step_ms_p50']:.1f} ms (kernels {kern_ms:.1f} ms, GEMMs {gemm_ms:.1f} ms, "
          f"{flops:.2f} GFLOP in GEMMs); single-thread GEMM peak {peak:.1f} GFLOP/s")
    print(f"GEMM FLOPs / step time = {res['step_gemm_flops_frac_of_peak']:.0%} of peak; the GEMMs alone run at "
          f"{res['gemm_frac_of_peak']:.0%} of peak (the ceiling with every other op free)")
    for name, p in res["programs"].items():
        print(f"  {name}: kernels {p['kernel_ms_per_step']:.1f} ms, GEMM share {p['gemm_share']:.0%}; top: "
              + ", ".join(f"{k} {v:.1f}" for k, v in p["top_ops_ms_per_step"].items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
