"""The tail on Ray workers (server_backend/workers.py), against a real local Ray cluster.

The cluster (2 CPUs) is started once for this module and stopped after it. The server is the
real FlexServer on a loopback port; the clients are benchmarks/synthetic.py's (the real protocol
over real websockets, seeded Z), all in this test's event loop.
"""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

import ray  # noqa: E402 - flexsfl[scale], part of make install ('.[all]'): no skip, these are must-pass

from flexsfl.benchmarks.synthetic import SyntheticSpec, run_clients, synthetic_batch  # noqa: E402
from flexsfl.core.bundle import layout_fingerprint  # noqa: E402
from flexsfl.core.errors import ConfigError  # noqa: E402
from flexsfl.model.loading import load_model  # noqa: E402
from flexsfl.server_backend.aggregation import ClientUpdate  # noqa: E402
from flexsfl.server_backend.server import FlexServer, ServerConfig, frame_limit  # noqa: E402
from flexsfl.server_backend.state import ServerState  # noqa: E402
from flexsfl.server_backend.strategy import TrainConfig, make_strategy  # noqa: E402
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost  # noqa: E402
from flexsfl.server_backend.workers import HostSpec, WorkerPool, make_compute  # noqa: E402

SPLIT, B, T = 2, 2, 8
OPT = OptimizerConfig("sgd", 0.05)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def loader(tiny_model_dirs):
    return functools.partial(load_model, str(tiny_model_dirs["gpt2"]), task="seq_cls", num_labels=2, seed=0,
                             attn_implementation="sdpa")


async def _serve(loader, tmp_path, n: int, steps: int, workers: int, hook=None, replay_bytes=None, rounds: int = 1):
    """One FlexP-SFL round with ``n`` synthetic clients; returns (global state, client results, pool, summary).
    ``hook(pool, tags, seconds)`` runs after each acknowledged batch."""
    loaded = loader()
    host = TailHost(loaded, OPT)
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=rounds, min_clients=n, local_steps=steps, batch_size=B, lr=0.05,
                                                     round_timeout=300))
    state = ServerState(tmp_path / f"state-{workers}-{n}", {"model": loaded.info.id})
    pool = make_compute(host, HostSpec(loader, OPT), workers=workers)
    if hook is not None:
        pool.on_batch = functools.partial(hook, pool)
    if replay_bytes is not None:
        pool.replay_bytes = replay_bytes
    server = FlexServer(host, strategy, None, state, ServerConfig(port=0, max_batch=B, max_seq=T, hello_timeout=120,
                                                                  step_timeout=120), compute=pool)
    serving = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.ready.wait(), 120)
        spec = SyntheticSpec(url=f"ws://127.0.0.1:{server.port}", layout_hash=layout_fingerprint(loaded.info, loaded.lora, SPLIT),
                             split=SPLIT, hidden=loaded.info.hidden_size, batch=B, seq=T, fresh_z=True,
                             max_frame_bytes=frame_limit(host, B, T))
        results = await asyncio.wait_for(run_clients(spec, n), 300)
        await asyncio.wait_for(serving, 60)
    finally:
        serving.cancel()
        state.close()
    rounds = [e for e in _events(state.dir) if e.get("event") == "round"]
    return host.state(), results, pool, rounds[-1]


def _client_of_tag(tag: str) -> str:
    return tag.rsplit(":", 2)[0]


