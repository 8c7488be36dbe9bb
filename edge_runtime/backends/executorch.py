"""ExecuTorch backend: one ``.pte`` with a ``forward`` and a ``backward`` method.

ExecuTorch's Python bindings link libtorch and take torch tensors, so torch is imported here,
lazily, and nowhere else in the edge runtime. The bindings' C++ module is used directly, not
through ``executorch.runtime``: that wrapper's import goes through ``portable_lib``, which
imports ``executorch.exir`` and with it torchao and sympy (~1,800 modules, ~130 MB of RSS that a
device never uses; :func:`_bindings`). numpy and torch share memory both ways
(``torch.from_numpy`` / ``Tensor.numpy``); the saved activations stay torch tensors from the
forward's outputs to the backward's inputs. All ExecuTorch API use of the edge runtime is in
this module.

ExecuTorch plans the program's memory when it is exported, for the bundle's largest batch
(``runtime.executorch.planned_batch`` in the manifest, by default the training batch): its
arena is that size whatever the batch, and a larger batch is refused with one line (the
bundle's ``max_batch``, which is the planned batch, :func:`~flexsfl.edge_runtime.backends.check_batch`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError
from flexsfl.edge_runtime.backends import INSTALL_HINTS, ProgramBackend, _first_line

__all__ = ["ExecuTorchBackend", "ExecuTorchTopPrograms"]


def _bindings() -> tuple[Any, Any]:
    """(torch, ExecuTorch's pybindings ``_C`` module); raises BackendError if either is missing.

    ``_C`` is what ``executorch.runtime.Runtime`` calls (``_load_program``, ``load_method``,
    calling a method with a list of tensors); its outputs are cloned on every call, since the
    forward and backward share one planned arena."""
    try:
        import torch  # the bindings' tensor type; their library links libtorch
        from executorch.extension.pybindings import _C
    except ImportError as e:
        raise BackendError(f"ExecuTorch is not usable here ({e}); {INSTALL_HINTS['executorch']}") from None
    return torch, _C


def _load_program(_C: Any, path: Any) -> Any:
    return _C._load_program(str(path), program_verification=_C.Verification.InternalConsistency)


class ExecuTorchBackend(ProgramBackend):
    name: ClassVar[str] = "executorch"

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        self._torch, _C = _bindings()
        if threads:
            # XNNPACK's thread pool is process-wide; it is what runs the delegated kernels.
            _C._unsafe_reset_threadpool(threads)
        path = bundle.path("executorch.program")
        try:
            program = _load_program(_C, path)
            self._methods = {m: program.load_method(m) for m in ("forward", "backward")}
        except Exception as e:  # noqa: BLE001 - the bindings raise RuntimeError/ValueError
            raise BackendError(f"{path}: ExecuTorch cannot load it ({_first_line(e)}); re-export the bundle with this "
                               "executorch version") from None
        if any(m is None for m in self._methods.values()):
            raise BackendError(f"{path}: the program lacks a forward or backward method; re-export the bundle")
        self._program = program  # the methods borrow the program's memory
        self._setup(bundle, {m: meth.method_meta().num_inputs() for m, meth in self._methods.items()})

    def _run(self, method: str, inputs: list[Any]) -> list[Any]:
        torch = self._torch
        args = [a if isinstance(a, torch.Tensor) else torch.from_numpy(a) for a in inputs]
        try:
            outs = self._methods[method](args)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"ExecuTorch {method} failed for inputs of shape {list(args[0].shape)}: {_first_line(e)}; "
                               "check the batch against the bundle's limits or re-export it") from None
        if method == "forward":
            return [outs[0].numpy(), *outs[1:]]
        return [o.numpy() for o in outs]


class ExecuTorchTopPrograms:
    """Methods ``top_train`` / ``top_eval`` of the bundle's ``.pte`` (U-shaped topology), for
    :mod:`flexsfl.edge_runtime.top`: ``run(method, numpy inputs) -> numpy outputs``."""

    def __init__(self, bundle: Bundle, threads: int | None) -> None:
        self._torch, _C = _bindings()
        path = bundle.path("executorch.program")
        try:
            self._program = _load_program(_C, path)
            self._methods = {m: self._program.load_method(m) for m in ("top_train", "top_eval")}
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"{path}: ExecuTorch cannot load its top methods ({_first_line(e)}); re-export the "
                               "bundle with --top") from None

    def num_inputs(self, method: str) -> int:
        return self._methods[method].method_meta().num_inputs()

    def run(self, method: str, inputs: list[Any]) -> list[Any]:
        try:
            outs = self._methods[method]([self._torch.from_numpy(a) for a in inputs])
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"ExecuTorch {method} failed (H {list(inputs[0].shape)}): {_first_line(e)}") from None
        return [o.numpy() for o in outs]
