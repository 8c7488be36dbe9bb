"""Resource-aware split selection: how many blocks each device trains (FlexP-SFL's "flexible" part).

For a client with device profile ``P`` and a candidate split ``s`` (its head is the embeddings
and blocks ``1..s``; batch ``B``, sequence length ``T``, everything fp32)::

    memory(s) = 4 B · (embedding + w · s · block parameters)         frozen weights
              + 4 B · s · LoRA parameters · (2 + optimizer states)   adapters + gradients + SGD 0 / momentum 1 / AdamW 2
              + copies · 4 B · B · T · s · saved(T)                  activations the backward reads
              + workspace · 4 B · B · T · saved(T)                   the runtime's transient buffers
              + 4 B · B · T · d · (2, or 3 with alignment)           Z, the server's gradient G (and Z')
              + runtime + Python                                     fixed

    time(s)   = head FLOPs(s) / P.head_gflops                        the device, at its measured rate
              + |Z| / uplink + |g| / downlink + RTT                  the network, in the transfer encoding
              + tail FLOPs(s) / (server_gflops / clients)            the server, at this client's share

with the block weights' copies ``w``, ``copies``, ``workspace`` and the fixed part per runtime
(:data:`RUNTIMES`, below), and ``s_k = argmin time(s)`` subject to ``memory(s) <= P.memory_budget_mb``; splits whose times
agree to :data:`TIE_RTOL` count as equal and the smaller wins (less device memory). The user
can pin ``s_k``; a pinned split that does not fit is refused.

**What makes it a trade-off.** ``Z`` is ``[B, T, d]`` at every split of a transformer, so the
network term does not depend on ``s`` (the per-round adapter exchange grows with ``s`` but is
tiny: MiniLM's r=8 q/v adapters are 49 KB per block). Moving one block from the server to the
device changes the step time by ``block FLOPs · (1 / head_gflops − clients / server_gflops)``:
the device competes with its *share* of the server, which runs the tails of every client it
hosts at once. A 200 GFLOP/s server with 16 concurrent clients gives each 12.5 GFLOP/s; a
Raspberry Pi 4 (≈ 4 GFLOP/s) is slower than that and keeps one block, a Jetson Orin is faster
and takes as many blocks as its memory allows. ``time(s)`` is linear in ``s``, so the best split
is the smallest one or the largest that fits: the memory budget is what spreads fast devices
over different splits, and a busier server (more clients) pushes every device's split up.

**FLOPs** per token and block (``T`` keys per query, attention width ``qd = h·hd``, ``P_mm``
the block's matmul weights, ``P_lora`` its LoRA weights)::

    forward  = 2·P_mm + 4·T·qd + 2·P_lora
    backward = 2·P_mm + 8·T·qd + 4·P_lora      (every block but the head's first)

Base weights are frozen, so the backward only propagates activation gradients through them
(1× their forward cost, not the 2× of full training); ``QKᵀ`` and ``PV`` multiply two
activations and need both gradients (2×); LoRA needs input and weight gradients (2×).

**Saved activations** per token and block, ``saved(T)``: what the forward program of
:mod:`flexsfl.export.programs` hands to its backward program (transformers 5.24, eager attention)::

    bert    3·qd + 2·d +   dff + 4 + h·T         Q, K, V, P; both LayerNorm inputs (+ mean, 1/σ); the GELU input
    gpt2    3·qd + 2·d + 4·dff + 4 + h·T         likewise; gelu_new's tanh formula keeps four [T, dff] tensors
    llama   qd + 2·kvd + 2·d + 3·dff + 2 + h·T   Q, K and V before GQA's repeat, P; RMSNorm inputs (+ 1/rms); gate, up, silu(gate)
    + per LoRA'd linear: r (x·Aᵀ), and each distinct input of a LoRA'd linear once (d, or dff for the down projection)

The head's first block needs no gradient for its input, so it keeps and computes less: a tensor
needs a gradient only downstream of a LoRA weight there. :meth:`ModelCost._backward` follows
that through each family's block, so both counts are exact for any LoRA targets: FLOPs equal
what ``torch.utils.flop_counter`` counts on the real head and tail, and saved values equal the
real programs' outputs (tested). Lookups, norms and pointwise ops are not counted in FLOPs:
``head_gflops`` is measured against this same count
(:func:`flexsfl.edge_runtime.probe.measure_head_throughput`), so their cost is folded into the rate.

**Runtimes** (:data:`RUNTIMES`). The constants are fitted to the peak resident set of MiniLM's
head at splits 1, 3 and 5 (batch 8, seq 128, one thread, x86-64, Python 3.11); the model is
within 9 % of each of the nine measurements::

    runtime                               fixed    measured peak MB (s = 1, 3, 5)   model
    ort (onnxruntime 1.32, no torch)       45 MB   246, 448, 537                    265, 408, 552
    executorch 1.5.1 (XNNPACK delegate)   330 MB   576, 737, 925                    591, 752, 914
    torch 2.13 eager (reference)          385 MB   555, 643, 746                    555, 640, 725

The edge process itself (Python, numpy, tokenizers, websockets, safetensors) is 34 MB
(:data:`PYTHON_MB`). ONNX Runtime and ExecuTorch both load each block's weights twice (the
backward program needs them too). ONNX Runtime holds the saved activations about 2.6 times (its
arena grows in steps); ExecuTorch three times (the forward's planned arena, the outputs copied
to Python, the backward's planned inputs), and it plans memory for the bundle's
``max_batch × max_seq`` whatever the batch, so plan with those. ExecuTorch's Python bindings link
libtorch: 325 MB on import. (On x86, the ``onnxruntime-training`` 1.19.2 wheel imports torch
when torch is installed, 255 MB more; a device runs the plain ``onnxruntime`` wheel, as
measured here.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import pathlib
from typing import Any, Iterable, Mapping

from flexsfl.core.bundle import Manifest
from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import DeviceProfile, read_profile
from flexsfl.core.wire.tensors import ENCODINGS, payload_nbytes
from flexsfl.core.models import DEFAULT_TARGETS, resolve_model

__all__ = [
    "FAMILIES",
    "OPTIMIZER_STATES",
    "Runtime",
    "RUNTIMES",
    "PYTHON_MB",
    "DEFAULT_SERVER_GFLOPS",
    "DEFAULT_CLIENTS",
    "TIE_RTOL",
    "EXAMPLE_PROFILES",
    "ModelCost",
    "SplitEstimate",
    "SplitChoice",
    "read_model_config",
    "config_subset",
    "head_step_flops",
    "tail_step_flops",
    "memory_breakdown_mb",
    "memory_mb",
    "step_time_s",
    "choose_split",
    "add_parser",
    "run",
]

log = logging.getLogger("flexsfl.split")

FAMILIES = ("bert", "gpt2", "llama")
OPTIMIZER_STATES = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}  # fp32 tensors per trainable tensor
PYTHON_MB = 35.0  # interpreter + numpy, tokenizers, websockets, safetensors (34 MB measured)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a training runtime spends device memory besides the embedding (fitted to measured peak RSS)."""

    fixed_mb: float  # the runtime itself and the sessions' own state (Python not included)
    block_weight_copies: int  # how many copies of each block's frozen weights it loads
    activation_copies: float  # how many times the saved activations are resident during a step
    workspace_blocks: float  # transient buffers, in units of one block's saved activations


