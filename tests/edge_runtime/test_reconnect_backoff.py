"""The device's reconnect loop against a server that welcomes it and then fails at once (1011), as a
server serving on a closed state did: the client backs off ever more slowly and gives up after
``max_retries``, instead of resetting its backoff at every Welcome and reconnecting every half
second forever; a ``stop`` set from another thread ends it at the next lost connection.

Real websocket server on loopback speaking the real protocol; real client (:func:`run_client`) with
a real head trainer over the tiny GPT-2 bundle.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from websockets.asyncio.server import serve

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import FlexSFLError
from flexsfl.core.wire import Connection, Role, Welcome
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import HeadTrainer
from flexsfl.edge_runtime.transport import ClientOptions, run_client

TRAIN = [Example(f"example number {i} says {'yes' if i % 2 else 'no'}", i % 2) for i in range(8)]


@pytest.fixture(scope="module")
def trainer(tiny_bundles, tmp_path_factory):
    bundle = load_bundle(tiny_bundles("gpt2", 1, "ort"))
    return HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN,
                       state_dir=tmp_path_factory.mktemp("state"))


def _welcome_then_fail(connected: list[float]):
    async def handler(ws):
        connected.append(time.monotonic())
        conn = Connection(Role.SERVER)
        conn.receive(await ws.recv())  # the Hello
        await ws.send(conn.send(Welcome(session_id="s1", encoding="fp32", max_frame_bytes=64 << 20)))
        await ws.close(1011, "test: internal error right after Welcome")

    return handler


def test_a_server_that_fails_after_welcome_is_retried_with_growing_backoff_then_given_up(trainer):
    connected: list[float] = []

    async def main():
        async with serve(_welcome_then_fail(connected), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            opts = ClientOptions(server=url, client_id="c0", token="t" * 32, max_retries=3, backoff_initial=0.4)
            with pytest.raises(FlexSFLError, match=r"gave up on ws://127\.0\.0\.1:\d+ after 3 reconnects in a row"):
                await asyncio.wait_for(run_client(trainer, opts), timeout=30)

    asyncio.run(main())
    assert len(connected) == 4  # the first connection and 3 reconnects: each Welcome did not reset the count
    gaps = [b - a for a, b in zip(connected, connected[1:])]
    # delays drawn from [0.5, 1] x 0.4 x 2^k: at least 0.2, 0.4, 0.8 s, so the last gap exceeds the first
    assert gaps[0] >= 0.2 and gaps[2] >= 0.8 and gaps[2] > gaps[0], gaps


def test_a_healthy_connection_resets_the_backoff(trainer):
    """A connection that stayed up ``healthy_s`` has served: the next loss starts the count again."""
    connected: list[float] = []

    async def main():
        async with serve(_welcome_then_fail(connected), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            opts = ClientOptions(server=url, client_id="c0", token="t" * 32, max_retries=1, backoff_initial=0.05,
                                 healthy_s=0.0)  # every welcomed connection counts as healthy
            task = asyncio.create_task(run_client(trainer, opts))
            while len(connected) < 6:  # max_retries=1, yet it keeps reconnecting
                await asyncio.sleep(0.05)
                assert not task.done(), task.exception()
            task.cancel()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_stop_from_another_thread_ends_the_client_at_the_next_lost_connection(trainer):
    connected: list[float] = []
    stop = threading.Event()

    async def main():
        async with serve(_welcome_then_fail(connected), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            opts = ClientOptions(server=url, client_id="c0", token="t" * 32, max_retries=0)  # forever, unless stopped
            threading.Timer(0.1, stop.set).start()
            return await asyncio.wait_for(run_client(trainer, opts, stop=stop), timeout=30)

    report = asyncio.run(main())
    assert not report.reason and report.reconnects <= 1 and len(connected) <= 2
