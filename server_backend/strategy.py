"""Round strategies: small classes with narrow hooks; the round loop is written once, in the server.

A strategy decides who trains in a round (:meth:`Strategy.select`), what each selected client
is told and given (:meth:`Strategy.plan`, abstract), and how the uploads change the global
model (:meth:`Strategy.aggregate`, abstract). Hooks see the server's model only through
:class:`StrategyHost` (the global adapters ``φ``: read them whole or per head, write them back),
never the server or its sessions. The server calls ``plan`` and ``aggregate`` on its compute
thread, one at a time. The maths live in :mod:`.aggregation` as free functions.

- :class:`FlexPSFL`: personal heads kept on the device across rounds, global adapters sent as the
  alignment reference (and as the first personal head), layer-wise aggregation across split
  points. ``align_lambda = 0`` is the ablation. ``alignment`` says where the term is computed:
  ``feature_kl`` on the device at Z, ``logit_kl`` on the server at the tail's logits (the device
  sends Z' with Z; :mod:`.tail_host`). A U-shaped client (``top`` set) is planned and
  aggregated over every block it holds (see :class:`FlexPSFLU`).
- :class:`FlexPSFLU`: FlexP-SFL-U, the label-private U-shaped topology: each client holds its
  head blocks ``[0, s_k)`` *and* its top ``[L - u_k, L)`` + final norm + task head, all personal
  and kept across rounds; the server trains only the middle and never sees a label. Each round
  sends ``φ`` of every block the client holds (alignment reference, first personal model);
  layer-wise aggregation covers head and top blocks and the task head (:func:`.aggregation.holds`).
  The alignment term acts on the head's output as in FlexP-SFL, and with ``align_top`` also at
  the top's input ``H`` (the client's RoundConfig says so). ``logit_kl`` is not offered for U-shaped
  clients: their logits come out of the device's top, whose exported program fuses a hard-label
  cross-entropy; a logit-level term there needs a top program that also takes soft targets
  (the global model's logits for the same batch, which the device does not have either).
- :class:`SplitFed`: SplitFed/SplitLoRA: one split for everyone, no personalization (every round
  starts from the global head), FedAvg of the heads.
- :class:`FedAvg`: FedAvg-LoRA with the whole model on the device (client mode "full").
- :class:`LocalOnly`: every client fine-tunes the whole model alone; nothing is aggregated.
- FedPer, FedRep and Ditto (:mod:`.baselines`) add themselves to :data:`STRATEGIES`.

Device optimizer state, one rule for every strategy: a tensor's state is reset when the server
replaces that tensor and kept while the device continues its own (see
:mod:`flexsfl.sim.full_trainer`; the split devices' HeadTrainer does the same).
"""

from __future__ import annotations

import abc
import dataclasses
import random
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from flexsfl.core.alignment import check_alignment
from flexsfl.core.constants import ALIGN_LAMBDA, DITTO_MU, OPTIMIZERS
from flexsfl.core.errors import ConfigError
from flexsfl.core.wire import RoundMode

from flexsfl.server_backend.aggregation import AGGREGATIONS, ClientUpdate, fedavg, holds, layerwise_fedavg

__all__ = ["TrainConfig", "RoundPlan", "StrategyHost", "Strategy", "FlexPSFL", "FlexPSFLU", "SplitFed", "FedAvg",
           "LocalOnly", "STRATEGIES", "TOPOLOGIES", "make_strategy", "client_params", "every_nth_and_last"]

TOPOLOGIES = ("head-tail", "u")  # head-tail: the server holds the output (and sees labels); u: the device does


