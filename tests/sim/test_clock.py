"""The device clock on a synthetic federation (two profiles, known costs, a straggler): round times
by hand; and its costs for real profiles agree with the split planner's predictions."""

import dataclasses

import pytest

from flexsfl.core.cost import ModelCost
from flexsfl.core.errors import ConfigError
from flexsfl.core.model_config import read_model_config
from flexsfl.core.planner import step_time_s
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.sim.clock import ClientStep, DeviceClock, round_time, split_client, whole_model_client

# Two device kinds. Per step: compute + network on the device, server FLOPs at the client's share.
FAST = dict(profile="fast", compute_s=0.1, network_s=0.05, server_flops=2e9, round_s=0.5)
SLOW = dict(profile="slow", compute_s=0.4, network_s=0.1, server_flops=1e9, round_s=1.0)


def test_rounds_end_with_the_slowest_client_by_hand():
    a, c = ClientStep("a", **FAST), ClientStep("c", **FAST)
    b = ClientStep("b", **SLOW)  # the straggler
    clock = DeviceClock(server_gflops=10.0)
    # round 0: three server users share 10 GFLOP/s, 10/3 each: a's server part is 2e9 / (10e9/3) = 0.6 s/step
    r0 = clock.advance([(a, 10), (b, 10), (c, 5)])
    assert r0.per_client["a"] == pytest.approx(0.5 + 10 * (0.1 + 0.05 + 0.6))  # 8.0
    assert r0.per_client["b"] == pytest.approx(1.0 + 10 * (0.4 + 0.1 + 0.3))  # 9.0
    assert r0.per_client["c"] == pytest.approx(0.5 + 5 * (0.1 + 0.05 + 0.6))  # 4.25
    assert r0.straggler == "b" and r0.seconds == pytest.approx(9.0) and clock.now == pytest.approx(9.0)
    # round 1: only a and b; each now gets 5 GFLOP/s
    r1 = clock.advance([(a, 10), (b, 10)])
    assert r1.per_client == pytest.approx({"a": 0.5 + 10 * (0.15 + 0.4), "b": 1.0 + 10 * (0.5 + 0.2)})  # 6.0, 8.0
    assert clock.now == pytest.approx(17.0) and [r.straggler for r in clock.rounds] == ["b", "b"]


def test_whole_model_clients_take_no_server_share_and_unfit_ones_are_marked():
    a = ClientStep("a", **FAST)
    full = ClientStep("f", "slow", compute_s=2.0, round_s=3.0, memory_mb=900.0, fits=False)
    r = round_time([(a, 4), (full, 4)], server_gflops=10.0)
    # a is the server's only user: 2e9 / 10e9 = 0.2 s/step
    assert r.per_client == pytest.approx({"a": 0.5 + 4 * (0.15 + 0.2), "f": 3.0 + 4 * 2.0})
    assert r.straggler == "f" and r.seconds == pytest.approx(11.0) and r.unfit == ("f",)


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="at least one"):
        round_time([])
    with pytest.raises(ConfigError, match="compute_s must be >= 0"):
        ClientStep("a", "fast", compute_s=-1.0)


@pytest.fixture(scope="module")
def minilm():
    return ModelCost.from_config(read_model_config("minilm"), task="seq_cls", num_labels=2)


@pytest.mark.parametrize("name", sorted(EXAMPLE_PROFILES))
def test_split_client_is_the_planners_step_time(minilm, name):
    p = EXAMPLE_PROFILES[name]
    for split, align in ((1, False), (3, True)):
        c = split_client("k", minilm, p, split, batch=8, seq=48, align=align)
        r = round_time([(c, 1)] + [(dataclasses.replace(c, client=f"o{i}"), 1) for i in range(3)], server_gflops=200.0)
        want = step_time_s(minilm, split, p, batch=8, seq=48, server_gflops=200.0, clients=4, align=align)
        assert r.per_client["k"] - c.round_s == pytest.approx(want, rel=1e-12)


def test_whole_model_costs_more_device_time_and_memory_than_a_head(minilm):
    rpi4 = EXAMPLE_PROFILES["rpi4"]
    head = split_client("h", minilm, rpi4, 1, batch=8, seq=48)
    full = whole_model_client("f", minilm, rpi4, batch=8, seq=48)
    assert full.compute_s > 5 * head.compute_s and full.memory_mb > head.memory_mb and full.server_flops == 0
    small = dataclasses.replace(rpi4, name="tiny", memory_budget_mb=int(head.memory_mb) + 1)
    assert split_client("h", minilm, small, 1, batch=8, seq=48).fits
    assert not whole_model_client("f", minilm, small, batch=8, seq=48).fits
