"""The device's top in the U-shaped topology: a bundle's ``top_train`` / ``top_eval`` programs.

A U-shaped step on the device, after the server's middle returned ``H``::

    step = top.train_step(h, attention_mask, labels)   # loss, logits, dL/dH, grads of θ_top
    send(step.grad_h, step.loss)                       # the labels never leave the device
    optimizer.step(top.params, step.grads)             # in place (flexsfl.edge_runtime.optim)

``params`` are the top's personal tensors θ_top (its blocks' LoRA adapters and the task head),
float32 arrays by canonical (PEFT) name in the programs' input order, loaded from the bundle's
``top.adapter`` file. Two runtimes, chosen like the head's backend:

- ``ort``: ``ort/top_train.onnx`` and ``ort/top_eval.onnx`` in ONNX Runtime; no torch;
- ``executorch``: methods ``top_train`` / ``top_eval`` of the bundle's ``.pte`` (the torch-free shim).

Every input is checked before a program runs (shape, dtype, bounds, label range, finite ``H``);
a bad one is a one-line :class:`ConfigError` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError, BundleError, ConfigError
from flexsfl.edge_runtime.backends import INSTALL_HINTS, _first_line

__all__ = ["TopStep", "TopRunner", "open_top", "has_top"]

TRAIN, EVAL = "top_train", "top_eval"
ADAPTER_ROLE = "top.adapter"


@dataclasses.dataclass(frozen=True)
class TopStep:
    """One fused top step: ``loss`` (mean over labelled positions), ``logits`` [B, C] or
    [B, T, V], ``grad_h`` = dL/dH [B, T, d] (what goes back to the server), ``grads`` by name."""

    loss: float
    logits: np.ndarray
    grad_h: np.ndarray
    grads: dict[str, np.ndarray]


def has_top(bundle: Bundle) -> bool:
    """Whether the bundle was exported with ``--top`` (U-shaped topology)."""
    return "top" in bundle.manifest.extra


class TopRunner:
    """θ_top and the top's two programs on one runtime. Not thread-safe."""

    def __init__(self, bundle: Bundle, backend: str, *, threads: int | None = None) -> None:
        if not has_top(bundle):
            raise ConfigError(f"bundle {bundle.root} has no top programs; export it with --top U for the U-shaped topology")
        if backend not in _RUNTIMES:
            raise ConfigError(f"unknown backend {backend!r} for the top; choose one of: {', '.join(_RUNTIMES)}")
        m = bundle.manifest
        self.bundle, self.backend = bundle, backend
        self.info = m.extra["top"]
        self._train_spec, self._eval_spec = m.program(f"{backend}.{TRAIN}"), m.program(f"{backend}.{EVAL}")
        self._names = [t.name for t in self._train_spec.inputs[3:]]
        self.hidden_size = m.model.hidden_size
        self.task = m.model.task
        self.num_classes = int(self._eval_spec.outputs[0].shape[-1])
        self._programs = _RUNTIMES[backend](bundle, threads)
        for method, spec in ((TRAIN, self._train_spec), (EVAL, self._eval_spec)):
            n = self._programs.num_inputs(method)
            if n != len(spec.inputs):
                raise BundleError(f"bundle {bundle.root}: the {backend} {method} program takes {n} inputs, the manifest "
                                  f"lists {len(spec.inputs)}; re-export the bundle")
        self.params = self._load_params()

    # -- θ_top ---------------------------------------------------------------------------------
    def _load_params(self) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = self.bundle.path(ADAPTER_ROLE)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise BundleError(f"{path}: unreadable top adapter file ({e}); re-export the bundle") from None
        return self._checked(tensors, str(path))

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.params.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Replace θ_top (all tensors, checked against the programs); arrays are copied."""
        self.params = self._checked(params, "set_params")

    def _checked(self, params: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        if set(params) != set(self._names):
            extra, missing = sorted(set(params) - set(self._names)), sorted(set(self._names) - set(params))
            raise ConfigError(f"{where}: top tensors do not match the bundle (missing {missing[:2]}, unexpected {extra[:2]})")
        out = {}
        for spec in self._train_spec.inputs[3:]:
            a = np.asarray(params[spec.name])
            if tuple(a.shape) != tuple(spec.shape):
                raise ConfigError(f"{where}: {spec.name!r} has shape {list(a.shape)}, the bundle expects {list(spec.shape)}")
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                raise ConfigError(f"{where}: {spec.name!r} must hold finite floats (got {a.dtype}, or NaN/Inf values)")
            out[spec.name] = np.array(a, dtype=np.float32, order="C")
        return out

    # -- programs ------------------------------------------------------------------------------
    def train_step(self, h: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> TopStep:
        """Loss, logits, dL/dH and θ_top's gradients for one batch; θ_top is not changed."""
        h, mask = self._check_h(h, attention_mask)
        labels = self._check_labels(labels, h.shape[:2])
        loss, logits, grad_h, *grads = self._programs.run(TRAIN, [h, mask, labels, *(self.params[n] for n in self._names)])
        grad_h = np.asarray(grad_h)
        if grad_h.shape != h.shape:
            raise BackendError(f"the {self.backend} top program returned dL/dH of shape {list(grad_h.shape)} for H "
                               f"{list(h.shape)}; the bundle is inconsistent, re-export it")
        return TopStep(float(np.asarray(loss)), np.asarray(logits), grad_h,
                       {n: np.asarray(g) for n, g in zip(self._names, grads)})

    def predict(self, h: np.ndarray, attention_mask: np.ndarray, *, params: Mapping[str, np.ndarray] | None = None
                ) -> np.ndarray:
        """Logits for ``H`` with θ_top (or ``params``)."""
        h, mask = self._check_h(h, attention_mask)
        theta = self.params if params is None else self._checked(params, "predict params")
        (logits,) = self._programs.run(EVAL, [h, mask, *(theta[n] for n in self._names)])
        return np.asarray(logits)

    def _check_h(self, h, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        m = self.bundle.manifest
        h, mask = np.asarray(h), np.asarray(attention_mask)
        if h.ndim != 3 or h.shape[2] != self.hidden_size or mask.shape != h.shape[:2]:
            raise ConfigError(f"H must be float [B, T, {self.hidden_size}] with attention_mask [B, T]; got H "
                              f"{list(h.shape)} and mask {list(mask.shape)}")
        b, t = mask.shape
        if not 1 <= b <= m.max_batch or not 2 <= t <= m.max_seq:
            raise ConfigError(f"batch [{b}, {t}] is outside this bundle's limits (1..{m.max_batch} x 2..{m.max_seq})")
        if not np.issubdtype(h.dtype, np.floating) or not np.isfinite(h).all():
            raise ConfigError(f"H must hold finite floats (got {h.dtype}, or NaN/Inf values); the server's output is unusable")
        if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 1)):
            raise ConfigError("attention_mask must hold only 0 (padding) and 1 (token)")
        return np.ascontiguousarray(h, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.int64)

    def _check_labels(self, labels, bt: tuple[int, int]) -> np.ndarray:
        y = np.asarray(labels)
        want = bt if self.task == "causal_lm" else bt[:1]
        if y.shape != want or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"labels must be integers of shape {list(want)} for {self.task}, got {y.dtype} {list(y.shape)}")
        ok = (y >= 0) & (y < self.num_classes)
        if self.task == "causal_lm":
            ok |= y == -100
        if not ok.all():
            raise ConfigError(f"labels must be in 0..{self.num_classes - 1}" + (" or -100" if self.task == "causal_lm" else ""))
        return np.ascontiguousarray(y, dtype=np.int64)


