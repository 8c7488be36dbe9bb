"""The server's side of a U-shaped step (``Hello.top = u >= 0``): the middle, and never a label.

A U-shaped client holds its head (blocks ``0..s-1``) and its top (blocks ``L-u..L-1``, final norm,
task head, the labels and the loss); the server runs only the middle ``s..L-u-1``::

    Activations  (Z, mask)   -> MiddleHost.forward   -> MiddleOutput (H)       # H's graph kept per step
    TopGradients (dL/dH)     -> MiddleHost.backward  -> Gradients   (dL/dZ)   # + the middle's optimizer step
    Activations  eval (Z)    -> MiddleHost.predict   -> MiddleOutput (H)       # the device scores its own top
    Activations  (Z, Z')     -> forward + predict    -> MiddleOutput (H, H')   # --align-top: one compute call

Nothing here can see a label: the session's :class:`~flexsfl.core.wire.Connection` refuses an
Activations that carries labels before the server dispatches it, and these functions take only
``Z``, the mask and ``dL/dH``. The Connection also holds the order (Z -> H -> dL/dH -> dL/dZ,
one step at a time, ids and shapes matching), so what reaches the middle is a well-formed step;
what only the middle knows (a wrong-shape, non-finite or unknown ``dL/dH``, a forward freed at
its deadline, the pending-step bound) comes back as a one-line :class:`TensorError` that changes
nothing, and the server sends it to that client alone.

All torch work runs on the compute worker: train forwards and backwards through its batching
queue (:meth:`ComputeWorker.submit`), so concurrent clients' halves run as one
``MiddleHost.forward_batch`` / ``backward_batch``, the middle stepping under the server's fixed
schedule (``--server-step-every``, counted per dL/dH); evaluation and the rest through
:meth:`ComputeWorker.call`. :meth:`UShaped.expire_loop`
frees the forwards whose ``dL/dH`` is late on a timer, so an idle server does not hold them.
Steps are keyed ``(client id, round id, step id)``; the order of the middle's optimizer steps is
logged as ``batch`` events (as the tail's are) and each forward as a ``u_forward`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

import numpy as np

from flexsfl.core.errors import AuthError, ConfigError, ErrorCode, TensorError
from flexsfl.core.wire import Activations, Gradients, MiddleOutput, TopGradients
from flexsfl.server_backend.aggregation import holds
from flexsfl.server_backend.compute import ComputeWorker
from flexsfl.server_backend.middle_host import MiddleBackward, MiddleForward, MiddleHost, MiddleRequest
from flexsfl.server_backend.state import ServerState

__all__ = ["UShaped", "check_top", "client_specs"]

log = logging.getLogger("flexsfl.server.u")


def check_top(info: Any, split: int, top: int) -> None:
    """Refuse (AuthError, BUNDLE_MISMATCH) a Hello whose ``(split, top)`` leaves the server no middle block."""
    L = info.num_blocks
    if top >= 0 and not top < L - split:
        raise AuthError(f"top {top} does not fit split {split} of {info.id} ({L} blocks): the server's middle "
                        f"(blocks {split}..{L - top - 1}) would be empty; export the bundle with --top <= {L - split - 1}",
                        ErrorCode.BUNDLE_MISMATCH)


def client_specs(params: Mapping[str, Any], blocks: Mapping[str, int], num_blocks: int, split: int,
                 top: int | None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a client at ``(split, top)`` holds and uploads (head, and for a
    U-shaped client its top blocks and the task head), by canonical name."""
    return {n: tuple(params[n].shape) for n, j in blocks.items() if holds(j, split, top, num_blocks)}


