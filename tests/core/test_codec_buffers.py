"""The codec's reused buffers: reused when free, never while an array still refers to them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flexsfl.core.wire import Gradients, parse
from flexsfl.core.wire.codec import POOL, BufferPool
from flexsfl.core.wire.tensors import decode, encode

FLOAT_ENCODINGS = ["fp16", "bf16", "int8"]  # fp32 encodes and decodes as views, no buffers


def _big(seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((8, 64, 96), dtype=np.float32) * np.float32(scale)  # 192 KiB


@pytest.mark.parametrize("encoding", FLOAT_ENCODINGS)
def test_two_consecutive_decodes_keep_their_values(encoding):
    a, b = _big(0), _big(1, 1e-5)
    ha, pa = encode("g", a, encoding)
    fa = b"".join(pa)
    hb, pb = encode("g", b, encoding)
    fb = b"".join(pb)
    first = decode(ha, fa)
    want_first = first.copy()
    second = decode(hb, fb)
    third = decode(ha, fa)
    np.testing.assert_array_equal(first, want_first)  # the later decodes wrote elsewhere
    assert not np.shares_memory(first, second) and not np.shares_memory(first, third)
    np.testing.assert_array_equal(third, want_first)
    assert not np.array_equal(second, want_first)


@pytest.mark.parametrize("encoding", FLOAT_ENCODINGS)
def test_a_payload_stays_valid_while_a_later_encode_runs(encoding):
    _, parts = encode("z", _big(2), encoding)
    want = b"".join(parts)
    encode("z", _big(3), encoding)  # same name, same shape: would reuse the buffer were it free
    encode("other", _big(4), encoding)
    assert b"".join(parts) == want


@pytest.mark.parametrize("encoding", FLOAT_ENCODINGS)
def test_a_free_buffer_is_reused(encoding):
    header, parts = encode("g", _big(5), encoding)
    frame = b"".join(parts)
    first_addr = np.asarray(parts[0]).__array_interface__["data"][0]
    del parts
    _, parts = encode("g", _big(6), encoding)
    assert np.asarray(parts[0]).__array_interface__["data"][0] == first_addr
    out = decode(header, frame)
    addr = out.__array_interface__["data"][0]
    del out
    assert decode(header, frame).__array_interface__["data"][0] == addr


def test_parsed_messages_do_not_share_their_gradients():
    frames = [Gradients(round_id=0, step_id=i, g=_big(10 + i, 1e-6), loss=0.5, encoding="fp16").serialize() for i in range(3)]
    msgs = [parse(f) for f in frames]
    for i, m in enumerate(msgs):
        np.testing.assert_array_equal(m.g, parse(frames[i]).g)
    assert not np.shares_memory(msgs[0].g, msgs[1].g)


def test_pool_hands_out_fresh_arrays_past_its_limits():
    pool = BufferPool(min_bytes=1024, per_key=2, max_bytes=1 << 20)
    small = pool.take("k", 10, np.float32)
    assert pool.held_bytes() == 0 and small.size == 10  # under min_bytes: not pooled
    held = [pool.take("k", 1024, np.float32) for _ in range(3)]  # the third is past per_key
    assert pool.held_bytes() == 2 * 4096
    assert not np.shares_memory(held[0], held[1]) and not np.shares_memory(held[1], held[2])
    del held
    again = pool.take("k", 512, np.float32)
    assert again.base is not None and pool.held_bytes() == 2 * 4096  # reused, not grown
    huge = pool.take("k2", 1 << 19, np.float32)  # 2 MiB would pass max_bytes
    assert huge.base is None and pool.held_bytes() == 2 * 4096


def test_buffers_are_per_thread():
    pool = BufferPool(min_bytes=0)
    mine = pool.take("k", 100, np.float32)
    seen = []
    t = threading.Thread(target=lambda: seen.append(pool.take("k", 100, np.float32)))
    t.start()
    t.join()
    assert not np.shares_memory(mine, seen[0])


def test_default_pool_is_bounded_after_many_encodes():
    for i in range(20):
        for enc in FLOAT_ENCODINGS:
            encode("z", _big(i), enc)
    assert POOL.held_bytes() < 16 << 20
