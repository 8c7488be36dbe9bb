"""Personalized-FL baselines beside FlexP-SFL, on the same engine, data and wire (issue 18).

- :class:`FedPer` (Arivazhagan et al., 2019): the whole model trains on the device, as FedAvg;
  the *task head* (everything after the last block: final norm or pooler, classifier) is
  personal. Each round the server sends the global body only, so a client keeps its own head and
  takes the new body; the server averages every uploaded tensor (sample-weighted), bodies for the
  next round and heads only for the global model's own evaluation.

- :class:`FedRep` (Collins et al., 2021): FedPer's rounds and aggregation, but the device spends
  its ``local_steps`` in two phases: the first ``fedrep_head_steps`` train its own task head alone
  (body frozen), the rest the body alone (head frozen); the server averages the bodies.
- :class:`Ditto` (Li et al., 2021): the global model trains as FedAvg (sent whole, trained
  ``local_steps``, uploaded, averaged); each device also keeps a personal model ``v_k`` (whole
  model, LoRA adapters + task head), trained ``local_steps`` more per round on
  ``L(v_k) + ditto_mu/2 ‖v_k − w‖²`` against the round's global ``w``. Personal accuracy is
  ``v_k``'s; global accuracy the averaged ``w``'s. A round costs the device ``2 · local_steps``.

The device side of each is a ``local_rule`` of :class:`~flexsfl.sim.full_trainer.FullModelTrainer`
(sent in every RoundConfig). The floor "global model + the client's label prior" is evaluated
for every strategy (:func:`flexsfl.sim.evaluation.label_prior_accuracies`).

The maths are free functions tested against numpy; the classes only say what a round sends.
:data:`BASELINES` adds itself to :data:`flexsfl.server_backend.strategy.STRATEGIES` (which imports this module).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flexsfl.core.errors import ConfigError
from flexsfl.core.wire import RoundMode
from flexsfl.server_backend.aggregation import ClientUpdate, fedavg
from flexsfl.server_backend.strategy import STRATEGIES, FedAvg, RoundPlan, Strategy, StrategyHost, TrainConfig

__all__ = ["personal_head_names", "shared_state", "check_fedrep_steps", "FedPer", "FedRep", "Ditto", "BASELINES"]


def personal_head_names(blocks: Mapping[str, int], num_blocks: int) -> set[str]:
    """The tensors past the last block (``blocks[name] == num_blocks``): the task head FedPer keeps personal."""
    return {n for n, j in blocks.items() if j == num_blocks}


def shared_state(state: Mapping[str, np.ndarray], personal: set[str]) -> dict[str, np.ndarray]:
    """``state`` without the ``personal`` tensors: what a FedPer round sends."""
    return {n: a for n, a in state.items() if n not in personal}


class FedPer(Strategy):
    """FedPer: whole model on the device, personal task head, the body averaged (see the module)."""

    name = "fedper"
    mode = RoundMode.FULL
    personal = False  # every round the client takes what is sent (the body); the head it keeps is never sent

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        return self._round_plan(shared_state(host.state(), personal_head_names(host.blocks, host.info.num_blocks)), 0.0)

    def aggregate(self, round_id: int, host: StrategyHost, updates: Mapping[str, ClientUpdate]) -> None:
        if updates:
            host.load_state(fedavg([(u.params, u.num_samples) for u in updates.values()], self.cfg.aggregation))


def check_fedrep_steps(head_steps: int, local_steps: int) -> None:
    """Refuse a FedRep round whose head phase leaves the body no step (ConfigError, one line)."""
    if not 0 <= head_steps < local_steps:
        raise ConfigError(f"fedrep_head_steps ({head_steps}) must be >= 0 and below local_steps ({local_steps}) so the "
                          "body trains too: lower --fedrep-head-steps or raise --local-steps")


class FedRep(FedPer):
    """FedRep: FedPer with the device's steps split into a head phase and a body phase (see the module)."""

    name = "fedrep"

    def __init__(self, cfg: TrainConfig) -> None:
        check_fedrep_steps(cfg.fedrep_head_steps, cfg.local_steps)
        super().__init__(cfg)

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        return self._round_plan(shared_state(host.state(), personal_head_names(host.blocks, host.info.num_blocks)), 0.0,
                                local_rule="fedrep", head_steps=self.cfg.fedrep_head_steps)


class Ditto(FedAvg):
    """Ditto: FedAvg of the global model, plus a proximal personal model on every device (see the module)."""

    name = "ditto"
    uploads_own_model = False  # the upload is w_k; the personal v_k stays on the device

    def plan(self, round_id: int, client_id: str, split: int, host: StrategyHost, top: int | None = None) -> RoundPlan:
        return self._round_plan(host.state(), 0.0, local_rule="ditto", prox_mu=self.cfg.ditto_mu)


BASELINES: dict[str, type[Strategy]] = {s.name: s for s in (FedPer, FedRep, Ditto)}
STRATEGIES.update(BASELINES)  # strategy.py imports this module last, so every registry user sees them
