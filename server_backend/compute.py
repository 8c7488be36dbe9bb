"""The server's torch worker: one thread that owns the model, fed from the event loop.

All torch work runs on this thread so the asyncio loop only moves bytes. Requests go through one
queue, in the order received: tail steps (:meth:`ComputeWorker.train`), U-shaped middle forwards
and backwards (:meth:`ComputeWorker.submit`), and any other model work (:meth:`ComputeWorker.call`).
With ``batching`` on, the worker takes the run of same-kind requests waiting at the head of the
queue when it becomes free and runs them as one batch call (:meth:`TailHost.train_batch`,
``MiddleHost.forward_batch`` / ``backward_batch``) — under load, requests that arrive while a
batch runs are batched together, without any artificial delay when idle. Batching never changes
a result: the optimizer steps follow the fixed schedule of :mod:`.schedule` (one step per
``--server-step-every`` client steps, in queue order), and a training batch never spans a
schedule group (``submit(..., limit=schedule.room)``), so each group's clients are answered as
soon as their group is stepped; with ``K = 1`` every step runs, steps and answers alone. :meth:`ComputeWorker.end_round` steps a group left partial (the server calls it at
every round end).

Batching policy (``flexsfl serve --max-batch-tokens/--max-wait-ms``): a batch holds at most
``max_batch_requests`` steps and at most ``max_batch_tokens`` tokens (Σ B·T; 0 = no cap; a
single step over the cap still runs, alone). With ``max_wait_ms`` > 0 the worker, once it has a
first step, waits up to that long for more to fill the batch: worth it on a GPU, where a batch
of 16 costs little more than a batch of 1; on a CPU the GEMMs are already the bottleneck and the
default 0 never waits.

Threads: ``threads=None`` uses every core this process may run on (``os.sched_getaffinity``),
or ``OMP_NUM_THREADS`` when that is set.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from flexsfl.core.errors import ConfigError
from flexsfl.server_backend.tail_host import StepRequest, StepResult, TailHost

__all__ = ["ComputeWorker", "default_threads"]

log = logging.getLogger("flexsfl.server.compute")

_STOP = object()


class ComputeWorker:
    """Runs :class:`TailHost` work on a dedicated thread.

    ``await worker.train(req)`` returns the step's :class:`StepResult`; ``await worker.submit(fn,
    req)`` runs ``fn([req, ...])[i]`` batched with the same-``fn`` requests waiting next to it;
    ``await worker.call(fn, *args)`` runs any other model work (predictions, aggregation) in
    order with the steps. ``server_steps`` counts the optimizer steps taken (tail and middle).
    """

    def __init__(self, host: TailHost, *, batching: bool = True, max_batch_requests: int = 64, threads: int | None = None,
                 max_batch_tokens: int = 0, max_wait_ms: float = 0.0,
                 on_batch: Callable[[list[str], float], None] | None = None):
        if max_batch_tokens < 0 or max_wait_ms < 0 or max_batch_requests < 1:
            raise ConfigError(f"batching policy: --max-batch-tokens ({max_batch_tokens}) and --max-wait-ms ({max_wait_ms}) "
                              f"must be >= 0 and the requests per batch ({max_batch_requests}) >= 1")
        self.host = host
        self.on_batch = on_batch  # called on this thread after each step batch: (request tags, seconds)
        self.batching = batching
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1e3
        self.threads = threads or default_threads()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._held: collections.deque = collections.deque()  # taken from the queue, not yet run (policy overflow)
        self._thread = threading.Thread(target=self._run, name="flexsfl-compute", daemon=True)
        self.busy_seconds = 0.0  # time spent computing, for throughput reports
        self.batches = 0
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout=30)

    def queue_depth(self) -> int:
        """Requests waiting for the thread (approximate: it moves while you read it)."""
        return self._q.qsize()

    @property
    def server_steps(self) -> int:
        """Optimizer steps the global model took (tail and U-shaped middle)."""
        return self.host.steps

    async def train(self, req: StepRequest) -> StepResult:
        return await self.submit(self.host.train_batch, req, limit=self.host.schedule.room)

    async def submit(self, batch_fn: Callable[[list], list], req: Any, *, limit: Callable[[], int] | None = None) -> Any:
        """``batch_fn(batch)[i]`` for ``req`` at position ``i`` of a batch of the same-``batch_fn``
        requests waiting in order (``batch_fn`` must accept any such run and answer each in order).

        ``limit()``, read on the compute thread when a batch is formed, caps its requests: the
        schedule's room, so that a batch never spans a group boundary and each group's clients get
        their answers when their group is done (with ``K = 1``: one step, one answer, at once)."""
        fut = asyncio.get_running_loop().create_future()
        self._q.put((batch_fn, req, fut, limit))
        return await fut

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._q.put((None, (fn, args), fut, None))
        return await fut

    async def end_round(self) -> None:
        """Step a schedule group left partial (:meth:`TailHost.flush`); nothing to merge, this
        worker trains the one global model in place (the Ray pool's
        :meth:`~.workers.WorkerPool.end_round` averages its copies here)."""
        await self.call(self.host.flush)

    # -- worker thread -------------------------------------------------------------------------

    def _next(self, timeout: float | None = None):
        if self._held:
            return self._held.popleft()
        if timeout is None:
            return self._q.get()
        return self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()

    def _run(self) -> None:
        import torch

        if getattr(getattr(self.host, "device", None), "type", "cpu") == "cpu":
            torch.set_num_threads(self.threads)
        while True:
            item = self._next()
            if item is _STOP:
                return
            if item[0] is None:
                self._do_call(item)
                continue
            batch = [item]
            if self.batching:
                batch = self._fill(batch)
            self._do_batch(batch)

    def _fill(self, batch: list) -> list:
        """Add waiting same-kind requests to ``batch`` under the policy; anything else taken is held for later."""
        tokens = _tokens(batch[0][1])
        deadline = time.perf_counter() + self.max_wait
        limit = batch[0][3]
        cap = min(self.max_batch_requests, max(1, limit())) if limit is not None else self.max_batch_requests
        while len(batch) < cap:
            try:
                nxt = self._next(timeout=max(0.0, deadline - time.perf_counter()) if self.max_wait else 0)
            except queue.Empty:
                break
            if nxt is _STOP or nxt[0] != batch[0][0]:
                self._held.append(nxt)
                break
            t = _tokens(nxt[1])
            if self.max_batch_tokens and tokens + t > self.max_batch_tokens:
                self._held.append(nxt)  # the first of the next batch
                break
            batch.append(nxt)
            tokens += t
        return batch

    def _do_batch(self, items: list) -> None:
        fn = items[0][0]
        t0 = time.perf_counter()
        try:
            results = fn([it[1] for it in items])
        except Exception as e:  # noqa: BLE001 - reported to every waiting client, the worker lives on
            log.exception("batch of %d failed", len(items))
            for it in items:
                _resolve(it[2], exc=e)
            return
        finally:
            dt = time.perf_counter() - t0
            self.busy_seconds += dt
        if fn == self.host.train_batch:  # tail steps (the middle's are counted by MiddleHost and u_round)
            if self.on_batch is not None:
                self.on_batch([it[1].tag for it in items], dt)
            self.batches += 1
            self.steps += len(items)
        for (_, _, fut, _), res in zip(items, results):
            _resolve(fut, value=res)

    def _do_call(self, item) -> None:
        _, (fn, args), fut, _ = item
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001
            _resolve(fut, exc=e)
        else:
            _resolve(fut, value=value)
        finally:
            self.busy_seconds += time.perf_counter() - t0


def default_threads() -> int:
    """Torch threads when none are asked for: ``OMP_NUM_THREADS`` if set, else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _tokens(req: Any) -> int:
    """B·T of a request: its ``z`` (a tail step, a middle forward) or its ``grad_h`` (a middle backward)."""
    a = req.z if hasattr(req, "z") else req.grad_h
    return int(a.shape[0]) * int(a.shape[1])


def _resolve(fut: asyncio.Future, *, value: Any = None, exc: BaseException | None = None) -> None:
    def set_() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    fut.get_loop().call_soon_threadsafe(set_)
