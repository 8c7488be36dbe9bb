"""Split selection for the U-shaped topology: how many head blocks ``s`` and top blocks ``u`` a device trains.

A U-shaped client holds the embeddings and blocks ``1..s`` (its head) *and* the last ``u``
blocks + final norm + task head (its top); the server trains the middle ``s+1..L-u``. Per step
the device sends ``Z`` (+ mask), receives ``H``, sends ``dL/dH``, receives ``dL/dZ``: two round
trips instead of head/tail's one, and two more ``[B, T, d]`` transfers (``H↓``, ``dL/dH↑``),
but no labels. For a candidate ``(s, u)``::

    memory(s, u) = memory(s)                                      the head, as :mod:`flexsfl.core.memory`
                 + 4 B · w_top · (u · block parameters + final)   the top's frozen weights (a tied LM head: none, the
                                                                  embedding is stored once)
                 + 4 B · (u · LoRA + task head) · (2 + states)    top adapters, task head, gradients, optimizer state
                 + copies_top · 4 B · B · T · u · saved(T)        the top's activations (every block needs dL/dH)
                 + 4 B · (3 · B · T · V  or  B · C)                logits, their gradient and the copy handed back
                 + io_top · 4 B · B · T · d                       H, dL/dH and the step's [B, T, d] buffers
                 + top_fixed                                      the top's sessions

with ``w_top``, ``copies_top``, ``io_top`` and ``top_fixed`` per runtime
(:data:`flexsfl.core.memory.RUNTIMES`). A BERT classifier's top runs its last block for the [CLS]
position only: that block keeps only the keys and values of every position (``2 · kvd`` per
token, resident once) instead of ``saved(T)``. For ONNX Runtime the constants are fitted to the
measured top (``flexsfl bench top``, MiniLM split 1, u = 0..2, B 4/8 x T 48/128; within 10 % of
every measurement above noise, benchmarks/README §11): its train and eval programs are two
sessions, each loading the top's weights, so ``w_top = 4`` where the head has 1.

    time(s, u)   = (head FLOPs(s) + top FLOPs(u)) / P.head_gflops        the device at its measured rate
                 + (|Z| + mask + |dL/dH|) / uplink + (|H| + |g|) / downlink + 2 · RTT
                 + middle FLOPs(s, u) / (server_gflops / clients)         the server, at this client's share

The top runs in the same process and runtime as the head, one after the other, so the runtime's
fixed cost and its transient workspace are counted once. ``(s_k, u_k) = argmin time`` subject to
``memory <= P.memory_budget_mb``; ties (:data:`~flexsfl.core.planner.TIE_RTOL`) go to the pair
with fewer device blocks, then the smaller ``s``. The user can pin ``s``, ``u`` or both; a pin
that does not fit is refused. Moving a block from the server to the device changes the time by
``block FLOPs · (1 / head_gflops − clients / server_gflops)`` whether it joins the head or the
top, so, as with head/tail, a device slower than its share of the server keeps ``(1, 0)`` and a
faster one takes as many blocks as its memory allows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flexsfl.core.cost import ModelCost, check_shape, check_split, head_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.memory import OPTIMIZER_STATES, RUNTIMES, memory_mb
from flexsfl.core.planner import DEFAULT_CLIENTS, DEFAULT_SERVER_GFLOPS, TIE_RTOL, WIRE_DTYPES, choose_split
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.wire.tensors import ENCODINGS, payload_nbytes

__all__ = ["check_top", "top_step_flops", "middle_step_flops", "top_trainable_params", "top_memory_mb", "step_bytes", "UEstimate", "UChoice",
           "choose_u_split"]

_F32, _MB = 4, 1e6


def check_top(cost: ModelCost, s: int, u: int) -> None:
    """``0 <= u`` and the server keeps at least one block: ``s + u <= L - 1``."""
    check_split(cost, s)
    if not isinstance(u, int) or isinstance(u, bool) or not 0 <= u <= cost.num_blocks - s - 1:
        raise ConfigError(f"top {u!r} does not fit split {s} ({cost.num_blocks} blocks): the server keeps at least one "
                          f"block, choose 0..{cost.num_blocks - s - 1}")


def top_step_flops(cost: ModelCost, u: int, *, batch: int, seq: int) -> float:
    """FLOPs of the top's fused train step: blocks ``L-u+1..L`` and the task head, forward + backward
    down to ``dL/dH`` (BERT classification runs the last block for the [CLS] position only). Equals
    :func:`~flexsfl.core.cost.tail_step_flops` at split ``L-u``, the same layers."""
    check_shape(batch, seq)
    if not 0 <= u < cost.num_blocks:
        raise ConfigError(f"top {u} is out of range: choose 0..{cost.num_blocks - 1}")
    per_block = cost.forward_flops(seq) + cost.backward_flops(seq)
    if cost.family == "bert" and cost.task == "seq_cls" and u:
        return batch * (seq * ((u - 1) * per_block + cost.final_flops(seq)) + cost.cls_block_flops(seq))
    return batch * seq * (u * per_block + cost.final_flops(seq))


def middle_step_flops(cost: ModelCost, s: int, u: int, *, batch: int, seq: int) -> float:
    """FLOPs of the server's middle (blocks ``s+1..L-u``, every position), forward + backward."""
    check_top(cost, s, u)
    check_shape(batch, seq)
    return batch * seq * (cost.num_blocks - s - u) * (cost.forward_flops(seq) + cost.backward_flops(seq))


