"""The server's middle in the U-shaped topology: blocks ``s..L-u-1`` over the global model.

A U-shaped step reaches the server twice, and labels never do::

    forward  (client, step, Z [B,T,d], mask)  -> H [B,T,d]     # kept: what the backward needs
    backward (client, step, dL/dH [B,T,d])    -> dL/dZ          # then an optimizer step

Between the two halves the host keeps, per ``(client, step)``, what the middle's backward needs,
bounded in memory: at most ``max_pending`` entries (a forward beyond that is refused) and each
for ``ttl_s`` seconds (:meth:`MiddleHost.expire` frees it; every entry point calls it, and the
server also calls it on a timer so an idle server frees memory too; a late backward is refused
as late, also after a timer freed it). :meth:`MiddleHost.forget` frees a client's entries when
it disconnects. Two ways to keep it (``recompute``):

- ``False`` (default): the autograd graph of the forward, activations included (fast; memory per
  client is the middle's training activations);
- ``True``: only ``Z``, the mask and a snapshot of the adapters; the backward runs the forward
  again (one more middle forward per step; memory per client is ``Z``).

Either way the forward runs on a snapshot of the middle's adapters, so an optimizer step taken
for another client in between changes neither this client's graph nor its ``dL/dZ``: a client's
result is exactly what it would get alone from the weights its forward saw.

Device: the middle runs where the :class:`TailHost` put the model (``flexsfl serve --device``);
``Z``, mask and ``dL/dH`` go there per batch and ``H``/``dL/dZ`` come back as numpy arrays.

Cross-client batching: :meth:`forward_batch` runs the requests that arrived together as one
forward per ``(split, top)``, right-padding ``T`` with masked zeros; :meth:`backward_batch` takes
the ``dL/dH`` that arrived together. The compute worker batches both across clients
(:meth:`~.compute.ComputeWorker.submit`), so concurrent clients' forwards run as one
``forward_batch`` and their backwards as one ``backward_batch``.

Optimizer schedule: the middle steps under the :class:`~.tail_host.TailHost`'s
:class:`~.schedule.StepSchedule` (``--server-step-every k``), counted per ``dL/dH`` received, in
order: :meth:`backward_batch` cuts its requests at the group boundaries, adds each group's
adapter gradients (each computed at the snapshot its forward saw) to the open group, and the
step is taken at the group's k-th ``dL/dH`` with the mean over the group. Within a group, a
forward batch's kept graph serves when the group holds every client still waiting on it (one
backward over the batch); otherwise the group's clients recompute their own rows' forward from
the kept inputs and snapshot (the same numbers as alone). With ``k = 1`` a forward batch of
several clients therefore keeps no graph (each backward recomputes its rows). Each client's
``H`` and ``dL/dZ`` is exactly its own, and the same sequence of forwards and backwards gives
the same middle weights and results whether its requests come one at a time or in batches
(tests/server_backend/test_middle_batch.py). Not thread-safe: call it from the server's one
compute thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.model.partition import Middle, build_middle
from flexsfl.server_backend.tail_host import TailHost

__all__ = ["MiddleRequest", "MiddleForward", "MiddleBackward", "MiddleResult", "MiddleHost"]

log = logging.getLogger("flexsfl.server.middle")


@dataclasses.dataclass(frozen=True)
class MiddleRequest:
    """One client's forward half: its smashed data at its ``(split, top)``. No labels."""

    key: Hashable  # (client id, step id): the backward names it
    split: int
    top: int
    z: np.ndarray  # [B, T, d] float32
    attention_mask: np.ndarray  # [B, T] int64


@dataclasses.dataclass(frozen=True)
class MiddleForward:
    h: np.ndarray | None  # [B, T, d] float32; None when refused
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class MiddleBackward:
    """One client's backward half: dL/dH for the forward it named."""

    key: Hashable
    grad_h: np.ndarray  # [B, T, d] float32


@dataclasses.dataclass(frozen=True)
class MiddleResult:
    g: np.ndarray | None  # [B, T, d] float32: dL/dZ; None when refused (nothing was changed)
    error: str | None = None


