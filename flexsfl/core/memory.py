"""How much device memory training split ``s`` takes, per runtime (no torch)::

    memory(s) = 4 B · (embedding + w · s · block parameters)         frozen weights
              + 4 B · s · LoRA parameters · (2 + optimizer states)   adapters + gradients + SGD 0 / momentum 1 / AdamW 2
              + copies · 4 B · B · T · s · saved(T)                  activations the backward reads
              + workspace · 4 B · B · T · saved(T)                   the runtime's transient buffers
              + 4 B · B · T · d · (2, or 3 with alignment)           Z, the server's gradient G (and Z')
              + runtime + Python                                     fixed

with ``saved(T)`` from :meth:`flexsfl.core.cost.ModelCost.saved_floats` and the block weights'
copies ``w``, ``copies``, ``workspace`` and the fixed part per runtime (:data:`RUNTIMES`).

**Runtimes** (:data:`RUNTIMES`). The constants are fitted to the peak resident set of a fresh
process training MiniLM's head at splits 1 and 3 and SmolLM2's at split 2 (batch 8, seq 128, one
thread, x86-64, Python 3.11, ``flexsfl bench memory``); split 5 was held out. Peak MB (10^6 bytes)::

    runtime                               fixed   measured (MiniLM s = 1, 3, 5; SmolLM2 s = 2)   model
    ort (onnxruntime 1.19, no torch)      43 MB   187, 264, 333; 351                              187, 263, 339; 350
    executorch 1.5.1 (XNNPACK, C shim)     8 MB   211, 311, 427; 387                              197, 300, 403; 406
    torch 2.13 eager (reference)         447 MB   581, 695, 768; 740                              580, 681, 781; 755

The edge process itself (Python, numpy, tokenizers, websockets, safetensors) is 35 MB
(:data:`PYTHON_MB`); importing onnxruntime and the edge runtime brings it to 70 MB. The ONNX
Runtime backend holds the frozen weights once (both sessions read one mapping of
``weights.bin``) and the saved activations about 1.4 times (the OrtValues handed from the forward
to the backward, plus what the arena both sessions share keeps of the forward's temporaries).
ExecuTorch plans memory for the bundle's ``max_batch``, which ``flexsfl export`` sets to the
training batch unless told otherwise, so predict with the batch the bundle was exported for.
The backend runs it through flexsfl's C shim over ExecuTorch's C++ libraries (no torch: 40 MB
of RSS with the runtime loaded, against 232 MB through the torch-linked Python bindings, which
this model no longer describes): a kept forward copies its saved activations straight into the
backward's planned inputs, and each method's planned memory is released after it runs, so a
step holds one arena at a time plus the staged activations (2.0 copies of the saved activations
and 2.5 blocks' worth of workspace; benchmarks/README §12). With
``FLEXSFL_EXECUTORCH_LOW_MEMORY=0`` both arenas stay resident (faster, +33–77 MB at MiniLM 1–5,
+77 MB at SmolLM2 2; not modelled). (On x86, the ``onnxruntime-training`` 1.19.2 wheel imports torch
when torch is installed, ~200 MB more; a device runs the plain ``onnxruntime`` wheel, as measured
here.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flexsfl.core.cost import ModelCost, check_shape, check_split
from flexsfl.core.errors import ConfigError

__all__ = ["OPTIMIZER_STATES", "PYTHON_MB", "Runtime", "RUNTIMES", "memory_breakdown_mb", "memory_mb", "largest_split"]

OPTIMIZER_STATES = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}  # fp32 tensors per trainable tensor
PYTHON_MB = 35.0  # interpreter + numpy, tokenizers, websockets, safetensors (34 MB measured)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a training runtime spends device memory besides the embedding (fitted to measured peak RSS).

    The ``top_*`` fields are the U-shaped topology's top programs (a fused train program and an
    eval program, :func:`flexsfl.core.u_planner.top_memory_mb`); where they were not measured they
    repeat the head's constants.
    """

    fixed_mb: float  # the runtime itself and the sessions' own state (Python not included)
    block_weight_copies: int  # how many copies of each block's frozen weights it loads
    activation_copies: float  # how many times the saved activations are resident during a step
    workspace_blocks: float  # transient buffers, in units of one block's saved activations
    top_weight_copies: float  # copies of the top's frozen weights (blocks + final norm / pooler + task head)
    top_activation_copies: float  # times the top's full blocks' saved activations are resident in its fused step
    top_io_copies: float  # [B, T, d] tensors resident for the top's step: H, dL/dH and the program's own buffers
    top_fixed_mb: float = 0.0  # the top's two sessions' own state


