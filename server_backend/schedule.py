"""The server's fixed optimizer schedule: one step every ``k`` client steps, in the order received.

The tail (:class:`~.tail_host.TailHost`) and the U-shaped middle (:class:`~.middle_host.MiddleHost`)
share one optimizer over the global model, and one :class:`StepSchedule` decides when it steps:

- client steps are counted in the order the server receives them (a tail step when its ``Z`` and
  labels are trained, a middle step when its ``dL/dH`` is), and cut into **groups** of ``k``
  (``flexsfl serve --server-step-every K``; ``k = 1``, the default, is the paper's sequential
  split learning: one server step per client step);
- the gradients of a group's client steps accumulate; the step is taken when the group's k-th
  client step is done, with the **mean** of their gradients — the objective of a group is the
  mean of its clients' mean losses, so ``k`` does not change the effective learning rate of SGD;
- a group left partial (fewer than ``k`` client steps when the round ends) is stepped by
  :meth:`StepSchedule.take` at the round end, with the mean over the steps it holds.

The count, not arrival timing, decides every step, so the number of server steps and the
weights every client step sees depend only on the sequence of requests: cross-client batching
(:mod:`.compute`) only decides which requests of one group are computed together. A refused
client step (non-finite, wrong shape) counts for nothing.

This module holds only the bookkeeping (no optimizer, no model): :meth:`add` returns the mean
gradient when a group is complete and the host applies it. Not thread-safe: the server calls it
from its one compute thread.
"""

from __future__ import annotations

from typing import Mapping

import torch

from flexsfl.core.errors import ConfigError

__all__ = ["StepSchedule", "check_step_every"]


def check_step_every(k: int) -> int:
    """``k`` if it is a valid group size, else a one-line ConfigError."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"--server-step-every must be an integer >= 1 (client steps per server optimizer step), got {k!r}")
    return k


class StepSchedule:
    """Groups of ``every`` client steps; ``pending`` of the open group are done, ``steps`` groups stepped."""

    def __init__(self, every: int = 1) -> None:
        self.every = check_step_every(every)
        self.pending = 0  # client steps accumulated in the open group
        self.steps = 0  # groups stepped (the optimizer steps taken)
        self._sum: dict[torch.nn.Parameter, torch.Tensor] = {}

    def room(self) -> int:
        """Client steps the open group still takes before its step (1..every)."""
        return self.every - self.pending

    def add(self, grads: Mapping[torch.nn.Parameter, torch.Tensor], clients: int) -> dict | None:
        """Add the summed gradients of ``clients`` (1..room()) client steps of the open group.

        Returns the group's mean gradient (parameter -> tensor) when this completes it — the
        caller must then take the optimizer step with it — else None.
        """
        if not 0 < clients <= self.room():
            raise ValueError(f"{clients} client steps do not fit the open group (room {self.room()})")
        for p, g in grads.items():
            self._sum[p] = self._sum[p] + g if p in self._sum else g
        self.pending += clients
        return self.take() if self.pending == self.every else None

    def take(self) -> dict | None:
        """Close the open group: its mean gradient (None when it holds no client step)."""
        if not self.pending:
            return None
        n, grads = self.pending, self._sum
        self.pending, self._sum = 0, {}
        self.steps += 1
        return grads if n == 1 else {p: g / n for p, g in grads.items()}
