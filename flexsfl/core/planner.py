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
(:data:`flexsfl.core.memory.RUNTIMES`), and ``s_k = argmin time(s)`` subject to ``memory(s) <= P.memory_budget_mb``; splits whose times
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

The parts: :mod:`flexsfl.core.model_config` reads a model's shape, :mod:`flexsfl.core.cost` counts
FLOPs, :mod:`flexsfl.core.memory` predicts memory; this module adds the network and the server
and chooses. ``flexsfl plan`` (:mod:`flexsfl.cli.plan`) prints the result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable

from flexsfl.core.cost import ModelCost, check_split, head_step_flops, tail_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.memory import memory_mb
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.wire.tensors import ENCODINGS, payload_nbytes

__all__ = [
    "DEFAULT_SERVER_GFLOPS",
    "DEFAULT_CLIENTS",
    "TIE_RTOL",
    "WIRE_DTYPES",
    "SplitEstimate",
    "SplitChoice",
    "step_time_s",
    "choose_split",
]

log = logging.getLogger("flexsfl.split")

# A 16-core server CPU reaches ~200 GFLOP/s of fp32 training throughput; 16 clients share it.
DEFAULT_SERVER_GFLOPS = 200.0
DEFAULT_CLIENTS = 16
TIE_RTOL = 1e-9  # relative difference below which two predicted step times are equal
WIRE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}


def _network_s(cost: ModelCost, profile: DeviceProfile, batch: int, seq: int, encoding: str) -> float | None:
    """Seconds on the wire per step; None when the profile does not know its bandwidth."""
    if encoding not in WIRE_DTYPES:
        raise ConfigError(f"unknown encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
    if profile.uplink_mbps is None or profile.downlink_mbps is None:
        return None
    z = payload_nbytes(WIRE_DTYPES[encoding], encoding, (batch, seq, cost.hidden_size))
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
        check_split(cost, s)
    if pin is not None:
        check_split(cost, pin)
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
