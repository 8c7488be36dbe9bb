"""ONNX Runtime backend: ``forward.onnx`` and ``backward.onnx`` in two inference sessions.

The programs use standard ONNX operators only (no training contrib ops), so the plain
``onnxruntime`` wheel runs them — including on aarch64, where PyPI has no onnxruntime-training.
No torch anywhere. All ONNX Runtime API use of the edge runtime is in this module.

The saved activations stay ONNX Runtime ``OrtValue``s from the forward's outputs to the
backward's inputs (``run_with_ort_values``), so they are never copied into numpy and back.

**One copy of the frozen weights.** Both programs read their large initializers from the
bundle's one ``ort/weights.bin``. Left to itself, each ONNX Runtime session would load its own
copy (and pre-pack another for its GEMMs), so this backend maps the file once, read-only, and
hands each session the same memory as its initializers (``SessionOptions.add_initializer``,
located by ``ort/weights.json``); pre-packing is off, so no session makes a private packed copy
(MLAS packs GEMM panels on the fly instead), and where one program reads a matrix transposed,
the export wrote a transposed GEMM rather than a second matrix. The activations come from one
CPU arena shared by both sessions (:func:`_shared_arena`), with no per-shape memory pattern and
no buffer reuse plan, so each temporary is returned to the arena after its last use and the
backward's temporaries take the forward's freed chunks (MiniLM split 3, B=8, T=128: peak RSS
257 MB instead of 417, and no more page faults per step). ``share_weights=False`` lets each
session load its own copy of the weights, all else equal: the outputs are bit-identical (tests
and benchmarks compare the two). Bundles exported before ``ort/weights.json`` load the old way:
each session its own weights, arena and pre-packed copies.

Before loading anything, the installed onnxruntime is checked against the manifest's
``runtime.ort.min_onnxruntime`` (set at export from the programs' ONNX opset and IR version):
an older runtime is refused with one line saying what to install, rather than failing inside
ONNX Runtime's loader with a message about IR versions. The graphs' input and output names must
be the manifest's (schema 3 on), so a client that feeds them by the manifest's names alone works.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, ClassVar

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError, BundleError
from flexsfl.edge_runtime.backends import ProgramBackend, _first_line

__all__ = ["OrtBackend", "check_runtime_version", "import_onnxruntime"]


def _version_tuple(version: str) -> tuple[int, ...]:
    """(1, 19, 2) for "1.19.2", "1.19.2+cpu" or "1.20.0rc1" (the leading numeric release part)."""
    parts = tuple(int(p) for p in re.findall(r"\d+", re.match(r"[\d.]*", version).group(0)))
    return parts + (0,) * (3 - len(parts))


def check_runtime_version(bundle: Bundle, version: str) -> None:
    """Refuse an onnxruntime ``version`` older than the bundle's programs need (one-line BackendError).

    Bundles without the requirement (schema version 1) are accepted: ONNX Runtime's loader is then
    the only check.
    """
    need = bundle.manifest.runtime.get("ort")
    if not need:
        return
    minimum = need["min_onnxruntime"]
    if _version_tuple(version) < _version_tuple(minimum):
        raise BackendError(
            f"onnxruntime {version} is too old for {bundle.root}: its programs (ONNX opset {need['onnx_opset']}, "
            f"IR version {need['onnx_ir_version']}) need onnxruntime >= {minimum}; "
            f"run `pip install 'onnxruntime>={minimum}'` on this device")


def _check_names(bundle: Bundle, sessions: dict) -> None:
    """Schema 3 on: each graph's input and output names, in order, are exactly the manifest's."""
    m = bundle.manifest
    if m.schema_version < 3:
        return  # older bundles named parameters differently in the graphs; they run by position
    for method, session in sessions.items():
        role = f"ort.{method}"
        spec = m.program(role)
        for what, got, want in (("inputs", session.get_inputs(), spec.inputs), ("outputs", session.get_outputs(), spec.outputs)):
            got_names, want_names = [t.name for t in got], [t.name for t in want]
            if got_names != want_names:
                where = next((i for i, (a, b) in enumerate(zip(got_names, want_names)) if a != b), min(len(got_names), len(want_names)))
                raise BundleError(
                    f"{bundle.path(role)}: {what} differ from the manifest's {role} at position {where} "
                    f"(graph {got_names[where] if where < len(got_names) else '-'!r}, manifest "
                    f"{want_names[where] if where < len(want_names) else '-'!r}); re-export the bundle")


_ARENA: list = []  # the process's one shared CPU arena, once registered
_ARENA_LOCK = threading.Lock()  # in-process clients open their sessions from threads at once


def _shared_arena(ort) -> None:
    """Register one CPU memory arena in ONNX Runtime's environment for every session that asks
    for it (``session.use_env_allocators``), growing by exactly what is requested.

    With each session's own arena, the forward's freed memory stays reserved for the forward and
    the backward grows another; with one, the backward's temporaries reuse the forward's freed
    chunks. Process-wide, registered once: ONNX Runtime refuses a second registration ("An allocator
    for this device has already been registered"), so the check and the registration hold one lock.
    """
    with _ARENA_LOCK:
        if not _ARENA:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
            _ARENA.append(info)


def use_shared_arena(ort, opts) -> None:
    """Set ``opts`` to take activations from the process's one shared arena, with no memory pattern
    planned (and kept) per input shape and no buffer-reuse plan: each temporary goes back to the arena
    after its last use. For sessions whose input shapes change from step to step."""
    _shared_arena(ort)
    opts.enable_mem_pattern = False  # no block planned (and kept) per input shape
    opts.enable_mem_reuse = False  # each temporary is freed after its last use, not held for a later one
    opts.add_session_config_entry("session.use_env_allocators", "1")  # the one shared arena


def import_onnxruntime():
    """``import onnxruntime``, without the ``onnxruntime.training`` package where it is installed.

    The x86 ``onnxruntime-training`` wheel checks its build at import by importing ORTModule,
    which imports torch and onnx (2.7 s of CPU and ~500 MB per process here; the plain wheel a
    device runs has no such check). The edge runtime runs inference sessions only, so that
    import is turned away for the duration (the check then reports no ORTModule) and may still
    happen later in the same process.
    """
    import sys

    if "onnxruntime" in sys.modules or "onnxruntime.training" in sys.modules:
        import onnxruntime

        return onnxruntime
    sys.modules["onnxruntime.training"] = None  # type: ignore[assignment]  # None: "import ... raises ImportError"
    try:
        import onnxruntime
    finally:
        if sys.modules.get("onnxruntime.training", 0) is None:
            del sys.modules["onnxruntime.training"]
    return onnxruntime


class OrtBackend(ProgramBackend):
    name: ClassVar[str] = "ort"

    def __init__(self, bundle: Bundle, *, threads: int | None = None, runtime_version: str | None = None,
                 share_weights: bool = True) -> None:
        """``runtime_version`` stands for the installed onnxruntime's version in the check (tests use it);
        ``share_weights=False`` gives each session its own weights (see the module docstring)."""
        try:
            ort = import_onnxruntime()
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e}); pip install 'flexsfl[edge]'") from None
        check_runtime_version(bundle, runtime_version or ort.__version__)
        self._ort = ort
        self._initializers: dict = {}  # OrtValues the sessions read: they must outlive them
        # One process trains one head: its threads are the device's cores (or what the user says).
        self._threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or bundle.manifest.target.cores
        shared = self._shared_weights(bundle)
        self._sessions = {m: self._session(bundle, f"ort.{m}", shared, share_weights) for m in ("forward", "backward")}
        self._inputs = {m: [i.name for i in s.get_inputs()] for m, s in self._sessions.items()}
        self._setup(bundle, {m: len(names) for m, names in self._inputs.items()})  # input counts first
        _check_names(bundle, self._sessions)

    def _shared_weights(self, bundle: Bundle) -> tuple[np.ndarray, dict] | None:
        """``weights.bin`` mapped once (read-only) and its index, or None for a bundle without the index."""
        if "ort.weights_index" not in bundle.manifest.artifacts:
            return None
        index_path = bundle.path("ort.weights_index")
        try:
            index = json.loads(index_path.read_text())
            data = np.memmap(bundle.path("ort.weights"), dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise BundleError(f"{index_path}: cannot read the shared weights ({e}); re-export the bundle") from None
        self._weights_map = data  # the sessions' initializers point into it: it lives as long as they do
        return data, index["programs"]

    def _session(self, bundle: Bundle, role: str, shared: tuple[np.ndarray, dict] | None, share: bool):
        ort, path = self._ort, bundle.path(role)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if shared is not None:
            use_shared_arena(ort, opts)
            opts.add_session_config_entry("session.disable_prepacking", "1")  # no packed copy of each weight
            data, programs = shared
            values = self._initializers.setdefault(role, [])
            for name, (offset, length, dtype, shape) in (programs.get(path.name, {}) if share else {}).items():
                values.append(ort.OrtValue.ortvalue_from_numpy(data[offset:offset + length].view(dtype).reshape(shape)))
                opts.add_initializer(name, values[-1])
        try:
            return self._ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({_first_line(e)}); re-export the bundle "
                               "or upgrade onnxruntime") from None

    def _run(self, method: str, inputs: list[Any]) -> list[Any]:
        wrap = self._ort.OrtValue.ortvalue_from_numpy  # no copy for C-contiguous CPU arrays
        feed = {n: a if isinstance(a, self._ort.OrtValue) else wrap(a) for n, a in zip(self._inputs[method], inputs)}
        try:
            outs = self._sessions[method].run_with_ort_values(None, feed)
        except Exception as e:  # noqa: BLE001
            shape = inputs[0].shape() if isinstance(inputs[0], self._ort.OrtValue) else inputs[0].shape
            raise BackendError(f"ONNX Runtime {method} failed (first input {list(shape)}): {_first_line(e)}; "
                               "check the batch against the bundle's limits or re-export it") from None
        if method == "forward":
            return [outs[0].numpy(), *outs[1:]]
        return [o.numpy() for o in outs]

