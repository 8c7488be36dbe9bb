"""benchmarks/synthetic.py: many synthetic clients in one event loop through a real server round,
retrying like devices when the server says busy (1013)."""

from __future__ import annotations

import asyncio

import numpy as np

from flexsfl.benchmarks.synthetic import SyntheticSpec, run_clients, synthetic_batch
from flexsfl.core.bundle import layout_fingerprint
from flexsfl.model.loading import load_model
from flexsfl.server_backend.server import FlexServer, ServerConfig, frame_limit
from flexsfl.server_backend.state import ServerState
from flexsfl.server_backend.strategy import TrainConfig, make_strategy
from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost


def test_synthetic_batch_is_seeded():
    a, b = synthetic_batch(3, 0, 1, 2, 4, 8), synthetic_batch(3, 0, 1, 2, 4, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], synthetic_batch(3, 0, 2, 2, 4, 8)[0])
    assert a[0].shape == (2, 4, 8) and a[1].dtype == np.int64 and set(a[2]) <= {0, 1}


def test_many_clients_in_one_loop_retry_when_busy(tiny_model_dirs, tmp_path):
    n, steps = 6, 2
    loaded = load_model(str(tiny_model_dirs["gpt2"]), num_labels=2, attn_implementation="sdpa")
    host = TailHost(loaded, OptimizerConfig("sgd", 0.01))
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=1, min_clients=n, local_steps=steps, batch_size=2, round_timeout=120))
    state = ServerState(tmp_path / "state", {"model": loaded.info.id})
    # One unwelcomed connection at a time: five of the six are told 1013 at first and must retry.
    server = FlexServer(host, strategy, None, state, ServerConfig(port=0, max_batch=2, max_seq=8, max_unauthenticated=1),
                        compute_threads=1)

    async def main():
        serving = asyncio.create_task(server.serve())
        await server.ready.wait()
        spec = SyntheticSpec(url=f"ws://127.0.0.1:{server.port}", layout_hash=layout_fingerprint(loaded.info, loaded.lora, 1),
                             split=1, hidden=loaded.info.hidden_size, batch=2, seq=8, max_frame_bytes=frame_limit(host, 2, 8))
        results = await asyncio.wait_for(run_clients(spec, n), 120)
        await asyncio.wait_for(serving, 60)
        return results

    try:
        results = asyncio.run(main())
    finally:
        state.close()
    assert [r["client"] for r in results] == [f"synthetic{k}" for k in range(n)]
    assert all(len(r["steps"]) == steps and all(np.isfinite(r["losses"])) for r in results)
    assert server.refused >= 1  # the busy answers happened (and were retried)
