"""The one small interface every on-device runtime implements, and a lazy registry.

A backend runs a bundle's two head programs::

    z = backend.forward(input_ids, attention_mask)       # Z [B, T, d]; keeps what backward needs
    grads = backend.backward(G)                          # ∂(Σ Z·G)/∂θ for every trainable tensor
    optimizer.step(backend.params, grads)                # in place (flexsfl.edge_runtime.optim)

``params`` are the personal adapters θ: float32 arrays keyed by their canonical (PEFT) names, in
the manifest's ``trainable_parameters`` order (which is also the programs' parameter input
order). ``forward(..., params=φ, keep=False)`` runs the head with other adapters (the alignment
reference) without disturbing the kept forward.

Each runtime lives in its own module, imported only when chosen, so that an unstable runtime
API is touched in one file and a missing runtime gives one clear error:

- ``ort``: ONNX Runtime (``forward.onnx`` + ``backward.onnx``); no torch needed.
- ``executorch``: ExecuTorch (one ``.pte`` with ``forward`` and ``backward`` methods), through a C shim
  over the wheel's runtime built once with g++ (no torch); ExecuTorch's own Python bindings, which
  link libtorch, only where no compiler is found.
- ``torch``: eager PyTorch, the reference for tests and benchmarks; it needs the model code and
  lives in :mod:`flexsfl.sim.eager_backend`, which registers it here (:func:`register_backend`)
  when imported.

The split programs (``flexsfl.export.programs``) take ``(input_ids, attention_mask, *θ) -> (z, *saved)``
and ``(*saved, grad_z, *θ) -> (*grads)``; :class:`ProgramBackend` holds everything about them
that does not depend on the runtime (checks, the kept forward, naming), so a runtime module only
loads its files and runs one program.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError, BundleError, ConfigError

__all__ = ["Backend", "ProgramBackend", "BACKENDS", "open_backend", "register_backend", "load_initial_params",
           "check_batch"]

# name -> "module:Class" (imported on first use: each runtime is heavy and optional) or a class
# registered by a higher layer.
BACKENDS: dict[str, "str | type[Backend]"] = {
    "ort": "flexsfl.edge_runtime.backends.ort:OrtBackend",
    "executorch": "flexsfl.edge_runtime.backends.executorch:ExecuTorchBackend",
}
# Backends that rebuild the head from the model itself rather than run the bundle's programs.
_REFERENCE: set[str] = set()


class Backend(abc.ABC):
    """A head's forward and backward programs on one runtime. Not thread-safe."""

    name: ClassVar[str]
    bundle: Bundle
    params: dict[str, np.ndarray]

    @abc.abstractmethod
    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None: ...

    @abc.abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                params: Mapping[str, np.ndarray] | None = None, keep: bool = True) -> np.ndarray:
        """``Z`` float32 [B, T, d] for int64 [B, T] inputs, with ``self.params`` or ``params``.

        ``keep=True`` stores what :meth:`backward` needs (replacing any earlier kept forward).
        """

    @abc.abstractmethod
    def backward(self, grad_z: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of ``Σ Z·grad_z`` for the last kept forward, by canonical name. Consumes it."""

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.params.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Replace θ (all tensors, checked against the manifest); arrays are copied."""
        self.params = _checked(self.bundle, params, "set_params")


class ProgramBackend(Backend):
    """A runtime that runs the bundle's split ``forward`` / ``backward`` programs.

    Subclasses load the programs in ``__init__`` (then call :meth:`_setup`) and implement
    :meth:`_run`; inputs are C-contiguous numpy arrays in the programs' input order.
    """

    def _setup(self, bundle: Bundle, num_inputs: dict[str, int]) -> None:
        """Check the loaded programs against the manifest and load θ from the adapter file.

        ``num_inputs`` maps "forward"/"backward" to how many inputs the runtime says each takes.
        """
        m = bundle.manifest
        self.bundle = bundle
        for method, n in num_inputs.items():
            want = len(m.inputs.get(f"{self.name}.{method}", ()))
            if n != want:
                raise BundleError(f"bundle {bundle.root}: the {self.name} {method} program takes {n} inputs, the manifest "
                                  f"lists {want}; re-export the bundle")
        self._names = [p.name for p in m.trainable_parameters]
        self._z_dim = m.model.hidden_size
        self.params = load_initial_params(bundle)
        self._kept: tuple[Sequence[Any], list[np.ndarray], tuple[int, ...]] | None = None

    @abc.abstractmethod
    def _run(self, method: str, inputs: list[Any]) -> list[Any]:
        """Run program ``method`` ("forward" or "backward") and return its outputs in order.

        Inputs are numpy arrays, except the saved activations, which are passed back exactly as
        :meth:`_run` returned them from the forward (so a runtime may keep them in its own
        tensor type). Every output but those must convert with ``np.asarray``. Runtime failures
        are raised as :class:`BackendError`.
        """

    def forward(self, input_ids, attention_mask, *, params: Mapping[str, np.ndarray] | None = None, keep: bool = True):
        ids, mask = check_batch(self.bundle, input_ids, attention_mask)
        theta = self.params if params is None else _checked(self.bundle, params, "forward params")
        plist = [theta[n] for n in self._names]
        outs = self._run("forward", [ids, mask, *plist])
        z = np.asarray(outs[0])
        if z.shape != (*ids.shape, self._z_dim):
            raise BackendError(f"the {self.name} forward program returned Z of shape {list(z.shape)} for a "
                               f"{list(ids.shape)} batch; the bundle is inconsistent, re-export it")
        if keep:
            # θ as it was: the optimizer updates self.params in place after backward().
            self._kept = (outs[1:], [p.copy() for p in plist] if params is None else plist, z.shape)
        return z

    def backward(self, grad_z: np.ndarray) -> dict[str, np.ndarray]:
        if self._kept is None:
            raise BackendError("backward() without a kept forward(); call forward(..., keep=True) first")
        saved, plist, shape = self._kept
        g = np.asarray(grad_z)
        if g.shape != shape or not np.issubdtype(g.dtype, np.floating):
            raise ConfigError(f"grad_z must be float [{', '.join(map(str, shape))}] like the kept forward's Z, "
                              f"got {g.dtype} {list(g.shape)}")
        g = np.ascontiguousarray(g, dtype=np.float32)
        if not np.isfinite(g).all():
            raise ConfigError("grad_z has NaN or Inf values; the server's gradient is unusable, skip this step")
        self._kept = None
        grads = self._run("backward", [*saved, g, *plist])
        return {n: np.asarray(a) for n, a in zip(self._names, grads)}


def _first_line(e: BaseException) -> str:
    """A runtime exception's first line (they carry C++ stack traces below it)."""
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _checked(bundle: Bundle, params: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    specs = bundle.manifest.trainable_parameters
    names = [p.name for p in specs]
    if set(params) != set(names):
        extra, missing = sorted(set(params) - set(names)), sorted(set(names) - set(params))
        raise ConfigError(f"{where}: adapter names do not match the bundle (missing {missing[:2]}, unexpected {extra[:2]})")
    out = {}
    for p in specs:
        a = np.asarray(params[p.name])
        if tuple(a.shape) != tuple(p.shape):
            raise ConfigError(f"{where}: {p.name!r} has shape {list(a.shape)}, the bundle expects {list(p.shape)}")
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise ConfigError(f"{where}: {p.name!r} must hold finite floats (got {a.dtype}, or NaN/Inf values)")
        out[p.name] = np.array(a, dtype=np.float32, order="C")
    return out


def load_initial_params(bundle: Bundle) -> dict[str, np.ndarray]:
    """θ from the bundle's PEFT adapter file, in manifest order."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from flexsfl.core.bundle import ADAPTER_WEIGHTS_NAME

    path = bundle.adapter_dir / ADAPTER_WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path}: unreadable adapter file ({e}); re-export the bundle") from None
    return _checked(bundle, tensors, str(path))


def check_batch(bundle: Bundle, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 C-contiguous copies of a batch the programs accept, or a one-line ConfigError."""
    m = bundle.manifest
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ConfigError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must both be [B, T]")
    b, t = ids.shape
    if not 1 <= b <= m.max_batch or not 2 <= t <= m.max_seq:
        raise ConfigError(f"batch [{b}, {t}] is outside this bundle's limits (1..{m.max_batch} x 2..{m.max_seq}); "
                          "use smaller batches or re-export with larger --max-batch/--max-seq")
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(mask.dtype, np.integer)):
        raise ConfigError(f"input_ids and attention_mask must be integers, got {ids.dtype} and {mask.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= m.model.vocab_size):
        raise ConfigError(f"token ids must be in 0..{m.model.vocab_size - 1}; is this the bundle's tokenizer?")
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ConfigError("attention_mask must hold only 0 (padding) and 1 (token)")
    return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)


def open_backend(name: str, bundle: Bundle, *, threads: int | None = None) -> Backend:
    """The backend ``name`` for ``bundle``, imported now; BackendError says what to install."""
    if name not in BACKENDS:
        hint = "; the eager reference 'torch' needs torch (flexsfl.sim.eager_backend)" if name == "torch" else ""
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}{hint}")
    if name not in _REFERENCE and name not in bundle.manifest.backend:
        raise ConfigError(f"bundle {bundle.root} has no {name} programs (has: {', '.join(bundle.manifest.backend)}); "
                          f"export it with --backend {name} or all")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    entry = BACKENDS[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise BackendError(f"the {name} backend cannot be loaded here ({e}); {INSTALL_HINTS[name]}") from None
        entry = getattr(mod, cls)
    return entry(bundle, threads=threads)


def register_backend(cls: "type[Backend]", *, reference: bool = False) -> None:
    """Make ``cls`` openable as ``cls.name``. A ``reference`` backend needs no programs in the bundle."""
    BACKENDS[cls.name] = cls
    if reference:
        _REFERENCE.add(cls.name)


INSTALL_HINTS = {
    "ort": "pip install 'flexsfl[edge]' (onnxruntime-training on x86_64, onnxruntime on aarch64)",
    "executorch": "pip install 'flexsfl[edge-executorch]' (and g++ once, to build its torch-free shim)",
}
