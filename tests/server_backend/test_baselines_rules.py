"""FedRep and Ditto, server side, on the real TailHost of a tiny Llama: what a round sends and
tells the device (its local rule), and aggregation as the sample-weighted mean against numpy
(FedRep: the bodies; Ditto: the global models ``w_k``)."""

from __future__ import annotations

import numpy as np
import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.server_backend.aggregation import ClientUpdate
from flexsfl.server_backend.baselines import personal_head_names
from flexsfl.server_backend.strategy import STRATEGIES, TrainConfig, make_strategy
from flexsfl.server_backend.tail_host import TailHost

CFG = TrainConfig(local_steps=6, batch_size=2, lr=0.01, optimizer="sgd", fedrep_head_steps=4, ditto_mu=0.3)


@pytest.fixture(scope="module")
def host(tiny_model_dirs):
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=2))
    rng = np.random.default_rng(0)
    host.load_state({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items()})
    return host


def test_registered_as_whole_model_strategies():
    for name in ("fedrep", "ditto"):
        s = make_strategy(name, CFG)
        assert name in STRATEGIES and s.mode == "full" and s.personal is False and s.refuse(2) is None
    assert STRATEGIES["fedrep"].uploads_own_model and not STRATEGIES["ditto"].uploads_own_model


def test_fedrep_sends_the_body_and_its_head_phase(host):
    plan = make_strategy("fedrep", CFG).plan(0, "c0", 2, host)
    head = personal_head_names(host.blocks, host.info.num_blocks)
    assert head and set(plan.adapters) == set(host.state()) - head
    assert (plan.local_rule, plan.head_steps, plan.local_steps, plan.prox_mu) == ("fedrep", 4, 6, 0.0)


def test_fedrep_refuses_a_head_phase_that_leaves_the_body_no_step():
    with pytest.raises(ConfigError, match=r"fedrep_head_steps \(6\) must be >= 0 and below local_steps \(6\)"):
        make_strategy("fedrep", TrainConfig(local_steps=6, fedrep_head_steps=6))


def test_ditto_sends_the_whole_global_model_and_mu(host):
    plan = make_strategy("ditto", CFG).plan(0, "c0", 2, host)
    state = host.state()
    assert set(plan.adapters) == set(state) and all(np.array_equal(plan.adapters[n], state[n]) for n in state)
    assert (plan.local_rule, plan.prox_mu, plan.head_steps) == ("ditto", 0.3, 0)


def test_other_strategies_keep_the_plain_rule(host):
    for name in ("fedavg", "fedper", "local", "splitfed", "flexpsfl"):
        assert make_strategy(name, CFG).plan(0, "c0", 2, host).local_rule == "plain", name


@pytest.mark.parametrize("name", ["fedrep", "ditto"])
def test_aggregation_is_the_sample_weighted_mean(host, name):
    rng = np.random.default_rng(1)
    state = host.state()
    ups = {f"c{k}": ClientUpdate({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in state.items()}, n, 1)
           for k, n in enumerate((5, 15, 80))}
    make_strategy(name, CFG).aggregate(0, host, ups)
    got = host.state()
    for n in state:  # numpy: Σ n_k θ_k / Σ n_k (FedRep's heads too, for the global model's own evaluation)
        want = sum(u.num_samples * u.params[n].astype(np.float64) for u in ups.values()) / 100.0
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6, err_msg=n)