class UShaped:
    """The U-shaped steps of every session, over one :class:`MiddleHost` driven from the compute thread."""

    def __init__(self, middle: MiddleHost, worker: ComputeWorker, state: ServerState) -> None:
        self.middle, self.worker, self.state = middle, worker, state

    async def activations(self, s: Any, msg: Activations) -> MiddleOutput:
        """``H`` for a train or eval Activations of session ``s`` (``client_id``, ``split``, ``top``);
        a train step's forward is kept until its TopGradients or its deadline."""
        z, mask = np.asarray(msg.z), np.asarray(msg.attention_mask)
        if msg.mode == "eval":
            try:
                h = await self.worker.call(self.middle.predict, s.split, s.top, z, mask)
            except ConfigError as e:
                raise TensorError(f"eval step {msg.step_id} refused: {e}") from None
            return MiddleOutput(round_id=msg.round_id, step_id=msg.step_id, h=h, encoding=s.conn.encoding)
        key = (s.client_id, msg.round_id, msg.step_id)
        t0 = time.perf_counter()
        req = MiddleRequest(key, s.split, s.top, z, mask)
        if msg.z_ref is None:
            res, h_ref = await self.worker.submit(self.middle.forward_batch, req), None
        else:  # align_top: H and H' in one compute call, so both see the same middle
            res, h_ref = await self.worker.call(self.reference, req, np.asarray(msg.z_ref))
        if res.h is None:
            raise TensorError(f"step {msg.step_id} refused: {res.error}", ErrorCode.NON_FINITE)
        self.state.log("u_forward", client=s.client_id, round=msg.round_id, step=msg.step_id,
                       server_ms=round(1e3 * (time.perf_counter() - t0), 3), held_bytes=self.middle.held_bytes())
        if h_ref is not None:
            self.state.log("u_reference", client=s.client_id, round=msg.round_id, step=msg.step_id)
        return MiddleOutput(round_id=msg.round_id, step_id=msg.step_id, h=res.h, h_ref=h_ref, encoding=s.conn.encoding)

    def reference(self, req: MiddleRequest, z_ref: np.ndarray) -> tuple[MiddleForward, np.ndarray | None]:
        """On the compute thread, for a train step that carries Z' (an align_top round; the
        Connection allows it nowhere else): the step's forward (kept for its backward) and then
        ``H' = middle_φ(Z')`` with no gradient and nothing kept, in one call so that no optimizer
        step of the middle falls between them. ``(forward, None)`` when the forward is refused; a
        Z' the middle refuses, or whose H' is not finite, is refused the same way (the session then
        closes, and :meth:`forget` frees the kept forward)."""
        (res,) = self.middle.forward_batch([req])
        if res.h is None:
            return res, None
        try:
            h_ref = self.middle.predict(req.split, req.top, z_ref, req.attention_mask)  # checks Z' as the forward checks Z
        except ConfigError as e:
            return MiddleForward(None, f"Z': {e}"), None
        if not np.isfinite(h_ref).all():
            return MiddleForward(None, "the middle's output for Z' is not finite"), None
        return res, h_ref

    async def top_gradients(self, s: Any, msg: TopGradients) -> Gradients:
        """``dL/dZ`` for the step ``msg`` names; the middle steps under the schedule. A refused
        ``dL/dH`` is a TensorError and changes nothing."""
        key = (s.client_id, msg.round_id, msg.step_id)
        t0 = time.perf_counter()
        res = await self.worker.submit(self.middle.backward_batch, MiddleBackward(key, np.asarray(msg.grad_h)),
                                       limit=self.middle.host.schedule.room)  # a batch never spans a schedule group
        if res.g is None:
            raise TensorError(f"TopGradients for step {msg.step_id} refused: {res.error}", ErrorCode.BAD_TENSOR)
        ms = round(1e3 * (time.perf_counter() - t0), 3)
        tag = f"{s.client_id}:{msg.round_id}:{msg.step_id}"
        self.state.log("batch", steps=[tag], ms=ms)  # the order of the middle's optimizer steps
        self.state.log("step", client=s.client_id, round=msg.round_id, step=msg.step_id, loss=msg.loss, topology="u",
                       batch=int(msg.grad_h.shape[0]), seq=int(msg.grad_h.shape[1]), server_ms=ms)
        return Gradients(round_id=msg.round_id, step_id=msg.step_id, loss=msg.loss, g=res.g, encoding=s.conn.encoding)

    async def forget(self, client_id: str) -> None:
        """Free what the middle keeps for a client that left."""
        if not self.middle.pending:  # the usual case (every step finished): no trip to the worker
            return
        n = await self.worker.call(self.middle.forget, client_id)
        if n:
            log.info("freed %d middle forward(s) of %s, which left", n, client_id)

    async def expire_loop(self) -> None:
        """Free late forwards every quarter of the deadline (at least every 0.05 s), until cancelled."""
        every = max(0.05, self.middle.ttl_s / 4)
        while True:
            await asyncio.sleep(every)
            gone = await self.worker.call(self.middle.expire)
            for cid, r, step in (k for k in gone if isinstance(k, tuple) and len(k) == 3):
                self.state.log("u_expired", client=cid, round=r, step=step, ttl_s=self.middle.ttl_s)

