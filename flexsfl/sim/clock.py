"""A virtual device clock: how long a federation's rounds would take on the devices it simulates.

Every simulated client runs at *this* machine's speed, so wall time here says nothing about a
Raspberry Pi 4 training a whole model against a Jetson training one block (issue 18). The clock
replays each round on the clients' device profiles instead (:mod:`flexsfl.core.profiles`), with
the planner's cost model (:mod:`flexsfl.core.planner`, :mod:`flexsfl.core.cost`)::

    step_k  = compute_k                      head (and top) FLOPs / profile.head_gflops
            + network_k                      Z up, g down (and H, ∂L/∂H for a U-shaped client) + RTT
            + server_flops_k / share         the server's part of the step at this client's share
    share   = server_gflops / n              n: the selected clients that use the server this round
    client_k = round_k + steps_k · step_k    round_k: φ down, θ_k up, once per round (+ RTT)
    round   = max_k client_k                 a round ends when its slowest selected client ends

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

from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.memory import memory_mb
from flexsfl.core.planner import DEFAULT_SERVER_GFLOPS, WIRE_DTYPES
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.wire.tensors import payload_nbytes

__all__ = ["ClientStep", "RoundTime", "DeviceClock", "round_time", "split_client", "whole_model_client", "run_clients"]

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


def _transfer_s(profile: DeviceProfile, up: float, down: float) -> float:
    """Seconds to send ``up`` bytes and receive ``down`` bytes, plus one RTT; 0 without bandwidths."""
    if profile.uplink_mbps is None or profile.downlink_mbps is None:
        return 0.0
    return up * 8 / (profile.uplink_mbps * 1e6) + down * 8 / (profile.downlink_mbps * 1e6) + (profile.rtt_ms or 0.0) / 1e3


def split_client(client: str, cost: ModelCost, profile: DeviceProfile, split: int, *, batch: int, seq: int,
                 encoding: str = "fp32", align: bool = False, optimizer: str = "sgd", top_flops: float = 0.0,
                 top_bytes: float = 0.0) -> ClientStep:
    """A split-learning client (head on the device, tail on the server), as the planner predicts it.

    Per step: the head's FLOPs (with the Z' forward when ``align``) at ``profile.head_gflops``;
    Z and its mask up, g down in ``encoding`` + RTT (the planner's network term); the tail's FLOPs on
    the server. A U-shaped client adds its top's FLOPs (``top_flops``) on the device and the bytes
    of H down and ∂L/∂H up (``top_bytes``, half each way); its server part is then counted as the
    whole tail, an upper bound on the middle. Per round: the head's adapters down and up.
    """
    if encoding not in WIRE_DTYPES:
        raise ConfigError(f"unknown encoding {encoding!r}; choose one of: {', '.join(WIRE_DTYPES)}")
    z = payload_nbytes(WIRE_DTYPES[encoding], encoding, (batch, seq, cost.hidden_size))
    adapters = _F32 * split * cost.lora_params_per_block
    mem = memory_mb(cost, split, batch=batch, seq=seq, optimizer=optimizer, runtime=profile.backend or "ort", align=align)
    return ClientStep(
        client=client, profile=profile.name,
        compute_s=(head_step_flops(cost, split, batch=batch, seq=seq, align=align) + top_flops) / _rate(profile),
        network_s=_transfer_s(profile, z + batch * seq + top_bytes / 2, z + top_bytes / 2),
        server_flops=tail_step_flops(cost, split, batch=batch, seq=seq),
        round_s=_transfer_s(profile, adapters, adapters), memory_mb=mem, fits=mem <= profile.memory_budget_mb,
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


def run_clients(cfg, splits: list[int]) -> dict[str, ClientStep] | None:
    """Each client's :class:`ClientStep` for a simulated run (a :class:`~flexsfl.sim.config.SimConfig`
    and the splits it ran), from its device profile; None when the run named no profiles (pinned
    splits alone say nothing about the devices). A U-shaped client's top is not counted (yet)."""
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
    for k, (name, s) in enumerate(zip(cfg.profiles, splits)):
        p, cid = EXAMPLE_PROFILES[name], f"c{k}"
        out[cid] = (whole_model_client(cid, cost, p, batch=cfg.batch_size, seq=cfg.max_seq, optimizer=cfg.optimizer) if whole
                    else split_client(cid, cost, p, s, batch=cfg.batch_size, seq=cfg.max_seq, encoding=cfg.encoding,
                                      align=align, optimizer=cfg.optimizer))
    return out
