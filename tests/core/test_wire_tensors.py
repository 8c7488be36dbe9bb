"""The tensor codec: every dtype and encoding, the encodings' error bounds, NaN/Inf, zero copy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flexsfl.core.errors import ConfigError, ErrorCode, FrameError, TensorError
from flexsfl.core.wire.tensors import DTYPES, ENCODINGS, Limits, TensorHeader, decode, encode, payload_nbytes

RAW_DTYPES = ["int64", "int32", "int8", "uint8", "bool"]


def roundtrip(a: np.ndarray, encoding: str, name: str = "t") -> tuple[TensorHeader, np.ndarray, bytes]:
    header, parts = encode(name, a, encoding)
    buf = b"".join(parts)
    assert len(buf) == header.nbytes == payload_nbytes(header.dtype, header.encoding, header.shape)
    out = decode(header, memoryview(buf))
    assert out.shape == a.shape
    assert not out.flags.writeable
    return header, out, buf


# --- exact round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", RAW_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_raw_dtypes_round_trip_exactly(dtype, shape):
    info = np.iinfo(dtype) if dtype != "bool" else None
    rng = np.random.default_rng(1)
    if info is None:
        a = rng.integers(0, 2, shape).astype(bool)
    else:
        a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    header, out, _ = roundtrip(a, "raw")
    assert header.dtype == dtype and header.encoding == "raw"
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("shape", [(), (0,), (4, 0), (7,), (2, 3, 5)])
def test_fp32_round_trips_exactly_including_extremes(shape):
    a = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    if a.size >= 4:
        a.flat[:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal, -0.0]
    _, out, _ = roundtrip(a, "fp32")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)
    assert np.array_equal(np.signbit(out), np.signbit(a))


@pytest.mark.parametrize("src", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_any_float_input_decodes_to_float32(src, encoding):
    a = (np.arange(-12, 12).reshape(4, 6) / 4).astype(src)  # exactly representable in every encoding
    a[:, 0] = 127 / 4  # int8: each vector's absmax is 127 steps of 1/4
    _, out, _ = roundtrip(a, encoding)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a.astype(np.float32))


def test_fp32_decode_views_the_frame_and_encode_views_the_array():
    a = np.random.default_rng(3).standard_normal((8, 16, 32), dtype=np.float32)
    header, parts = encode("z", a, "fp32")
    assert len(parts) == 1 and np.shares_memory(np.asarray(parts[0]), a)  # no copy on the way out
    frame = b"".join(parts)
    out = decode(header, memoryview(frame))
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8))  # no copy on the way in
    np.testing.assert_array_equal(out, a)


def test_unaligned_payload_decodes_to_an_aligned_array():
    a = np.arange(10, dtype=np.int64)
    header, parts = encode("ids", a, "raw")
    frame = b"x" + b"".join(parts)
    out = decode(header, memoryview(frame)[1:])
    assert out.flags.aligned
    np.testing.assert_array_equal(out, a)


# --- error bounds of the lossy encodings -------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite32.filter(lambda x: abs(x) < 65504)))
def test_fp16_error_bound(a):
    _, out, _ = roundtrip(a, "fp16")
    x, y = a.astype(np.float64), out.astype(np.float64)
    assert (np.abs(x - y) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite32.filter(lambda x: abs(x) < 3.38e38)))
def test_bf16_error_bound(a):
    _, out, _ = roundtrip(a, "bf16")
    x, y = a.astype(np.float64), out.astype(np.float64)
    assert (np.abs(x - y) <= np.maximum(np.abs(x) * 2.0**-8, 2.0**-134)).all()


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite32.filter(lambda x: abs(x) < 1e37)))
def test_int8_error_bound_is_absmax_over_254_per_vector(a):
    _, out, _ = roundtrip(a, "int8")
    x, y = a.astype(np.float64), out.astype(np.float64)
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    assert (np.abs(x - y) <= absmax / 254 + absmax * 2.0**-20 + 2.0**-143).all()


def test_int8_payload_is_codes_then_one_scale_per_vector():
    a = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)
    header, out, buf = roundtrip(a, "int8")
    assert header.nbytes == 6 + 2 * 4
    np.testing.assert_array_equal(np.frombuffer(buf[:6], np.int8), [64, -127, 32, 0, 0, 0])
    np.testing.assert_array_equal(np.frombuffer(buf[6:], "<f4"), np.float32([2 / 127, 0]))
    np.testing.assert_array_equal(out[1], 0)  # an all-zero vector gets scale 0, not a division by 0


@pytest.mark.parametrize("shape", [(), (3, 0), (0, 4)])
def test_int8_degenerate_shapes(shape):
    a = np.full(shape, 0.75, np.float32)
    _, out, _ = roundtrip(a, "int8")
    np.testing.assert_allclose(out, a, atol=0.75 / 254)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Nearest bfloat16 by exact float64 distance, ties to the even pattern (an independent oracle)."""
    u = x.view(np.uint32).astype(np.uint64)
    lo = (u >> 16).astype(np.uint32)
    hi = lo + 1
    widen = lambda p: (p.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    d_lo = np.abs(x.astype(np.float64) - widen(lo))
    d_hi = np.abs(x.astype(np.float64) - widen(hi))
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def test_bf16_is_round_to_nearest_even_on_every_kind_of_pattern():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 0x7F7F0000, 20000, dtype=np.uint32)
    bits[::4] = (bits[::4] & 0xFFFF0000) | 0x8000  # exact ties
    bits[1::4] = (bits[1::4] & 0xFFFF0000) | 0x7FFF  # just below a tie
    bits[2::8] |= 0x80000000  # negatives
    bits[:16] = np.arange(16, dtype=np.uint32) << 12  # subnormals and zero
    x = bits.view(np.float32)
    header, parts = encode("z", x, "bf16")
    np.testing.assert_array_equal(np.frombuffer(b"".join(parts), "<u2"), _bf16_reference(x))