# Fitted to the peak RSS of MiniLM's head at splits 1, 3 and 5 (batch 8, seq 128, one thread);
# the model is within 9 % of every measurement (see the module docstring).
RUNTIMES = {
    # forward.onnx and backward.onnx share one weights.bin on disk, but each session holds the
    # blocks' weights in memory (the backward transposed, for input gradients); the forward's outputs are copied out of its arena into numpy, and the
    # arena grows in steps.
    "ort": Runtime(fixed_mb=45.0, block_weight_copies=2, activation_copies=2.6, workspace_blocks=3.0),
    # The .pte holds the block weights twice too (XNNPACK packs its own). The forward's planned
    # arena, the outputs copied to Python and the backward's planned inputs each hold the saved
    # activations; memory is planned for the bundle's max batch x max seq, whatever the batch.
    "executorch": Runtime(fixed_mb=330.0, block_weight_copies=2, activation_copies=3.0, workspace_blocks=4.5),
    # Autograd keeps a few extra views. The reference backend loads transformers, peft and the
    # whole model.
    "torch": Runtime(fixed_mb=385.0, block_weight_copies=1, activation_copies=1.6, workspace_blocks=2.0),
}
# A 16-core server CPU reaches ~200 GFLOP/s of fp32 training throughput; 16 clients share it.
DEFAULT_SERVER_GFLOPS = 200.0
DEFAULT_CLIENTS = 16
TIE_RTOL = 1e-9  # relative difference below which two predicted step times are equal
_MB = 1e6
_F32 = 4  # bytes
_WIRE_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}

# HF config keys ModelCost reads, per family (what a bundle must carry to be planned for).
_CONFIG_KEYS = {
    "bert": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "max_position_embeddings", "type_vocab_size"),
    "gpt2": ("n_embd", "n_inner", "n_head", "n_layer", "vocab_size", "n_positions", "tie_word_embeddings"),
    "llama": ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
              "attention_bias", "mlp_bias"),
}
# GGUF metadata key (after "<arch>.") -> HF LlamaConfig key, as transformers' GGUF loader maps them.
_GGUF_LLAMA = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.dimension_count": "head_dim",
    "block_count": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
}


