"""ONNX Runtime backend: ``forward.onnx`` and ``backward.onnx`` in two inference sessions.

The programs use standard ONNX operators only (no training contrib ops), so the plain
``onnxruntime`` wheel runs them — including on aarch64, where PyPI has no onnxruntime-training.
No torch anywhere. All ONNX Runtime API use of the edge runtime is in this module.
"""

from __future__ import annotations

import os
from typing import ClassVar, Mapping

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError, BundleError
from . import Backend, _checked, check_batch, load_initial_params

__all__ = ["OrtBackend"]


class OrtBackend(Backend):
    name: ClassVar[str] = "ort"

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e}); pip install 'flexsfl[edge]'") from None
        self._ort = ort
        self.bundle = bundle
        m = bundle.manifest
        opts = ort.SessionOptions()
        # One process trains one head: its threads are the device's cores (or what the user says).
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or m.target.cores
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._fwd = self._session(bundle, "ort.forward", opts)
        self._bwd = self._session(bundle, "ort.backward", opts)
        self._fwd_in = [i.name for i in self._fwd.get_inputs()]
        self._bwd_in = [i.name for i in self._bwd.get_inputs()]
        want_f, want_b = len(m.inputs["ort.forward"]), len(m.inputs["ort.backward"])
        if len(self._fwd_in) != want_f or len(self._bwd_in) != want_b:
            raise BundleError(f"bundle {bundle.root}: the ONNX programs take {len(self._fwd_in)}/{len(self._bwd_in)} inputs, "
                              f"the manifest lists {want_f}/{want_b}; re-export the bundle")
        self._names = [p.name for p in m.trainable_parameters]
        self.params = load_initial_params(bundle)
        self._kept: tuple[list[np.ndarray], list[np.ndarray], tuple] | None = None

    def _session(self, bundle: Bundle, role: str, opts):
        path = bundle.path(role)
        try:
            return self._ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); re-export the bundle "
                               "or upgrade onnxruntime") from None

    def forward(self, input_ids, attention_mask, *, params: Mapping[str, np.ndarray] | None = None, keep: bool = True):
        ids, mask = check_batch(self.bundle, input_ids, attention_mask)
        theta = self.params if params is None else _checked(self.bundle, params, "forward params")
        plist = [theta[n] for n in self._names]
        try:
            outs = self._fwd.run(None, dict(zip(self._fwd_in, [ids, mask, *plist])))
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"ONNX Runtime forward failed for a [{ids.shape[0]}, {ids.shape[1]}] batch: "
                               f"{str(e).splitlines()[0][:200]}") from None
        if keep:
            self._kept = (outs[1:], plist, outs[0].shape)
        return outs[0]

    def backward(self, grad_z: np.ndarray) -> dict[str, np.ndarray]:
        if self._kept is None:
            raise BackendError("backward() without a kept forward(); call forward(..., keep=True) first")
        saved, plist, shape = self._kept
        g = np.ascontiguousarray(grad_z, dtype=np.float32)
        if g.shape != shape:
            raise BackendError(f"grad_z has shape {list(g.shape)}, the kept forward's Z {list(shape)}")
        self._kept = None
        try:
            grads = self._bwd.run(None, dict(zip(self._bwd_in, [*saved, g, *plist])))
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"ONNX Runtime backward failed: {str(e).splitlines()[0][:200]}") from None
        return dict(zip(self._names, grads))
