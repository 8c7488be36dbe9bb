"""The device clock on a synthetic federation (two profiles, known costs, a straggler): round times
by hand; a U-shaped client's top and extra transfers by hand; and its costs for real profiles
agree with the split planners' predictions (head/tail and U)."""

import dataclasses

import pytest

from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.model_config import read_model_config
from flexsfl.core.planner import step_time_s
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import choose_u_split, top_step_flops
from flexsfl.sim.clock import ClientStep, DeviceClock, round_time, run_clients, split_client, u_client, whole_model_client
from flexsfl.sim.config import SimConfig

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


# Round numbers: 8 Mbit/s up = 1 MB/s, 16 Mbit/s down = 2 MB/s, 10 ms RTT, 2 GFLOP/s.
DEV = DeviceProfile(name="dev", arch="aarch64", cores=4, memory_mb=4096, memory_budget_mb=4000, head_gflops=2.0,
                    uplink_mbps=8.0, downlink_mbps=16.0, rtt_ms=10.0, backend="ort")


def test_u_client_adds_its_top_and_the_extra_transfers_by_hand(minilm):
    """MiniLM (6 blocks, d = 384), B = 8, T = 48, fp32: Z, H, dL/dH and dL/dZ are 8·48·384·4 = 589 824 bytes
    each, the mask 384 (uint8). Head/tail: Z + mask up, g down, one RTT. U at (1, 1): Z + mask + dL/dH up,
    H + dL/dZ down, two RTTs; the top's block 6 and classifier on the device; the server runs blocks 2..5."""
    ht = split_client("h", minilm, DEV, 1, batch=8, seq=48)
    u = u_client("u", minilm, DEV, 1, 1, batch=8, seq=48)
    assert ht.network_s == pytest.approx(590_208 / 1e6 + 589_824 / 2e6 + 0.010, rel=1e-12)  # 0.89512 s
    assert u.network_s == pytest.approx(1_180_032 / 1e6 + 1_179_648 / 2e6 + 0.020, rel=1e-12)  # 1.789856 s
    # the top's fused step costs what the same layers cost the server in head/tail at split L - u = 5
    top = top_step_flops(minilm, 1, batch=8, seq=48)
    assert top == tail_step_flops(minilm, 5, batch=8, seq=48)
    assert u.compute_s == pytest.approx((head_step_flops(minilm, 1, batch=8, seq=48) + top) / 2e9, rel=1e-12)
    assert u.compute_s - ht.compute_s == pytest.approx(top / 2e9, rel=1e-9)
    assert u.server_flops == pytest.approx(ht.server_flops - top, rel=1e-12)  # the middle: the tail without the top
    # per round: head LoRA (q, v: 2 · 8 · (384 + 384) = 12 288 values) + top LoRA (12 288) + classifier (384·2 + 2)
    personal = 4 * (12_288 + 12_288 + 770)  # 101 384 bytes
    assert u.round_s == pytest.approx(personal / 1e6 + personal / 2e6 + 0.010, rel=1e-12)
    assert u.memory_mb > ht.memory_mb and u.fits

    # a round of 10 steps each on a 10 GFLOP/s server shared by both: 5 GFLOP/s each
    r = round_time([(ht, 10), (u, 10)], server_gflops=10.0)
    want_ht = ht.round_s + 10 * (ht.compute_s + 0.89512 + ht.server_flops / 5e9)
    want_u = u.round_s + 10 * (u.compute_s + 1.789856 + u.server_flops / 5e9)
    assert r.per_client == pytest.approx({"h": want_ht, "u": want_u}, rel=1e-9)
    assert r.straggler == "u"  # ~9 s more on the wire over 10 steps outweighs the server time it saves


@pytest.mark.parametrize("name", sorted(EXAMPLE_PROFILES))
def test_u_client_is_the_u_planners_step_time_and_memory(minilm, name):
    p = EXAMPLE_PROFILES[name]
    for pin_split, pin_top, align in ((1, 0, False), (1, 2, True), (2, 1, False)):
        want = choose_u_split(minilm, p, batch=8, seq=48, pin_split=pin_split, pin_top=pin_top, clients=4, align=align,
                              server_gflops=200.0).chosen
        c = u_client("k", minilm, p, pin_split, pin_top, batch=8, seq=48, align=align)
        r = round_time([(c, 1)] + [(dataclasses.replace(c, client=f"o{i}"), 1) for i in range(3)], server_gflops=200.0)
        assert r.per_client["k"] - c.round_s == pytest.approx(want.time_s, rel=1e-12)
        assert c.memory_mb == pytest.approx(want.memory_mb, rel=1e-12)


def test_run_clients_counts_the_tops_of_u_shaped_clients():
    cfg = SimConfig(strategy="flexpsfl-u", profiles=("rpi4", "rpi5"), clients=2, batch_size=8, max_seq=48, align_lambda=0.0)
    cost = ModelCost.from_config(read_model_config("minilm"), task="seq_cls", num_labels=2)
    kw = dict(batch=8, seq=48, optimizer=cfg.optimizer)
    costs = run_clients(cfg, [1, 2], [1, 0])
    assert costs["c0"] == u_client("c0", cost, EXAMPLE_PROFILES["rpi4"], 1, 1, **kw)
    assert costs["c1"] == u_client("c1", cost, EXAMPLE_PROFILES["rpi5"], 2, 0, **kw)
    ht = run_clients(dataclasses.replace(cfg, strategy="flexpsfl", topology="head-tail"), [1, 2])
    assert ht["c0"] == split_client("c0", cost, EXAMPLE_PROFILES["rpi4"], 1, **kw)
    with pytest.raises(ConfigError, match="top 5 does not fit split 1"):
        run_clients(cfg, [1, 2], [5, 0])
