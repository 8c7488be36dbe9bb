"""Personalized-FL baselines beside FlexP-SFL, on the same engine, data and wire (issue 18).

- :class:`FedPer` (Arivazhagan et al., 2019): the whole model trains on the device, as FedAvg;
  the *task head* (everything after the last block: final norm or pooler, classifier) is
  personal. Each round the server sends the global body only, so a client keeps its own head and
  takes the new body; the server averages every uploaded tensor (sample-weighted), bodies for the
  next round and heads only for the global model's own evaluation.

Not here yet (issue 18, item 5): FedRep (FedPer with the head trained to convergence before the
body each round — a device-side schedule the whole-model trainer does not have) and Ditto (a
second, proximal personal model on the device). The floor "global model + the client's label
prior" is evaluated for every strategy (:func:`flexsfl.sim.evaluation.label_prior_accuracies`).

The maths are free functions tested against numpy; the classes only say what a round sends.
:data:`BASELINES` adds itself to :data:`flexsfl.server_backend.strategy.STRATEGIES` (which imports this module).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flexsfl.core.wire import RoundMode
from flexsfl.server_backend.aggregation import ClientUpdate, fedavg
from flexsfl.server_backend.strategy import STRATEGIES, RoundPlan, Strategy, StrategyHost

__all__ = ["personal_head_names", "shared_state", "FedPer", "BASELINES"]


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


BASELINES: dict[str, type[Strategy]] = {s.name: s for s in (FedPer,)}
STRATEGIES.update(BASELINES)  # strategy.py imports this module last, so every registry user sees them