def top_trainable_params(cost: ModelCost, u: int) -> int:
    """The top's personal values: its blocks' LoRA adapters and the task head's trainable part (a
    classifier's weight, and its bias for BERT; a causal LM's output head is frozen)."""
    if cost.task != "seq_cls":
        return u * cost.lora_params_per_block
    return u * cost.lora_params_per_block + cost.hidden_size * cost.num_labels + (cost.num_labels if cost.family == "bert" else 0)


def top_memory_mb(cost: ModelCost, u: int, *, batch: int, seq: int, optimizer: str = "sgd",
                  runtime: str = "ort") -> dict[str, float]:
    """What the top adds to the head's device memory, in MB per part (see the module docstring)."""
    check_shape(batch, seq)
    if optimizer not in OPTIMIZER_STATES or runtime not in RUNTIMES:
        raise ConfigError(f"unknown optimizer {optimizer!r} or runtime {runtime!r}; choose from "
                          f"{', '.join(OPTIMIZER_STATES)} and {', '.join(RUNTIMES)}")
    rt, tokens, d = RUNTIMES[runtime], batch * seq, cost.hidden_size
    logits = batch * cost.num_labels if cost.task == "seq_cls" else 3 * tokens * cost.vocab_size
    full, cls_only = u, 0.0
    if u and cost.family == "bert" and cost.task == "seq_cls":  # the last block runs [CLS] only: K and V kept
        full, cls_only = u - 1, 2.0 * cost.num_kv_heads * cost.head_dim
    return {
        "top_weights": _F32 * rt.top_weight_copies * (u * cost.block_params + cost.final_params) / _MB,
        "top_adapters": _F32 * top_trainable_params(cost, u) * (2 + OPTIMIZER_STATES[optimizer]) / _MB,
        "top_activations": _F32 * tokens * (rt.top_activation_copies * full * cost.saved_floats(seq) + cls_only) / _MB,
        "top_logits": _F32 * logits / _MB,
        "top_io": rt.top_io_copies * _F32 * tokens * d / _MB,
        "top_runtime": rt.top_fixed_mb,
    }


