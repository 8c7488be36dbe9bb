"""What one registered device may claim in a round, checked against what the server saw.

A client is trusted to hold a valid token, not to tell the truth. The server therefore keeps,
per session and round, a :class:`RoundLedger` of the train steps it served (ids and batch
sizes) and checks each message against it *before* anything changes:

* a train step must carry an id in ``0..τ-1`` not seen before in the round (no extra, replayed
  or out-of-range steps: each one would be an optimizer step on the shared tail);
* an Upload's ``num_samples`` may not exceed the samples the server served the client this round
  (split training), or ``τ × batch`` when the whole model trains on the device (where the server
  sees no steps; the claim is capped there and the cap logged);
* each uploaded tensor's L2 norm must be at most ``factor × max(‖φ_t‖, mean ‖φ‖)``, the global
  adapter the round started from (:func:`check_upload_norms`; the mean covers LoRA B, which
  starts at zero).

A refusal raises a :class:`~flexsfl.core.errors.ProtocolError` naming the field; the server
answers it with an Error and drops the session, and the refused message reaches nothing.

:class:`RateLimit` bounds how often refusals are logged (a token bucket), so a client that
reconnects and misbehaves in a loop cannot fill the disk.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import numpy as np

from flexsfl.core.errors import ErrorCode, OrderError, TensorError

__all__ = ["RoundLedger", "check_upload_norms", "reference_norms", "RateLimit", "MAX_CONNECTIONS", "MAX_UNAUTHENTICATED",
           "HELLO_MAX_BYTES", "STEP_TIMEOUT", "UPLOAD_NORM_FACTOR"]

# The defaults of the server's limits (ServerConfig, `flexsfl serve` flags; docs/security.md).
MAX_CONNECTIONS = 256  # open websocket connections; more are closed at once with 1013
MAX_UNAUTHENTICATED = 32  # of them, connections not welcomed yet
HELLO_MAX_BYTES = 64 << 10  # the largest frame before Welcome (checked from the frame header)
STEP_TIMEOUT = 120.0  # seconds a client in a round may stay silent before it is dropped
UPLOAD_NORM_FACTOR = 100.0  # per-tensor upload norm <= this x the global adapter's; 0 = off


@dataclasses.dataclass
class RoundLedger:
    """One session's round: τ, the batch limit, and the steps and samples the server served."""

    round_id: int
    local_steps: int  # τ
    batch_size: int  # the plan's batch size (the most samples one step may count)
    whole_model: bool = False  # FULL mode: no steps on the wire
    ref_norms: dict[str, float] | None = None  # per-tensor L2 norms of the adapters the round started from
    steps: set[int] = dataclasses.field(default_factory=set)
    samples: int = 0

    def admit_step(self, round_id: int, step_id: int, batch: int) -> None:
        """Count a train step, or raise OrderError (nothing counted) if it is not allowed."""
        if self.whole_model:
            raise OrderError(f"train step {step_id}: this round trains the whole model on the device; no steps are served")
        if round_id != self.round_id:
            raise OrderError(f"train step for round {round_id}, but round {self.round_id} is running")
        if not 0 <= step_id < self.local_steps:
            raise OrderError(f"train step id {step_id} is outside 0..{self.local_steps - 1} (local_steps = {self.local_steps})")
        if step_id in self.steps:
            raise OrderError(f"train step {step_id} of round {round_id} was already served; a step is trained once")
        self.steps.add(step_id)
        self.samples += batch

    def allowed_samples(self) -> int:
        """The most ``num_samples`` an Upload of this round may claim."""
        if self.whole_model:
            return max(self.local_steps * self.batch_size, 1)
        return max(self.samples, 1)  # a client that trained no step reports 1 (never 0)


def reference_norms(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-tensor L2 norms (float64, so huge values do not overflow)."""
    return {n: float(np.linalg.norm(np.asarray(a, dtype=np.float64))) for n, a in tensors.items()}


def check_upload_norms(tensors: Mapping[str, np.ndarray], ref: Mapping[str, float], factor: float) -> None:
    """Raise TensorError if a tensor's norm exceeds ``factor × max(‖ref_t‖, mean ref)``; ``factor <= 0`` disables."""
    if factor <= 0 or not ref:
        return
    floor = sum(ref.values()) / len(ref)
    for name, a in tensors.items():
        bound = factor * max(ref.get(name, 0.0), floor)
        norm = float(np.linalg.norm(np.asarray(a, dtype=np.float64)))
        if not norm <= bound:
            raise TensorError(
                f"Upload tensor {name!r} has norm {norm:.3g}, over {factor:g}x the global adapter's ({bound:.3g}); "
                "refused (--upload-norm-factor)", ErrorCode.BAD_TENSOR,
            )


class RateLimit:
    """A token bucket: :meth:`allow` is True at most ``per_s`` times a second on average (bursts of ``burst``)."""

    def __init__(self, per_s: float, burst: int = 20) -> None:
        self.per_s, self.burst = per_s, burst
        self._tokens = float(burst)
        self._t = time.monotonic()
        self.suppressed = 0  # calls refused since the last allowed one

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.per_s)
        self._t = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