def test_bf16_ties_go_to_even():
    one_plus = np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])  # halfway cases
    _, out, _ = roundtrip(one_plus, "bf16")
    np.testing.assert_array_equal(out, np.float32([1.0, 1 + 2**-6, -1.0]))


def _every_fp16_value_and_the_float32s_around_its_roundings() -> np.ndarray:
    finite = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # 0 ... 65504
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties (every half value, subnormals included)
    mids32 = mids.astype(np.float32)
    x = np.concatenate([finite, mids, np.nextafter(mids32, 0), np.nextafter(mids32, 1), [65519.996, 2.0**-26, 2.0**-30, 1e-45]])
    x = x.astype(np.float32)
    return np.concatenate([x, -x])


def test_fp16_encode_matches_numpy_bit_for_bit_on_every_tie_and_subnormal():
    # Our own float32 -> float16 (numpy's is ~40x slower on gradients, which are mostly fp16 subnormals)
    # must round exactly as IEEE round-to-nearest-even does.
    x = _every_fp16_value_and_the_float32s_around_its_roundings()
    rng = np.random.default_rng(5)
    x = np.concatenate([x, rng.standard_normal(50000, dtype=np.float32) * np.float32(10.0) ** rng.integers(-12, 5, 50000)])
    x = x[np.abs(x) < 65520]
    _, parts = encode("g", x, "fp16")
    np.testing.assert_array_equal(np.frombuffer(b"".join(parts), "<u2"), x.astype("<f2").view("<u2"))


def test_fp16_decode_matches_numpy_on_every_finite_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7C00) != 0x7C00]
    header = TensorHeader("g", "float16", (bits.size,), "fp16", bits.nbytes)
    got = decode(header, memoryview(bits.tobytes()))
    np.testing.assert_array_equal(got.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))  # -0.0 too


# --- what encode refuses ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values_naming_tensor_and_index(encoding, bad):
    a = np.zeros((2, 3), np.float32)
    a[1, 2] = bad
    with pytest.raises(TensorError) as e:
        encode("z", a, encoding)
    assert e.value.code == ErrorCode.NON_FINITE
    assert "'z'" in str(e.value) and "(1, 2)" in str(e.value)


def test_encode_refuses_values_that_overflow_the_encoding():
    assert decode(*_joined(encode("g", np.float32([65519.0]), "fp16")))[0] == 65504  # rounds down: still fine
    with pytest.raises(TensorError, match="'g'.*overflow float16; use encoding bf16 or fp32"):
        encode("g", np.float32([1.0, 70000.0]), "fp16")
    big = np.finfo(np.float32).max
    with pytest.raises(TensorError, match="'g'.*overflow bfloat16; use encoding fp32"):
        encode("g", np.float32([big]), "bf16")
    with pytest.raises(TensorError, match="'g'.*overflow the int8 encoding; use encoding fp32"):
        encode("g", np.float32([big]), "int8")
    near = np.float32(3.37e38)
    np.testing.assert_allclose(decode(*_joined(encode("g", np.float32([near, -near]), "int8"))), [near, -near], rtol=1e-6)


def _joined(pair):
    header, parts = pair
    return header, b"".join(parts)


@pytest.mark.parametrize(
    "array, encoding, message",
    [
        (np.arange(3), "fp16", "encoding fp16 is for float tensors, not int64"),
        (np.zeros(3, np.float32), "raw", "dtype float32 cannot travel raw"),
        (np.zeros(3, np.uint16), "raw", "dtype uint16 cannot travel raw"),
        (np.zeros(3, np.complex64), "fp32", "encoding fp32 is for float tensors, not complex64"),
        (np.zeros(3, np.float32), "fp8", "unknown encoding 'fp8'"),
    ],
)
def test_encode_refuses_dtype_encoding_mismatch(array, encoding, message):
    with pytest.raises(TensorError, match=message):
        encode("t", array, encoding)