def every_nth_and_last(r: int, every: int, rounds: int) -> bool:
    """Whether round ``r`` (0-based) is one of every ``every``-th (the N-th, 2N-th, ...; 0: none) or the
    last of ``rounds`` (0: a run without a round count has no last)."""
    return bool(every and (r + 1) % every == 0) or (rounds > 0 and r == rounds - 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How rounds run. Client-side values travel in each round's RoundConfig."""

    rounds: int = 10  # rounds to run; 0 = until stopped
    clients_per_round: int = 0  # 0 = every connected client
    min_clients: int = 1  # wait for this many before starting a round
    local_steps: int = 10  # tau: client steps per round
    batch_size: int = 8
    lr: float = 1e-3  # client learning rate
    optimizer: str = "sgd"  # client optimizer: sgd | adamw
    align_lambda: float = ALIGN_LAMBDA  # lambda of the alignment term (FlexP-SFL only; baselines send 0)
    round_timeout: float = 600.0  # seconds to wait for uploads; late clients are left out of the round
    aggregation: str = "mean"  # how uploads combine per tensor: mean (sample-weighted) | median | trimmed-mean
    align_top: bool = False  # U-shaped clients: the alignment term also at the top's input H (needs align_lambda > 0)
    alignment: str = "feature_kl"  # where the term is computed: feature_kl (device, at Z) | logit_kl (server, at the logits)
    seed: int = 0  # client sampling
    fedrep_head_steps: int = 5  # FedRep: of each round's local_steps, the first this many train the task head alone
    ditto_mu: float = DITTO_MU  # Ditto: proximal weight of the personal model towards the round's global model
    score_every: int = 1  # the devices score their own test split every N-th round and in the last (RoundConfig.evaluate)

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_clients", "local_steps", "batch_size", "score_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.align_lambda < 0:
            raise ConfigError(f"align_lambda must be >= 0, got {self.align_lambda}")
        if self.ditto_mu < 0 or self.fedrep_head_steps < 0:
            raise ConfigError(f"ditto_mu and fedrep_head_steps must be >= 0, got {self.ditto_mu} and {self.fedrep_head_steps}")
        if self.align_top and not self.align_lambda > 0:
            raise ConfigError("align_top applies the alignment term at the top's input: set align_lambda > 0 too")
        object.__setattr__(self, "alignment", check_alignment(self.alignment, "--align"))
        if self.align_top and self.alignment == "logit_kl":
            raise ConfigError("--align-top is for U-shaped clients, --align logit-kl for head/tail ones: choose one")

    def scores(self, r: int) -> bool:
        """Whether round ``r``'s devices score their own test split: every ``score_every``-th round
        (the N-th, 2N-th, ...) and the last of a run with a round count."""
        return every_nth_and_last(r, self.score_every, self.rounds)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What one selected client receives when a round starts (the server turns it into a
    RoundConfig, followed by an Adapters message when ``adapters`` is not None)."""

    local_steps: int
    batch_size: int
    lr: float
    optimizer: str
    align_lambda: float
    adapters: Mapping[str, np.ndarray] | None  # tensors to download, or None
    mode: RoundMode  # where the model trains: split (head on the device) or full (whole model)
    personal: bool  # the client keeps its own adapters across rounds
    align_top: bool = False  # U-shaped client: the alignment term also at the top's input H
    alignment: str = "feature_kl"  # where the term is computed (RoundConfig.alignment): feature_kl | logit_kl
    local_rule: str = "plain"  # whole-model rounds: how the device spends its steps (constants.LOCAL_RULES)
    head_steps: int = 0  # fedrep: the first head_steps of local_steps train the task head alone
    prox_mu: float = 0.0  # ditto: the personal model's proximal weight


class StrategyHost(Protocol):
    """What a strategy may ask of the server's model: the global adapters ``φ`` (canonical
    names), whole or per head, and a way to replace them. :class:`~.tail_host.TailHost` is one."""

    @property
    def blocks(self) -> Mapping[str, int]:
        """Canonical name -> 0-based block of every tensor of ``φ`` (the task head maps to L)."""
        ...

    @property
    def info(self) -> Any:
        """The model's facts; strategies read ``info.num_blocks`` (L)."""
        ...

    def head_params(self, split: int) -> dict[str, np.ndarray]:
        """``φ``'s tensors in blocks ``0..split-1`` (a copy): what a client's head holds."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Every tensor of ``φ`` (a copy)."""
        ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace ``φ`` with ``state`` (same names and shapes)."""
        ...


class Strategy(abc.ABC):
    """Hooks the server's round loop calls. Subclasses set ``name`` (and ``mode`` / ``personal``
    where they differ) and implement :meth:`plan` and :meth:`aggregate`."""

    name: ClassVar[str]
    mode: ClassVar[RoundMode] = RoundMode.SPLIT  # split: head on device, tail on server; full: whole model on device
    personal: ClassVar[bool] = True  # clients keep their own adapters across rounds
    topologies: ClassVar[tuple[str, ...]] = ("head-tail",)  # the client topologies it can plan (see refuse)
    uploads_own_model: ClassVar[bool] = True  # a client's upload is the model it scores itself with (not so: Ditto)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def select(self, round_id: int, available: Sequence[str]) -> list[str]:
        """The clients that train in ``round_id``: all, or a seeded sample of ``clients_per_round``."""
        ids = sorted(available)
        k = self.cfg.clients_per_round
        if not k or k >= len(ids):
            return ids
        return sorted(random.Random(self.cfg.seed * 1_000_003 + round_id).sample(ids, k))

    def refuse(self, top: int | None) -> str | None:
        """Why a client of this topology (``top``: its u_k if U-shaped, None for head/tail) cannot
        train under this strategy, as one line for the client; None when it can. The server asks
        at Hello."""
        if self.mode is RoundMode.FULL:
            return None  # the whole model trains on the device: the split layout does not matter
        topology = "head-tail" if top is None else "u"
        if topology == "u" and self.cfg.alignment == "logit_kl" and self.cfg.align_lambda > 0:
            return (f"strategy {self.name} aligns at the logits (--align logit-kl), which the server holds only for "
                    "head/tail clients; this client has a U-shaped bundle (--top): export it without --top")
        if topology in self.topologies:
            return None
        if topology == "u":
            return (f"strategy {self.name} trains head/tail clients (labels go to the server); this client has a "
                    "U-shaped bundle (--top): use strategy flexpsfl-u, or export the bundle without --top")
        return (f"strategy {self.name} trains U-shaped clients (labels stay on the device); this client's bundle "
                "has no top: export it with --top U, or use strategy flexpsfl")

    def _round_plan(self, adapters: Mapping[str, np.ndarray] | None, align_lambda: float,
                    align_top: bool = False, alignment: str = "feature_kl", **rule: Any) -> RoundPlan:
        """The round's plan from the config; ``rule``: a whole-model strategy's local_rule, head_steps, prox_mu."""
        c = self.cfg
        return RoundPlan(c.local_steps, c.batch_size, c.lr, c.optimizer, align_lambda, adapters, self.mode, self.personal,
                         align_top, alignment, **rule)

    @abc.abstractmethod
    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        """What ``client_id`` (whose head holds ``split`` blocks and, if U-shaped, whose top holds
        the last ``top`` blocks + task head) is told and given in ``round_id``."""

    @abc.abstractmethod
    def aggregate(self, round_id: int, host: StrategyHost, updates: Mapping[str, ClientUpdate]) -> None:
        """Fold the round's uploads (client id -> update; possibly empty) into ``host``'s ``φ``."""


def client_params(host: StrategyHost, split: int, top: int | None) -> dict[str, np.ndarray]:
    """``φ``'s tensors in every block a client at ``(split, top)`` holds (a copy): its head's, and
    for a U-shaped client (``top`` not None) also its top blocks' and the task head's."""
    if top is None:
        return host.head_params(split)
    L = host.info.num_blocks
    if not (isinstance(top, int) and 0 <= top < L - split):
        raise ConfigError(f"top {top!r} does not fit split {split} of a {L}-block model: choose 0 <= top <= {L - split - 1}")
    state = host.state()
    return {n: state[n] for n, j in host.blocks.items() if holds(j, split, top, L)}


class FlexPSFL(Strategy):
    name = "flexpsfl"
    topologies = TOPOLOGIES  # head/tail and U-shaped clients, in one federation if need be

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        # φ of every block the client holds: the alignment reference every round, the initial θ_k at the first.
        align_top = self.cfg.align_top and top is not None
        alignment = self.cfg.alignment if top is None else "feature_kl"  # U-shaped: refused at Hello if logit_kl
        return self._round_plan(client_params(host, split, top), self.cfg.align_lambda, align_top, alignment)

    def aggregate(self, round_id: int, host: StrategyHost, updates: Mapping[str, ClientUpdate]) -> None:
        host.load_state(layerwise_fedavg(host.state(), host.blocks, list(updates.values()), self.cfg.aggregation,
                                         num_blocks=host.info.num_blocks))


class FlexPSFLU(FlexPSFL):
    """FlexP-SFL-U: FlexP-SFL with every client U-shaped (labels and output layers stay on the device)."""

    name = "flexpsfl-u"
    topologies = ("u",)

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.alignment == "logit_kl" and cfg.align_lambda > 0:
            raise ConfigError("strategy flexpsfl-u cannot align at the logits (--align logit-kl): a U-shaped device's "
                              "logits come from its own top, whose program takes hard labels only; use --align feature-kl")
        super().__init__(cfg)

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        if top is None:
            raise ConfigError(self.refuse(None) or "")
        return super().plan(round_id, client_id, split, host, top)


class SplitFed(FlexPSFL):
    name = "splitfed"
    personal = False  # every round starts from the global head
    topologies = ("head-tail",)

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        if top is not None:
            raise ConfigError(self.refuse(top) or "")
        return self._round_plan(host.head_params(split), 0.0)


class FedAvg(Strategy):
    name = "fedavg"
    mode = RoundMode.FULL
    personal = False

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        return self._round_plan(host.state(), 0.0)

    def aggregate(self, round_id: int, host: StrategyHost, updates: Mapping[str, ClientUpdate]) -> None:
        if updates:
            host.load_state(fedavg([(u.params, u.num_samples) for u in updates.values()], self.cfg.aggregation))


class LocalOnly(Strategy):
    name = "local"
    mode = RoundMode.FULL

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self._started: set[str] = set()

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        # Everyone starts from the same pretrained model; after that nothing is shared.
        first = client_id not in self._started
        self._started.add(client_id)
        return self._round_plan(host.state() if first else None, 0.0)

    def aggregate(self, round_id: int, host: StrategyHost, updates: Mapping[str, ClientUpdate]) -> None:
        return None


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FlexPSFL, FlexPSFLU, SplitFed, FedAvg, LocalOnly)}

# The personalized-FL baselines subclass Strategy above: imported last, they add themselves here.
import flexsfl.server_backend.baselines  # noqa: E402,F401


def make_strategy(name: str, cfg: TrainConfig) -> Strategy:
    try:
        return STRATEGIES[name](cfg)
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