class _OrtPrograms:
    """``top_train.onnx`` / ``top_eval.onnx`` in two ONNX Runtime sessions."""

    def __init__(self, bundle: Bundle, threads: int | None) -> None:
        from flexsfl.edge_runtime.backends.ort import import_onnxruntime, use_shared_arena

        try:
            ort = import_onnxruntime()
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e}); {INSTALL_HINTS['ort']}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or bundle.manifest.target.cores
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # As the head's sessions (backends/ort.py): H's length changes from batch to batch, and ONNX Runtime's default
        # memory pattern plans and keeps a block per input shape, so a device's memory grew with every new (B, T)
        # (MiniLM U in the suites: +300-400 MB a round); instead temporaries go back to one shared arena
        use_shared_arena(ort, opts)
        self._sessions = {}
        for method in (TRAIN, EVAL):
            path = bundle.path(f"ort.{method}")
            try:
                self._sessions[method] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise BackendError(f"{path}: ONNX Runtime cannot load it ({_first_line(e)}); re-export the bundle") from None
        self._inputs = {m: [i.name for i in s.get_inputs()] for m, s in self._sessions.items()}

    def num_inputs(self, method: str) -> int:
        return len(self._inputs[method])

    def run(self, method: str, inputs: list[np.ndarray]) -> list[Any]:
        try:
            return self._sessions[method].run(None, dict(zip(self._inputs[method], inputs)))
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"ONNX Runtime {method} failed (H {list(inputs[0].shape)}): {_first_line(e)}") from None


def _executorch_programs(bundle: Bundle, threads: int | None):
    # All ExecuTorch API use (and torch) stays in its backend module.
    from flexsfl.edge_runtime.backends.executorch import ExecuTorchTopPrograms

    return ExecuTorchTopPrograms(bundle, threads)


_RUNTIMES = {"ort": _OrtPrograms, "executorch": _executorch_programs}


def open_top(bundle: Bundle, backend: str, *, threads: int | None = None) -> TopRunner:
    """The top of ``bundle`` on ``backend`` ("ort" or "executorch"), loaded now."""
    return TopRunner(bundle, backend, threads=threads)
