"""Lower a head's forward/backward programs to ``forward.onnx`` and ``backward.onnx``.

Both are exported from the ``torch.export`` programs of :func:`export.programs.export_programs`
(dynamic ``batch``/``seq``) with the dynamo exporter at opset 18. The graphs contain standard
ONNX operators only — the backward is plain MatMul/Mul/ReduceSum/... arithmetic, no training
contrib ops — so any ONNX Runtime build runs them, the inference-only aarch64 wheel included.
The IR version is set to what ONNX Runtime 1.19 reads (<= 10). Frozen weights are initializers
inside each file; the LoRA tensors are inputs, so the device owns θ and updates it in place.

Before returning, both files are run with ONNX Runtime on a padded example batch and compared
with the torch programs; a mismatch is an :class:`ExportError`, never a silent bad bundle.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import time

import numpy as np
import torch

from edge_runtime.errors import ExportError

from .programs import HeadPrograms, export_programs

__all__ = ["FORWARD_NAME", "BACKWARD_NAME", "lower_onnx"]

log = logging.getLogger("flexsfl.export.onnx")

FORWARD_NAME = "forward.onnx"
BACKWARD_NAME = "backward.onnx"
OPSET = 18
MAX_IR_VERSION = 10  # what onnxruntime 1.19 accepts (onnx 1.23 writes 11+)


def lower_onnx(programs: HeadPrograms, out_dir: str | pathlib.Path, *, verify: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``out_dir/forward.onnx`` and ``out_dir/backward.onnx``; returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ep_f, ep_b = export_programs(programs)
    paths = []
    for which, ep, spec, name in (("forward", ep_f, programs.forward_spec, FORWARD_NAME),
                                  ("backward", ep_b, programs.backward_spec, BACKWARD_NAME)):
        path = out / name
        try:
            # The exporter prints progress lines and warnings about torchvision; keep them out.
            with contextlib.redirect_stdout(io.StringIO()):
                onx = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, optimize=True,
                                        input_names=[t.name for t in spec.inputs],
                                        output_names=[t.name for t in spec.outputs])
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"ONNX export of the {which} program failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        onx.model.ir_version = min(onx.model.ir_version, MAX_IR_VERSION)
        _check_standard_ops(onx.model, which)
        # Heads over protobuf's 2 GB limit get their weights in a file next to the model.
        onx.save(path)
        paths.append(path)
    log.info("ONNX programs written in %.1f s (%s)", time.perf_counter() - t0,
             ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in paths))
    if verify:
        _verify(programs, paths[0], paths[1])
    return paths[0], paths[1]


def _check_standard_ops(model, which: str) -> None:
    """Only the default ONNX domain: no ORT training or contrib ops, so any ONNX Runtime build runs it."""
    other = sorted({f"{n.domain}::{n.op_type}" for n in model.graph if n.domain not in ("", "ai.onnx")})
    if other:
        raise ExportError(f"the {which} ONNX program uses non-standard operators ({', '.join(other[:5])}); "
                          "the plain onnxruntime wheel could not run it, please report this")


def _verify(programs: HeadPrograms, fwd: pathlib.Path, bwd: pathlib.Path, tol: float = 1e-4) -> None:
    """Both ONNX programs against the torch programs on a padded example batch (rel err <= tol)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    fs = ort.InferenceSession(str(fwd), opts, providers=["CPUExecutionProvider"])
    bs = ort.InferenceSession(str(bwd), opts, providers=["CPUExecutionProvider"])
    b, t = min(3, programs.max_batch), min(11, programs.max_seq)
    args = programs.example_forward_args(b, t, seed=7)
    with torch.no_grad():
        z, *saved = programs.forward(*args)
        grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(8))
        want = programs.backward(*saved, grad_z, *args[2:])
    feed = [a.numpy() for a in args]
    outs = fs.run(None, dict(zip([i.name for i in fs.get_inputs()], feed)))
    grads = bs.run(None, dict(zip([i.name for i in bs.get_inputs()], [*outs[1:], grad_z.numpy(), *feed[2:]])))
    checks = [("z", outs[0], z)] + [(f"grad {n}", g, w) for n, g, w in zip(programs.param_names, grads, want)]
    for what, got, ref in checks:
        ref = ref.numpy()
        err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
        if not err <= tol:
            raise ExportError(f"ONNX {what} differs from the torch program (rel err {err:.2e} > {tol:g}); please report this")
