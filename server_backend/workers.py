"""Scale-out: the tail on N Ray actors behind the one asyncio front end (``flexsfl serve --workers N``).

:func:`make_compute` is the one place the server's compute is built: with one worker and no Ray
address it is today's :class:`~.compute.ComputeWorker` (one thread, one tail, unchanged
behaviour); otherwise a :class:`WorkerPool` with the same interface (``train(req)``,
``submit(fn, req)``, ``call(fn, *args)``, ``end_round()``, ``start``/``stop``,
``steps``/``batches``/``busy_seconds``/``server_steps``, ``queue_depth()``).

How the pool trains (SplitFed-V1's server side, then FlexP-SFL's layer-wise aggregation as today):

- The front end keeps the **global model** (its :class:`TailHost`, run by a local ComputeWorker
  thread). Every ``call`` — round plans, predictions, the aggregation, ``state`` — runs there, and
  so do U-shaped middle halves (``submit``, batched as on one worker).
- **Schedule**: each worker's TailHost steps under the fixed schedule of :mod:`.schedule`
  (``--server-step-every k``: one step per k of *its* clients' steps, in the order it receives
  them; a batch holds at most k steps), as one worker does; :meth:`WorkerPool.end_round` steps every worker's partial group
  (and the front end's, for the middle) before it averages.
- Each Ray actor (:class:`TailWorker`) holds a copy of the trainable tensors and trains it on the
  steps routed to it. A client's steps always go to the same worker (**stable assignment**: a new
  client joins the least-loaded worker; at each round end the clients that trained stay where
  they are unless the loads differ by more than one, when the excess moves — free then, because
  every copy is reset to the global model before the next round).
- :meth:`WorkerPool.end_round` (before the aggregation) averages the copies into the global
  model, weighted by the samples each worker served since the round began:
  ``φ ← φ + Σ_k (n_k / Σn)(φ_k − φ₀)`` (``φ₀``: what the workers started from); a tensor no
  worker changed stays bit-exact, and with one worker the result is that worker's tensors
  exactly. The first step after that pushes the global model (with whatever the aggregation and
  other calls did to it) to every worker. Plans and predictions made while steps run see the
  global model of the last round end; a call that trains it then (a U-shaped middle) keeps its
  change, the workers' deltas are added on top.
- **Failure**: each worker's acknowledged batches since the round began (or since its last
  checkpoint) are kept, inputs in order. When an actor dies, the pool starts a new one from the
  round's starting state (or the checkpoint) and optimizer moments, replays those batches in
  order, then retries the batch in flight: no acknowledged step is lost, and a client whose step
  was in flight just waits longer. When a worker's log passes ``replay_bytes`` (256 MB), the pool
  checkpoints that worker (its tensors and moments, one round trip) and empties the log, so the
  front end's memory per worker stays bounded whatever the clients and τ (a worker in the middle
  of a schedule group is checkpointed after the batch that closes it).

Ray is imported lazily (``pip install flexsfl[scale]``); the core install never needs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import numpy as np

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import LoadedModel
from flexsfl.server_backend.compute import ComputeWorker, default_threads
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, StepResult, TailHost

__all__ = ["HostSpec", "TailWorker", "WorkerPool", "make_compute", "average_states", "import_ray"]

log = logging.getLogger("flexsfl.server.workers")

RESTARTS_PER_BATCH = 3  # a batch that kills this many fresh workers in a row is refused, not retried forever
REPLAY_BYTES = 256 << 20  # a worker's replay log past this is replaced by a checkpoint of the worker


def import_ray():
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--workers/--ray-address need Ray: pip install 'flexsfl[scale]'") from None
    return ray


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """How a worker builds its own copy of the model: a picklable recipe, no tensors.

    ``load`` is a picklable callable returning the :class:`LoadedModel` (e.g. a
    ``functools.partial`` of :func:`flexsfl.model.loading.load_model`); it must build the same
    model, seed included, as the front end's.
    """

    load: Callable[[], LoadedModel]
    optimizer: OptimizerConfig = OptimizerConfig()
    device: str = "cpu"
    threads: int = 1

    def build(self) -> TailHost:
        import torch

        torch.set_num_threads(self.threads)
        return TailHost(self.load(), self.optimizer, device=self.device)


class TailWorker:
    """One worker's tail (run as a Ray actor; a plain object in-process). Not thread safe."""

    def __init__(self, spec: HostSpec, state: dict[str, np.ndarray], optimizer_state: dict | None = None) -> None:
        self.host = spec.build()
        self.begin(state, optimizer_state)

    def begin(self, state: dict[str, np.ndarray], optimizer_state: dict | None = None) -> dict:
        """Start a round from ``state``; returns the optimizer's moments (to restart from)."""
        self.host.load_state(state)
        if optimizer_state is not None:
            self.host.optimizer.load_state_dict(optimizer_state)
        return self.host.optimizer.state_dict()

    def train_batch(self, reqs: list[StepRequest]) -> tuple[list[StepResult], float, int]:
        """The results, the seconds it took and the optimizer steps it took."""
        t0, steps0 = time.perf_counter(), self.host.steps
        results = self.host.train_batch(reqs)
        return results, time.perf_counter() - t0, self.host.steps - steps0

    def flush(self) -> int:
        """Step a schedule group left partial (round end); returns the optimizer steps taken (0 or 1)."""
        return int(self.host.flush())

    def state(self) -> dict[str, np.ndarray]:
        return self.host.state()

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """Its tensors and optimizer moments: what a replacement starts from; None while a
        schedule group is open (its summed gradients are only in the replay log)."""
        if self.host.schedule.pending:
            return None
        return self.host.state(), self.host.optimizer.state_dict()

    def pid(self) -> int:
        return os.getpid()


