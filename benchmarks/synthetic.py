"""Synthetic clients: many per process, the real protocol over real websockets, no model.

A synthetic client says Hello with a bundle layout's fingerprint, then for every round it is
given sends τ training steps of seeded random smashed data ``Z`` [B, T, d] with random labels,
waits for each ``g``, uploads the adapters it was sent (unchanged) for ``B·τ`` samples and
reports metrics — exactly what a device does on the wire, with none of its compute, so a load
test measures the server. :func:`run_clients` runs any number of them in one event loop
(hundreds per process: each costs one websocket and one ``Z`` buffer), and
:func:`clients_worker` is the same as a :class:`~flexsfl.benchmarks.worker.Worker` subprocess::

    w = Worker("flexsfl.benchmarks.synthetic:clients_worker", threads=1)
    w.send({**spec, "clients": 16, "first": 0}); w.recv()    # {"ready": true}; they connect
    results = w.recv()["clients"]                             # after the server's Bye

``spec`` is :class:`SyntheticSpec`'s fields. :func:`synthetic_batch` gives the step inputs,
so a test can recompute exactly what each client sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import OrderError

__all__ = ["SyntheticSpec", "synthetic_batch", "run_client", "run_clients", "clients_worker"]

_FP16_MIN_NORMAL = 2.0**-14
CONNECT_TRIES = 30


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    url: str  # ws://host:port of the server
    layout_hash: str  # layout_fingerprint(info, lora, split) of the bundle the clients pretend to run
    split: int
    hidden: int  # d of Z
    batch: int = 8  # B
    seq: int = 128  # T
    encoding: str = "fp32"
    max_frame_bytes: int = 64 << 20
    num_labels: int = 2
    fresh_z: bool = False  # a new Z every step (seeded by client, round, step); else one Z per client
    prefix: str = "synthetic"  # client ids are f"{prefix}{k}"
    tokens: tuple[str, ...] = ()  # client k's token is tokens[k] (a server with a clients file); "" without


def synthetic_batch(seed: int, round_id: int | None, step: int | None, b: int, t: int, d: int, num_labels: int = 2):
    """The ``(z, mask, labels)`` a synthetic client with ``seed`` sends at ``(round_id, step)`` when
    ``fresh_z``; with ``None`` for both, the one batch it sends every step otherwise."""
    rng = np.random.default_rng([seed] if round_id is None else [seed, round_id, step])
    z = rng.standard_normal((b, t, d), dtype=np.float32)
    return z, np.ones((b, t), np.int64), rng.integers(0, num_labels, b).astype(np.int64)


def _expect(msg, kind):
    """``msg`` if it is a ``kind``, else OrderError: the synthetic client follows the script exactly."""
    if not isinstance(msg, kind):
        detail = f": {msg.message}" if hasattr(msg, "message") else ""
        raise OrderError(f"synthetic client expected {kind.__name__}, got {type(msg).__name__}{detail}")
    return msg


async def run_client(spec: SyntheticSpec, k: int, connected: asyncio.Event | None = None) -> dict[str, Any]:
    """Client ``k`` (id ``prefix + k``, seed ``k``) until the server's Bye.

    Returns its step times ``[(round, Z sent, g received)]`` (perf_counter seconds), the losses it
    was answered, and a sample of ``|g|`` statistics. Like a device, it retries (up to
    ``CONNECT_TRIES`` times, with jittered back-off) when the server closes it with 1013 before
    Welcome: too many connections at once (``--max-unauthenticated``), try again later."""
    from websockets.exceptions import ConnectionClosed

    rng = np.random.default_rng([k, 1013])
    for attempt in range(CONNECT_TRIES):
        try:
            return await _run_client(spec, k, connected)
        except _Busy:
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(attempt, 5)) * (0.5 + rng.random()))
        except ConnectionClosed:
            raise
    raise OrderError(f"synthetic client {k}: the server said 'busy' (1013) {CONNECT_TRIES} times; raise --max-unauthenticated")


class _Busy(Exception):
    """Closed with 1013 before Welcome."""


async def _run_client(spec: SyntheticSpec, k: int, connected: asyncio.Event | None) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from flexsfl.core.wire import (
        Activations, Adapters, Bye, Connection, Gradients, Hello, Limits, Metrics, Role, RoundConfig, RoundEnd, Upload, Welcome,
    )

    b, t, d = spec.batch, spec.seq, spec.hidden
    fixed = synthetic_batch(k, None, None, b, t, d, spec.num_labels)
    limits = Limits(max_frame_bytes=spec.max_frame_bytes)
    conn = Connection(Role.CLIENT, limits)
    steps: list[tuple[int, float, float]] = []
    losses: list[float] = []
    g_abs: list[np.ndarray] = []
    async with connect(spec.url, compression=None, max_size=limits.max_frame_bytes, open_timeout=300,
                       ping_interval=None, close_timeout=5) as ws:
        async def recv():
            return conn.receive(await ws.recv())

        token = spec.tokens[k] if k < len(spec.tokens) else ""
        try:
            await ws.send(conn.send(Hello(client_id=f"{spec.prefix}{k}", token=token, layout_hash=spec.layout_hash,
                                          split=spec.split, backend="synthetic", encodings=(spec.encoding,))))
            welcome = _expect(await recv(), Welcome)
        except ConnectionClosed as e:
            if e.rcvd is not None and e.rcvd.code == 1013:
                raise _Busy() from None
            raise
        if connected is not None:
            connected.set()
        while True:
            msg = await recv()
            if isinstance(msg, Bye):
                break
            msg = _expect(msg, RoundConfig)
            adapters = dict(_expect(await recv(), Adapters).tensors) if msg.adapters else {}
            for step in range(msg.local_steps):
                z, mask, labels = synthetic_batch(k, msg.round_id, step, b, t, d, spec.num_labels) if spec.fresh_z else fixed
                t0 = time.perf_counter()
                await ws.send(conn.send(Activations(round_id=msg.round_id, step_id=step, mode="train", z=z, attention_mask=mask,
                                                    labels=labels, encoding=welcome.encoding)))
                g = _expect(await recv(), Gradients)
                steps.append((msg.round_id, t0, time.perf_counter()))
                losses.append(float(g.loss))
                if len(g_abs) < 2:
                    g_abs.append(np.abs(np.asarray(g.g)).ravel())
            await ws.send(conn.send(Upload(round_id=msg.round_id, num_samples=b * msg.local_steps, tensors=adapters)))
            _expect(await recv(), RoundEnd)
            await ws.send(conn.send(Metrics(round_id=msg.round_id, metrics={"steps": msg.local_steps})))
    a = np.concatenate(g_abs) if g_abs else np.zeros(1, np.float32)
    return {"client": f"{spec.prefix}{k}", "steps": steps, "losses": losses, "g_abs_median": float(np.median(a)),
            "g_frac_below_fp16_normal": float(np.mean((a > 0) & (a < _FP16_MIN_NORMAL)))}


async def run_clients(spec: SyntheticSpec, n: int, first: int = 0) -> list[dict[str, Any]]:
    """Clients ``first .. first+n-1`` at once in this event loop; their results in that order."""
    return list(await asyncio.gather(*(run_client(spec, k) for k in range(first, first + n))))


def clients_worker(chan) -> None:
    """Worker: ``{**spec, "clients": n, "first": k}`` -> ``{"ready"}``; runs them to the server's Bye -> results."""
    msg = chan.recv()
    n, first = int(msg.pop("clients")), int(msg.pop("first", 0))
    spec = SyntheticSpec(**msg)
    chan.send({"ready": True})
    chan.send({"clients": asyncio.run(run_clients(spec, n, first))})
    chan.recv()  # stop
