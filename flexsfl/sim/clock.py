"""A virtual device clock: how long a federation's rounds would take on the devices it simulates.

Every simulated client runs at *this* machine's speed, so wall time here says nothing about a
Raspberry Pi 4 training a whole model against a Jetson training one block (issue 18). The clock
replays each round on the clients' device profiles instead (:mod:`flexsfl.core.profiles`), with
the planner's cost model (:mod:`flexsfl.core.planner`, :mod:`flexsfl.core.cost`)::

    step_k  = compute_k                      head (and top) FLOPs / profile.head_gflops
            + network_k                      Z up, g down + RTT; a U-shaped client: Z and ∂L/∂H up,
                                             H and ∂L/∂Z down + 2 RTT (two round trips)
            + server_flops_k / share         the server's part of the step at this client's share
                                             (the tail; a U-shaped client's middle)
    share   = server_gflops / n              n: the selected clients that use the server this round
    client_k = round_k + steps_k · step_k    round_k: φ down, θ_k up, once per round (+ RTT)
    round   = max_k client_k                 a round ends when its slowest selected client ends

Alignment (``align``): the device's forward of Z' through φ is in ``compute_k``, added to the
step, not overlapped with the wait for ``g`` (an upper bound for ``feature_kl``, whose Z' the
device computes while it waits; exact for ``logit_kl``, whose Z' must exist before Z is sent).
A ``logit_kl`` step also sends Z' up with Z (one more Z-sized upload) and costs the server a
second pass through the tail (the forward of Z' and the KL's backward to Z, counted as one more
tail step: an upper bound).

The server is shared equally among the round's clients for the whole round (the planner's
assumption; a finished client's share is not handed on), so the round time is an upper bound
for a server that rebalances. A whole-model client (FedAvg, local only) computes every block on
the device and sends nothing per step. A client whose predicted memory exceeds its profile's
budget is still timed but marked (``fits = False``): a strategy that needs it cannot run there.

Pure and torch-free: :class:`ClientStep` values in, seconds out.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from flexsfl.core.alignment import check_alignment
from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.memory import memory_mb
from flexsfl.core.planner import DEFAULT_SERVER_GFLOPS, WIRE_DTYPES
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.u_planner import (check_top, middle_step_flops, step_bytes, top_memory_mb, top_step_flops,
                                    top_trainable_params)
from flexsfl.core.wire.tensors import payload_nbytes

__all__ = ["ClientStep", "RoundTime", "DeviceClock", "round_time", "split_client", "u_client", "whole_model_client",
           "run_clients"]

_F32 = 4  # bytes per adapter value on the wire (adapters travel in fp32)


@dataclasses.dataclass(frozen=True)
class ClientStep:
    """One client's predicted costs on its device (seconds and FLOPs)."""

    client: str
    profile: str
    compute_s: float  # per step, on the device: head (and top) forward + backward at the profile's rate
    network_s: float = 0.0  # per step: transfers at the profile's bandwidths + RTT
    server_flops: float = 0.0  # per step: the server's work for this client (its tail or middle)
    round_s: float = 0.0  # per round: adapters down and up (+ RTT)
    memory_mb: float | None = None  # predicted device memory of its training
    fits: bool = True  # memory_mb <= the profile's budget

    def __post_init__(self) -> None:
        for name in ("compute_s", "network_s", "server_flops", "round_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"ClientStep.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RoundTime:
    """One round on the device clock."""

    seconds: float  # when the slowest selected client ends, from the round's start
    per_client: Mapping[str, float]  # each selected client's own time in the round
    straggler: str  # the client that ended last
    unfit: tuple[str, ...] = ()  # selected clients whose training does not fit their profile's memory


def round_time(selected: Iterable[tuple[ClientStep, int]], *, server_gflops: float = DEFAULT_SERVER_GFLOPS) -> RoundTime:
    """The round of ``selected`` (each client's costs and its steps this round); see the module docstring."""
    selected = list(selected)
    if not selected:
        raise ConfigError("a round needs at least one selected client")
    if not server_gflops > 0:
        raise ConfigError(f"server_gflops must be > 0, got {server_gflops}")
    users = sum(1 for c, _ in selected if c.server_flops > 0)
    share = server_gflops * 1e9 / max(users, 1)  # FLOP/s each server user gets
    per = {c.client: c.round_s + steps * (c.compute_s + c.network_s + c.server_flops / share) for c, steps in selected}
    straggler = max(per, key=per.__getitem__)
    return RoundTime(per[straggler], per, straggler, tuple(c.client for c, _ in selected if not c.fits))


class DeviceClock:
    """Virtual time across rounds: :meth:`advance` adds one round, :attr:`now` is the total."""

    def __init__(self, *, server_gflops: float = DEFAULT_SERVER_GFLOPS) -> None:
        self.server_gflops = server_gflops
        self.now = 0.0
        self.rounds: list[RoundTime] = []

    def advance(self, selected: Iterable[tuple[ClientStep, int]]) -> RoundTime:
        r = round_time(selected, server_gflops=self.server_gflops)
        self.now += r.seconds
        self.rounds.append(r)
        return r


def _rate(profile: DeviceProfile) -> float:
    if profile.head_gflops is None:
        raise ConfigError(f"device profile {profile.name!r} has no head_gflops; measure it on the device with "
                          "`flexsfl edge probe --bundle B --json FILE`")
    return profile.head_gflops * 1e9


def _transfer_s(profile: DeviceProfile, up: float, down: float, round_trips: int = 1) -> float:
    """Seconds to send ``up`` bytes and receive ``down`` bytes, plus ``round_trips`` RTTs; 0 without bandwidths."""
    if profile.uplink_mbps is None or profile.downlink_mbps is None:
        return 0.0
    return (up * 8 / (profile.uplink_mbps * 1e6) + down * 8 / (profile.downlink_mbps * 1e6)
            + round_trips * (profile.rtt_ms or 0.0) / 1e3)


def split_client(client: str, cost: ModelCost, profile: DeviceProfile, split: int, *, batch: int, seq: int,
                 encoding: str = "fp32", align: bool = False, optimizer: str = "sgd",
                 alignment: str = "feature_kl") -> ClientStep:
    """A head/tail split-learning client (head on the device, tail on the server), as the planner predicts it.

    Per step: the head's FLOPs (with the Z' forward when ``align``) at ``profile.head_gflops``;
    Z and its mask up, g down in ``encoding`` + RTT (the planner's network term); the tail's FLOPs on
    the server. With ``align`` and ``alignment = "logit_kl"``, Z' goes up too and the server's
    tail runs twice (module docstring). Per round: the head's adapters down and up.
    """
    if encoding not in WIRE_DTYPES:
        raise ConfigError(f"unknown encoding {encoding!r}; choose one of: {', '.join(WIRE_DTYPES)}")
    logit = align and check_alignment(alignment) == "logit_kl"
    z = payload_nbytes(WIRE_DTYPES[encoding], encoding, (batch, seq, cost.hidden_size))
    adapters = _F32 * split * cost.lora_params_per_block
    mem = memory_mb(cost, split, batch=batch, seq=seq, optimizer=optimizer, runtime=profile.backend or "ort", align=align)
    return ClientStep(
        client=client, profile=profile.name,
        compute_s=head_step_flops(cost, split, batch=batch, seq=seq, align=align) / _rate(profile),
        network_s=_transfer_s(profile, z * (2 if logit else 1) + batch * seq, z),
        server_flops=tail_step_flops(cost, split, batch=batch, seq=seq) * (2 if logit else 1),
        round_s=_transfer_s(profile, adapters, adapters), memory_mb=mem, fits=mem <= profile.memory_budget_mb,
    )


def u_client(client: str, cost: ModelCost, profile: DeviceProfile, split: int, top: int, *, batch: int, seq: int,
             encoding: str = "fp32", align: bool = False, optimizer: str = "sgd") -> ClientStep:
    """A U-shaped client (head blocks ``1..split`` and the last ``top`` blocks + task head on the
    device, the middle on the server), as :func:`~flexsfl.core.u_planner.choose_u_split` predicts it.

    Per step: the head's FLOPs (with the Z' forward when ``align``) and the top's fused step at
    ``profile.head_gflops``; Z, its mask and ∂L/∂H up, H and ∂L/∂Z down in ``encoding``, and two
    RTTs (:func:`~flexsfl.core.u_planner.step_bytes`); the middle's FLOPs on the server. Per round:
    the head's and the top's adapters and the task head down and up. Memory: the head's and the top's.
    """
    check_top(cost, split, top)
    runtime = profile.backend or "ort"
    up, down = step_bytes(cost, batch=batch, seq=seq, encoding=encoding, topology="u")
    kw = dict(batch=batch, seq=seq, optimizer=optimizer, runtime=runtime)
    mem = memory_mb(cost, split, align=align, **kw) + sum(top_memory_mb(cost, top, **kw).values())
    personal = _F32 * (split * cost.lora_params_per_block + top_trainable_params(cost, top))
    compute = head_step_flops(cost, split, batch=batch, seq=seq, align=align) + top_step_flops(cost, top, batch=batch, seq=seq)
    return ClientStep(
        client=client, profile=profile.name, compute_s=compute / _rate(profile),
        network_s=_transfer_s(profile, up, down, round_trips=2),
        server_flops=middle_step_flops(cost, split, top, batch=batch, seq=seq),
        round_s=_transfer_s(profile, personal, personal), memory_mb=mem, fits=mem <= profile.memory_budget_mb,
    )


def whole_model_client(client: str, cost: ModelCost, profile: DeviceProfile, *, batch: int, seq: int,
                       optimizer: str = "sgd") -> ClientStep:
    """A client that trains the whole model on the device (FedAvg, local only).

    Per step: every block and the task head, forward + backward, at ``profile.head_gflops``;
    nothing on the wire and no server work. Per round: all adapters and the task head down and
    up. Memory: the planner's head memory extended by one block (it is linear in the split), the
    task head's few parameters left out.
    """
    last = cost.num_blocks - 1
    flops = head_step_flops(cost, last, batch=batch, seq=seq) + tail_step_flops(cost, last, batch=batch, seq=seq)
    runtime = profile.backend or "ort"

    def mem(s: int) -> float:
        return memory_mb(cost, s, batch=batch, seq=seq, optimizer=optimizer, runtime=runtime)

    per_block = (mem(last) - mem(1)) / (last - 1) if last > 1 else mem(1)
    m = mem(last) + per_block
    tensors = _F32 * (cost.num_blocks * cost.lora_params_per_block + cost.final_params)
    return ClientStep(client=client, profile=profile.name, compute_s=flops / _rate(profile),
                      round_s=_transfer_s(profile, tensors, tensors), memory_mb=m, fits=m <= profile.memory_budget_mb)


def run_clients(cfg, splits: list[int], tops: list[int | None] | None = None) -> dict[str, ClientStep] | None:
    """Each client's :class:`ClientStep` for a simulated run (a :class:`~flexsfl.sim.config.SimConfig`,
    the splits it ran and, for U-shaped clients, their tops: a None top or no ``tops`` is a
    head/tail client), from its device profile; None when the run named no profiles (pinned
    splits alone say nothing about the devices)."""
    from flexsfl.core.model_config import read_model_config
    from flexsfl.core.profiles import EXAMPLE_PROFILES
    from flexsfl.core.wire import RoundMode
    from flexsfl.server_backend.strategy import STRATEGIES

    if not cfg.profiles:
        return None
    cost = ModelCost.from_config(read_model_config(cfg.model), task=cfg.task,
                                 **({"num_labels": cfg.num_labels} if cfg.task == "seq_cls" and cfg.num_labels else {}))
    whole = STRATEGIES[cfg.strategy].mode is RoundMode.FULL
    align = cfg.align_lambda > 0 and cfg.strategy.startswith("flexpsfl")
    out = {}
    tops = list(tops) if tops is not None else [None] * len(splits)
    for k, (name, s, u) in enumerate(zip(cfg.profiles, splits, tops)):
        p, cid = EXAMPLE_PROFILES[name], f"c{k}"
        kw = dict(batch=cfg.batch_size, seq=cfg.max_seq, optimizer=cfg.optimizer)
        if whole:
            out[cid] = whole_model_client(cid, cost, p, **kw)
        elif u is None:
            out[cid] = split_client(cid, cost, p, s, encoding=cfg.encoding, align=align, alignment=cfg.alignment, **kw)
        else:
            out[cid] = u_client(cid, cost, p, s, u, encoding=cfg.encoding, align=align, **kw)
    return out