def step_bytes(cost: ModelCost, *, batch: int, seq: int, encoding: str = "fp32", topology: str = "u") -> tuple[int, int]:
    """``(up, down)`` tensor bytes of one training step (headers not counted): head/tail sends Z,
    the mask (uint8) and the labels (int64) and gets g; U sends Z, the mask and dL/dH and gets H and g."""
    if encoding not in WIRE_DTYPES:
        raise ConfigError(f"unknown encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
    z = payload_nbytes(WIRE_DTYPES[encoding], encoding, (batch, seq, cost.hidden_size))
    if topology == "u":
        return 2 * z + batch * seq, 2 * z
    labels = 8 * batch * (seq if cost.task == "causal_lm" else 1)
    return z + batch * seq + labels, z


@dataclasses.dataclass(frozen=True)
class UEstimate:
    """Predicted memory and step time of one ``(split, top)``."""

    split: int
    top: int
    memory_mb: float
    fits: bool
    device_s: float  # head + top compute per step
    network_s: float | None  # Z, mask, dL/dH up; H, g down; 2 RTT; None when the bandwidth is unknown
    server_s: float  # the middle at this client's share of the server

    @property
    def time_s(self) -> float:
        return self.device_s + (self.network_s or 0.0) + self.server_s

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "time_s": self.time_s}


@dataclasses.dataclass(frozen=True)
class UChoice:
    """The chosen ``(split, top)``, every candidate's estimate, the head/tail best for comparison, and why."""

    split: int
    top: int
    estimates: tuple[UEstimate, ...]  # ascending (split, top)
    reason: str
    head_tail: tuple[int, float] | None  # (split, s/step) head/tail would choose under the same profile; None if none fits
    pinned: tuple[str, ...] = ()  # "split" and/or "top"
    notes: tuple[str, ...] = ()

    @property
    def chosen(self) -> UEstimate:
        return next(e for e in self.estimates if (e.split, e.top) == (self.split, self.top))

    def to_json(self) -> dict[str, Any]:
        return {"topology": "u", "split": self.split, "top": self.top, "pinned": list(self.pinned), "reason": self.reason,
                "notes": list(self.notes), "head_tail": None if self.head_tail is None else
                {"split": self.head_tail[0], "time_s": self.head_tail[1]}, "estimates": [e.to_json() for e in self.estimates]}