@dataclasses.dataclass(frozen=True)
class _Linear:
    """A linear layer of one block: where PEFT names it, its shape, and the activation it reads."""

    name: str  # module path inside the block ("attention.self.query")
    fan_in: int
    fan_out: int
    bias: bool
    reads: str  # "x" (block input), "ln1"/"ln2" (norm outputs), "ctx" (attention output), "act" (MLP activation)


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """A transformer's shape numbers and what one block costs in parameters, FLOPs and memory.

    Build it with :meth:`from_config` (a Hugging Face ``config.json`` dict) or
    :meth:`from_manifest`; all counts are exact for the bert, gpt2 and llama families of
    transformers 5.x (checked against the loaded modules in the tests).
    """

    family: str  # "bert" | "gpt2" | "llama"
    num_blocks: int  # L
    hidden_size: int  # d: the last dim of the smashed data Z
    intermediate_size: int  # dff: the MLP's inner width
    num_heads: int  # h
    num_kv_heads: int  # llama's grouped-query K/V heads; = h elsewhere
    head_dim: int  # hd; h·hd is the attention width
    vocab_size: int
    max_positions: int
    lora_r: int
    lora_targets: tuple[str, ...]  # PEFT target_modules: module names or their dotted suffixes
    task: str = "seq_cls"  # "seq_cls" | "causal_lm"
    num_labels: int = 2
    type_vocab_size: int = 2  # bert's token-type embeddings
    tie_word_embeddings: bool = True  # decoders' LM head shares the token embedding
    bias: bool = False  # llama attention_bias / mlp_bias (bert and gpt2 always have biases)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model family {self.family!r} is not supported; flexsfl plans for {', '.join(FAMILIES)}")
        for f in ("num_blocks", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_positions", "lora_r", "num_labels"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {f} must be a positive int, got {v!r}")
        if self.num_blocks < 2:
            raise ConfigError(f"model config: {self.num_blocks} block(s) leave no split point; a split needs L >= 2")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: {self.num_heads} heads are not a multiple of {self.num_kv_heads} K/V heads")
        if self.task not in ("seq_cls", "causal_lm"):
            raise ConfigError(f"task must be seq_cls or causal_lm, got {self.task!r}")
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty; name the block modules that carry LoRA adapters")
        if self.family == "bert" and self.task == "causal_lm":
            raise ConfigError("task causal_lm needs a decoder (gpt2 or llama family), not bert")
        self._lora_linears  # noqa: B018 - resolves the targets now, so a bad one fails at construction

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        task: str = "seq_cls",
        num_labels: int = 2,
        lora_r: int = 8,
        lora_targets: Iterable[str] | None = None,
    ) -> "ModelCost":
        """From a Hugging Face config dict (``config.json``, or :func:`read_model_config`)."""
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(f"model config: model_type {family!r} is not supported; flexsfl plans for {', '.join(FAMILIES)}")

        def need(key: str) -> Any:
            if config.get(key) is None:
                raise ConfigError(f"model config: missing {key!r} for a {family} model; is this a complete config.json?")
            return config[key]

        if family == "gpt2":
            d, h = need("n_embd"), need("n_head")
            dims = dict(num_blocks=need("n_layer"), hidden_size=d, intermediate_size=config.get("n_inner") or 4 * d,
                        num_heads=h, num_kv_heads=h, head_dim=d // h, max_positions=need("n_positions"),
                        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))
        else:
            d, h = need("hidden_size"), need("num_attention_heads")
            dims = dict(num_blocks=need("num_hidden_layers"), hidden_size=d, intermediate_size=need("intermediate_size"),
                        num_heads=h, num_kv_heads=config.get("num_key_value_heads") or h,
                        head_dim=config.get("head_dim") or d // h, max_positions=need("max_position_embeddings"))
            if family == "bert":
                dims["type_vocab_size"] = config.get("type_vocab_size", 2)
            else:
                dims["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
                if bool(config.get("attention_bias")) != bool(config.get("mlp_bias")):
                    raise ConfigError(
                        "model config: attention_bias and mlp_bias differ; flexsfl's cost model needs both or neither"
                    )
                dims["bias"] = bool(config.get("attention_bias"))
        return cls(
            family=family, vocab_size=need("vocab_size"), lora_r=lora_r,
            lora_targets=tuple(lora_targets or DEFAULT_TARGETS[family]), task=task, num_labels=num_labels, **dims,
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ModelCost":
        """From a bundle: its LoRA settings and task, and the model's config.

        The config comes from ``manifest.extra["model_config"]`` (see :func:`config_subset`),
        else from the model the bundle names, when it is installed here.
        """
        config = manifest.extra.get("model_config")
        if config is None:
            try:
                config = read_model_config(manifest.model.id)
            except ConfigError as e:
                raise ConfigError(
                    f"bundle has no extra.model_config and its model is not readable here ({e}); "
                    "re-export the bundle with this flexsfl version"
                ) from None
        m = manifest.model
        return cls.from_config(config, task=m.task, num_labels=m.num_labels if m.task == "seq_cls" else 2,
                               lora_r=manifest.lora.r, lora_targets=manifest.lora.target_modules)

    # --- structure ---------------------------------------------------------------------------

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim

    @functools.cached_property
    def _linears(self) -> tuple[_Linear, ...]:
        d, dff, qd, kvd = self.hidden_size, self.intermediate_size, self.attention_width, self.num_kv_heads * self.head_dim
        if self.family == "bert":
            return (
                _Linear("attention.self.query", d, qd, True, "x"),
                _Linear("attention.self.key", d, qd, True, "x"),
                _Linear("attention.self.value", d, qd, True, "x"),
                _Linear("attention.output.dense", qd, d, True, "ctx"),
                _Linear("intermediate.dense", d, dff, True, "ln1"),
                _Linear("output.dense", dff, d, True, "act"),
            )
        if self.family == "gpt2":  # Conv1D layers, fused q/k/v
            return (
                _Linear("attn.c_attn", d, 3 * qd, True, "ln1"),
                _Linear("attn.c_proj", qd, d, True, "ctx"),
                _Linear("mlp.c_fc", d, dff, True, "ln2"),
                _Linear("mlp.c_proj", dff, d, True, "act"),
            )
        b = self.bias
        return (
            _Linear("self_attn.q_proj", d, qd, b, "ln1"),
            _Linear("self_attn.k_proj", d, kvd, b, "ln1"),
            _Linear("self_attn.v_proj", d, kvd, b, "ln1"),
            _Linear("self_attn.o_proj", qd, d, b, "ctx"),
            _Linear("mlp.gate_proj", d, dff, b, "ln2"),
            _Linear("mlp.up_proj", d, dff, b, "ln2"),
            _Linear("mlp.down_proj", dff, d, b, "act"),
        )

    @functools.cached_property
    def _lora_linears(self) -> tuple[_Linear, ...]:
        """The block linears PEFT puts adapters on: a target matches a module whose name is it or ends in ``.target``."""
        hit = []
        for t in self.lora_targets:
            matched = [lin for lin in self._linears if lin.name == t or lin.name.endswith("." + t)]
            if not matched:
                names = ", ".join(lin.name for lin in self._linears)
                raise ConfigError(f"LoRA target {t!r} matches no linear layer of a {self.family} block (they are: {names})")
            hit.extend(m for m in matched if m not in hit)
        return tuple(hit)

    @property
    def block_params(self) -> int:
        """Frozen parameters of one block (weights, biases, norms; LoRA not included)."""
        norms = 2 * self.hidden_size if self.family == "llama" else 4 * self.hidden_size  # RMSNorm: weight only
        return sum(lin.fan_in * lin.fan_out + (lin.fan_out if lin.bias else 0) for lin in self._linears) + norms

    @property
    def block_matmul_params(self) -> int:
        return sum(lin.fan_in * lin.fan_out for lin in self._linears)

    @property
    def lora_params_per_block(self) -> int:
        return sum(self.lora_r * (lin.fan_in + lin.fan_out) for lin in self._lora_linears)

    @property
    def embedding_params(self) -> int:
        d = self.hidden_size
        if self.family == "bert":  # word + position + token type embeddings, then a LayerNorm
            return (self.vocab_size + self.max_positions + self.type_vocab_size) * d + 2 * d
        if self.family == "gpt2":
            return (self.vocab_size + self.max_positions) * d
        return self.vocab_size * d

    @property
    def final_params(self) -> int:
        """What follows the last block: final norm (or BERT's pooler) and the task head."""
        d, c = self.hidden_size, self.num_labels
        if self.family == "bert":  # pooler dense + classifier
            return d * d + d + d * c + c
        norm = 2 * d if self.family == "gpt2" else d
        if self.task == "seq_cls":
            return norm + d * c  # score, no bias
        return norm + (0 if self.tie_word_embeddings else self.vocab_size * d)

    @property
    def total_params(self) -> int:
        """Every parameter of the task model without LoRA (what ``sum(p.numel())`` counts)."""
        return self.embedding_params + self.num_blocks * self.block_params + self.final_params

    # --- per-token costs of one block ----------------------------------------------------------

    def forward_flops(self, seq: int) -> float:
        """FLOPs per token of one block's forward with ``seq`` keys per query."""
        return 2 * self.block_matmul_params + 4 * seq * self.attention_width + 2 * self.lora_params_per_block

    def backward_flops(self, seq: int, *, first: bool = False) -> float:
        """FLOPs per token of one block's backward: activation grads through frozen weights, LoRA grads.

        ``first``: the head's first block, whose input needs no gradient (see :meth:`_backward`).
        """
        return self._backward(seq, grad_in=not first)[1]

    def final_flops(self, seq: int) -> float:
        """FLOPs per token of the server's norm + task head, forward and backward."""
        d, c = self.hidden_size, self.num_labels
        if self.family == "bert":  # pooler + classifier on the [CLS] token only: fwd, grad of input, grad of classifier
            pooler_lora = any(t in ("dense", "pooler.dense") for t in self.lora_targets)  # PEFT's match on "pooler.dense"
            return (2 * (d * d + d * c) * 2 + 2 * d * c + (12 * self.lora_r * d if pooler_lora else 0)) / seq
        if self.task == "seq_cls":  # score runs on every position before the last one is picked
            return 2 * d * c * 3
        return 2 * d * self.vocab_size * 2  # frozen LM head: forward + input gradient

    def saved_floats(self, seq: int, *, first: bool = False) -> float:
        """fp32 values per token one block keeps from its forward for its backward (``first``: the head's first block)."""
        size = {"x": self.hidden_size, "ln1": self.hidden_size, "ln2": self.hidden_size, "ctx": self.attention_width,
                "act": self.intermediate_size}
        lora = self._lora_linears
        # Each LoRA'd linear keeps its input (for dA; once per distinct input) and x·Aᵀ (for dB).
        lora_inputs = sum(size[r] for r in {lin.reads for lin in lora}) + self.lora_r * len(lora)
        return self._backward(seq, grad_in=not first)[0] + lora_inputs

    def cls_block_flops(self, seq: int) -> float:
        """FLOPs per sequence of BERT's last block when only position 0 feeds the pooler (forward +
        backward): keys and values for every position, everything else for one (see ``Tail``)."""
        rows = {"attention.self.key": seq, "attention.self.value": seq}
        lora = {lin.name for lin in self._lora_linears}
        forward = 4 * seq * self.attention_width  # one query's scores and weighted values
        for lin in self._linears:
            n = rows.get(lin.name, 1)
            forward += n * 2 * lin.fan_in * lin.fan_out + (n * 2 * self.lora_r * (lin.fan_in + lin.fan_out) if lin.name in lora else 0)
        return forward + self._backward(seq, grad_in=True, rows=rows)[1]

    def _backward(self, seq: int, *, grad_in: bool, rows: Mapping[str, int] | None = None) -> tuple[float, float]:
        """(values kept per token, backward FLOPs per token) of one block, following which tensors need a gradient.

        A tensor needs one when it depends on a LoRA weight or on a block input that does
        (``grad_in``: every block but the head's first). An op keeps what its backward reads
        for the gradients needed (a frozen linear keeps nothing, ``QKᵀ`` keeps K for dQ and Q
        for dK, softmax and ``PV`` keep P, ``PV`` keeps V for dP, norms keep their input and
        statistics, activations their inputs), and its backward computes only those gradients.
        LoRA inputs are counted by :meth:`saved_floats`. ``rows`` (BERT's position-0 last block):
        per-sequence counts instead, with each linear run on ``rows[name]`` positions (default 1)
        and one query position in the attention.
        """
        d, dff, qd, r = self.hidden_size, self.intermediate_size, self.attention_width, self.lora_r
        kvd = self.num_kv_heads * self.head_dim
        lora = {lin.name for lin in self._lora_linears}
        by_name = {lin.name: lin for lin in self._linears}
        saved = flops = 0.0

        def linear(name: str, g_in: bool) -> bool:  # -> whether its output needs a gradient
            nonlocal flops
            lin = by_name[name]
            n = rows.get(name, 1) if rows else 1
            flops += n * 2 * lin.fan_in * lin.fan_out if g_in else 0  # dX through the frozen weight
            if name in lora:  # dB, d(x·Aᵀ), dA (+ dX through A)
                flops += n * (2 * r * (2 * lin.fan_out + lin.fan_in) + (2 * r * lin.fan_in if g_in else 0))
            return g_in or name in lora

        def attention(qg: bool, kg: bool, vg: bool) -> bool:
            nonlocal saved, flops
            pg = qg or kg
            saved += (kvd if qg else 0) + (qd if kg else 0) + (self.num_heads * seq if pg or vg else 0) + (kvd if pg else 0)
            flops += 2 * seq * qd * (qg + kg + pg + vg)  # dQ, dK of QKᵀ; dP, dV of PV
            return pg or vg

        def norm(g: bool, stats: int) -> bool:  # keeps its input and its statistics
            nonlocal saved
            saved += d + stats if g else 0
            return g

        f = self.family
        if f == "bert":  # post-norm: attention, add & LayerNorm, MLP, add & LayerNorm
            qkv = [linear(f"attention.self.{m}", grad_in) for m in ("query", "key", "value")]
            h1 = norm(linear("attention.output.dense", attention(*qkv)) or grad_in, 2)
            act = linear("intermediate.dense", h1)
            saved += dff if act else 0  # GELU input
            norm(linear("output.dense", act) or h1, 2)
        elif f == "gpt2":  # pre-norm, fused q/k/v
            qkv = linear("attn.c_attn", norm(grad_in, 2))
            h1 = linear("attn.c_proj", attention(qkv, qkv, qkv)) or grad_in
            act = linear("mlp.c_fc", norm(h1, 2))
            saved += 4 * dff if act else 0  # gelu_new's tanh formula keeps four [T, dff] tensors
            linear("mlp.c_proj", act)
        else:  # llama: pre-RMSNorm, grouped-query attention, gated MLP
            x = norm(grad_in, 1)
            qkv = [linear(f"self_attn.{m}_proj", x) for m in ("q", "k", "v")]
            h1 = norm(linear("self_attn.o_proj", attention(*qkv)) or grad_in, 1)
            gate, up = linear("mlp.gate_proj", h1), linear("mlp.up_proj", h1)
            saved += dff * (2 * gate + up)  # dgate reads gate and up, dup reads silu(gate)
            linear("mlp.down_proj", gate or up)
        return saved, flops


def config_subset(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a HF config dict that :meth:`ModelCost.from_config` reads (for a bundle's manifest)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"model config: model_type {family!r} is not supported; flexsfl plans for {', '.join(FAMILIES)}")
    return {"model_type": family, **{k: config[k] for k in _CONFIG_KEYS[family] if config.get(k) is not None}}


def read_model_config(name_or_path: str) -> dict[str, Any]:
    """The HF config dict of ``minilm``, ``smollm2`` or a model directory, without loading weights or torch."""
    src = resolve_model(name_or_path)
    if src.gguf_file:
        return _gguf_config(src.path / src.gguf_file)
    path = src.path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return config


def _gguf_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/OSError/struct errors for bad files
        raise ConfigError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; flexsfl reads llama GGUF files")
    config: dict[str, Any] = {"model_type": "llama"}
    for key, hf in _GGUF_LLAMA.items():
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None:
            config[hf] = field.contents()
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in reader.fields:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    # As transformers decides it: without an output.weight tensor the LM head is the embedding.
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    return config


# --- the per-split model ----------------------------------------------------------------------


def _check_split(cost: ModelCost, s: int) -> None:
    if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s < cost.num_blocks:
        raise ConfigError(f"split {s!r} is out of range: choose 1..{cost.num_blocks - 1} ({cost.num_blocks} blocks)")


def _check_shape(batch: int, seq: int) -> None:
    if batch < 1 or seq < 2:
        raise ConfigError(f"need batch >= 1 and seq >= 2, got batch {batch}, seq {seq}")


def head_step_flops(cost: ModelCost, s: int, *, batch: int, seq: int, align: bool = False) -> float:
    """FLOPs of one device step: forward + backward of blocks 1..s (+ the forward for Z' if ``align``)."""
    _check_split(cost, s)
    _check_shape(batch, seq)
    forward = s * cost.forward_flops(seq) * (2 if align else 1)
    backward = cost.backward_flops(seq, first=True) + (s - 1) * cost.backward_flops(seq)
    return batch * seq * (forward + backward)


def tail_step_flops(cost: ModelCost, s: int, *, batch: int, seq: int) -> float:
    """FLOPs of the server's part of one step: blocks s+1..L and the task head, forward + backward."""
    _check_split(cost, s)
    _check_shape(batch, seq)
    per_block = cost.forward_flops(seq) + cost.backward_flops(seq)
    if cost.family == "bert" and cost.task == "seq_cls":  # the last block runs position 0 only
        return batch * (seq * ((cost.num_blocks - s - 1) * per_block + cost.final_flops(seq)) + cost.cls_block_flops(seq))
    return batch * seq * ((cost.num_blocks - s) * per_block + cost.final_flops(seq))


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
    _check_split(cost, s)
    _check_shape(batch, seq)
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


def _network_s(cost: ModelCost, profile: DeviceProfile, batch: int, seq: int, encoding: str) -> float | None:
    """Seconds on the wire per step; None when the profile does not know its bandwidth."""
    if encoding not in _WIRE_DTYPE:
        raise ConfigError(f"unknown encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
    if profile.uplink_mbps is None or profile.downlink_mbps is None:
        return None
    z = payload_nbytes(_WIRE_DTYPE[encoding], encoding, (batch, seq, cost.hidden_size))
    up = z + batch * seq  # Z and the attention mask (uint8 on the wire)
    return up * 8 / (profile.uplink_mbps * 1e6) + z * 8 / (profile.downlink_mbps * 1e6) + (profile.rtt_ms or 0.0) / 1e3


def _times(cost, s, profile, batch, seq, server_gflops, clients, encoding, align) -> tuple[float, float | None, float]:
    if profile.head_gflops is None:
        raise ConfigError(
            f"device profile {profile.name!r} has no head_gflops; measure it on the device with "
            "`flexsfl edge probe --bundle B --json FILE`"
        )
    if not server_gflops > 0 or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"need server_gflops > 0 and clients >= 1, got {server_gflops} and {clients}")
    head = head_step_flops(cost, s, batch=batch, seq=seq, align=align) / (profile.head_gflops * 1e9)
    server = tail_step_flops(cost, s, batch=batch, seq=seq) / (server_gflops / clients * 1e9)
    return head, _network_s(cost, profile, batch, seq, encoding), server


def step_time_s(
    cost: ModelCost,
    s: int,
    profile: DeviceProfile,
    *,
    batch: int,
    seq: int,
    server_gflops: float = DEFAULT_SERVER_GFLOPS,
    clients: int = DEFAULT_CLIENTS,
    encoding: str = "fp32",
    align: bool = False,
) -> float:
    """Predicted seconds per training step of split ``s`` on ``profile``'s device.

    Head compute at ``profile.head_gflops`` + Z up and g down in ``encoding`` + RTT + tail
    compute at ``server_gflops / clients``. A profile without bandwidths contributes no
    network time (it is the same at every split, so the choice does not change).
    """
    head, net, server = _times(cost, s, profile, batch, seq, server_gflops, clients, encoding, align)
    return head + (net or 0.0) + server


@dataclasses.dataclass(frozen=True)
class SplitEstimate:
    """Predicted memory and step time of one candidate split."""

    split: int
    memory_mb: float
    fits: bool  # memory_mb <= the profile's budget
    head_s: float  # device compute per step
    network_s: float | None  # Z, mask and g on the wire + RTT; None when the bandwidth is unknown
    server_s: float  # tail compute at this client's share of the server

    @property
    def time_s(self) -> float:
        return self.head_s + (self.network_s or 0.0) + self.server_s

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "time_s": self.time_s}


@dataclasses.dataclass(frozen=True)
class SplitChoice:
    """The chosen split, every candidate's estimate, and why."""

    split: int
    estimates: tuple[SplitEstimate, ...]  # ascending split
    reason: str
    pinned: bool = False
    notes: tuple[str, ...] = ()

    def estimate(self, s: int) -> SplitEstimate:
        for e in self.estimates:
            if e.split == s:
                return e
        raise ConfigError(f"split {s} was not a candidate (candidates: {', '.join(str(e.split) for e in self.estimates)})")

    @property
    def chosen(self) -> SplitEstimate:
        return self.estimate(self.split)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "pinned": self.pinned, "reason": self.reason, "notes": list(self.notes),
                "estimates": [e.to_json() for e in self.estimates]}


def choose_split(
    cost: ModelCost,
    profile: DeviceProfile,
    *,
    batch: int,
    seq: int,
    candidates: Iterable[int] | None = None,
    pin: int | None = None,
    optimizer: str = "sgd",
    runtime: str | None = None,
    server_gflops: float = DEFAULT_SERVER_GFLOPS,
    clients: int = DEFAULT_CLIENTS,
    encoding: str = "fp32",
    align: bool = False,
) -> SplitChoice:
    """The fastest split whose memory fits ``profile.memory_budget_mb``; ties go to the smaller split.

    ``candidates`` defaults to every split point ``1..L-1``; ``runtime`` to the one the profile
    was measured with (``"ort"`` if it does not say). ``pin`` forces a split, which must fit.
    Raises :class:`ConfigError` when nothing fits, saying how much memory the smallest
    candidate needs and which batch size or sequence length would fit.
    """
    runtime = runtime or profile.backend or "ort"
    cands = sorted(set(candidates)) if candidates is not None else list(range(1, cost.num_blocks))
    if not cands:
        raise ConfigError("no candidate splits given")
    for s in cands:
        _check_split(cost, s)
    if pin is not None:
        _check_split(cost, pin)
        if pin not in cands:
            cands = sorted({*cands, pin})
    budget = profile.memory_budget_mb

    def mem(s: int, b: int = batch, t: int = seq) -> float:
        return memory_mb(cost, s, batch=b, seq=t, optimizer=optimizer, runtime=runtime, align=align)

    estimates = []
    for s in cands:
        head, net, server = _times(cost, s, profile, batch, seq, server_gflops, clients, encoding, align)
        m = mem(s)
        estimates.append(SplitEstimate(s, m, m <= budget, head, net, server))
    notes = []
    if estimates[0].network_s is None:
        notes.append("network time not included: the profile has no uplink_mbps/downlink_mbps "
                     "(it is the same at every split, so the choice does not change)")
    if runtime == "executorch":
        notes.append(f"ExecuTorch plans memory for the bundle's max batch x max seq: export with --max-batch {batch} "
                     f"--max-seq {seq} for these numbers to hold")
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        raise ConfigError(_nothing_fits(estimates[0], budget, batch, seq, mem))
    best = fitting[0]
    for e in fitting[1:]:
        if e.time_s < best.time_s * (1 - TIE_RTOL):
            best = e
    if pin is not None:
        e = next(e for e in estimates if e.split == pin)
        if not e.fits:
            fit = ", ".join(str(f.split) for f in fitting)
            where = _fits_at(pin, budget, batch, seq, mem)
            raise ConfigError(
                f"pinned split {pin} needs {e.memory_mb:.0f} MB at batch {batch}, seq {seq} but the budget is "
                f"{budget} MB; splits {fit} fit (fastest: {best.split})" + (f", or split {pin} at {where}" if where else "")
            )
        reason = f"pinned by the user (the fastest split that fits is {best.split}: {best.time_s:.3g} s/step)"
        return SplitChoice(pin, tuple(estimates), reason, pinned=True, notes=tuple(notes))
    reason = _why(profile, best, estimates, budget, server_gflops, clients)
    log.debug("%s: split %d, %s", profile.name, best.split, reason)
    return SplitChoice(best.split, tuple(estimates), reason, notes=tuple(notes))


def _why(profile, best, estimates, budget, server_gflops, clients) -> str:
    share = server_gflops / clients
    reason = f"fastest of the splits that fit {budget} MB ({best.time_s:.3g} s/step)"
    if profile.head_gflops > share:
        reason += (f"; the device ({profile.head_gflops:g} GFLOP/s) is faster than its share of the server "
                   f"({share:g} GFLOP/s), so each block it takes saves time")
        bigger = [e for e in estimates if e.split > best.split and not e.fits]
        if bigger:
            reason += f", up to its memory: split {bigger[0].split} needs {bigger[0].memory_mb:.0f} MB"
    elif profile.head_gflops < share:
        reason += (f"; the device ({profile.head_gflops:g} GFLOP/s) is slower than its share of the server "
                   f"({share:g} GFLOP/s), so it keeps as few blocks as it can")
    return reason


def _fits_at(s: int, budget: float, batch: int, seq: int, mem) -> str:
    """Where split ``s`` would fit: "batch 4 or seq 60", "batch 1 with seq 40", or ""."""
    b = next((b for b in range(batch - 1, 0, -1) if mem(s, b, seq) <= budget), None)
    t = next((t for t in range(seq - 1, 1, -1) if mem(s, batch, t) <= budget), None)
    options = ([f"batch {b}"] if b else []) + ([f"seq {t}"] if t else [])
    if options:
        return " or ".join(options)
    t = next((t for t in range(seq - 1, 1, -1) if mem(s, 1, t) <= budget), None)
    return f"batch 1 with seq {t}" if t else ""


def _nothing_fits(smallest: SplitEstimate, budget: float, batch: int, seq: int, mem) -> str:
    s, need = smallest.split, math.ceil(smallest.memory_mb)
    head = f"no split fits the memory budget of {budget} MB: split {s} needs {need} MB at batch {batch}, seq {seq}"
    where = _fits_at(s, budget, batch, seq, mem)
    if where:
        return f"{head}; it fits at {where}, or with --memory-budget-mb {need}"
    return (f"{head}, and even batch 1, seq 2 needs {math.ceil(mem(s, 1, 2))} MB; raise --memory-budget-mb to {need} "
            "or free memory on the device")


# Illustrative devices for the demo and the docs (typical achieved rates and budgets, not
# measurements), running the plain onnxruntime wheel, which has aarch64 builds. With minilm at
# batch 8, seq 128 and the default server (200 GFLOP/s shared by 16 clients) they land on
# different splits for different reasons: the Pi 4 is slower than its share of the server
# (split 1, although 2 blocks would fit); the Pi 5 is faster, so it wants every block, but it
# shares its RAM with other services and its budget stops it at split 3; the Jetson is faster
# still, with room for every split point (split 5), despite its slow uplink, which costs the
# same at every split.
EXAMPLE_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="rpi4", arch="aarch64", cores=4, memory_mb=4096, memory_budget_mb=400, head_gflops=4.0,
            uplink_mbps=20.0, downlink_mbps=50.0, rtt_ms=15.0, device_model="Raspberry Pi 4 Model B (example)",
            cpu_model="ARM Cortex-A72", backend="ort",
        ),
        DeviceProfile(
            name="rpi5", arch="aarch64", cores=4, memory_mb=8192, memory_budget_mb=450, head_gflops=20.0,
            uplink_mbps=100.0, downlink_mbps=100.0, rtt_ms=5.0, device_model="Raspberry Pi 5 (example)",
            cpu_model="ARM Cortex-A76", backend="ort",
        ),
        DeviceProfile(
            name="jetson-orin", arch="aarch64", cores=6, memory_mb=8192, memory_budget_mb=2048, head_gflops=60.0,
            uplink_mbps=10.0, downlink_mbps=40.0, rtt_ms=40.0, device_model="Jetson Orin Nano 8GB (example)",
            cpu_model="ARM Cortex-A78AE", accelerator="cuda", backend="ort",
        ),
    )
}


