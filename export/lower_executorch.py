"""Lower a head's forward/backward programs to ONE ExecuTorch ``.pte`` with two methods.

``forward`` and ``backward`` live in one program so the frozen weights are stored once (the
emitter and XNNPACK's named-data store keep one copy of each distinct constant). Dynamic
``batch`` / ``seq`` are planned at their upper bounds (``max_batch`` x ``max_seq``).

Speed (MiniLM split 3, B=8, T=128, one thread; ETDump): with ExecuTorch's own kernels a step
is ~3.3x eager PyTorch: ``mm`` runs at a fifth of GEMM peak and every frozen weight is
transposed by a generic ``permute_copy`` on every call; ``gelu``/``erf``/``softmax`` are scalar
loops. So, in order:

1. ``addmm`` -> ``mm`` + ``add`` (GPT-2's ``Conv1D``; ExecuTorch's ``addmm`` kernel is ~4x slower);
2. constant folding: transposes of frozen weights become constants. XNNPACK needs GEMM weights
   to be constants to pre-pack them; the price is that a weight the backward reads untransposed
   is stored twice (W^T for the forward, W for the backward: +28 % for MiniLM split 3);
3. XNNPACK delegation of GEMMs, batched matmuls, transposes, gelu, exp, softmax and
   add/mul/sub. The full partitioner set fails on these graphs ("pass through arguments": a
   saved softmax output is both a partition's output and another's input), this subset works.
   Result: ~1.15x eager for forward+backward, gradients within ~3e-6 of eager.

All private/unstable ExecuTorch APIs the project uses for export live here.
"""

from __future__ import annotations

import logging
import pathlib
import time

import torch

from edge_runtime.errors import ExportError

from .programs import HeadPrograms, export_programs

__all__ = ["PTE_NAME", "lower_executorch"]

log = logging.getLogger("flexsfl.export.executorch")

PTE_NAME = "head.pte"


def _addmm_as_mm_add(bias, mat1, mat2, *, beta=1, alpha=1):
    out = torch.ops.aten.mm.default(mat1, mat2)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else bias * beta)


def _erf_for_xnnpack(x):
    """erf from ops XNNPACK runs (|error| < 6e-7 in float32; Abramowitz & Stegun 7.1.26).

    ExecuTorch's portable ``erf`` is a scalar loop that costs ~15 % of a BERT step (it is in
    gelu's derivative) and XNNPACK has no erf; this form runs in the delegate. The sign comes
    from ``clamp(x * 1e30, -1, 1)``, which is exact except where |x| < 1e-30 and erf(x) ~ 0.
    """
    a = torch.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    return torch.clamp(x * 1e30, -1.0, 1.0) * (1.0 - poly * torch.exp(-a * a))


def _xnnpack_partitioner():
    from executorch.backends.xnnpack.partition import config as xc
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    wanted = {
        "MMConfig", "AddmmConfig", "LinearConfig", "BMMConfig", "PermuteConfig", "GeluConfig", "ExpConfig",
        "SoftmaxConfig", "AddConfig", "MulConfig", "SubConfig", "DivConfig", "AbsConfig", "ClampConfig",
    }
    return XnnpackPartitioner(configs=[c for c in xc.ALL_PARTITIONER_CONFIGS if c.__name__ in wanted])


def lower_executorch(programs: HeadPrograms, out_dir: str | pathlib.Path, *, xnnpack: bool = True) -> pathlib.Path:
    """Write ``out_dir/head.pte`` with methods ``forward`` and ``backward``; returns its path.

    The methods take and return exactly ``programs.forward_spec`` / ``backward_spec``, in
    order. ``xnnpack=False`` keeps every op on ExecuTorch's portable kernels (~3x slower).
    Raises :class:`ExportError` if a step fails.
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    t0 = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PTE_NAME
    # 1. torch.export both programs with dynamic batch/seq; addmm -> mm + add (ExecuTorch's
    #    addmm kernel is the slow one) and, for XNNPACK, erf from ops it runs.
    rewrites = {torch.ops.aten.addmm.default: _addmm_as_mm_add}
    if xnnpack:
        rewrites[torch.ops.aten.erf.default] = _erf_for_xnnpack
    ep_f, ep_b = export_programs(programs, rewrites=rewrites)
    try:
        # 2. Fold weight transposes into constants (XNNPACK pre-packs constant GEMM weights).
        ep_f, ep_b = constant_prop_pass(ep_f), constant_prop_pass(ep_b)
        # 3. Edge dialect, both methods in one program so constants are shared; XNNPACK takes
        #    the GEMMs and the heavy elementwise ops.
        edge = to_edge_transform_and_lower(
            {"forward": ep_f, "backward": ep_b},
            partitioner=[_xnnpack_partitioner()] if xnnpack else None,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        # 4. ExecuTorch program; memory planned at the dims' upper bounds.
        prog = edge.to_executorch(ExecutorchBackendConfig())
    except Exception as e:  # executorch raises plain Exceptions/RuntimeErrors
        raise ExportError(f"ExecuTorch lowering failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    path.write_bytes(prog.buffer)
    log.info("wrote %s: %.2f MB, xnnpack=%s, %.1f s", path, path.stat().st_size / 1e6, xnnpack, time.perf_counter() - t0)
    return path