# --- what decode refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, encoding, payload",
    [
        ("float32", "fp32", np.float32([1, np.nan]).tobytes()),
        ("float32", "fp32", np.float32([-np.inf, 1]).tobytes()),
        ("float16", "fp16", np.uint16([0x3C00, 0x7C00]).tobytes()),  # 1.0, +Inf
        ("float16", "fp16", np.uint16([0xFE00, 0]).tobytes()),  # NaN
        ("bfloat16", "bf16", np.uint16([0x3F80, 0x7FC0]).tobytes()),  # 1.0, NaN
        ("bfloat16", "bf16", np.uint16([0xFF80, 0]).tobytes()),  # -Inf
        ("int8", "int8", np.int8([1, 2]).tobytes() + np.float32([np.nan]).tobytes()),
        ("int8", "int8", np.int8([1, 2]).tobytes() + np.float32([-1.0]).tobytes()),
        ("int8", "int8", np.int8([-128, 2]).tobytes() + np.float32([3e36]).tobytes()),  # -128 * 3e36 overflows
    ],
)
def test_decode_refuses_non_finite_payloads(dtype, encoding, payload):
    header = TensorHeader("z", dtype, (2,), encoding, len(payload))
    with pytest.raises(TensorError, match="'z'") as e:
        decode(header, payload)
    assert e.value.code == ErrorCode.NON_FINITE


def test_decode_refuses_bool_bytes_other_than_0_and_1():
    header = TensorHeader("m", "bool", (3,), "raw", 3)
    with pytest.raises(TensorError, match="'m': bool payload holds bytes other than 0 and 1"):
        decode(header, b"\x00\x01\x02")


def test_decode_refuses_a_payload_of_the_wrong_length():
    header = TensorHeader("m", "int32", (3,), "raw", 12)
    with pytest.raises(FrameError, match="payload is 8 bytes, header says 12"):
        decode(header, b"\x00" * 8)


# --- the tensor table entry ---------------------------------------------------------------------

GOOD = {"name": "z", "dtype": "float32", "shape": [2, 3], "encoding": "fp32", "nbytes": 24}


@pytest.mark.parametrize(
    "edit, error, message",
    [
        ({"nbytes": 23}, FrameError, "tensor 'z': nbytes 23 does not match float32\\[2, 3\\] in encoding fp32 \\(24 bytes\\)"),
        ({"nbytes": True}, FrameError, "nbytes True does not match"),
        ({"nbytes": 24.0}, FrameError, "nbytes 24.0 does not match"),
        ({"shape": [2, -3]}, TensorError, "shape must be a list of non-negative ints"),
        ({"shape": [2, True]}, TensorError, "shape must be a list of non-negative ints"),
        ({"shape": "2x3"}, TensorError, "shape must be a list of non-negative ints"),
        ({"shape": [1] * 7, "nbytes": 4}, FrameError, "7 dimensions, over the limit of 6"),
        ({"shape": [1 << 25], "nbytes": 4 << 25}, FrameError, "has a dimension over the limit of 16777216"),
        ({"dtype": "float64"}, TensorError, "encoding 'fp32' carries dtype float32, not 'float64'"),
        ({"dtype": "float16"}, TensorError, "encoding 'fp32' carries dtype float32, not 'float16'"),
        ({"encoding": "gzip"}, TensorError, "unknown encoding 'gzip'"),
        ({"encoding": "raw"}, TensorError, "encoding 'raw' carries dtype int64 or int32 or int8 or uint8 or bool"),
        ({"name": ""}, FrameError, "entry 4: name must be a non-empty string"),
        ({"name": "\ud800"}, FrameError, "entry 4: name must be a non-empty string"),
        ({"name": 5}, FrameError, "entry 4: name must be a non-empty string"),
        ({"extra": 1}, FrameError, "entry 4 must be an object with keys"),
    ],
)
def test_table_entry_validation_names_the_tensor(edit, error, message):
    with pytest.raises(error, match=message) as e:
        TensorHeader.from_json({**GOOD, **edit}, 4)
    assert "\n" not in str(e.value)
    if "over the limit" in message:
        assert e.value.code == ErrorCode.TOO_LARGE


def test_table_entry_round_trips_and_respects_custom_limits():
    assert TensorHeader.from_json(GOOD, 0).to_json() == GOOD
    with pytest.raises(FrameError, match="3 dimensions, over the limit of 2"):
        TensorHeader.from_json({**GOOD, "shape": [1, 2, 3], "nbytes": 24}, 0, Limits(max_ndim=2))
    with pytest.raises(FrameError, match="missing|keys"):
        TensorHeader.from_json({k: v for k, v in GOOD.items() if k != "nbytes"}, 0)
    with pytest.raises(FrameError, match="must be an object"):
        TensorHeader.from_json([1, 2], 0)


def test_int8_nbytes_counts_codes_and_scales():
    assert payload_nbytes("int8", "int8", (8, 128, 384)) == 8 * 128 * 384 + 4 * 8 * 128
    assert payload_nbytes("int8", "raw", (8, 128, 384)) == 8 * 128 * 384
    assert payload_nbytes("int8", "int8", ()) == 1 + 4
    assert set(DTYPES) == {"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"}


@pytest.mark.parametrize("kw", [{"max_frame_bytes": 0}, {"max_tensors": -1}, {"max_ndim": True}, {"max_dim": 2.5}, {"max_header_bytes": 1 << 32}])
def test_limits_are_validated(kw):
    with pytest.raises(ConfigError, match=f"Limits.{next(iter(kw))}"):
        Limits(**kw)