def _events(d):
    import json

    return [json.loads(line) for f in sorted(d.glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]


def _reference(loader, n: int, steps: int, rounds: int = 1) -> dict[str, np.ndarray]:
    """SplitFed-V1 by hand, in this process, round after round: from the global model, a tail copy
    per client trained on its steps in order, the copies averaged by samples (float64), then
    FlexP-SFL's layer-wise aggregation of the uploads (each client uploads the adapters it was sent)."""
    glob = TailHost(loader(), OPT)
    strategy = make_strategy("flexpsfl", TrainConfig(rounds=rounds, min_clients=n, local_steps=steps, batch_size=B, lr=0.05))
    copies = [TailHost(loader(), OPT) for _ in range(n)]
    for r in range(rounds):
        base = glob.state()
        updates = {}
        acc = {k: v.astype(np.float64) for k, v in base.items()}
        for k, h in enumerate(copies):
            h.load_state(base)
            for step in range(steps):
                z, mask, labels = synthetic_batch(k, r, step, B, T, h.info.hidden_size)
                (res,) = h.train_batch([StepRequest(SPLIT, z, mask, labels)])
                assert res.g is not None
            for name, a in h.state().items():
                acc[name] += (a.astype(np.float64) - base[name]) / n  # equal samples: weight 1/n
            plan = strategy.plan(r, f"synthetic{k}", SPLIT, glob)
            updates[f"synthetic{k}"] = ClientUpdate(dict(plan.adapters), B * steps, SPLIT)
        glob.load_state({name: a.astype(np.float32) for name, a in acc.items()})
        strategy.aggregate(r, glob, updates)
    return glob.state()


def _assert_state_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_two_workers_serve_eight_clients_through_a_round(cluster, loader, tmp_path):
    state, results, pool, summary = asyncio.run(_serve(loader, tmp_path, n=8, steps=2, workers=2))
    assert isinstance(pool, WorkerPool)
    assert summary["steps"] == 16 and summary["clients"] == [f"synthetic{k}" for k in range(8)]
    assert summary["server_steps"] == 16  # the fixed schedule (K = 1): one optimizer step per client step, on each worker
    assert all(len(r["steps"]) == 2 for r in results)
    loads = [sum(1 for i in pool.assignment.values() if i == w) for w in range(2)]
    assert loads == [4, 4], pool.assignment  # stable, balanced assignment
    assert {i for i in pool.assignment.values()} == {0, 1}
    assert pool.restarts == 0
    initial = TailHost(loader(), OPT).state()
    assert any(not np.array_equal(state[n], initial[n]) for n in state), "the round changed nothing"


def test_more_workers_than_the_cluster_holds_is_one_line(cluster, loader):
    pool = make_compute(TailHost(loader(), OPT), HostSpec(loader, OPT), workers=3)  # 3 x 1 CPU on a 2-CPU cluster
    with pytest.raises(ConfigError, match=r"--workers 3 need 3 CPUs \(the cluster has 2\): lower --workers"):
        pool.start()


def test_one_client_per_worker_equals_the_single_process_result(cluster, loader, tmp_path):
    # Two rounds: the second starts from the first's averaged + aggregated model, pushed to both workers.
    state, _, pool, _ = asyncio.run(_serve(loader, tmp_path, n=2, steps=3, workers=2, rounds=2))
    assert sorted(pool.assignment.values()) == [0, 1]  # each worker held one client's steps
    _assert_state_equal(state, _reference(loader, 2, 3, rounds=2))


def test_killing_a_worker_mid_round_loses_no_acknowledged_step(cluster, loader, tmp_path):
    killed, acked = [], []
    one_step = B * T * 64 * 4 + B * T * 8 + B * 8  # Z + mask + labels of one step (hidden size 64)

    def kill_after_three(pool, tags, _seconds):
        # After each acknowledged batch: once worker 0 has acknowledged three steps, kill its actor (its next
        # step fails). With the replay cap at 1.5 steps it checkpointed after its second: the new actor starts
        # from that checkpoint and replays the third.
        slot = pool.slots[0]
        if pool.assignment.get(_client_of_tag(tags[0])) == 0:
            acked.append(len(slot.log))  # its replay log's length, this batch included
        if not killed and len(acked) == 3:
            killed.append(ray.get(slot.actor.pid.remote()))
            ray.kill(slot.actor, no_restart=True)

    state, results, pool, summary = asyncio.run(_serve(loader, tmp_path, n=2, steps=4, workers=2, hook=kill_after_three,
                                                       replay_bytes=int(1.5 * one_step)))
    assert killed and pool.restarts == 1
    assert acked[:3] == [1, 2, 1]  # the checkpoint after its second step emptied the log: one batch was replayed
    assert summary["steps"] == 8 and all(len(r["steps"]) == 4 for r in results)
    assert pool.slots[0].restarts == 1 and pool.slots[1].restarts == 0  # a new actor took over worker 0's clients
    _assert_state_equal(state, _reference(loader, 2, 4))  # as if nothing had happened


@pytest.mark.slow  # the bench's rows on a real cluster (~1 min); the pool itself is tested above, in CI
def test_bench_server_rows_for_one_and_two_workers(cluster, tiny_model_dirs, tmp_path):
    from flexsfl.benchmarks.server import ServerBenchConfig, run_server_bench

    cfg = ServerBenchConfig(model=str(tiny_model_dirs["gpt2"]), split=1, batch=2, seq=8, clients=(4,), modes=("batched",),
                            local_steps=2, rounds=2, repeats=1, workers=(1, 2), clients_per_process=4, out=str(tmp_path))
    rows, summary = run_server_bench(cfg)
    assert [(r["workers"], r["clients"]) for r in rows] == [(1, 4), (2, 4)]
    for r in rows:
        assert r["steps_timed"] == 4 * 2 and r["steps_per_s"] > 0 and r["latency_ms_p90"] >= r["latency_ms_p50"] > 0
        assert r["cpu_ms_per_step"] > 0 and 0 < r["front_cpu_ms_per_step"] and r["rss_mb_per_client"] > -50
    assert rows[0]["worker_rss_mb"] == 0 and rows[1]["worker_rss_mb"] > 50  # two actor processes with a model each
    assert rows[1]["front_cpu_ms_per_step"] < rows[1]["cpu_ms_per_step"]  # the actors' CPU counts too
    assert ray.is_initialized()  # the bench used this module's cluster and left it running


@pytest.mark.slow
def test_flexsfl_serve_on_an_existing_ray_cluster(cluster, loader, tiny_model_dirs, tmp_path):
    """The CLI form: `flexsfl serve --workers 2 --ray-address ADDR` (this module's cluster), registered clients."""
    from flexsfl.server_backend.clients import add_client
    from tests.integration.harness import events, finish, flexsfl, free_port, wait_listening

    clients = tmp_path / "clients.json"
    tokens = tuple(add_client(clients, f"synthetic{k}") for k in range(4))
    port, log, state_dir = free_port(), tmp_path / "serve.log", tmp_path / "state"
    address = ray.get_runtime_context().gcs_address
    proc = flexsfl("serve", "--model", str(tiny_model_dirs["gpt2"]), "--num-labels", "2", "--clients", str(clients),
                   "--state-dir", str(state_dir), "--port", str(port), "--rounds", "1", "--min-clients", "4",
                   "--local-steps", "2", "--batch-size", str(B), "--max-batch", str(B), "--max-seq", str(T),
                   "--workers", "2", "--ray-address", address, log=log)
    try:
        wait_listening(port, proc, log, timeout=240)
        loaded = loader()
        spec = SyntheticSpec(url=f"ws://127.0.0.1:{port}", layout_hash=layout_fingerprint(loaded.info, loaded.lora, SPLIT),
                             split=SPLIT, hidden=loaded.info.hidden_size, batch=B, seq=T, tokens=tokens)
        results = asyncio.run(asyncio.wait_for(run_clients(spec, 4), 300))
    finally:
        finish({"serve": (proc, log)}, timeout=120)
    assert all(len(r["steps"]) == 2 for r in results)
    (rnd,) = events(state_dir, "round")
    assert rnd["steps"] == 8 and len(rnd["clients"]) == 4
    assert "tail on 2 Ray worker(s)" in log.read_text() and "averaged 2 worker tail(s)" in log.read_text()
