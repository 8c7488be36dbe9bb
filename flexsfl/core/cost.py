"""What a transformer block costs: parameters, FLOPs and saved activations, exactly (no torch).

:class:`ModelCost` holds a model's shape numbers (from :mod:`flexsfl.core.model_config`);
:func:`head_step_flops` and :func:`tail_step_flops` give one training step's work on the device
and on the server for split ``s`` (the head is the embeddings and blocks ``1..s``).

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

from flexsfl.core.bundle import Manifest
from flexsfl.core.constants import TASKS
from flexsfl.core.errors import ConfigError
from flexsfl.core.model_config import FAMILIES, read_model_config
from flexsfl.core.models import DEFAULT_TARGETS

__all__ = ["ModelCost", "head_step_flops", "tail_step_flops", "check_split", "check_shape"]


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
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
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



def check_split(cost: ModelCost, s: int) -> None:
    if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s < cost.num_blocks:
        raise ConfigError(f"split {s!r} is out of range: choose 1..{cost.num_blocks - 1} ({cost.num_blocks} blocks)")


def check_shape(batch: int, seq: int) -> None:
    if batch < 1 or seq < 2:
        raise ConfigError(f"need batch >= 1 and seq >= 2, got batch {batch}, seq {seq}")


def head_step_flops(cost: ModelCost, s: int, *, batch: int, seq: int, align: bool = False) -> float:
    """FLOPs of one device step: forward + backward of blocks 1..s (+ the forward for Z' if ``align``)."""
    check_split(cost, s)
    check_shape(batch, seq)
    forward = s * cost.forward_flops(seq) * (2 if align else 1)
    backward = cost.backward_flops(seq, first=True) + (s - 1) * cost.backward_flops(seq)
    return batch * seq * (forward + backward)


def tail_step_flops(cost: ModelCost, s: int, *, batch: int, seq: int) -> float:
    """FLOPs of the server's part of one step: blocks s+1..L and the task head, forward + backward."""
    check_split(cost, s)
    check_shape(batch, seq)
    per_block = cost.forward_flops(seq) + cost.backward_flops(seq)
    if cost.family == "bert" and cost.task == "seq_cls":  # the last block runs position 0 only
        return batch * (seq * ((cost.num_blocks - s - 1) * per_block + cost.final_flops(seq)) + cost.cls_block_flops(seq))
    return batch * seq * ((cost.num_blocks - s) * per_block + cost.final_flops(seq))

