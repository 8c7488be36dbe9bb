"""The fp16 kernels: exact across block edges, errors from a later block, no page faults."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from flexsfl.core.errors import ErrorCode, TensorError
from flexsfl.core.wire import codec
from flexsfl.core.wire.tensors import decode, encode


def _finite_patterns() -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return bits[(bits & 0x7C00) != 0x7C00]


def test_encode_is_exact_across_block_edges_and_a_short_last_block():
    # Three blocks and a few elements: every kind of value lands on each side of a block edge.
    n = 3 * codec._BLOCK + 5
    rng = np.random.default_rng(7)
    halves = rng.choice(_finite_patterns(), n).view(np.float16).astype(np.float64)
    up = np.nextafter(halves.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    x = ((halves + up) / 2).astype(np.float32)  # ties (and 65504's upper neighbour's midpoint is 65520: clip)
    x[np.abs(x) >= 65520] = 65504
    x[::3] = halves[::3]
    got = codec.to_fp16("g", x)
    np.testing.assert_array_equal(got.view(np.uint16), x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("bad, code", [(70000.0, ErrorCode.BAD_TENSOR), (np.nan, ErrorCode.NON_FINITE)])
def test_encode_refuses_a_bad_value_in_a_later_block(bad, code):
    x = np.ones(2 * codec._BLOCK + 3, np.float32)
    x[-2] = bad
    with pytest.raises(TensorError) as e:
        codec.to_fp16("g", x)
    assert e.value.code == code and "'g'" in str(e.value)


def test_decode_is_exact_on_every_finite_pattern_across_block_edges():
    bits = np.tile(_finite_patterns(), 2)[: 2 * codec._BLOCK + 7]
    got = codec.from_fp16("g", bits)
    np.testing.assert_array_equal(got.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("pattern", [0x7C00, 0xFC00, 0x7E01])  # +Inf, -Inf, NaN
def test_decode_refuses_inf_or_nan_in_a_later_block(pattern):
    bits = np.zeros(2 * codec._BLOCK + 3, np.uint16)
    bits[-1] = pattern
    with pytest.raises(TensorError) as e:
        codec.from_fp16("g", bits)
    assert e.value.code == ErrorCode.NON_FINITE and "'g'" in str(e.value) and f"({bits.size - 1},)" in str(e.value)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_fp16_encode_and_decode_of_a_step_fault_no_pages_once_warm():
    # One step's Z (1.5 MiB): fresh temporaries would fault ~370 pages per call, ~7,000 in all.
    x = np.random.default_rng(8).standard_normal((8, 128, 384), dtype=np.float32)
    for _ in range(2):
        header, parts = encode("z", x, "fp16")
        frame = b"".join(parts)
        del parts
        decode(header, frame)
    f0 = _faults()
    for _ in range(10):
        _, parts = encode("z", x, "fp16")
        del parts
        decode(header, frame)
    assert _faults() - f0 < 200