# Fitted to the peak RSS of MiniLM's head at splits 1, 3 and 5 and SmolLM2's at split 2 (batch 8,
# seq 128, one thread, ``flexsfl bench memory``); within 10 % of every measurement (module docstring).
RUNTIMES = {
    # One copy of the frozen weights, shared by the forward and backward sessions; the saved
    # activations once (OrtValues from the forward's outputs to the backward's inputs) plus what
    # the shared arena keeps of the forward's temporaries; about one block's worth of backward
    # temporaries.
    # The top (fitted to `flexsfl bench top`, MiniLM split 1, u = 0..2, B 4/8 x T 48/128; benchmarks/
    # README §11): its train and eval programs are two plain sessions, each loading the top's weights
    # (not the head's shared mapping): the train session the weights, their folded transposes and
    # pre-packed GEMM copies, the eval session its pre-packed copies, 4 copies in all (measured 4.1 at
    # load); the fused step keeps a full block's saved activations 2.3 times (forward outputs and the
    # backward's gradients of them), and about 5.4 [B, T, d] buffers (H, dL/dH, the arena's copies).
    "ort": Runtime(fixed_mb=43.0, block_weight_copies=1, activation_copies=1.4, workspace_blocks=1.0,
                   top_weight_copies=4.0, top_activation_copies=2.3, top_io_copies=5.4, top_fixed_mb=0.8),
    # Through flexsfl's C shim (no torch; 8 MB on top of Python with ExecuTorch's libraries
    # loaded): the block weights count once (XNNPACK's packed copies; the .pte is mapped, not
    # read into memory); the saved activations in the forward's arena and staged in the
    # backward's planned inputs, each method's arena released after it runs (the larger of
    # forward + staged and the backward's arena: ~2 copies of the saved activations plus 2.5
    # blocks' workspace, fitted on MiniLM 1, 3 and SmolLM2 2 with the fixed part pinned to the
    # measured runtime; MiniLM 5 held out, -6 %). Memory is planned for
    # the bundle's max batch, which export sets to the training batch by default (plan with the
    # batch the bundle was exported for).
    # The top's methods live in the same .pte and run without the staging/release; not measured
    # yet, so the constants of the head before the shim.
    "executorch": Runtime(fixed_mb=8.0, block_weight_copies=1, activation_copies=2.0, workspace_blocks=2.5,
                          top_weight_copies=2, top_activation_copies=2.4, top_io_copies=2),
    # Autograd keeps the activations about twice (views and the graph's own copies); torch,
    # transformers and peft are most of the fixed part.
    "torch": Runtime(fixed_mb=447.0, block_weight_copies=1, activation_copies=1.95, workspace_blocks=0.0,
                     top_weight_copies=1, top_activation_copies=1.95, top_io_copies=2),
}
_MB = 1e6
_F32 = 4  # bytes


def memory_breakdown_mb(
    cost: ModelCost,
    s: int,
    *,
    batch: int,
    seq: int,
    optimizer: str = "sgd",
    runtime: str = "ort",
    align: bool = False,
) -> dict[str, float]:
    """Device memory of training split ``s``, in MB per part (see the module docstring)."""
    check_split(cost, s)
    check_shape(batch, seq)
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZER_STATES)}")
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    rt = RUNTIMES[runtime]
    tokens = batch * seq
    block_acts = _F32 * tokens * cost.saved_floats(seq)
    return {
        "weights": _F32 * (cost.embedding_params + rt.block_weight_copies * s * cost.block_params) / _MB,
        "adapters": _F32 * s * cost.lora_params_per_block * (2 + OPTIMIZER_STATES[optimizer]) / _MB,
        "activations": rt.activation_copies * (_F32 * tokens * cost.saved_floats(seq, first=True) + (s - 1) * block_acts)
        / _MB,
        "workspace": rt.workspace_blocks * block_acts / _MB,
        "io": _F32 * tokens * cost.hidden_size * (3 if align else 2) / _MB,
        "runtime": rt.fixed_mb + PYTHON_MB,
    }


def memory_mb(cost: ModelCost, s: int, **kwargs: Any) -> float:
    """Total of :func:`memory_breakdown_mb` (same arguments)."""
    return sum(memory_breakdown_mb(cost, s, **kwargs).values())


def largest_split(cost: ModelCost, budget_mb: float, **kwargs: Any) -> int | None:
    """The most blocks a head may have and still train within ``budget_mb`` (None: not even one);
    ``kwargs`` as for :func:`memory_breakdown_mb`. Memory grows with the split, so it is the last that fits."""
    fits = [s for s in range(1, cost.num_blocks) if memory_mb(cost, s, **kwargs) <= budget_mb]
    return fits[-1] if fits else None
