"""The server's torch worker: one thread that owns the model, fed from the event loop.

All torch work runs on this thread so the asyncio loop only moves bytes. Training steps go
through a queue; with ``batching`` on, the worker takes every step that is waiting when it
becomes free and runs them as one :meth:`TailHost.train_batch` — under load, requests that
arrive while a step runs are batched together, without any artificial delay when idle.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

from flexsfl.server_backend.tail_host import StepRequest, StepResult, TailHost

__all__ = ["ComputeWorker"]

log = logging.getLogger("flexsfl.server.compute")

_STOP = object()


class ComputeWorker:
    """Runs :class:`TailHost` work on a dedicated thread.

    ``await worker.train(req)`` returns the step's :class:`StepResult`; ``await worker.call(fn,
    *args)`` runs any other model work (predictions, aggregation) in order with the steps.
    """

    def __init__(self, host: TailHost, *, batching: bool = True, max_batch_requests: int = 64, threads: int | None = None,
                 on_batch: Callable[[list[str], float], None] | None = None):
        self.host = host
        self.on_batch = on_batch  # called on this thread after each step batch: (request tags, seconds)
        self.batching = batching
        self.max_batch_requests = max_batch_requests
        self._threads = threads
        self._q: queue.SimpleQueue = queue.SimpleQueue()
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

    async def train(self, req: StepRequest) -> StepResult:
        fut = asyncio.get_running_loop().create_future()
        self._q.put(("train", req, fut))
        return await fut

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._q.put(("call", (fn, args), fut))
        return await fut

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            batch = [item]
            if self.batching and item[0] == "train":
                # Take every step that is already waiting (never wait for more).
                held = []
                while len(batch) < self.max_batch_requests:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP or nxt[0] != "train":
                        held.append(nxt)
                        break
                    batch.append(nxt)
                self._do_train(batch)
                for h in held:
                    if h is _STOP:
                        return
                    self._do_call(h)
            elif item[0] == "train":
                self._do_train(batch)
            else:
                self._do_call(item)

    def _do_train(self, items: list) -> None:
        t0 = time.perf_counter()
        try:
            results = self.host.train_batch([req for _, req, _ in items])
        except Exception as e:  # noqa: BLE001 - reported to every waiting client, the worker lives on
            log.exception("training step failed")
            for _, _, fut in items:
                _resolve(fut, exc=e)
            return
        finally:
            dt = time.perf_counter() - t0
            self.busy_seconds += dt
        if self.on_batch is not None:
            self.on_batch([req.tag for _, req, _ in items], dt)
        self.batches += 1
        self.steps += len(items)
        for (_, _, fut), res in zip(items, results):
            _resolve(fut, value=res)

    def _do_call(self, item) -> None:
        _, (fn, args), fut = item
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001
            _resolve(fut, exc=e)
        else:
            _resolve(fut, value=value)
        finally:
            self.busy_seconds += time.perf_counter() - t0


def _resolve(fut: asyncio.Future, *, value: Any = None, exc: BaseException | None = None) -> None:
    def set_() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    fut.get_loop().call_soon_threadsafe(set_)