def average_states(base: dict[str, np.ndarray], states: list[dict[str, np.ndarray]], weights: list[float],
                   onto: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``onto + Σ w_k (state_k − base)`` with ``w`` normalised (``onto`` defaults to ``base``), in
    float64: a tensor no state changed comes back bit-exact, and one state's comes back exactly."""
    onto = base if onto is None else onto
    total = float(sum(weights))
    if not states or total <= 0:
        return {n: a.copy() for n, a in onto.items()}
    out = {}
    for n, b in base.items():
        b64 = b.astype(np.float64)
        acc = onto[n].astype(np.float64)
        for s, w in zip(states, weights):
            if w:
                acc += (w / total) * (s[n].astype(np.float64) - b64)
        out[n] = acc.astype(np.float32)
    return out


@dataclasses.dataclass(eq=False)
class _Slot:
    """One worker: its actor, its queue, what it did since the round began."""

    index: int
    actor: Any
    queue: asyncio.Queue | None = None
    task: asyncio.Task | None = None
    optimizer_state: dict | None = None  # its moments when the round began or at its checkpoint (for a restart)
    checkpoint: dict[str, np.ndarray] | None = None  # its tensors at its last checkpoint this round; None: the round's base
    log: list[list[StepRequest]] = dataclasses.field(default_factory=list)  # acknowledged batches since then, in order
    log_bytes: int = 0
    clients: set[str] = dataclasses.field(default_factory=set)  # whose steps it trained this round
    served: int = 0  # samples trained this round
    held: tuple | None = None  # taken from the queue over the token cap: the next batch's first
    restarts: int = 0


class WorkerPool:
    """The tail on ``workers`` Ray actors; the global model stays here. Same interface as ComputeWorker."""

    def __init__(self, host: TailHost, spec: HostSpec, workers: int, *, address: str | None = None,
                 batching: bool = True, max_batch_requests: int = 64, max_batch_tokens: int = 0,
                 threads: int | None = None, on_batch: Callable[[list[str], float], None] | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.host = host
        self.spec = spec
        self.workers = workers
        self.address = address
        self.batching = batching
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        # calls on the global model, and U-shaped middle halves (batched like one worker's)
        self.master = ComputeWorker(host, batching=batching, max_batch_requests=max_batch_requests, threads=threads,
                                    max_batch_tokens=max_batch_tokens)
        self.slots: list[_Slot] = []
        self.assignment: dict[str, int] = {}  # client id -> slot index
        self.base: dict[str, np.ndarray] = {}  # the global tensors the workers started the round from
        self.steps = 0
        self.batches = 0
        self.worker_steps = 0  # optimizer steps the workers took (their tails)
        self.busy_seconds = 0.0  # summed over workers
        self.restarts = 0
        self.replay_bytes = REPLAY_BYTES
        self._stale = False  # the global model moved on (round end): push it before the next step
        self._lock: asyncio.Lock | None = None
        self._idle: asyncio.Condition | None = None
        self._inflight = 0
        self._ray = None
        self._own_ray = False
        self._actor_cls = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.address} if self.address else {"num_cpus": os.cpu_count()}
            ray.init(**kw, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._own_ray = True
        cuda = self.spec.device != "cpu"
        need = {"CPU": self.workers * (1 if cuda else self.spec.threads), "GPU": self.workers if cuda else 0}
        have = ray.cluster_resources()
        short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
        if short:
            if self._own_ray:
                ray.shutdown()
            raise ConfigError(f"--workers {self.workers} need {' and '.join(short)}: lower --workers or --threads, "
                              "or add machines to the Ray cluster")
        self._actor_cls = ray.remote(num_cpus=1 if cuda else self.spec.threads, num_gpus=1 if cuda else 0,
                                     max_restarts=0)(TailWorker)
        self.master.start()
        self.base = self.host.state()
        self.slots = [_Slot(i, self._new_actor(self.base)) for i in range(self.workers)]
        log.info("tail on %d Ray worker(s) (%s, %d thread(s) each)", self.workers, self.spec.device, self.spec.threads)

    def stop(self) -> None:
        for s in self.slots:
            if s.task is not None:
                s.task.cancel()
            try:
                self._ray.kill(s.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.master.stop()
        if self._own_ray:
            self._ray.shutdown()

    async def worker_pids(self) -> list[int]:
        """The workers' process ids (for CPU and memory reports; on another machine they are that machine's)."""
        return list(await asyncio.gather(*(s.actor.pid.remote() for s in self.slots)))

    def queue_depth(self) -> int:
        return sum(s.queue.qsize() for s in self.slots if s.queue is not None)

    def _new_actor(self, state: dict[str, np.ndarray], optimizer_state: dict | None = None):
        return self._actor_cls.remote(self.spec, state, optimizer_state)

    # -- the ComputeWorker interface -------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the global model's thread (see the module docstring)."""
        return await self.master.call(fn, *args)

    @property
    def server_steps(self) -> int:
        """Optimizer steps taken: the workers' tails and the global model's (the U-shaped middle)."""
        return self.worker_steps + self.host.steps

    async def submit(self, batch_fn: Callable[[list], list], req: Any, *, limit: Callable[[], int] | None = None) -> Any:
        """``batch_fn`` over a batch of waiting requests on the global model's thread (the middle)."""
        return await self.master.submit(batch_fn, req, limit=limit)

    async def train(self, req: StepRequest) -> StepResult:
        """One client's step on its worker; survives the worker dying (replayed and retried there)."""
        self._ensure_loop_state()
        async with self._lock:
            if self._stale:
                await self._push()
            self._inflight += 1
        try:
            slot = self.slots[self._route(_client_of(req))]
            fut = asyncio.get_running_loop().create_future()
            if slot.task is None:
                slot.queue = asyncio.Queue()
                slot.task = asyncio.create_task(self._dispatch(slot), name=f"flexsfl-worker-{slot.index}")
            slot.queue.put_nowait((req, fut))
            return await fut
        finally:
            async with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    async def end_round(self) -> None:
        """Step partial schedule groups, average the workers' copies into the global model,
        weighted by samples served; rebalance."""
        self._ensure_loop_state()
        async with self._lock:
            async with self._idle:
                await self._idle.wait_for(lambda: self._inflight == 0)
            await self.master.end_round()  # the middle's partial group, on the global model
            if self._stale:
                return  # no step since the last merge
            trained = [s for s in self.slots if s.served > 0]
            for s in trained:
                self.worker_steps += await self._with_restart(s, lambda a: a.flush.remote())
            states = [await self._with_restart(s, lambda a: a.state.remote()) for s in trained]
            current = await self.master.call(self.host.state)  # base, unless a call trained it (a U-shaped middle)
            merged = average_states(self.base, states, [s.served for s in trained], onto=current)
            await self.master.call(self.host.load_state, merged)
            log.info("round end: averaged %d worker tail(s) over %s samples", len(trained), [s.served for s in trained])
            self._rebalance()
            self._stale = True

    # -- internals -------------------------------------------------------------------------------
    def _ensure_loop_state(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._idle = asyncio.Condition()

    async def _push(self) -> None:
        """Every worker starts the round from the global model (keeping its optimizer moments)."""
        self.base = await self.master.call(self.host.state)
        for s in self.slots:  # last round's log is spent (a restart now starts from the new base)
            s.checkpoint, s.log, s.log_bytes, s.served, s.clients = None, [], 0, 0, set()
        moments = await asyncio.gather(*(self._with_restart(s, lambda a: a.begin.remote(self.base)) for s in self.slots))
        for s, m in zip(self.slots, moments):
            s.optimizer_state = m
        self._stale = False

    def _route(self, client: str) -> int:
        if client not in self.assignment:
            loads = [0] * self.workers
            for i in self.assignment.values():
                loads[i] += 1
            self.assignment[client] = min(range(self.workers), key=lambda i: (loads[i], i))
        return self.assignment[client]

    def _rebalance(self) -> None:
        """Keep the clients that trained this round; move the excess of a worker with > 1 more than another."""
        active = {c for s in self.slots for c in s.clients}
        groups: list[list[str]] = [[] for _ in range(self.workers)]
        for c in sorted(active):
            groups[self.assignment.get(c, 0)].append(c)
        while True:
            big = max(range(self.workers), key=lambda i: (len(groups[i]), -i))
            small = min(range(self.workers), key=lambda i: (len(groups[i]), i))
            if len(groups[big]) - len(groups[small]) <= 1:
                break
            groups[small].append(groups[big].pop())
        self.assignment = {c: i for i, g in enumerate(groups) for c in g}

    async def _dispatch(self, slot: _Slot) -> None:
        """The slot's loop: take what is waiting (under the batching caps), run it on the actor."""
        while True:
            batch = [slot.held if slot.held is not None else await slot.queue.get()]
            slot.held = None
            tokens = _tokens(batch[0][0])
            cap = min(self.max_batch_requests, self.spec.optimizer.server_step_every)  # at most one schedule group
            while self.batching and len(batch) < cap and not slot.queue.empty():
                nxt = slot.queue.get_nowait()
                if self.max_batch_tokens and tokens + _tokens(nxt[0]) > self.max_batch_tokens:
                    slot.held = nxt  # the first of the next batch
                    break
                batch.append(nxt)
                tokens += _tokens(nxt[0])
            reqs = [r for r, _ in batch]
            try:
                results, seconds, stepped = await self._with_restart(slot, lambda a: a.train_batch.remote(reqs))
            except Exception as e:  # noqa: BLE001 - reported to every waiting client; the loop lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            slot.log.append(reqs)
            slot.log_bytes += sum(r.z.nbytes + r.attention_mask.nbytes + r.labels.nbytes for r in reqs)
            slot.clients.update(map(_client_of, reqs))
            slot.served += sum(int(r.z.shape[0]) for r, res in zip(reqs, results) if res.g is not None)
            self.steps += len(reqs)
            self.worker_steps += stepped
            self.batches += 1
            self.busy_seconds += seconds
            if self.on_batch is not None:
                self.on_batch([r.tag for r in reqs], seconds)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
            if slot.log_bytes > self.replay_bytes:
                await self._checkpoint(slot)

    async def _checkpoint(self, slot: _Slot) -> None:
        """Replace the slot's replay log by its worker's tensors and moments now."""
        try:
            point = await self._with_restart(slot, lambda a: a.checkpoint.remote())
        except Exception:  # noqa: BLE001 - keep the log; the next batch tries again
            log.exception("could not checkpoint Ray worker %d", slot.index)
            return
        if point is None:  # mid-group: keep the log; the next batch tries again
            return
        state, moments = point
        slot.checkpoint, slot.optimizer_state, slot.log, slot.log_bytes = state, moments, [], 0

    async def _with_restart(self, slot: _Slot, submit: Callable[[Any], Any]) -> Any:
        """``await submit(actor)``; if the actor died, restart it (state + replay) and try again."""
        died = (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError)
        for attempt in range(RESTARTS_PER_BATCH + 1):
            try:
                if attempt:
                    start = slot.checkpoint if slot.checkpoint is not None else self.base
                    slot.actor = self._new_actor(start, slot.optimizer_state)
                    for reqs in slot.log:  # the acknowledged batches since then, in order
                        await slot.actor.train_batch.remote(reqs)
                return await submit(slot.actor)
            except died as e:
                if attempt == RESTARTS_PER_BATCH:
                    raise ConfigError(f"Ray worker {slot.index} died {attempt + 1} times on the same request; "
                                      "see the Ray logs (ray logs cluster)") from e
                log.warning("Ray worker %d died (%s); restarting it and replaying %d batch(es)", slot.index,
                            type(e).__name__, len(slot.log))
                self.restarts += 1
                slot.restarts += 1
        raise AssertionError("unreachable")


def _client_of(req: StepRequest) -> str:
    return req.tag.rsplit(":", 2)[0] if req.tag.count(":") >= 2 else req.tag


def _tokens(req: StepRequest) -> int:
    return int(req.z.shape[0]) * int(req.z.shape[1])


def make_compute(host: TailHost, spec: HostSpec | None = None, *, workers: int = 1, ray_address: str | None = None,
                 batching: bool = True, threads: int | None = None, max_batch_tokens: int = 0, max_wait_ms: float = 0.0,
                 on_batch: Callable[[list[str], float], None] | None = None) -> ComputeWorker | WorkerPool:
    """The server's compute: a ComputeWorker for one local worker, else a WorkerPool on Ray.

    ``threads`` is the torch threads of the one worker; in a pool, each actor's (default: the
    cores divided among the local workers, 1 per worker on a GPU)."""
    if workers == 1 and not ray_address:
        return ComputeWorker(host, batching=batching, threads=threads, max_batch_tokens=max_batch_tokens,
                             max_wait_ms=max_wait_ms, on_batch=on_batch)
    if spec is None:
        raise ConfigError("--workers > 1 needs a model recipe the workers can load (HostSpec); "
                          "start the server with flexsfl serve")
    if max_wait_ms:
        log.warning("--max-wait-ms applies to one local worker; a Ray pool batches what is waiting, without waiting")
    import_ray()  # a one-line error now, before anything starts, when Ray is not installed
    per_worker = threads or max(1, default_threads() // workers)
    # Ray gives each GPU worker one GPU of its own (CUDA_VISIBLE_DEVICES): inside it, that GPU is "cuda".
    device = "cuda" if spec.device.startswith("cuda") else spec.device
    spec = dataclasses.replace(spec, threads=per_worker, device=device)
    return WorkerPool(host, spec, workers, address=ray_address, batching=batching, max_batch_tokens=max_batch_tokens,
                      threads=1, on_batch=on_batch)
