"""ExecuTorch backend: one ``.pte`` with a ``forward`` and a ``backward`` method. No torch.

**Runtime.** The executorch wheel's Python bindings (``executorch.extension.pybindings._C``)
link libtorch and take torch tensors: ~190 MB of RSS for a library a device never uses, and a
broken promise (the edge runtime is torch-free). The same wheel ships ExecuTorch's C++ runtime
as shared libraries that need only libc/libstdc++ (``executorch/lib``: the runtime, the
optimized/portable CPU kernels, the XNNPACK delegate, its thread pool), with headers. So this
module compiles a small C shim against them (``et_shim/flexsfl_et.cpp``: load a program, load a
method with its planned memory, set inputs from numpy buffers, execute, copy outputs into numpy
arrays) and calls it with :mod:`ctypes`:

- built once per executorch install and shim source, with the C++ compiler (``$CXX``, else
  ``g++``/``c++``/``clang++``; ~2 s), into ``$FLEXSFL_CACHE/executorch-shim/KEY/`` (default
  ``~/.cache/flexsfl``; a private directory), where KEY hashes the wheel's version and location
  and the source. A device that has the built library needs no compiler.
- where it cannot be built (no compiler, or a wheel without headers), the torch-linked bindings
  are the fallback, with a warning; with neither, one line: install g++ or use ``--backend ort``.
  :attr:`ExecuTorchBackend.runtime` says which is in use ("shim" or "pybindings");
  ``$FLEXSFL_EXECUTORCH_RUNTIME`` (``shim`` / ``pybindings``) forces one (tests, benchmarks).

Both runtimes run the same program with the same kernels, so Z and the gradients are
bit-identical (tests compare them). numpy arrays in and out: a method's outputs are copied out
of its planned memory into new arrays (the forward and the alignment reference's forward share
one method), and the saved activations go back into the backward as inputs, which ExecuTorch
copies into the backward's planned memory. All ExecuTorch API use of the edge runtime is in this
module and the shim's source.

ExecuTorch plans the program's memory when it is exported, for the bundle's largest batch
(``runtime.executorch.planned_batch`` in the manifest, by default the training batch): its
arena is that size whatever the batch, and a larger batch is refused with one line (the
bundle's ``max_batch``, which is the planned batch, :func:`~flexsfl.edge_runtime.backends.check_batch`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import tempfile
from typing import Any, ClassVar

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError
from flexsfl.edge_runtime.backends import INSTALL_HINTS, ProgramBackend, _first_line

__all__ = ["ExecuTorchBackend", "ExecuTorchTopPrograms", "LOW_MEMORY_ENV", "RUNTIME_ENV", "SHIM_SOURCE", "load_shim",
           "shim_library"]

log = logging.getLogger("flexsfl.edge.executorch")

SHIM_SOURCE = pathlib.Path(__file__).parent / "et_shim" / "flexsfl_et.cpp"
RUNTIME_ENV = "FLEXSFL_EXECUTORCH_RUNTIME"  # "shim" | "pybindings"; unset: the shim, else the bindings
LOW_MEMORY_ENV = "FLEXSFL_EXECUTORCH_LOW_MEMORY"  # "0": keep the methods' planned memory resident (faster)
_NO_RUNTIME_FIX = "install g++ (the shim is built once) or use --backend ort"
_MAX_DIM = 16
# numpy dtype -> ExecuTorch ScalarType code (runtime/core/portable_type/scalar_type.h)
_SCALAR = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.int64): 4, np.dtype(np.float16): 5, np.dtype(np.float32): 6, np.dtype(np.float64): 7,
           np.dtype(np.bool_): 11}
_DTYPE = {code: dt for dt, code in _SCALAR.items()}


class _ShimUnavailable(BackendError):
    """The shim cannot be built here (no compiler, no headers in the wheel, a failed build)."""


# ---------------------------------------------------------------------------- the shim: build


def _executorch_root() -> pathlib.Path:
    """The installed executorch package's folder, found without importing it."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"ExecuTorch is not installed here; {INSTALL_HINTS['executorch']}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _shim_cache() -> pathlib.Path:
    base = pathlib.Path(os.environ.get("FLEXSFL_CACHE") or pathlib.Path.home() / ".cache" / "flexsfl")
    p = base / "executorch-shim"
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(p)
    except OSError as e:
        raise _ShimUnavailable(f"{p}: cannot create the ExecuTorch shim's cache ({e.strerror}); set FLEXSFL_CACHE "
                               "to a writable folder") from None
    # A library loaded from here runs in this process: only this user may write the folder.
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise _ShimUnavailable(f"{p}: the shim's cache must be a folder of uid {os.getuid()} that no one else may "
                               f"write (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it")
    return p


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for c in ("g++", "c++", "clang++") if (p := shutil.which(c))), None)


