"""Lower a head's forward/backward programs to ONE ExecuTorch ``.pte`` with two methods.

``forward`` and ``backward`` live in one program so the frozen weights are stored once: both
methods read the same constants, and the emitter and XNNPACK's named-data store keep one copy
of each. Dynamic ``batch`` / ``seq`` are planned at their upper bounds: the arena holds every
activation at ``programs.max_batch`` x ``max_seq`` whatever batch a step uses (MiniLM split 3,
seq 128: 1123 MB peak RSS planned for batch 32, 674 MB for batch 8), so ``flexsfl export``'s
``--max-batch`` defaults to the training batch (``--batch-size``).

Speed (MiniLM split 3, B=8, T=128, one thread; ETDump): with ExecuTorch's portable kernels a
step is ~3.3x eager PyTorch: ``mm`` runs at a fifth of GEMM peak, every frozen weight is
transposed by a generic ``permute_copy`` on every call, and ``gelu``/``erf``/``softmax`` are
scalar loops. What fixes it, all here:

1. GEMMs on frozen weights become ``linear(x, W)`` (forward) and ``mm(g, W)`` (backward), so
   XNNPACK gets ``W`` as a static weight it pre-packs once, and both methods share it (folding
   the transposes into constants instead would store W and W^T: +28 % for MiniLM split 3);
2. other ``addmm`` -> ``mm`` + ``add`` (GPT-2's ``Conv1D``; the portable ``addmm`` is ~4x slower);
3. XNNPACK delegation of GEMMs, batched matmuls, transposes, gelu, exp, softmax and
   elementwise arithmetic; ``erf`` (gelu's derivative, ~15 % of a step as a scalar loop) is
   computed from ops XNNPACK runs. The full partitioner set fails on these graphs ("pass
   through arguments": a saved softmax output is both a partition's output and another's
   input); this subset works.

Result: forward and forward+backward at or below eager PyTorch's time, gradients within ~3e-6.
All private/unstable ExecuTorch APIs the project uses for export live here.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time
from typing import TYPE_CHECKING

import torch

from flexsfl.core.errors import ExportError

from flexsfl.export.programs import HeadPrograms, export_programs

if TYPE_CHECKING:
    from flexsfl.export.top_programs import TopPrograms

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


def _for_executorch(gm: torch.fx.GraphModule, *, xnnpack: bool) -> None:
    """Rewrite the programs' ops into the forms ExecuTorch runs fast (see the module docstring).

    - ``mm(x, W.T)`` / ``addmm(b, x, W.T)`` with a frozen weight ``W`` -> ``linear(x, W[, b])``,
      and ``(W.T).T`` -> ``W``: both methods then read ``W`` itself, which XNNPACK takes as a
      static (pre-packed) GEMM weight, so it is stored once;
    - other ``addmm`` -> ``mm`` + ``add``;
    - with XNNPACK, ``erf`` -> :func:`_erf_for_xnnpack`;
    - ``alias`` and ``expand`` to the same shape (real copies in ExecuTorch) -> their input.
    """
    aten = torch.ops.aten

    def transposed_weight(n) -> torch.fx.Node | None:
        """``W`` if ``n`` is ``permute(W, [1, 0])`` of a frozen weight (a module attribute)."""
        is_t = isinstance(n, torch.fx.Node) and n.target == aten.permute.default and list(n.args[1]) == [1, 0]
        return n.args[0] if is_t and n.args[0].op == "get_attr" else None

    def same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
        va, vb = a.meta.get("val"), b.meta.get("val")
        return va is not None and vb is not None and [str(d) for d in va.shape] == [str(d) for d in vb.shape]

    for n in list(gm.graph.nodes):  # in order: a (W.T).T is gone before the GEMM that reads it
        if n.op != "call_function":
            continue
        if n.target == aten.alias.default or (n.target == aten.expand.default and same_shape(n, n.args[0])):
            n.replace_all_uses_with(n.args[0])  # copies in ExecuTorch, no-ops in PyTorch
        elif n.target == aten.permute.default and transposed_weight(n.args[0]) is not None and list(n.args[1]) == [1, 0]:
            n.replace_all_uses_with(transposed_weight(n.args[0]))
        elif n.target in (aten.mm.default, aten.addmm.default):
            x, wt = (n.args[0], n.args[1]) if n.target == aten.mm.default else (n.args[1], n.args[2])
            w = transposed_weight(wt)
            if w is not None and n.kwargs.get("beta", 1) == 1 and n.kwargs.get("alpha", 1) == 1:
                bias = (n.args[0],) if n.target == aten.addmm.default else ()
                with gm.graph.inserting_before(n):
                    lin = gm.graph.call_function(aten.linear.default, (x, w, *bias))
                lin.meta = dict(n.meta)
                n.replace_all_uses_with(lin)
            elif n.target == aten.addmm.default:
                n.target = _addmm_as_mm_add
        elif xnnpack and n.target == aten.erf.default:
            n.target = _erf_for_xnnpack


def lower_executorch(programs: HeadPrograms, out_dir: str | pathlib.Path, *, xnnpack: bool = True,
                     top: "TopPrograms | None" = None) -> pathlib.Path:
    """Write ``out_dir/head.pte`` with methods ``forward`` and ``backward``; returns its path.

    The methods take and return exactly ``programs.forward_spec`` / ``backward_spec``, in
    order. With ``top`` (U-shaped topology) the same program also has the top's ``top_train``
    and ``top_eval`` methods (``top.train_spec`` / ``eval_spec``): one file, so a weight both
    ends read (a causal LM's output matrix tied to its embedding) is stored once.
    ``xnnpack=False`` keeps every op on ExecuTorch's portable kernels (~3x slower).
    Raises :class:`ExportError` if a step fails.
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    t0 = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PTE_NAME
    # 1. torch.export both programs with dynamic batch/seq, ops rewritten for ExecuTorch.
    transform = functools.partial(_for_executorch, xnnpack=xnnpack)
    ep_f, ep_b = export_programs(programs, transform=transform)
    methods = {"forward": ep_f, "backward": ep_b}
    if top is not None:
        from flexsfl.export.top_programs import export_top_programs

        methods.update(export_top_programs(top, transform=transform))
    try:
        # 2. Edge dialect, every method in one program so constants are shared; XNNPACK takes
        #    the GEMMs and the heavy elementwise ops.
        edge = to_edge_transform_and_lower(
            methods,
            partitioner=[_xnnpack_partitioner()] if xnnpack else None,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        # 3. ExecuTorch program; memory planned at the dims' upper bounds: the bundle's max batch
        #    (by default the training batch, export/config.py) and max seq.
        prog = edge.to_executorch(ExecutorchBackendConfig())
    except Exception as e:  # executorch raises plain Exceptions/RuntimeErrors
        raise ExportError(f"ExecuTorch lowering failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    path.write_bytes(prog.buffer)
    log.info("wrote %s: %.2f MB, xnnpack=%s, %.1f s", path, path.stat().st_size / 1e6, xnnpack, time.perf_counter() - t0)
    return path
