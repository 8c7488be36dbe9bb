"""The compute worker's device, threads and batching policy, and the Ray pool's pure parts
(averaging, routing, rebalancing) without a cluster (tests/server_backend/test_workers_ray.py has one)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.server_backend.compute import ComputeWorker, default_threads
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost, resolve_device
from flexsfl.server_backend.workers import WorkerPool, _Slot, average_states, make_compute

B, T = 2, 8


@pytest.fixture(scope="module")
def host(tiny_model_dirs):
    # one schedule group of 64: the batching policy decides within a group (with K = 1 every batch is one step)
    return TailHost(load_model(str(tiny_model_dirs["gpt2"]), num_labels=2, attn_implementation="sdpa"),
                    OptimizerConfig("sgd", 0.01, server_step_every=64), device="cpu")


def _req(host, k: int, t: int = T) -> StepRequest:
    rng = np.random.default_rng(k)
    return StepRequest(1, rng.standard_normal((B, t, host.info.hidden_size), dtype=np.float32), np.ones((B, t), np.int64),
                       rng.integers(0, 2, B).astype(np.int64), tag=f"c{k}:0:0")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type == "cpu"
    with pytest.raises(ConfigError, match="not a device; use cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda:0")


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os

    assert default_threads() == len(os.sched_getaffinity(0))


async def _batches(host, reqs_at: list[tuple[float, StepRequest]], **policy) -> list[list[str]]:
    seen: list[list[str]] = []
    w = ComputeWorker(host, on_batch=lambda tags, s: seen.append(tags), threads=1, **policy)
    w.start()
    try:
        t0 = time.perf_counter()
        futs = []
        for at, r in reqs_at:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            futs.append(asyncio.ensure_future(w.train(r)))
        results = await asyncio.gather(*futs)
    finally:
        w.stop()
    assert all(r.g is not None and r.g.shape == (B, T, host.info.hidden_size) for r in results)
    return seen


def test_token_cap_splits_a_backlog(host):
    # Four steps queued at once; at most 2 x B x T tokens per batch -> batches of two.
    seen = asyncio.run(_batches(host, [(0.0, _req(host, k)) for k in range(4)], max_batch_tokens=2 * B * T))
    assert sorted(len(b) for b in seen) in ([1, 1, 2], [2, 2], [1, 1, 1, 1], [1, 2, 1]) and max(map(len, seen)) <= 2
    assert [t for b in seen for t in b] == [f"c{k}:0:0" for k in range(4)]  # in arrival order


def test_max_wait_gathers_a_late_step_into_the_batch(host):
    late = [(0.0, _req(host, 0)), (0.15, _req(host, 1))]
    assert asyncio.run(_batches(host, late, max_wait_ms=2000)) == [["c0:0:0", "c1:0:0"]]
    # Without waiting, the first step runs alone at once (the second comes long after it is done).
    assert asyncio.run(_batches(host, [(0.0, _req(host, 0)), (1.5, _req(host, 1))])) == [["c0:0:0"], ["c1:0:0"]]


def test_policy_values_are_checked(host):
    with pytest.raises(ConfigError, match="--max-batch-tokens"):
        ComputeWorker(host, max_batch_tokens=-1)
    with pytest.raises(ConfigError, match="--max-wait-ms"):
        ComputeWorker(host, max_wait_ms=-5)


def test_make_compute_is_todays_worker_for_one_worker(host):
    assert type(make_compute(host, workers=1)) is ComputeWorker
    with pytest.raises(ConfigError, match="HostSpec"):
        make_compute(host, None, workers=2)


def test_average_states_is_exact_where_it_must_be():
    rng = np.random.default_rng(0)
    base = {"a": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    s1 = {"a": base["a"] + np.float32(0.25), "b": base["b"].copy()}
    s2 = {"a": base["a"] - np.float32(0.5), "b": base["b"].copy()}
    one = average_states(base, [s1], [7])
    assert np.array_equal(one["a"], s1["a"]) and np.array_equal(one["b"], base["b"])  # one worker: its tensors exactly
    two = average_states(base, [s1, s2], [3, 1])
    np.testing.assert_allclose(two["a"], base["a"] + 0.75 * 0.25 + 0.25 * -0.5, rtol=1e-6)
    assert np.array_equal(two["b"], base["b"])  # untouched by every worker: bit-exact
    onto = {"a": base["a"], "b": base["b"] + np.float32(1)}  # the global model moved meanwhile (a U-shaped middle)
    assert np.array_equal(average_states(base, [s1], [1], onto=onto)["b"], onto["b"])
    assert np.array_equal(average_states(base, [], [])["a"], base["a"])


def test_routing_is_stable_and_rebalanced_at_round_end():
    pool = WorkerPool(None, None, 3)  # routing only: nothing started
    assert [pool._route(f"c{k}") for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert pool._route("c4") == 1  # stable
    # Round end: only c0, c3, c6 (all on worker 0) and c1 trained; the others left.
    pool.slots = [_Slot(i, actor=None) for i in range(3)]
    pool.slots[0].clients = {"c0", "c3", "c6"}
    pool.slots[1].clients = {"c1"}
    pool._rebalance()
    loads = sorted(list(pool.assignment.values()).count(i) for i in range(3))
    assert loads == [1, 1, 2] and set(pool.assignment) == {"c0", "c1", "c3", "c6"}
    assert pool.assignment["c1"] == 1 and pool.assignment["c0"] == 0  # who stays, stays where it was
    emptiest = min(range(3), key=lambda i: (list(pool.assignment.values()).count(i), i))
    assert pool._route("new") == emptiest  # a newcomer joins the least-loaded worker