# --- flexsfl plan -------------------------------------------------------------------------------


def _profile(arg: str) -> DeviceProfile:
    if arg in EXAMPLE_PROFILES and not pathlib.Path(arg).exists():
        return EXAMPLE_PROFILES[arg]
    return read_profile(arg)


def run(args: argparse.Namespace) -> int:
    """``flexsfl plan``: predict memory and step time of every split for one device; print the choice."""
    profile = _profile(args.profile)
    if args.memory_budget_mb is not None:
        profile = dataclasses.replace(profile, memory_budget_mb=args.memory_budget_mb)
    cost = ModelCost.from_config(
        read_model_config(args.model), task=args.task, num_labels=args.num_labels, lora_r=args.lora_r,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
    )
    choice = choose_split(
        cost, profile, batch=args.batch, seq=args.seq, pin=args.pin, optimizer=args.optimizer, runtime=args.runtime,
        server_gflops=args.server_gflops, clients=args.clients, encoding=args.encoding, align=args.align,
    )
    if args.json:
        print(json.dumps({"model": args.model, "profile": profile.to_json(), "batch": args.batch, "seq": args.seq,
                          **choice.to_json()}, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    runtime = args.runtime or profile.backend or "ort"
    table = Table(title=f"{args.model} ({cost.family}, {cost.num_blocks} blocks) on {profile.name}: batch {args.batch}, "
                        f"seq {args.seq}, {runtime}, budget {profile.memory_budget_mb} MB")
    for col in ("split", "memory MB", "fits", "device s", "network s", "server s", "step s", ""):
        table.add_column(col, justify="right" if col not in ("fits", "") else "left")
    for e in choice.estimates:
        mark = "pinned" if e.split == choice.split and choice.pinned else ("chosen" if e.split == choice.split else "")
        table.add_row(
            str(e.split), f"{e.memory_mb:.0f}", "yes" if e.fits else "no", f"{e.head_s:.3f}",
            "-" if e.network_s is None else f"{e.network_s:.3f}", f"{e.server_s:.3f}", f"{e.time_s:.3f}", mark,
            style="bold" if mark else None,
        )
    console = Console()
    console.print(table)
    console.print(f"split {choice.split}: {choice.reason}", highlight=False)
    for note in choice.notes:
        console.print(f"note: {note}", highlight=False)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``flexsfl plan``."""
    p = sub.add_parser("plan", help="choose a device's split point from its profile: memory and step time per split")
    p.add_argument("--model", required=True, help="minilm, smollm2, or a local Hugging Face model directory")
    p.add_argument("--profile", required=True,
                   help=f"device profile JSON from `flexsfl edge probe --json`, or an example: {', '.join(EXAMPLE_PROFILES)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--pin", type=int, help="use this split (refused if it does not fit the memory budget)")
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=int, help="override the profile's budget")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="sgd", help="on-device optimizer")
    p.add_argument("--runtime", choices=list(RUNTIMES), help="device runtime (default: the profile's backend, else ort)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default="fp32", help="transfer encoding of Z and g")
    p.add_argument("--server-gflops", dest="server_gflops", type=float, default=DEFAULT_SERVER_GFLOPS,
                   help="the server's achieved training throughput")
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="clients the server serves at once")
    p.add_argument("--align", action="store_true", help="alignment on (λ > 0): the device runs a second forward for Z'")
    p.add_argument("--task", choices=["seq_cls", "causal_lm"], default="seq_cls")
    p.add_argument("--num-labels", dest="num_labels", type=int, default=2)
    p.add_argument("--lora-r", dest="lora_r", type=int, default=8)
    p.add_argument("--lora-targets", dest="lora_targets", help="comma-separated module names (default: attention q,v)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    p.set_defaults(func=run)
