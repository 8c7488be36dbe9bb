"""FedPer against numpy on the real TailHost of a tiny Llama, and on the real whole-model device
trainer: a round sends the global body only, the device keeps its own task head and takes the
body, and aggregation is the sample-weighted mean of every upload."""

from __future__ import annotations

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import RoundSettings
from flexsfl.model.loading import load_model
from flexsfl.server_backend.aggregation import ClientUpdate
from flexsfl.server_backend.baselines import personal_head_names
from flexsfl.server_backend.strategy import STRATEGIES, TrainConfig, make_strategy
from flexsfl.server_backend.tail_host import TailHost

CFG = TrainConfig(local_steps=3, batch_size=2, lr=0.01, optimizer="sgd")


@pytest.fixture(scope="module")
def host(tiny_model_dirs):
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=2))
    rng = np.random.default_rng(0)
    host.load_state({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items()})
    return host


def test_fedper_is_registered_as_a_whole_model_strategy():
    s = make_strategy("fedper", CFG)
    assert "fedper" in STRATEGIES and s.mode == "full" and s.personal is False and s.refuse(2) is None


def test_a_round_sends_the_body_and_keeps_the_head_personal(host):
    plan = make_strategy("fedper", CFG).plan(0, "c0", 2, host)
    state, L = host.state(), host.info.num_blocks
    head = {n for n, j in host.blocks.items() if j == L}
    assert head and head == personal_head_names(host.blocks, L)
    assert set(plan.adapters) == set(state) - head  # every block's adapters, no task head
    for n, a in plan.adapters.items():
        np.testing.assert_array_equal(a, state[n])
    assert plan.align_lambda == 0.0 and plan.local_steps == 3


def test_aggregation_is_the_sample_weighted_mean_of_every_upload(host):
    rng = np.random.default_rng(1)
    state = host.state()
    ups = {f"c{k}": ClientUpdate({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in state.items()}, n, 1)
           for k, n in enumerate((10, 30, 60))}
    make_strategy("fedper", CFG).aggregate(0, host, ups)
    got = host.state()
    for n in state:  # numpy: Σ n_k θ_k / Σ n_k
        want = sum(u.num_samples * u.params[n].astype(np.float64) for u in ups.values()) / 100.0
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6, err_msg=n)


def test_the_device_keeps_its_head_and_takes_the_body(tiny_bundles, tiny_model_dirs):
    from flexsfl.sim.full_trainer import FullModelTrainer

    bundle = load_bundle(tiny_bundles("llama", 2, "ort"))
    t = FullModelTrainer(bundle, [Example(f"a {w} film", i % 2) for i, w in enumerate("good bad fine dull".split())])
    server = TailHost(load_model(bundle.manifest.model.id, num_labels=2, seed=int(bundle.manifest.extra.get("seed", 0))))
    strategy = make_strategy("fedper", CFG)
    first = strategy.plan(0, "c0", 2, server)
    settings = RoundSettings(0, 3, 2, 0.05, "sgd", 0.0, personal=False)
    t.begin_round(settings, first.adapters)
    t.train_local()
    mine = {n: p.detach().numpy().copy() for n, p in t.params.items()}
    head = personal_head_names(server.blocks, server.info.num_blocks)
    rng = np.random.default_rng(2)
    server.load_state({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in server.state().items()})
    t.begin_round(RoundSettings(1, 3, 2, 0.05, "sgd", 0.0, personal=False), strategy.plan(1, "c0", 2, server).adapters)
    now = {n: p.detach().numpy() for n, p in t.params.items()}
    for n in now:
        want = mine[n] if n in head else server.state()[n]
        np.testing.assert_array_equal(now[n], want, err_msg=n)