def choose_u_split(
    cost: ModelCost,
    profile: DeviceProfile,
    *,
    batch: int,
    seq: int,
    pin_split: int | None = None,
    pin_top: int | None = None,
    optimizer: str = "sgd",
    runtime: str | None = None,
    server_gflops: float = DEFAULT_SERVER_GFLOPS,
    clients: int = DEFAULT_CLIENTS,
    encoding: str = "fp32",
    align: bool = False,
) -> UChoice:
    """The fastest ``(split, top)`` whose memory fits ``profile.memory_budget_mb`` (see the module docstring).

    Raises :class:`ConfigError` (one line) when nothing fits, when the profile has no
    ``head_gflops``, or when a pinned split/top is out of range or does not fit.
    """
    runtime = runtime or profile.backend or "ort"
    if profile.head_gflops is None:
        raise ConfigError(f"device profile {profile.name!r} has no head_gflops; measure it on the device with "
                          "`flexsfl edge probe --bundle B --json FILE`")
    if not server_gflops > 0 or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"need server_gflops > 0 and clients >= 1, got {server_gflops} and {clients}")
    L = cost.num_blocks
    if pin_split is not None:
        check_split(cost, pin_split)
    if pin_top is not None:
        check_top(cost, pin_split if pin_split is not None else 1, pin_top)
    up, down = step_bytes(cost, batch=batch, seq=seq, encoding=encoding, topology="u")
    net = None
    if profile.uplink_mbps is not None and profile.downlink_mbps is not None:
        net = up * 8 / (profile.uplink_mbps * 1e6) + down * 8 / (profile.downlink_mbps * 1e6) + 2 * (profile.rtt_ms or 0) / 1e3
    share = server_gflops / clients * 1e9
    kw = dict(batch=batch, seq=seq)
    estimates = []
    for s in range(1, L):
        head_mem = memory_mb(cost, s, optimizer=optimizer, runtime=runtime, align=align, **kw)
        head_s = head_step_flops(cost, s, align=align, **kw) / (profile.head_gflops * 1e9)
        for u in range(0, L - s):
            m = head_mem + sum(top_memory_mb(cost, u, optimizer=optimizer, runtime=runtime, **kw).values())
            dev = head_s + top_step_flops(cost, u, **kw) / (profile.head_gflops * 1e9)
            estimates.append(UEstimate(s, u, m, m <= profile.memory_budget_mb, dev, net,
                                       middle_step_flops(cost, s, u, **kw) / share))
    pinned = tuple(k for k, v in (("split", pin_split), ("top", pin_top)) if v is not None)
    allowed = [e for e in estimates if (pin_split is None or e.split == pin_split) and (pin_top is None or e.top == pin_top)]
    fitting = [e for e in allowed if e.fits]
    if not fitting:
        smallest = min(allowed, key=lambda e: e.memory_mb)
        what = " and ".join(f"{k} {v}" for k, v in (("split", pin_split), ("top", pin_top)) if v is not None)
        raise ConfigError(
            f"no (split, top){' with ' + what if what else ''} fits the memory budget of {profile.memory_budget_mb} MB: "
            f"({smallest.split}, {smallest.top}) needs {math.ceil(smallest.memory_mb)} MB at batch {batch}, seq {seq}; "
            f"lower --batch/--seq, {'unpin, ' if pinned else ''}or raise --memory-budget-mb to {math.ceil(smallest.memory_mb)}")
    best = fitting[0]
    for e in fitting[1:]:  # ascending (s, u): strictly faster wins; a tie keeps fewer device blocks
        if e.time_s < best.time_s * (1 - TIE_RTOL) or (
                e.time_s <= best.time_s * (1 + TIE_RTOL) and e.split + e.top < best.split + best.top):
            best = e
    try:
        ht = choose_split(cost, profile, batch=batch, seq=seq, optimizer=optimizer, runtime=runtime,
                          server_gflops=server_gflops, clients=clients, encoding=encoding, align=align)
        head_tail = (ht.split, ht.chosen.time_s)
    except ConfigError:
        head_tail = None
    notes = [] if net is not None else ["network time not included: the profile has no uplink_mbps/downlink_mbps "
                                        f"(U moves {up + down} bytes per step against head/tail's "
                                        f"{sum(step_bytes(cost, batch=batch, seq=seq, encoding=encoding, topology='head-tail'))})"]
    reason = _why(profile, best, fitting, estimates, share / 1e9, head_tail, up, down, pinned)
    return UChoice(best.split, best.top, tuple(estimates), reason, head_tail, pinned, tuple(notes))


def _why(profile, best, fitting, estimates, share, head_tail, up, down, pinned) -> str:
    scope = "of the pinned pairs that fit" if pinned else "of the (split, top) pairs that fit"
    why = f"fastest {scope} {profile.memory_budget_mb} MB ({best.time_s:.3g} s/step)"
    if profile.head_gflops < share:
        why += (f"; the device ({profile.head_gflops:g} GFLOP/s) is slower than its share of the server ({share:g} "
                "GFLOP/s), so it keeps as few blocks as it can")
        if best.top and not pinned:  # BERT classification: the top's last block runs the [CLS] position only
            why += (" (a last block on the device runs the [CLS] position only, which costs less than that block "
                    "on the server, where the middle runs every position)")
    elif profile.head_gflops > share:
        why += (f"; the device ({profile.head_gflops:g} GFLOP/s) is faster than its share of the server ({share:g} "
                "GFLOP/s), so each block it takes saves time")
        more = [e for e in estimates if e.split + e.top > best.split + best.top and not e.fits]
        if more and not pinned:
            m = min(more, key=lambda e: e.memory_mb)
            why += f", up to its memory: ({m.split}, {m.top}) needs {m.memory_mb:.0f} MB"
    if head_tail is not None:
        why += (f"; head/tail would take split {head_tail[0]} at {head_tail[1]:.3g} s/step: U adds H down and dL/dH up "
                f"({(up + down) / 1e6:.2f} MB per step in all) and a second round trip, and keeps the labels on the device")
    return why
