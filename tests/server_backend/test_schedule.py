"""The server's fixed optimizer schedule (server_backend/schedule.py) on the real TailHost and
ComputeWorker: one step per k client steps in the order received, the mean over the group, a
partial group stepped at the round end, and cross-client batching that changes nothing."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.model.partition import task_loss
from flexsfl.server_backend.compute import ComputeWorker
from flexsfl.server_backend.schedule import StepSchedule
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost
from tests.server_backend.test_tail_host import _batches

LR = 0.1
# (split, B, T) of each request, in the order received; request 4 overflows inside the tail (refused)
SHAPES = [(1, 2, 10), (2, 3, 7), (1, 2, 12), (3, 2, 9), (1, 2, 8), (2, 3, 10), (1, 2, 6)]
BAD = 4
CUTS = {"one at a time": [1] * 7, "arbitrary": [3, 1, 3], "one batch": [7], "pairs": [2, 2, 2, 1]}


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def reqs(tiny_llama):
    host = TailHost(load_model(tiny_llama, num_labels=3))
    out = []
    for k, (s, b, t) in enumerate(SHAPES):
        ids, mask, y = _batches(1, b=b, t=t, seed=10 + k)[0]
        with torch.no_grad():
            z = host.head(s)(ids, mask).numpy()
        if k == BAD:
            z[0, 0, :] = 3e38  # finite on the wire, not finite inside the tail
        out.append(StepRequest(s, z, mask.numpy(), y.numpy(), tag=f"c{k}:0:{k}"))
    return out


def _host(path: str, k: int, optimizer: str = "sgd") -> TailHost:
    return TailHost(load_model(path, num_labels=3), OptimizerConfig(optimizer, LR, server_step_every=k))


def _run(host: TailHost, reqs, cuts):
    results, i = [], 0
    for n in cuts:
        results += host.train_batch(reqs[i:i + n])
        i += n
    host.flush()  # the round end
    return results


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_schedule_bookkeeping():
    p = torch.nn.Parameter(torch.zeros(2))
    s = StepSchedule(3)
    assert s.room() == 3 and s.take() is None and s.steps == 0
    assert s.add({p: torch.tensor([1.0, 2.0])}, 2) is None and s.room() == 1
    mean = s.add({p: torch.tensor([4.0, 4.0])}, 1)  # the group's 3rd client step: the step, with the mean
    assert torch.equal(mean[p], torch.tensor([5.0, 6.0]) / 3) and s.steps == 1 and s.room() == 3
    s.add({p: torch.tensor([2.0, 2.0])}, 1)
    assert torch.equal(s.take()[p], torch.tensor([2.0, 2.0])) and s.steps == 2 and s.pending == 0  # partial: its own mean
    with pytest.raises(ValueError):
        s.add({p: torch.zeros(2)}, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="--server-step-every must be an integer >= 1"):
            OptimizerConfig("sgd", 0.1, server_step_every=bad)


@pytest.mark.parametrize("k", [1, 3])
def test_batched_equals_one_at_a_time(tiny_llama, reqs, k):
    runs = {}
    for name, cuts in CUTS.items():
        host = _host(tiny_llama, k)
        runs[name] = (_run(host, reqs, cuts), host.state(), host.steps)
    ref_results, ref_state, ref_steps = runs["one at a time"]
    # 6 accepted client steps (one refused, counting for nothing): k=1 -> 6 steps; k=3 -> 2 full groups
    assert ref_steps == {1: 6, 3: 2}[k]
    assert ref_results[BAD].g is None and "not finite" in ref_results[BAD].error
    for name, (results, state, steps) in runs.items():
        assert steps == ref_steps, name
        for i, (a, b) in enumerate(zip(results, ref_results)):
            if b.g is None:
                assert a.g is None, (name, i)
                continue
            if k == 1:  # each group is one request, computed exactly as alone
                assert np.array_equal(a.g, b.g) and a.loss == b.loss, (name, i)
            else:
                assert _rel(a.g, b.g) <= 1e-6 and a.loss == pytest.approx(b.loss, rel=1e-6), (name, i)
        for n in ref_state:
            if k == 1:
                assert np.array_equal(state[n], ref_state[n]), (name, n)
            else:
                assert _rel(state[n], ref_state[n]) <= 1e-6, (name, n)


def test_group_steps_with_the_mean_and_partial_group_at_round_end(tiny_llama, reqs):
    # k = 4: requests 0-3 form the first group (all from w0, stepped at request 3); request 4 is
    # refused and counts for nothing; 5 and 6 are a partial group, stepped by flush() at round end.
    host = _host(tiny_llama, 4)
    host.train_batch(reqs[:5])
    assert host.steps == 1 and host.schedule.pending == 0
    host.train_batch(reqs[5:])
    assert host.steps == 1 and host.schedule.pending == 2
    assert host.flush() and host.steps == 2 and not host.flush()
    # reference: plain SGD on the mean of the group's per-client mean losses
    ref = _host(tiny_llama, 1)
    params = list(ref.params.values())
    for group in ([0, 1, 2, 3], [5, 6]):
        for p in params:
            p.grad = None
        for i in group:
            r = reqs[i]
            logits = ref.tail(r.split)(torch.from_numpy(r.z), torch.from_numpy(r.attention_mask))
            (task_loss(logits, torch.from_numpy(r.labels), "seq_cls") / len(group)).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= LR * p.grad
    got, want, w0 = host.state(), ref.state(), _host(tiny_llama, 1).state()
    assert any(not np.array_equal(got[n], w0[n]) for n in got)  # it trained
    for n in want:
        assert _rel(got[n], want[n]) <= 1e-5, n


def test_compute_worker_batches_without_changing_the_result(tiny_llama, reqs):
    # Real worker thread: all 7 requests wait in the queue behind a held call, so the worker batches
    # them, one schedule group per batch (K=3: [0 1 2] [3 4 5] with 4 refused, then [6]; K=1: one
    # each, answered as soon as stepped); the round end (end_round) steps the partial group.
    async def go(k: int, together: bool):
        host = _host(tiny_llama, k)
        worker = ComputeWorker(host, threads=1)
        worker.start()
        try:
            if together:
                gate = threading.Event()
                held = asyncio.ensure_future(worker.call(gate.wait))
                await asyncio.sleep(0.05)
                futs = [asyncio.ensure_future(worker.train(r)) for r in reqs]
                await asyncio.sleep(0.05)
                gate.set()
                await held
                results = await asyncio.gather(*futs)
            else:
                results = [await worker.train(r) for r in reqs]
            await worker.end_round()
            return results, host.state(), worker.server_steps, worker.batches
        finally:
            worker.stop()

    for k in (1, 3):
        seq = asyncio.run(go(k, False))
        bat = asyncio.run(go(k, True))
        assert seq[3] == 7 and bat[3] == {1: 7, 3: 3}[k]
        assert seq[2] == bat[2] == {1: 6, 3: 2}[k]
        for a, b in zip(bat[0], seq[0]):
            assert (a.g is None) == (b.g is None) and (a.g is None or _rel(a.g, b.g) <= 1e-6)
        for n in seq[1]:
            assert _rel(bat[1][n], seq[1][n]) <= 1e-6, n


@pytest.mark.parametrize("k,per_round", [(1, 6), (4, 2)])
def test_real_server_steps_on_the_schedule_and_flushes_each_round(tiny_model_dirs, tmp_path, k, per_round):
    # A real FlexServer on loopback, 3 synthetic client coroutines x 2 steps x 2 rounds: 6 client
    # steps per round -> K=1: 6 server steps; K=4: a full group + a partial one stepped at the round end.
    import json

    from flexsfl.benchmarks.synthetic import SyntheticSpec, run_clients
    from flexsfl.core.bundle import layout_fingerprint
    from flexsfl.server_backend.server import FlexServer, ServerConfig, frame_limit
    from flexsfl.server_backend.state import ServerState
    from flexsfl.server_backend.strategy import TrainConfig, make_strategy

    loaded = load_model(str(tiny_model_dirs["gpt2"]), num_labels=2, attn_implementation="sdpa")
    host = TailHost(loaded, OptimizerConfig("sgd", 0.01, server_step_every=k))
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=2, min_clients=3, local_steps=2, batch_size=2, round_timeout=120))
    state = ServerState(tmp_path / "state", {"model": loaded.info.id})
    server = FlexServer(host, strategy, None, state, ServerConfig(port=0, max_batch=2, max_seq=8), compute_threads=1)

    async def main():
        serving = asyncio.create_task(server.serve())
        await server.ready.wait()
        spec = SyntheticSpec(url=f"ws://127.0.0.1:{server.port}", layout_hash=layout_fingerprint(loaded.info, loaded.lora, 1),
                             split=1, hidden=loaded.info.hidden_size, batch=2, seq=8, max_frame_bytes=frame_limit(host, 2, 8))
        await asyncio.wait_for(run_clients(spec, 3), 120)
        await asyncio.wait_for(serving, 60)

    try:
        asyncio.run(main())
    finally:
        state.close()
    rounds = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in rounds if e["event"] == "round"]
    assert [(e["steps"], e["server_steps"]) for e in rounds] == [(6, per_round)] * 2
    assert host.schedule.pending == 0 and host.steps == 2 * per_round