def _compile_command(cxx: str, root: pathlib.Path, out: pathlib.Path) -> list[str]:
    inc, lib = root / "include", root / "lib"
    return [
        cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-o", str(out), str(SHIM_SOURCE),
        # what the wheel's libraries were compiled with (share/cmake/executorch-config.cmake)
        "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL",
        f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}",
        f"-L{lib}", f"-Wl,--enable-new-dtags,-rpath,{lib}",
        # the kernels and the XNNPACK delegate register themselves when loaded; nothing calls them by name
        "-Wl,--no-as-needed", "-lexecutorch_kernels_optimized", "-lexecutorch_backend_xnnpack",
        "-lexecutorch_threadpool", "-lexecutorch", "-Wl,--as-needed",
    ]


def shim_library() -> pathlib.Path:
    """The shim's shared library for the installed executorch, built now if it is not in the cache.

    Raises :class:`BackendError` (a ``_ShimUnavailable`` where the shim cannot be built here)."""
    root = _executorch_root()
    if not (root / "lib" / "libexecutorch.so").is_file() or not (root / "include" / "executorch").is_dir():
        raise _ShimUnavailable(f"the executorch install at {root} ships no C++ runtime (lib/libexecutorch.so and "
                               "include/); install the executorch wheel from PyPI")
    try:
        version = importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    source = SHIM_SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), str(root).encode(),
                                      platform.machine().encode()])).hexdigest()[:16]
    folder = _shim_cache() / key
    target = folder / "libflexsfl_et.so"
    if target.is_file():
        return target
    cxx = _compiler()
    if cxx is None:
        where = " ($CXX not found)" if os.environ.get("CXX") else ""
        raise _ShimUnavailable(f"no C++ compiler to build flexsfl's ExecuTorch shim{where}")
    folder.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        log.info("building the ExecuTorch shim for executorch %s with %s", version, cxx)
        proc = subprocess.run(_compile_command(cxx, root, pathlib.Path(tmp)), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
            raise _ShimUnavailable(f"{cxx} could not build the ExecuTorch shim: {errors[0].strip()[:300]}")
        os.replace(tmp, target)  # atomic: a process racing this one loads a whole library
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _ShimUnavailable(f"{cxx} could not build the ExecuTorch shim ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ---------------------------------------------------------------------------- the shim: calls


@functools.cache
def load_shim() -> ctypes.CDLL:
    """The shim, built if need be (:func:`shim_library`) and loaded into this process once."""
    path = shim_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendError(f"{path}: cannot load the ExecuTorch shim ({e}); remove the file to rebuild it") from None
    v, i, p64 = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
    for name, res, args in [
        ("fet_last_error", ctypes.c_char_p, []), ("fet_init", None, []), ("fet_set_threads", i, [ctypes.c_uint32]),
        ("fet_program_open", v, [ctypes.c_char_p]), ("fet_program_close", None, [v]),
        ("fet_method_load", v, [v, ctypes.c_char_p]), ("fet_method_free", None, [v]),
        ("fet_method_num_inputs", i, [v]), ("fet_method_num_outputs", i, [v]),
        ("fet_method_set_input", i, [v, i, i, v, p64, i]), ("fet_method_execute", i, [v]),
        ("fet_output_shape", i, [v, i, ctypes.POINTER(i), p64, i]), ("fet_output_copy", i, [v, i, v, ctypes.c_size_t]),
        ("fet_stage", i, [v, i, v, i]), ("fet_method_release", i, [v]), ("fet_method_planned_bytes", ctypes.c_size_t, [v]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib.fet_init()
    return lib


def _check(lib: ctypes.CDLL, ok: bool) -> None:
    if not ok:
        raise RuntimeError(lib.fet_last_error().decode(errors="replace"))


class _ShimMethod:
    def __init__(self, program: "_ShimProgram", name: str) -> None:
        self._lib, self._program = program.lib, program  # the method borrows the program's memory
        self._h = self._lib.fet_method_load(program.handle, name.encode())
        _check(self._lib, bool(self._h))
        self.num_inputs = self._lib.fet_method_num_inputs(self._h)
        self.num_outputs = self._lib.fet_method_num_outputs(self._h)
        self.planned_bytes = self._lib.fet_method_planned_bytes(self._h)

    def __call__(self, inputs: list[np.ndarray], *, first: int = 0, outputs: range | None = None) -> list[np.ndarray]:
        """Set inputs ``first, first + 1, ...`` (the others were staged), execute, copy ``outputs`` (all) out."""
        lib, h = self._lib, self._h
        for k, a in enumerate(inputs, start=first):
            a = np.ascontiguousarray(a)
            if a.dtype not in _SCALAR:
                raise RuntimeError(f"input {k} has dtype {a.dtype}, which the shim does not pass")
            shape = (ctypes.c_int64 * max(a.ndim, 1))(*a.shape)
            _check(lib, lib.fet_method_set_input(h, k, _SCALAR[a.dtype], a.ctypes.data, shape, a.ndim) == 0)
        _check(lib, lib.fet_method_execute(h) == 0)
        outs = []
        code, shape = ctypes.c_int(), (ctypes.c_int64 * _MAX_DIM)()
        for k in range(self.num_outputs) if outputs is None else outputs:
            ndim = lib.fet_output_shape(h, k, ctypes.byref(code), shape, _MAX_DIM)
            _check(lib, ndim >= 0 and code.value in _DTYPE)
            out = np.empty(tuple(shape[:ndim]), dtype=_DTYPE[code.value])
            _check(lib, lib.fet_output_copy(h, k, out.ctypes.data, out.nbytes) == 0)
            outs.append(out)
        return outs

    def stage(self, index: int, src: "_ShimMethod", output: int) -> None:
        """Input ``index`` from ``src``'s output ``output``, copied in ExecuTorch (no numpy copy)."""
        _check(self._lib, self._lib.fet_stage(self._h, index, src._h, output) == 0)

    def release(self) -> None:
        """Hand the planned memory's pages back to the kernel (outputs are gone after this)."""
        _check(self._lib, self._lib.fet_method_release(self._h) == 0)

    def __del__(self) -> None:
        if getattr(self, "_h", None):
            self._lib.fet_method_free(self._h)


class _ShimProgram:
    def __init__(self, path: pathlib.Path, threads: int | None) -> None:
        self.lib = load_shim()
        if threads:
            # XNNPACK's thread pool is process-wide; it is what runs the delegated kernels.
            _check(self.lib, self.lib.fet_set_threads(threads) == 0)
        self.handle = self.lib.fet_program_open(str(path).encode())
        _check(self.lib, bool(self.handle))

    def load_method(self, name: str) -> _ShimMethod:
        return _ShimMethod(self, name)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.lib.fet_program_close(self.handle)


# ---------------------------------------------------------------------------- the fallback: _C


class _PybindMethod:
    def __init__(self, torch: Any, method: Any) -> None:
        self._torch, self._method = torch, method
        self.num_inputs = method.method_meta().num_inputs()

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # from_numpy / .numpy() share memory; the bindings clone their outputs on every call.
        outs = self._method([self._torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        return [o.numpy() for o in outs]


class _PybindProgram:
    """The bindings' ``_C`` module used directly, not through ``executorch.runtime``, whose import
    goes through ``portable_lib`` and ``executorch.exir`` (~1,800 modules, ~130 MB of RSS)."""

    def __init__(self, path: pathlib.Path, threads: int | None) -> None:
        try:
            import torch  # the bindings' tensor type; their library links libtorch
            from executorch.extension.pybindings import _C
        except ImportError as e:
            raise BackendError(f"ExecuTorch's Python bindings are not usable here ({e})") from None
        self._torch = torch
        if threads:
            _C._unsafe_reset_threadpool(threads)
        self._program = _C._load_program(str(path), program_verification=_C.Verification.InternalConsistency)

    def load_method(self, name: str) -> _PybindMethod:
        method = self._program.load_method(name)
        if method is None:
            raise RuntimeError(f"the program has no method '{name}'")
        return _PybindMethod(self._torch, method)


def _open_program(path: pathlib.Path, threads: int | None) -> tuple[Any, str]:
    """(program, "shim" or "pybindings") for the ``.pte`` at ``path``; BackendError if neither runtime works."""
    choice = os.environ.get(RUNTIME_ENV, "")
    if choice not in ("", "shim", "pybindings"):
        raise BackendError(f"${RUNTIME_ENV}={choice!r}: choose shim or pybindings, or leave it unset")
    opener = {"shim": _ShimProgram, "pybindings": _PybindProgram}
    if choice:
        return _load(opener[choice], path, threads), choice
    try:
        return _load(_ShimProgram, path, threads), "shim"
    except _ShimUnavailable as e:
        reason = str(e)
    try:
        program = _load(_PybindProgram, path, threads)
    except BackendError:
        raise BackendError(f"ExecuTorch cannot run here: {reason}; {_NO_RUNTIME_FIX}") from None
    log.warning("ExecuTorch: %s; using the torch-linked Python bindings instead (~190 MB more memory)", reason)
    return program, "pybindings"


def _load(opener: Any, path: pathlib.Path, threads: int | None) -> Any:
    try:
        return opener(path, threads)
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - the shim raises RuntimeError, the bindings RuntimeError/ValueError
        raise BackendError(f"{path}: ExecuTorch cannot load it ({_first_line(e)}); re-export the bundle with this "
                           "executorch version") from None


# ---------------------------------------------------------------------------- the backends


def _load_methods(bundle: Bundle, threads: int | None, names: tuple[str, ...], fix: str) -> tuple[Any, str, dict]:
    path = bundle.path("executorch.program")
    program, runtime = _open_program(path, threads)
    try:
        methods = {m: program.load_method(m) for m in names}
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"{path}: ExecuTorch cannot load its {'/'.join(names)} methods ({_first_line(e)}); "
                           f"{fix}") from None
    return program, runtime, methods


def _call(method: Any, name: str, inputs: list[np.ndarray], **kwargs: Any) -> list[np.ndarray]:
    try:
        return method(inputs, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"ExecuTorch {name} failed for inputs of shape {list(np.shape(inputs[0]))}: "
                           f"{_first_line(e)}; check the batch against the bundle's limits or re-export it") from None


class _Staged:
    """A saved activation that a kept forward staged straight into the backward's inputs (shim)."""

    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


class ExecuTorchBackend(ProgramBackend):
    """With the shim, a kept forward copies its saved activations from its own planned memory
    into the backward's planned inputs, never into numpy, and each method's planned memory is
    released once its outputs are taken: a step holds one arena at a time plus the staged
    activations. The price is faulting the arenas back in on every step (MiniLM split 3: 48,700
    minor faults, ~30 % more CPU time per step); ``$FLEXSFL_EXECUTORCH_LOW_MEMORY=0`` keeps both
    arenas resident instead (MiniLM split 5 at B8 T128: 508 MB instead of 430; benchmarks/README
    §12). The bindings keep both arenas and the activations in numpy once more."""

    name: ClassVar[str] = "executorch"
    runtime: str  # "shim" (torch-free) or "pybindings" (the torch-linked fallback)

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        self._program, self.runtime, self._methods = _load_methods(
            bundle, threads, ("forward", "backward"), "re-export the bundle with this executorch version")
        self._keep = True
        self._generation = 0  # of the saved activations staged in the backward's inputs (shim)
        self.low_memory = self.runtime == "shim" and os.environ.get(LOW_MEMORY_ENV, "1") != "0"
        self._setup(bundle, {m: meth.num_inputs for m, meth in self._methods.items()})

    def forward(self, input_ids, attention_mask, *, params=None, keep: bool = True):
        self._keep = keep  # _run stages what the backward reads only for a kept forward
        return super().forward(input_ids, attention_mask, params=params, keep=keep)

    def _run(self, method: str, inputs: list[Any]) -> list[Any]:
        if self.runtime != "shim":
            return _call(self._methods[method], method, inputs)
        fwd, bwd = self._methods["forward"], self._methods["backward"]
        n_saved = fwd.num_outputs - 1  # forward: (ids, mask, *θ) -> (z, *saved); backward: (*saved, g, *θ)
        if method == "forward":
            try:
                outs = _call(fwd, method, inputs, outputs=range(1))
                if self._keep:
                    self._generation += 1
                    try:
                        for k in range(n_saved):
                            bwd.stage(k, fwd, k + 1)
                    except RuntimeError as e:
                        raise BackendError(f"ExecuTorch cannot hand the forward's activations to the backward "
                                           f"({_first_line(e)}); re-export the bundle") from None
                    outs += [_Staged(self._generation)] * n_saved
            finally:
                if self.low_memory:
                    fwd.release()
            return outs
        saved = inputs[:n_saved]
        if not all(isinstance(s, _Staged) and s.generation == self._generation for s in saved):
            raise BackendError("backward() with saved activations other than the last kept forward's; run "
                               "forward(..., keep=True) again")
        try:
            return _call(bwd, method, inputs[n_saved:], first=n_saved)
        finally:
            if self.low_memory:
                bwd.release()


class ExecuTorchTopPrograms:
    """Methods ``top_train`` / ``top_eval`` of the bundle's ``.pte`` (U-shaped topology), for
    :mod:`flexsfl.edge_runtime.top`: ``run(method, numpy inputs) -> numpy outputs``."""

    def __init__(self, bundle: Bundle, threads: int | None) -> None:
        self._program, self.runtime, self._methods = _load_methods(bundle, threads, ("top_train", "top_eval"),
                                                                   "re-export the bundle with --top")

    def num_inputs(self, method: str) -> int:
        return self._methods[method].num_inputs

    def run(self, method: str, inputs: list[Any]) -> list[Any]:
        return _call(self._methods[method], method, inputs)
