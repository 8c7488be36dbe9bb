"""choose_u_split's decisions for the U-shaped topology: time and memory terms by hand, pins, budgets, ties."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from flexsfl.core.bundle import Manifest
from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.errors import ConfigError
from flexsfl.core.memory import RUNTIMES, memory_mb
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.profiles import EXAMPLE_PROFILES
from flexsfl.core.u_planner import (choose_u_split, middle_step_flops, step_bytes, top_memory_mb, top_step_flops,
                                    top_trainable_params)

# A synthetic 8-block decoder classifier, so the cases do not depend on a packaged model.
SYNTH = ModelCost.from_config({
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
    "num_key_value_heads": 8, "num_hidden_layers": 8, "vocab_size": 32000, "max_position_embeddings": 2048,
}, num_labels=4)
B, T, D = 8, 128, 512


def _profile(**kw) -> DeviceProfile:
    base = dict(name="dev", arch="aarch64", cores=4, memory_mb=8192, memory_budget_mb=8000, head_gflops=10.0,
                uplink_mbps=50.0, downlink_mbps=100.0, rtt_ms=20.0, backend="ort")
    return DeviceProfile(**{**base, **kw})


def test_top_and_middle_flops_are_the_tails_layers(minilm_cost):
    for c in (SYNTH, minilm_cost):  # minilm: BERT classification, the top's last block runs [CLS] only
        L = c.num_blocks
        for u in range(1, L - 1):
            assert top_step_flops(c, u, batch=B, seq=T) == pytest.approx(tail_step_flops(c, L - u, batch=B, seq=T))
            for s in range(1, L - u):
                assert middle_step_flops(c, s, u, batch=B, seq=T) + top_step_flops(c, u, batch=B, seq=T) == \
                    pytest.approx(tail_step_flops(c, s, batch=B, seq=T))
    # u = 0: the top is the final norm + task head alone
    assert top_step_flops(SYNTH, 0, batch=B, seq=T) == B * T * SYNTH.final_flops(T)


def test_step_bytes_by_hand():
    z = B * T * D * 4
    assert step_bytes(SYNTH, batch=B, seq=T) == (2 * z + B * T, 2 * z)  # Z, mask, dL/dH up; H, g down
    assert step_bytes(SYNTH, batch=B, seq=T, topology="head-tail") == (z + B * T + 8 * B, z)  # Z, mask, labels up; g down
    assert step_bytes(SYNTH, batch=B, seq=T, encoding="fp16")[1] == 2 * B * T * D * 2


def test_time_terms_by_hand():
    p = _profile()
    choice = choose_u_split(SYNTH, p, batch=B, seq=T, server_gflops=200.0, clients=16)
    e = next(e for e in choice.estimates if (e.split, e.top) == (2, 3))
    z = B * T * D * 4
    net = (2 * z + B * T) * 8 / 50e6 + 2 * z * 8 / 100e6 + 2 * 0.020  # two round trips per step
    assert e.network_s == pytest.approx(net)
    dev = (head_step_flops(SYNTH, 2, batch=B, seq=T) + top_step_flops(SYNTH, 3, batch=B, seq=T)) / 10e9
    assert e.device_s == pytest.approx(dev)
    assert e.server_s == pytest.approx(middle_step_flops(SYNTH, 2, 3, batch=B, seq=T) / (200e9 / 16))
    assert e.time_s == pytest.approx(dev + net + e.server_s)
    # every pair with s >= 1, u >= 0 and a middle block: 7 + 6 + ... + 1
    assert len(choice.estimates) == 28 and all(e.split + e.top <= 7 for e in choice.estimates)


def test_top_memory_by_hand():
    rt = RUNTIMES["ort"]
    got = top_memory_mb(SYNTH, 2, batch=B, seq=T, optimizer="adamw", runtime="ort")
    assert got["top_weights"] == pytest.approx(4 * rt.top_weight_copies * (2 * SYNTH.block_params + SYNTH.final_params) / 1e6)
    assert got["top_adapters"] == pytest.approx(4 * (2 * SYNTH.lora_params_per_block + D * 4) * 4 / 1e6)  # adamw: 2 states
    # a decoder's top runs every block at every position
    assert got["top_activations"] == pytest.approx(rt.top_activation_copies * 4 * B * T * 2 * SYNTH.saved_floats(T) / 1e6)
    assert got["top_logits"] == pytest.approx(4 * B * 4 / 1e6)
    assert got["top_io"] == pytest.approx(rt.top_io_copies * 4 * B * T * D / 1e6) and got["top_runtime"] == rt.top_fixed_mb
    est = choose_u_split(SYNTH, _profile(), batch=B, seq=T, optimizer="adamw").estimates
    e = next(e for e in est if (e.split, e.top) == (1, 2))
    assert e.memory_mb == pytest.approx(memory_mb(SYNTH, 1, batch=B, seq=T, optimizer="adamw") + sum(got.values()))


@pytest.fixture(scope="module")
def minilm_top_manifest():
    """The manifest `flexsfl export --model minilm --split 1 --top 2 --max-batch 8 --max-seq 128` wrote (bench top's bundle)."""
    return Manifest.from_json(json.loads((pathlib.Path(__file__).parent / "data" / "minilm_s1_u2_manifest.json").read_text()))


# Top memory (MB) that `flexsfl bench top --bundle ... --repeats 5` measured on ORT (benchmarks/README §11), the
# peak-RSS difference of head + top and head-only fresh processes; (u, B, T) -> runs. At u = 2, B 8, T 128 the
# measurement is bimodal (123, or about 165 when ONNX Runtime's arena extends once more); the lower mode is here.
MEASURED_TOP_MB = {(0, 4, 48): (4.8, 4.7), (0, 4, 128): (6.8, 6.9), (0, 8, 48): (6.8, 6.8), (0, 8, 128): (11.5, 11.9),
                   (1, 4, 48): (32.4, 32.2), (1, 4, 128): (35.7, 36.2), (1, 8, 48): (35.4, 38.2), (1, 8, 128): (42.4, 42.6),
                   (2, 4, 48): (68.7, 69.9), (2, 4, 128): (87.0, 89.3), (2, 8, 48): (79.5, 79.6), (2, 8, 128): (123.0,)}


def test_top_memory_terms_on_a_minilm_manifest(minilm_top_manifest):
    """MiniLM's top of 2 blocks (blocks 5-6, the last [CLS]-only) + pooler + classifier, B 8, T 48, ORT, SGD."""
    m = minilm_top_manifest
    cost, u = ModelCost.from_manifest(m), m.extra["top"]["blocks"]
    assert u == 2 and (cost.block_params, cost.final_params, cost.saved_floats(48)) == (1_774_464, 148_610, 4436)
    trainable = sum(math.prod(p["shape"]) for p in m.extra["top"]["trainable_parameters"])  # 2 blocks' q, v LoRA + classifier
    assert trainable == top_trainable_params(cost, u) == 2 * 12_288 + 2 * 384 + 2
    got = top_memory_mb(cost, u, batch=8, seq=48, runtime="ort")
    assert got["top_weights"] == pytest.approx(4 * 4 * (2 * 1_774_464 + 148_610) / 1e6)  # 4 copies: 59.16 MB
    assert got["top_adapters"] == pytest.approx(4 * 25_346 * 2 / 1e6)  # values + gradients (SGD)
    # block 5 in full: 2.3 x saved(48); block 6 at [CLS] only: K and V of the 384 positions, once
    assert got["top_activations"] == pytest.approx(4 * 8 * 48 * (2.3 * 4436 + 2 * 384) / 1e6)  # 16.85 MB
    assert got["top_logits"] == pytest.approx(4 * 8 * 2 / 1e6)
    assert got["top_io"] == pytest.approx(5.4 * 4 * 8 * 48 * 384 / 1e6) and got["top_runtime"] == 0.8
    assert sum(got.values()) == pytest.approx(80.2, abs=0.05)  # measured 79.5 and 79.6


def test_top_memory_is_within_ten_percent_of_every_measurement(minilm_top_manifest):
    cost = ModelCost.from_manifest(minilm_top_manifest)
    for (u, b, t), runs in MEASURED_TOP_MB.items():
        predicted = sum(top_memory_mb(cost, u, batch=b, seq=t, runtime="ort").values())
        for measured in runs:
            assert abs(predicted / measured - 1) <= 0.10, (u, b, t, predicted, measured)


def test_slow_device_keeps_one_head_block_and_no_top_block():
    choice = choose_u_split(SYNTH, _profile(head_gflops=2.0), batch=B, seq=T, server_gflops=200.0, clients=16)
    assert (choice.split, choice.top) == (1, 0)
    assert "slower than its share" in choice.reason and "head/tail would take split 1" in choice.reason
    # U costs more per step than head/tail on the same device: two more transfers and a round trip
    assert choice.chosen.time_s > choice.head_tail[1]


def test_fast_device_takes_as_many_blocks_as_its_memory_allows():
    full = choose_u_split(SYNTH, _profile(head_gflops=50.0), batch=B, seq=T, server_gflops=200.0, clients=16)
    assert full.split + full.top == 7  # unconstrained: every block but the one the server must keep
    # every pair with 7 device blocks costs the same time: the tie goes to the smaller split
    assert (full.split, full.top) == (1, 6)
    # a budget between 4 and 5 device blocks of the cheapest layout
    mem = {(e.split, e.top): e.memory_mb for e in full.estimates}
    four = min(m for (s, u), m in mem.items() if s + u == 4)
    five = min(m for (s, u), m in mem.items() if s + u == 5)
    assert four < five
    p = _profile(head_gflops=50.0, memory_budget_mb=math.ceil((four + five) / 2))
    c = choose_u_split(SYNTH, p, batch=B, seq=T, server_gflops=200.0, clients=16)
    assert c.split + c.top == 4 and c.chosen.fits
    assert "faster than its share" in c.reason and "needs" in c.reason


def test_pins():
    p = _profile(head_gflops=50.0)
    c = choose_u_split(SYNTH, p, batch=B, seq=T, pin_split=3)
    assert (c.split, c.top) == (3, 4) and c.pinned == ("split",)  # the most top blocks beside split 3
    c = choose_u_split(SYNTH, p, batch=B, seq=T, pin_top=0)
    assert (c.split, c.top) == (7, 0) and c.pinned == ("top",)
    c = choose_u_split(SYNTH, p, batch=B, seq=T, pin_split=2, pin_top=1)
    assert (c.split, c.top) == (2, 1) and "pinned pairs" in c.reason
    with pytest.raises(ConfigError, match=r"top 6 does not fit split 2 \(8 blocks\).*choose 0\.\.5"):
        choose_u_split(SYNTH, p, batch=B, seq=T, pin_split=2, pin_top=6)
    small = _profile(memory_budget_mb=300)
    with pytest.raises(ConfigError, match=r"no \(split, top\) with split 6 fits the memory budget of 300 MB: .*unpin"):
        choose_u_split(SYNTH, small, batch=B, seq=T, pin_split=6)


def test_demo_profiles_on_minilm(minilm_cost):
    """The demo's three example devices (batch 8, seq 128, 16 clients on 200 GFLOP/s)."""
    got = {n: choose_u_split(minilm_cost, p, batch=8, seq=128) for n, p in EXAMPLE_PROFILES.items()}
    # The Pi 4 is slower than its share, yet takes one top block: BERT's last block on the device runs
    # the [CLS] position only, while the server's middle would run it for every position.
    assert (got["rpi4"].split, got["rpi4"].top) == (1, 1) and "[CLS] position only" in got["rpi4"].reason
    assert got["rpi4"].chosen.time_s < next(e for e in got["rpi4"].estimates if (e.split, e.top) == (1, 0)).time_s
    z = 8 * 128 * 384 * 4
    for name, c in got.items():
        assert c.chosen.fits and c.head_tail is not None
        # U per step: Z + mask + dL/dH up, H + g down, two RTTs; head/tail: Z + mask + labels up, g down, one RTT
        p = EXAMPLE_PROFILES[name]
        want = (2 * z + 8 * 128) * 8 / (p.uplink_mbps * 1e6) + 2 * z * 8 / (p.downlink_mbps * 1e6) + 2 * p.rtt_ms / 1e3
        assert c.chosen.network_s == pytest.approx(want)
