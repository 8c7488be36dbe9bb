"""Every round strategy against the real TailHost of a tiny Llama (4 blocks, LoRA on q,v + task head).

What a round configures (mode, personalization, which adapters are sent) and what aggregation does
to the global adapters φ, given known uploads, compared with numpy written out here:

- FlexP-SFL: layer-wise rule: block j's new φ^j is the sample-weighted mean of the heads that hold
  j and of the server's own φ^j, weighted by the samples of the clients whose head stops before j.
- SplitFed: the same rule on heads that all stop at the same split; no personalization.
- FedAvg: the sample-weighted mean of every tensor.
- LocalOnly: φ is never changed.
- FlexP-SFL-U: the same rule over every block a U-shaped client holds, [0, s) ∪ [L-u, L) and the
  task head; the server's φ^j counts for the clients whose middle held j.
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
    assert set(STRATEGIES) == {"flexpsfl", "flexpsfl-u", "splitfed", "fedavg", "local", "fedper", "fedrep", "ditto"}
    for name in STRATEGIES:
        assert make_strategy(name, CFG).name == name
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'; choose one of: flexpsfl, flexpsfl-u, splitfed, fedavg, local, fedper, fedrep, ditto"):
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


# --- FlexP-SFL-U: U-shaped clients hold head blocks, top blocks and the task head ----------------


def _held(host, split, top):
    L = host.info.num_blocks
    return {n for n, j in host.blocks.items() if j < split or j >= L - top}


@pytest.mark.parametrize("name", ["flexpsfl-u", "flexpsfl"])
def test_u_plan_sends_phi_of_every_block_the_client_holds(host, name):
    L = host.info.num_blocks
    s = make_strategy(name, CFG)
    for round_id in (0, 1):
        for cid, split, top in (("a", 1, 0), ("b", 1, 2), ("c", 2, 1)):
            plan = s.plan(round_id, cid, split, host, top)
            _check_common(plan)
            assert plan.mode == "split" and plan.personal is True and plan.align_lambda == 0.3 and plan.align_top is False
            want = _held(host, split, top)
            assert set(plan.adapters) == want
            assert any(host.blocks[n] == L for n in want)  # the task head travels, even at top 0
            assert not any(split <= host.blocks[n] < L - top for n in want)  # never a middle block
            for n in want:
                np.testing.assert_array_equal(plan.adapters[n], host.state()[n])


def test_u_plan_refuses_what_does_not_fit(host):
    with pytest.raises(ConfigError, match="strategy flexpsfl-u trains U-shaped clients .* export it with --top U"):
        make_strategy("flexpsfl-u", CFG).plan(0, "a", 1, host)
    with pytest.raises(ConfigError, match="use strategy flexpsfl-u, or export the bundle without --top"):
        make_strategy("splitfed", CFG).plan(0, "a", 1, host, 1)
    with pytest.raises(ConfigError, match="top 3 does not fit split 1 of a 4-block model: choose 0 <= top <= 2"):
        make_strategy("flexpsfl-u", CFG).plan(0, "a", 1, host, 3)


def test_refuse_says_which_topology_each_strategy_trains():
    assert make_strategy("flexpsfl", CFG).refuse(None) is None and make_strategy("flexpsfl", CFG).refuse(2) is None
    assert make_strategy("flexpsfl-u", CFG).refuse(0) is None
    assert "export it with --top U" in make_strategy("flexpsfl-u", CFG).refuse(None)
    assert "use strategy flexpsfl-u" in make_strategy("splitfed", CFG).refuse(1)
    assert make_strategy("fedavg", CFG).refuse(1) is None  # the whole model is on the device either way


def test_align_top_needs_lambda():
    import dataclasses

    assert dataclasses.replace(CFG, align_top=True).align_top is True
    with pytest.raises(ConfigError, match="align_top .* set align_lambda > 0 too"):
        dataclasses.replace(CFG, align_lambda=0.0, align_top=True)


def test_align_top_reaches_the_plan(host):
    import dataclasses

    s = make_strategy("flexpsfl", dataclasses.replace(CFG, align_top=True))
    assert s.plan(0, "u", 1, host, 1).align_top is True
    assert s.plan(0, "h", 1, host).align_top is False  # a head/tail client has no top


def test_flexpsfl_u_aggregates_head_and_top_blocks_layer_wise(host):
    phi = host.state()
    L = host.info.num_blocks
    rng = np.random.default_rng(7)
    rand = lambda names: {n: rng.standard_normal(phi[n].shape).astype(np.float32) for n in names}  # noqa: E731
    ups = {"a": ClientUpdate(rand(_held(host, 1, 2)), 4, 1, 2),  # holds 0, 2, 3, head; middle 1
           "b": ClientUpdate(rand(_held(host, 2, 0)), 6, 2, 0)}  # holds 0, 1, head; middle 2, 3
    make_strategy("flexpsfl-u", CFG).aggregate(0, host, ups)
    got = host.state()
    for n, j in host.blocks.items():
        a, b = ups["a"].params.get(n), ups["b"].params.get(n)
        if j == 0 or j == L:  # both hold it: the server's φ takes no part
            want = (4 * a.astype(np.float64) + 6 * b) / 10
        elif j == 1:  # b holds it, the server trained it for a
            want = (6 * b.astype(np.float64) + 4 * phi[n]) / 10
        else:  # 2, 3: a holds them, the server trained them for b
            want = (4 * a.astype(np.float64) + 6 * phi[n]) / 10
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6, err_msg=n)


def test_devices_score_every_nth_round_and_the_last():
    assert [TrainConfig(rounds=7, score_every=3).scores(r) for r in range(7)] == [False, False, True, False, False, True, True]
    assert all(TrainConfig(rounds=4).scores(r) for r in range(4))  # the default: every round
    # a run without a round count has no last round: every N-th only
    assert [TrainConfig(rounds=0, score_every=2).scores(r) for r in range(4)] == [False, True, False, True]
    with pytest.raises(ConfigError, match="score_every must be >= 1, got 0"):
        TrainConfig(score_every=0)