@dataclasses.dataclass
class _Batch:
    """One forward batch: its adapters snapshot, inputs and (store mode) graph; shared by its clients."""

    middle: Middle
    snapshot: dict[str, torch.Tensor]  # own name -> detached copy requiring grad
    z: torch.Tensor  # [ΣB, T, d] leaf requiring grad
    mask: torch.Tensor
    h: torch.Tensor | None  # the forward's output with its graph (None: no graph kept, a backward recomputes its rows)
    users: int  # entries not yet consumed or expired
    nbytes: int = 0  # what it holds: inputs, snapshot and (store mode) the activations the graph saved


@dataclasses.dataclass
class _Pending:
    batch: _Batch
    rows: slice
    shape: tuple[int, ...]  # the client's Z shape [B, T, d]
    deadline: float


class MiddleHost:
    """U-shaped clients' middles over ``host``'s global model; shares its optimizer and adapters."""

    def __init__(self, host: TailHost, *, ttl_s: float = 60.0, max_pending: int = 256, recompute: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s > 0 or max_pending < 1:
            raise ConfigError(f"ttl_s must be > 0 and max_pending >= 1 (got {ttl_s}, {max_pending})")
        self.host, self.ttl_s, self.max_pending, self.recompute, self.clock = host, ttl_s, max_pending, recompute, clock
        self._middles: dict[tuple[int, int], Middle] = {}
        self.pending: dict[Hashable, _Pending] = {}
        self._expired: collections.OrderedDict[Hashable, None] = collections.OrderedDict()  # recent, to say "late"
        self.steps = 0  # client steps answered (dL/dZ sent); the optimizer's steps are host.steps

    def middle(self, split: int, top: int) -> Middle:
        if (split, top) not in self._middles:
            self._middles[split, top] = build_middle(self.host.loaded, split, top)
        return self._middles[split, top]

    def held_bytes(self) -> int:
        """Bytes the pending steps hold (each forward batch counted once): the server's memory for
        U-shaped clients between their two halves."""
        return sum({id(p.batch): p.batch.nbytes for p in self.pending.values()}.values())

    def expire(self) -> list[Hashable]:
        """Free every entry past its deadline; returns their keys."""
        now = self.clock()
        gone = [k for k, p in self.pending.items() if p.deadline <= now]
        for k in gone:
            self._release(self.pending.pop(k))
            self._expired[k] = None
        while len(self._expired) > 4 * self.max_pending:
            self._expired.popitem(last=False)
        if gone:
            log.info("freed %d middle forward(s) whose backward did not arrive in %.0f s", len(gone), self.ttl_s)
        return gone

    def forget(self, owner: Hashable) -> int:
        """Free every entry whose key is a tuple starting with ``owner`` (a client that left);
        returns how many."""
        gone = [k for k in self.pending if isinstance(k, tuple) and k and k[0] == owner]
        for k in gone:
            self._release(self.pending.pop(k))
        return len(gone)

    def _release(self, p: _Pending) -> None:
        p.batch.users -= 1
        if p.batch.users == 0:  # drop the graph and activations now, not when the last reference goes
            p.batch.h = p.batch.z = None  # type: ignore[assignment]

    # -- forward -------------------------------------------------------------------------------
    def forward_batch(self, reqs: Sequence[MiddleRequest]) -> list[MiddleForward]:
        """``H`` for every request (one forward per ``(split, top)``); each is kept for its backward."""
        self.expire()
        out: list[MiddleForward | None] = [None] * len(reqs)
        groups: dict[tuple[int, int], list[int]] = {}
        room = self.max_pending - len(self.pending)
        for i, r in enumerate(reqs):
            why = self._check_forward(r, reqs[:i])
            if why is None and room <= 0:
                why = f"the server holds {self.max_pending} unfinished U-shaped steps; retry after a backward or the deadline"
            if why is not None:
                out[i] = MiddleForward(None, why)
                continue
            room -= 1
            groups.setdefault((r.split, r.top), []).append(i)
        deadline = self.clock() + self.ttl_s
        for (split, top), idx in groups.items():
            middle = self.middle(split, top)
            z, mask, rows = _concat([reqs[i] for i in idx])
            z, mask = z.to(self.host.device), mask.to(self.host.device)  # the host's --device (a no-op on CPU)
            snapshot = {n: p.detach().clone().requires_grad_(True) for n, p in middle.trainable()}
            batch = _Batch(middle, snapshot, z.requires_grad_(True), mask, None, len(idx))
            # k = 1 steps per client: a graph over several clients would never serve a backward whole.
            graph = not self.recompute and (len(idx) == 1 or self.host.schedule.every > 1)
            saved: dict[int, int] = {}  # storage -> bytes, each counted once (views share one)

            def keep(t: torch.Tensor) -> torch.Tensor:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                # detached (same storage, no grad_fn; autograd restores it at unpack): a saved *output* kept
                # as is would hold its own grad_fn, a C++ cycle no gc breaks — every kept graph leaked
                # (~10 MB a MiniLM step) once backward ran with retain_graph (pytorch/pytorch#189025)
                return t.detach()

            with torch.enable_grad() if graph else torch.no_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                h = torch.func.functional_call(middle, snapshot, (batch.z, mask))
            own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (z, mask, *snapshot.values())}
            batch.nbytes = sum({**saved, **own}.values())
            if graph:
                batch.h = h
            for i, r in zip(idx, rows):
                t = reqs[i].z.shape[1]
                hi = h[r, :t].detach().cpu().numpy().copy()
                if not np.isfinite(hi).all():
                    out[i] = MiddleForward(None, "the middle's output is not finite for these activations")
                    batch.users -= 1
                    continue
                self.pending[reqs[i].key] = _Pending(batch, r, tuple(reqs[i].z.shape), deadline)
                out[i] = MiddleForward(hi)
        return out  # type: ignore[return-value]

    def _check_forward(self, r: MiddleRequest, before: Sequence[MiddleRequest]) -> str | None:
        d = self.host.info.hidden_size
        z, m = np.asarray(r.z), np.asarray(r.attention_mask)
        if r.key in self.pending or any(b.key == r.key for b in before):
            return f"step {r.key!r} already has a middle forward waiting for its backward; use a new step id"
        if z.ndim != 3 or z.shape[2] != d or m.shape != z.shape[:2] or z.shape[1] < 2 or z.shape[0] < 1:
            return f"Z must be float32 [B, T, {d}] with mask [B, T] (T >= 2); got {list(z.shape)} and {list(m.shape)}"
        if z.dtype != np.float32 or not np.isfinite(z).all():
            return "Z must hold finite float32 values"
        try:
            self.middle(r.split, r.top)
        except ConfigError as e:
            return str(e)
        return None

    @torch.no_grad()
    def predict(self, split: int, top: int, z: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``H`` of the global middle for smashed data, keeping nothing (evaluation of a personal
        model: device head -> this -> device top). Bad input is a one-line ConfigError."""
        why = self._check_forward(MiddleRequest(object(), split, top, np.asarray(z), np.asarray(attention_mask)), ())
        if why is not None:
            raise ConfigError(why)
        z, mask = np.array(z, dtype=np.float32), np.array(attention_mask, dtype=np.int64)
        dev = self.host.device
        return self.middle(split, top)(torch.from_numpy(z).to(dev), torch.from_numpy(mask).to(dev)).cpu().numpy()

    # -- backward ------------------------------------------------------------------------------
    def backward_batch(self, reqs: Sequence[MiddleBackward]) -> list[MiddleResult]:
        """``dL/dZ`` for every request, in order, under the schedule (one optimizer step at each
        group's k-th accepted ``dL/dH``).

        A refused request (unknown or expired step, wrong shape, non-finite ``dL/dH`` or
        ``dL/dZ`` or adapter gradient) changes nothing, counts for nothing and keeps its forward
        for a correct retry until the deadline; the others are unaffected.
        """
        self.expire()
        out: list[MiddleResult | None] = [None] * len(reqs)
        valid: list[int] = []
        seen: set = set()
        for i, r in enumerate(reqs):
            p = self.pending.get(r.key)
            g = np.asarray(r.grad_h)
            if p is None or r.key in seen:
                late = r.key in self._expired
                out[i] = MiddleResult(None, f"step {r.key!r} " + ("arrived after the deadline; its forward was freed, "
                                      "redo the step" if late else "has no middle forward waiting (never sent, or "
                                      "already answered)"))
            elif g.shape != p.shape or g.dtype != np.float32:
                out[i] = MiddleResult(None, f"dL/dH must be float32 {list(p.shape)} like the H sent for step {r.key!r}, "
                                      f"got {g.dtype} {list(g.shape)}")
            elif not np.isfinite(g).all():
                out[i] = MiddleResult(None, f"dL/dH for step {r.key!r} has NaN or Inf values; nothing was changed")
            else:
                seen.add(r.key)
                valid.append(i)
        pos = 0
        while pos < len(valid):  # the open group first, then whole groups; refused ones leave room for the next
            chunk = valid[pos:pos + self.host.schedule.room()]
            pos += len(chunk)
            grads: dict[torch.nn.Parameter, torch.Tensor] = {}
            ok = 0
            by_batch: dict[int, list[int]] = {}
            for i in chunk:
                by_batch.setdefault(id(self.pending[reqs[i].key].batch), []).append(i)
            for idx in by_batch.values():
                ok += self._backward_part(reqs, idx, grads, out)
            if ok:
                self.host.accumulate(grads, ok)
        return out  # type: ignore[return-value]

    def _backward_part(self, reqs: Sequence[MiddleBackward], idx: list[int], grads: dict, out: list) -> int:
        """Backpropagate the ``dL/dH`` of ``idx`` (same forward batch, same group); on success add
        their adapter gradients to ``grads``, answer them and return how many were accepted."""
        pend = [self.pending[reqs[i].key] for i in idx]
        batch = pend[0].batch
        if batch.h is not None and len(idx) == batch.users:  # the kept graph, over the batch's rows
            z, h, rows = batch.z, batch.h, [(p.rows, p.shape[1]) for p in pend]
        else:  # this part's own rows again, from the kept inputs and snapshot
            t = max(p.shape[1] for p in pend)
            z = torch.cat([batch.z.detach()[p.rows, :t] for p in pend]).requires_grad_(True)
            mask = torch.cat([batch.mask[p.rows, :t] for p in pend])
            with torch.enable_grad():
                h = torch.func.functional_call(batch.middle, batch.snapshot, (z, mask))
            starts = np.cumsum([0] + [p.shape[0] for p in pend])
            rows = [(slice(int(a), int(a) + p.shape[0]), p.shape[1]) for a, p in zip(starts, pend)]
        gh = torch.zeros_like(h)
        for i, (r, t) in zip(idx, rows):
            gh[r, :t] = torch.tensor(np.asarray(reqs[i].grad_h), device=gh.device)  # a copy: wire arrays are read-only
        names = list(batch.snapshot)
        gz, *gp = torch.autograd.grad(h, [z, *batch.snapshot.values()], gh, retain_graph=True, allow_unused=True)
        own = dict(batch.middle.named_parameters())
        part = {own[n]: g for n, g in zip(names, gp) if g is not None}
        gs = [gz[r, :t].cpu().numpy().copy() for r, t in rows]
        if not all(np.isfinite(g).all() for g in gs) or not all(bool(torch.isfinite(g).all()) for g in part.values()):
            if len(idx) > 1:  # find whose, alone
                return sum(self._backward_part(reqs, [i], grads, out) for i in idx)
            out[idx[0]] = MiddleResult(None, "the middle's gradient is not finite for these activations; nothing was changed")
            return 0
        for p, g in part.items():
            grads[p] = grads[p] + g if p in grads else g
        for i, g in zip(idx, gs):
            self._release(self.pending.pop(reqs[i].key))
            out[i] = MiddleResult(g)
        self.steps += len(idx)
        return len(idx)


def _concat(reqs: Sequence[MiddleRequest]) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Stack along the batch, right-padding T with masked zeros (invisible to unpadded queries)."""
    t = max(r.z.shape[1] for r in reqs)
    d = reqs[0].z.shape[2]
    n = sum(r.z.shape[0] for r in reqs)
    z = np.zeros((n, t, d), np.float32)
    mask = np.zeros((n, t), np.int64)
    rows, start = [], 0
    for r in reqs:
        b, ti = r.z.shape[:2]
        z[start:start + b, :ti] = r.z
        mask[start:start + b, :ti] = r.attention_mask
        rows.append(slice(start, start + b))
        start += b
    return torch.from_numpy(z), torch.from_numpy(mask), rows
