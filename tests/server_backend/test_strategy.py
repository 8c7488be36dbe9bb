"""Every round strategy against the real TailHost of a tiny Llama (4 blocks, LoRA on q,v + task head).

What a round configures (mode, personalization, which adapters are sent) and what aggregation does
to the global adapters φ, given known uploads, compared with numpy written out here:

- FlexP-SFL: layer-wise rule: block j's new φ^j is the sample-weighted mean of the heads that hold
  j and of the server's own φ^j, weighted by the samples of the clients whose head stops before j.
- SplitFed: the same rule on heads that all stop at the same split; no personalization.
- FedAvg: the sample-weighted mean of every tensor.
- LocalOnly: φ is never changed.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.server_backend.aggregation import ClientUpdate
from flexsfl.server_backend.strategy import STRATEGIES, TrainConfig, make_strategy
from flexsfl.server_backend.tail_host import TailHost

CFG = TrainConfig(local_steps=7, batch_size=3, lr=0.02, optimizer="adamw", align_lambda=0.3)


@pytest.fixture(scope="module")
def host_and_phi(tiny_model_dirs):
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=2))
    rng = np.random.default_rng(0)
    # Known, distinct values everywhere (LoRA B starts at zero: a mean of zeros proves nothing).
    phi = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items()}
    return host, phi


@pytest.fixture
def host(host_and_phi):
    host, phi = host_and_phi
    host.load_state(phi)
    return host


def _heads(host, rng, split: int) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.head_params(split).items()}


def _assert_state(host, want: dict[str, np.ndarray]) -> None:
    got = host.state()
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7, err_msg=n)


def _assert_same(got, want):
    assert got is not None and set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n])


def layerwise_reference(phi, blocks, uploads):
    """φ^j <- (Σ_{k: j<s_k} n_k θ_k^j + (Σ_{k: j>=s_k} n_k) φ^j) / Σ_k n_k; φ^j as it was if no head holds j."""
    out = {}
    for name, p in phi.items():
        j = blocks[name]
        holders = [(u.params[name], u.num_samples) for u in uploads if j < u.split]
        if not holders:
            out[name] = p.copy()
            continue
        server_n = sum(u.num_samples for u in uploads if j >= u.split)
        num = sum(n * t.astype(np.float64) for t, n in holders) + server_n * p.astype(np.float64)
        out[name] = (num / (sum(n for _, n in holders) + server_n)).astype(np.float32)
    return out


# --- names -------------------------------------------------------------------------------------


def test_strategies_by_name():
    assert set(STRATEGIES) == {"flexpsfl", "splitfed", "fedavg", "local"}
    for name in STRATEGIES:
        assert make_strategy(name, CFG).name == name
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'; choose one of: flexpsfl, splitfed, fedavg, local"):
        make_strategy("fedprox", CFG)


# --- what a round configures -------------------------------------------------------------------


def _check_common(plan):
    assert (plan.local_steps, plan.batch_size, plan.lr, plan.optimizer) == (7, 3, 0.02, "adamw")


@pytest.mark.parametrize("name, personal, align", [("flexpsfl", True, 0.3), ("splitfed", False, 0.0)])
def test_split_strategies_send_the_global_head_every_round(host, name, personal, align):
    s = make_strategy(name, CFG)
    for round_id in (0, 1):
        for cid, split in (("a", 1), ("b", 3)):
            plan = s.plan(round_id, cid, split, host)
            _check_common(plan)
            assert plan.mode == "split" and plan.personal is personal and plan.align_lambda == align
            # φ's head blocks only: the alignment reference (and θ_k at the first round / every round)
            want = {n: a for n, a in host.state().items() if host.blocks[n] < split}
            assert set(plan.adapters) == set(want) and want
            for n in want:
                np.testing.assert_array_equal(plan.adapters[n], want[n])


def test_fedavg_sends_the_whole_model_every_round(host):
    s = make_strategy("fedavg", CFG)
    for round_id in (0, 1):
        plan = s.plan(round_id, "a", 2, host)
        _check_common(plan)
        assert plan.mode == "full" and plan.personal is False and plan.align_lambda == 0.0
        _assert_same(plan.adapters, host.state())


def test_local_only_sends_the_pretrained_model_once_per_client(host):
    s = make_strategy("local", CFG)
    first = s.plan(0, "a", 2, host)
    assert first.mode == "full" and first.personal is True and first.align_lambda == 0.0
    _assert_same(first.adapters, host.state())
    assert s.plan(1, "a", 2, host).adapters is None  # nothing is shared after the start
    _assert_same(s.plan(1, "b", 2, host).adapters, host.state())  # a newcomer starts from the same model
    assert s.plan(2, "b", 2, host).adapters is None


# --- what aggregation does to φ ----------------------------------------------------------------


def test_flexpsfl_aggregates_layer_wise_across_split_points(host):
    phi = host.state()
    rng = np.random.default_rng(1)
    ups = {"a": ClientUpdate(params=_heads(host, rng, 1), num_samples=3, split=1),
           "b": ClientUpdate(params=_heads(host, rng, 3), num_samples=5, split=3)}
    want = layerwise_reference(phi, host.blocks, list(ups.values()))
    make_strategy("flexpsfl", CFG).aggregate(0, host, ups)
    _assert_state(host, want)
    # The rule, spelled out for one tensor per block: block 0 is held by both heads (φ^0 drops
    # out), blocks 1-2 by b alone (φ weighted by a's samples), block 3 and the task head by nobody.
    by_block = {}
    for n, j in host.blocks.items():
        by_block.setdefault(j, n)
    n0, n1, n3 = by_block[0], by_block[1], by_block[3]
    got = host.state()
    np.testing.assert_allclose(got[n0], (3 * ups["a"].params[n0] + 5 * ups["b"].params[n0]) / 8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[n1], (5 * ups["b"].params[n1] + 3 * phi[n1]) / 8, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[n3], phi[n3])
    head = [n for n, j in host.blocks.items() if j == max(host.blocks.values())]
    assert head and all(np.array_equal(got[n], phi[n]) for n in head)


def test_splitfed_averages_the_heads_of_one_split(host):
    phi = host.state()
    rng = np.random.default_rng(2)
    ups = {c: ClientUpdate(params=_heads(host, rng, 2), num_samples=n, split=2) for c, n in (("a", 2), ("b", 6), ("c", 4))}
    make_strategy("splitfed", CFG).aggregate(0, host, ups)
    want = dict(phi)
    for n in ups["a"].params:
        want[n] = sum(u.num_samples * u.params[n].astype(np.float64) for u in ups.values()) / 12
    assert all(host.blocks[n] < 2 for n in ups["a"].params)
    _assert_state(host, want)


def test_fedavg_is_the_sample_weighted_mean_of_every_tensor(host):
    rng = np.random.default_rng(3)
    full = max(host.blocks.values())
    ups = {c: ClientUpdate(params=_heads(host, rng, full + 1), num_samples=n, split=full) for c, n in (("a", 1), ("b", 3))}
    assert set(ups["a"].params) == set(host.state())
    make_strategy("fedavg", CFG).aggregate(0, host, ups)
    _assert_state(host, {n: (ups["a"].params[n] + 3.0 * ups["b"].params[n]) / 4 for n in ups["a"].params})


def test_local_only_never_changes_phi(host):
    phi = host.state()
    rng = np.random.default_rng(4)
    full = max(host.blocks.values())
    ups = {"a": ClientUpdate(params=_heads(host, rng, full + 1), num_samples=9, split=full)}
    make_strategy("local", CFG).aggregate(0, host, ups)
    _assert_state(host, phi)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_without_uploads_leaves_phi(host, name):
    phi = host.state()
    make_strategy(name, CFG).aggregate(0, host, {})
    _assert_state(host, phi)
