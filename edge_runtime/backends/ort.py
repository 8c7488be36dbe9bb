"""ONNX Runtime backend: ``forward.onnx`` and ``backward.onnx`` in two inference sessions.

The programs use standard ONNX operators only (no training contrib ops), so the plain
``onnxruntime`` wheel runs them — including on aarch64, where PyPI has no onnxruntime-training.
No torch anywhere. All ONNX Runtime API use of the edge runtime is in this module.

The saved activations stay ONNX Runtime ``OrtValue``s from the forward's outputs to the
backward's inputs (``run_with_ort_values``), so they are never copied into numpy and back.

Before loading anything, the installed onnxruntime is checked against the manifest's
``runtime.ort.min_onnxruntime`` (set at export from the programs' ONNX opset and IR version):
an older runtime is refused with one line saying what to install, rather than failing inside
ONNX Runtime's loader with a message about IR versions. The graphs' input and output names must
be the manifest's (schema 3 on), so a client that feeds them by the manifest's names alone works.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError, BundleError
from flexsfl.edge_runtime.backends import ProgramBackend, _first_line

__all__ = ["OrtBackend", "check_runtime_version"]


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


class OrtBackend(ProgramBackend):
    name: ClassVar[str] = "ort"

    def __init__(self, bundle: Bundle, *, threads: int | None = None, runtime_version: str | None = None) -> None:
        """``runtime_version`` stands for the installed onnxruntime's version in the check (tests use it)."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e}); pip install 'flexsfl[edge]'") from None
        check_runtime_version(bundle, runtime_version or ort.__version__)
        self._ort = ort
        opts = ort.SessionOptions()
        # One process trains one head: its threads are the device's cores (or what the user says).
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or bundle.manifest.target.cores
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._sessions = {m: self._session(bundle, f"ort.{m}", opts) for m in ("forward", "backward")}
        self._inputs = {m: [i.name for i in s.get_inputs()] for m, s in self._sessions.items()}
        self._setup(bundle, {m: len(names) for m, names in self._inputs.items()})  # input counts first
        _check_names(bundle, self._sessions)

    def _session(self, bundle: Bundle, role: str, opts):
        path = bundle.path(role)
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

