"""Lower a head's forward/backward programs to ``forward.onnx`` and ``backward.onnx``.

Both are exported from the ``torch.export`` programs of :func:`flexsfl.export.programs.export_programs`
(dynamic ``batch``/``seq``, traced once straight to functional ATen, so the exporter need not
decompose them again) with the dynamo exporter at opset 18. The graphs contain standard
ONNX operators only — the backward is plain MatMul/Mul/ReduceSum/... arithmetic, no training
contrib ops — so any ONNX Runtime build runs them, the inference-only aarch64 wheel included.
The IR version is set to what ONNX Runtime 1.19 reads (<= 10). With ``fused_ops`` the forward's
GELU becomes ONNX Runtime's fused ``com.microsoft::Gelu`` (:mod:`flexsfl.export.fuse_onnx`;
the CPU provider of every standard build has them). The LoRA tensors are inputs, so
the device owns θ and updates it in place. Frozen weights (initializers of 1 KiB or more) live in
one ``weights.bin`` beside the programs as ONNX external data, each stored once: the backward
needs the blocks' weights (transposed) for the input gradients too, and two self-contained files
would hold every block twice.

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

from flexsfl.core.errors import ExportError

from flexsfl.export.programs import HeadPrograms, export_programs

__all__ = ["FORWARD_NAME", "BACKWARD_NAME", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME", "lower_onnx", "write_onnx_program",
           "share_weights", "weights_index", "fuse_program",
           "min_onnxruntime", "runtime_requirements"]

log = logging.getLogger("flexsfl.export.onnx")

FORWARD_NAME = "forward.onnx"
BACKWARD_NAME = "backward.onnx"
WEIGHTS_NAME = "weights.bin"
WEIGHTS_INDEX_NAME = "weights.json"  # where each program's initializers lie in weights.bin
_SHARED_MIN_BYTES = 1024  # smaller initializers stay inside the graphs
_ALIGN = 4096  # page-aligned offsets, so ONNX Runtime can map the weights instead of reading them
OPSET = 18
MAX_IR_VERSION = 10  # what onnxruntime 1.19 accepts (onnx 1.23 writes 11+)
# The first onnxruntime release that implements each (ONNX opset, IR version), from ONNX Runtime's
# version matrix (docs/Versioning.md there). Older releases cannot load our programs at all.
_ORT_RELEASES = (("1.14", 18, 8), ("1.15", 19, 9), ("1.17", 20, 9), ("1.18", 21, 10), ("1.20", 22, 10),
                 ("1.22", 23, 11))


def lower_onnx(programs: HeadPrograms, out_dir: str | pathlib.Path, *, verify: bool = True,
               fused_ops: bool = False) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Write ``forward.onnx``, ``backward.onnx`` and their shared ``weights.bin`` into ``out_dir``; returns the three paths.

    ``fused_ops``: the forward's GELU becomes ONNX Runtime's fused ``com.microsoft::Gelu`` kernel
    (:mod:`flexsfl.export.fuse_onnx`); its inputs, outputs and saved activations stay the same."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ep_f, ep_b = export_programs(programs, aten=True)  # traced once, already in the ATen form ONNX's exporter wants
    paths = [write_onnx_program(ep, spec, out / name, which, decomposed=True)
             for which, ep, spec, name in (("forward", ep_f, programs.forward_spec, FORWARD_NAME),
                                           ("backward", ep_b, programs.backward_spec, BACKWARD_NAME))]
    weights = share_weights(paths, out / WEIGHTS_NAME)
    if fused_ops:
        fuse_program(paths[0])
    log.info("ONNX programs written in %.1f s (%s)", time.perf_counter() - t0,
             ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in (*paths, weights)))
    if verify:
        _verify(programs, paths[0], paths[1])
    return paths[0], paths[1], weights


def write_onnx_program(ep, spec, path: pathlib.Path, which: str, *, decomposed: bool = False) -> pathlib.Path:
    """``ep`` (a ``torch.export`` program taking ``spec.inputs``) as a standard-ops ONNX file at ``path``.

    Its weights are inside it (or, over protobuf's 2 GB limit, in a file next to it) until
    :func:`share_weights` moves them into the bundle's one weights file. ``decomposed``: ``ep`` was
    traced to functional ATen already (``export_programs(..., aten=True)``), so the exporter's own
    decomposition, a second full trace, is skipped unless the graph holds an op it would decompose.
    """
    try:
        # The exporter prints progress lines and warnings about torchvision; keep them out.
        with contextlib.redirect_stdout(io.StringIO()), (_no_second_decomposition() if decomposed else contextlib.nullcontext()):
            onx = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, optimize=True,
                                    input_names=[t.name for t in spec.inputs],
                                    output_names=[t.name for t in spec.outputs])
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"ONNX export of the {which} program failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    onx.model.ir_version = min(onx.model.ir_version, MAX_IR_VERSION)
    _check_standard_ops(onx.model, which)
    onx.save(path)
    return path


@contextlib.contextmanager
def _no_second_decomposition():
    """While in it, ``torch.onnx.export`` leaves a program whose every op it implements as it is,
    instead of re-tracing it through ``run_decompositions`` (30% of a MiniLM split-5 export's CPU)."""
    from torch.onnx._internal.exporter import _decomp, _fx_passes

    original = _fx_passes.decompose_with_registry

    def decompose(ep, registry):
        table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
        if any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):
            return original(ep, registry)
        return ep

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def fuse_program(path: pathlib.Path) -> dict[str, int]:
    """Rewrite the ONNX program at ``path`` with :func:`~flexsfl.export.fuse_onnx.fuse_activations`
    (its weights stay where they are); returns what was fused."""
    import onnx

    from flexsfl.export.fuse_onnx import fuse_activations

    model = onnx.load(path, load_external_data=False)
    done = fuse_activations(model)
    if done:
        onnx.save(model, path)
    log.info("%s: fused %s", path.name, ", ".join(f"{n} {op}" for op, n in sorted(done.items())) or "nothing")
    return done


def min_onnxruntime(opset: int, ir_version: int) -> str:
    """The oldest onnxruntime release that reads ONNX ``opset`` at ``ir_version`` ("1.18")."""
    for release, max_opset, max_ir in _ORT_RELEASES:
        if opset <= max_opset and ir_version <= max_ir:
            return release
    raise ExportError(f"ONNX opset {opset} / IR version {ir_version} is newer than any onnxruntime this exporter "
                      "knows; lower OPSET/MAX_IR_VERSION in flexsfl/export/lower_onnx.py")


def runtime_requirements(paths: list[pathlib.Path]) -> dict:
    """What the device's onnxruntime must read for the programs at ``paths`` (the manifest's
    ``runtime.ort``): opset, IR version, oldest release, and ``contrib_ops``, the ``com.microsoft``
    kernels the programs use (empty unless exported with fused ops; every standard build has them)."""
    import onnx

    from flexsfl.export.fuse_onnx import contrib_ops

    models = [onnx.load(p, load_external_data=False) for p in paths]
    opset = max(o.version for m in models for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ir_version = max(m.ir_version for m in models)
    return {"onnx_opset": opset, "onnx_ir_version": ir_version, "min_onnxruntime": min_onnxruntime(opset, ir_version),
            "contrib_ops": contrib_ops(models)}


def share_weights(paths: list[pathlib.Path], weights: pathlib.Path) -> pathlib.Path:
    """Move every initializer of >= 1 KiB of the models at ``paths`` into ``weights`` as ONNX
    external data, each distinct tensor once, rewrite the models to point at it, and write the
    index the edge runtime shares them by (:data:`WEIGHTS_INDEX_NAME`, :func:`weights_index`).

    The models must sit in ``weights``' directory. One already pointing at ``weights`` is read
    back in first, so programs added later (the U-shaped topology's top) join the same file.

    A matrix that one program uses as ``W`` and another as ``Wᵀ`` (the forward's ``x·Wᵀ`` and the
    backward's ``g·W``) is stored once, and the program that reads it the other way round gets a
    transposed GEMM instead of a matrix of its own (:func:`_read_transposed`): a ``Gemm`` flips
    ``transA``/``transB``, a ``MatMul`` becomes ``Reshape → Gemm(transB=1) → Reshape``. Only an
    operator that has no transposed form gets a ``Transpose`` node, which ONNX Runtime would fold
    into a copy when it loads the session (no program of the supported models has one).
    """
    import hashlib
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    def key(a: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes() + f"{a.dtype}:{list(a.shape)}".encode()).digest()

    models = [onnx.load(p) for p in paths]  # any external data they already had is loaded in
    big = [(m, t) for m in models for t in m.graph.initializer if len(t.raw_data) >= _SHARED_MIN_BYTES]
    arrays = {id(t): numpy_helper.to_array(t) for _, t in big}
    keys = {id(t): (key(a), key(a.T) if a.ndim == 2 else None) for t, a in ((t, arrays[id(t)]) for _, t in big)}
    # Orientations some program must read as they are (no transposed form of its consumers):
    # the other orientation of such a matrix is the one that flips.
    rigid = {keys[id(t)][0] for m, t in big if not _transposable(m.graph, t.name, gemm_only=True)}
    where: dict[bytes, tuple[int, int]] = {}
    index: dict[str, dict[str, list]] = {}
    with open(weights, "wb") as f:
        for model, path in zip(models, paths):
            entries = index.setdefault(path.name, {})
            for t in [t for m, t in big if m is model]:
                k, kt = keys[id(t)]
                if k not in where and kt is not None and _transposable(model.graph, t.name, gemm_only=False):
                    # Read the stored matrix transposed, or store this one the way another program must read it.
                    if kt in where or (kt in rigid and k not in rigid):
                        _read_transposed(model.graph, t.name, arrays[id(t)].shape)
                        a = np.ascontiguousarray(arrays[id(t)].T)
                        t.raw_data, t.dims[:] = a.tobytes(), list(a.shape)
                        k = kt
                elif k not in where and kt is not None and kt in where:
                    _transpose_node(model.graph, t, arrays[id(t)])  # ONNX Runtime folds it into a copy: the rare fallback
                    k = kt
                if k not in where:
                    f.write(b"\0" * (-f.tell() % _ALIGN))
                    where[k] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                offset, length = where[k]
                entries[t.name] = [offset, length, arrays[id(t)].dtype.name,
                                   list(t.dims)]
                set_external_data(t, location=weights.name, offset=offset, length=length)
                t.ClearField("raw_data")
    for model, path in zip(models, paths):
        for stale in path.parent.glob(path.name + ".data"):  # what onx.save externalized, now in ``weights``
            stale.unlink()
        onnx.save(model, path)
    (weights.parent / WEIGHTS_INDEX_NAME).write_text(
        json.dumps({"format": 1, "file": weights.name, "programs": index}, sort_keys=True))
    return weights


def weights_index(weights: pathlib.Path) -> dict:
    """The index :func:`share_weights` wrote beside ``weights``: ``{"file", "programs": {program
    file name: {initializer: [offset, length, numpy dtype, shape]}}}``."""
    import json

    return json.loads((weights.parent / WEIGHTS_INDEX_NAME).read_text())


def _consumers(graph, name: str) -> list[tuple[object, int]]:
    return [(n, i) for n in graph.node for i, x in enumerate(n.input) if x == name]


def _transposable(graph, name: str, *, gemm_only: bool) -> bool:
    """Every use of initializer ``name`` has a transposed form: a Gemm's A or B, or (unless
    ``gemm_only``) a MatMul's B. Not a graph output, not read by a subgraph."""
    uses = _consumers(graph, name)
    if not uses or any(o.name == name for o in graph.output):
        return False
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH/GRAPHS: subgraphs may read it
        return False
    return all((n.op_type == "Gemm" and i in (0, 1)) or (not gemm_only and n.op_type == "MatMul" and i == 1)
               for n, i in uses)


def _read_transposed(graph, name: str, shape: tuple[int, int]) -> None:
    """Rewrite every use of ``name`` (a [K, N] matrix) to read the [N, K] tensor the initializer
    will hold instead: Gemm flips transA/transB; ``MatMul(X, W)`` becomes
    ``Reshape(Gemm(Reshape(X, [-1, K]), Wᵀ, transB=1), Shape(X)[:-1] + [N])``."""
    from onnx import helper, numpy_helper

    k, n_out = shape
    for node, i in _consumers(graph, name):
        if node.op_type == "Gemm":
            attr = "transA" if i == 0 else "transB"
            old = next((a for a in node.attribute if a.name == attr), None)
            if old is None:
                node.attribute.append(helper.make_attribute(attr, 1))
            else:
                old.i = 1 - old.i
            continue
        x, (y,) = node.input[0], node.output
        p = f"{y}__tgemm"
        graph.initializer.extend([numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}_2d"),
                                  numpy_helper.from_array(np.array([n_out], np.int64), f"{p}_n")])
        nodes = [
            helper.make_node("Reshape", [x, f"{p}_2d"], [f"{p}_x2d"], name=f"{p}_reshape_in"),
            helper.make_node("Gemm", [f"{p}_x2d", name], [f"{p}_y2d"], name=f"{p}_gemm", transB=1),
            helper.make_node("Shape", [x], [f"{p}_lead"], name=f"{p}_shape", end=-1),
            helper.make_node("Concat", [f"{p}_lead", f"{p}_n"], [f"{p}_shape_out"], name=f"{p}_concat", axis=0),
            helper.make_node("Reshape", [f"{p}_y2d", f"{p}_shape_out"], [y], name=f"{p}_reshape_out"),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for j, new in enumerate(nodes):
            graph.node.insert(at + j, new)


def _transpose_node(graph, t, a: np.ndarray) -> None:
    """Make initializer ``t`` (holding ``a``) a Transpose of ``aᵀ``, the matrix already stored."""
    from onnx import helper

    source = f"{t.name}__transposed"
    graph.node.insert(0, helper.make_node("Transpose", [source], [t.name], perm=[1, 0], name=f"{t.name}__shared"))
    at = np.ascontiguousarray(a.T)
    t.name, t.raw_data, t.dims[:] = source, at.tobytes(), list(at.shape)


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
