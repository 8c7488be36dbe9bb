"""The device-memory model: each part follows its definition."""

from __future__ import annotations


import pytest

from flexsfl.core.memory import OPTIMIZER_STATES, PYTHON_MB, RUNTIMES, largest_split, memory_breakdown_mb, memory_mb


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_memory_parts_follow_their_definitions(minilm_cost, runtime):
    c, rt = minilm_cost, RUNTIMES[runtime]
    kw = dict(batch=8, seq=128, runtime=runtime)
    sgd = memory_breakdown_mb(c, 3, **kw)
    assert sgd["weights"] == pytest.approx(4 * (c.embedding_params + rt.block_weight_copies * 3 * c.block_params) / 1e6)
    assert sgd["io"] == pytest.approx(4 * 8 * 128 * 384 * 2 / 1e6)
    assert sgd["runtime"] == rt.fixed_mb + PYTHON_MB
    for opt, states in OPTIMIZER_STATES.items():
        extra = memory_breakdown_mb(c, 3, optimizer=opt, **kw)["adapters"] - sgd["adapters"]
        assert extra == pytest.approx(4 * 3 * c.lora_params_per_block * states / 1e6)
    assert memory_mb(c, 3, align=True, **kw) - memory_mb(c, 3, **kw) == pytest.approx(4 * 8 * 128 * 384 / 1e6)
    # each block adds its weights, its adapters and their gradients, and its activations
    step = memory_mb(c, 4, **kw) - memory_mb(c, 3, **kw)
    per_block = (4 * rt.block_weight_copies * c.block_params + 8 * c.lora_params_per_block
                 + rt.activation_copies * 4 * 8 * 128 * c.saved_floats(128))
    assert step == pytest.approx(per_block / 1e6)
    assert c.saved_floats(256) - c.saved_floats(128) == 12 * 128  # attention probabilities grow with seq²


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_largest_split_is_the_last_that_fits(minilm_cost, runtime):
    kw = dict(batch=8, seq=128, runtime=runtime)
    mems = [memory_mb(minilm_cost, s, **kw) for s in range(1, minilm_cost.num_blocks)]
    assert mems == sorted(mems)
    for s, m in enumerate(mems, start=1):
        assert largest_split(minilm_cost, m, **kw) == s
        assert largest_split(minilm_cost, m - 0.01, **kw) == (s - 1 or None)
    assert largest_split(minilm_cost, 1e9, **kw) == minilm_cost.num_blocks - 1
