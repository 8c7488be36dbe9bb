"""choose_split's decisions: time terms, budgets, pins, ties, the example profiles."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexsfl.core.errors import ConfigError
from flexsfl.core.cost import ModelCost, head_step_flops, tail_step_flops
from flexsfl.core.memory import memory_mb
from flexsfl.core.planner import TIE_RTOL, choose_split, step_time_s
from flexsfl.core.profile import DeviceProfile
from flexsfl.core.profiles import EXAMPLE_PROFILES


def _profile(**kw) -> DeviceProfile:
    base = dict(name="dev", arch="aarch64", cores=4, memory_mb=8192, memory_budget_mb=4000, head_gflops=10.0,
                uplink_mbps=50.0, downlink_mbps=100.0, rtt_ms=20.0, backend="ort")
    return DeviceProfile(**{**base, **kw})


def test_step_time_adds_device_network_and_server_share(minilm_cost):
    c, p = minilm_cost, _profile()
    B, T, d = 8, 128, 384
    for enc, zbytes in (("fp32", B * T * d * 4), ("fp16", B * T * d * 2), ("int8", B * T * d + 4 * B * T)):
        net = (zbytes + B * T) * 8 / 50e6 + zbytes * 8 / 100e6 + 0.020
        want = head_step_flops(c, 2, batch=B, seq=T) / 10e9 + net + tail_step_flops(c, 2, batch=B, seq=T) / (200e9 / 16)
        assert step_time_s(c, 2, p, batch=B, seq=T, encoding=enc, server_gflops=200.0, clients=16) == pytest.approx(want)
    # The network term is the same at every split: Z is [B, T, d] wherever the model is cut.
    est = choose_split(c, p, batch=B, seq=T).estimates
    assert len({e.network_s for e in est}) == 1


# A synthetic 8-block decoder, so the cases below do not depend on a packaged model.
SYNTH = ModelCost.from_config({
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
    "num_key_value_heads": 8, "num_hidden_layers": 8, "vocab_size": 32000, "max_position_embeddings": 2048,
})


def _budget_between(s_fits: int, **kw) -> int:
    """A budget where split ``s_fits`` fits and ``s_fits + 1`` does not."""
    lo, hi = memory_mb(SYNTH, s_fits, **kw), memory_mb(SYNTH, s_fits + 1, **kw)
    return math.ceil((lo + hi) / 2)


def test_fast_device_takes_the_largest_split_that_fits_not_the_unconstrained_fastest():
    kw = dict(batch=8, seq=128, runtime="ort")
    p = _profile(head_gflops=50.0, memory_budget_mb=_budget_between(4, **kw))
    choice = choose_split(SYNTH, p, batch=8, seq=128, server_gflops=200.0, clients=16)
    times = {e.split: e.time_s for e in choice.estimates}
    assert min(times, key=times.get) == 7  # unconstrained: as many blocks as possible
    assert not choice.estimate(7).fits and not choice.estimate(5).fits
    assert choice.split == 4 and choice.estimate(4).fits
    assert "faster than its share" in choice.reason and "split 5 needs" in choice.reason
    # More memory moves the choice up; the same device with a less busy server moves it down.
    assert choose_split(SYNTH, dataclasses.replace(p, memory_budget_mb=8000), batch=8, seq=128).split == 7
    assert choose_split(SYNTH, p, batch=8, seq=128, server_gflops=200.0, clients=2).split == 1


def test_slow_device_keeps_one_block():
    choice = choose_split(SYNTH, _profile(head_gflops=2.0), batch=8, seq=128, server_gflops=200.0, clients=16)
    assert choice.split == 1 and "slower than its share" in choice.reason


def test_equal_times_go_to_the_smaller_split():
    # The device runs exactly as fast as its share of the server: every split takes the same time.
    p = _profile(head_gflops=12.5)
    choice = choose_split(SYNTH, p, batch=4, seq=64, server_gflops=200.0, clients=16)
    times = [e.time_s for e in choice.estimates]
    assert max(times) - min(times) <= 1e-12 * max(times)
    assert choice.split == 1
    assert choose_split(SYNTH, p, batch=4, seq=64, server_gflops=200.0, clients=16, candidates=[5, 3, 6]).split == 3


def test_pinned_split_is_used_when_it_fits_and_refused_when_it_does_not():
    kw = dict(batch=8, seq=128, runtime="ort")
    p = _profile(head_gflops=50.0, memory_budget_mb=_budget_between(4, **kw))
    choice = choose_split(SYNTH, p, batch=8, seq=128, pin=2)
    assert (choice.split, choice.pinned) == (2, True)
    assert "fastest split that fits is 4" in choice.reason
    with pytest.raises(ConfigError) as e:
        choose_split(SYNTH, p, batch=8, seq=128, pin=6)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(rf"pinned split 6 needs \d+ MB at batch 8, seq 128 but the budget is {p.memory_budget_mb} MB; "
                     r"splits 1, 2, 3, 4 fit \(fastest: 4\), or split 6 at batch \d+ or seq \d+", msg)
    with pytest.raises(ConfigError, match="split 8 is out of range: choose 1..7"):
        choose_split(SYNTH, p, batch=8, seq=128, pin=8)


def test_nothing_fits_says_what_would():
    kw = dict(batch=8, seq=128, runtime="ort")
    need1 = memory_mb(SYNTH, 1, **kw)
    budget = math.floor(memory_mb(SYNTH, 1, batch=3, seq=128, runtime="ort"))  # batch 3 does not fit, 2 does
    with pytest.raises(ConfigError) as e:
        choose_split(SYNTH, _profile(memory_budget_mb=budget), batch=8, seq=128)
    msg = str(e.value)
    m = re.fullmatch(rf"no split fits the memory budget of {budget} MB: split 1 needs (\d+) MB at batch 8, seq 128; "
                     r"it fits at batch (\d+) or seq (\d+), or with --memory-budget-mb (\d+)", msg)
    assert m, msg
    assert int(m.group(1)) == int(m.group(4)) == math.ceil(need1)
    b, t = int(m.group(2)), int(m.group(3))
    assert b == 2
    assert memory_mb(SYNTH, 1, batch=8, seq=t, runtime="ort") <= budget < memory_mb(SYNTH, 1, batch=8, seq=t + 1, runtime="ort")
    with pytest.raises(ConfigError, match=r"even batch 1, seq 2 needs \d+ MB; raise --memory-budget-mb to \d+"):
        choose_split(SYNTH, _profile(memory_budget_mb=100), batch=8, seq=128)


def test_profile_gaps_are_reported():
    with pytest.raises(ConfigError, match="has no head_gflops; measure it on the device with `flexsfl edge probe"):
        choose_split(SYNTH, _profile(head_gflops=None), batch=8, seq=128)
    choice = choose_split(SYNTH, _profile(uplink_mbps=None), batch=8, seq=128)
    assert all(e.network_s is None for e in choice.estimates)
    assert any("network time not included" in n for n in choice.notes)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        choose_split(SYNTH, _profile(), batch=8, seq=128, optimizer="adam")
    with pytest.raises(ConfigError, match="unknown encoding 'fp8'"):
        choose_split(SYNTH, _profile(), batch=8, seq=128, encoding="fp8")


@settings(max_examples=60, deadline=None)
@given(
    gflops=st.floats(0.5, 500.0),
    budget=st.integers(100, 3000),
    clients=st.integers(1, 64),
    batch=st.integers(1, 16),
    seq=st.sampled_from([16, 64, 128, 256]),
    cands=st.sets(st.integers(1, 7), min_size=1),
)
def test_choice_is_the_fastest_split_within_the_budget(gflops, budget, clients, batch, seq, cands):
    p = _profile(head_gflops=gflops, memory_budget_mb=budget)
    fitting = {s: step_time_s(SYNTH, s, p, batch=batch, seq=seq, clients=clients)
               for s in sorted(cands) if memory_mb(SYNTH, s, batch=batch, seq=seq, runtime="ort") <= budget}
    try:
        choice = choose_split(SYNTH, p, batch=batch, seq=seq, candidates=cands, clients=clients)
    except ConfigError:
        assert not fitting
        return
    assert choice.split in fitting
    best = min(fitting.values())
    assert fitting[choice.split] <= best * (1 + TIE_RTOL)
    assert all(s >= choice.split or t > best * (1 + TIE_RTOL) for s, t in fitting.items())  # no smaller split ties


def test_example_profiles_choose_different_splits_for_minilm(minilm_cost):
    chosen = {name: choose_split(minilm_cost, p, batch=8, seq=128) for name, p in EXAMPLE_PROFILES.items()}
    assert {n: c.split for n, c in chosen.items()} == {"rpi4": 1, "rpi5": 3, "jetson-orin": 5}
    assert "slower than its share" in chosen["rpi4"].reason and chosen["rpi4"].estimate(2).fits
    assert "split 4 needs" in chosen["rpi5"].reason
    assert all(e.fits for e in chosen["jetson-orin"].estimates)


