"""Hostile bytes: random frames and mutated valid frames must only ever raise ProtocolError.

Whatever arrives, ``parse`` either returns a valid message or raises a one-line
:class:`~flexsfl.core.errors.ProtocolError` subclass; never another exception, and never an
allocation sized by what a frame merely declares. A connection that refuses a frame is unchanged.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexsfl.core.errors import ProtocolError
from flexsfl.core.wire import ENCODINGS, Connection, Limits, Role, parse
from tests.core.test_wire_messages import ACT_FIELDS, MASK, frame, one_of_each
from tests.core.test_wire_protocol import reach, snapshot

CORPUS = [m.serialize() for enc in ENCODINGS for m in one_of_each(enc)]
SMALL = Limits(max_frame_bytes=1 << 16, max_header_bytes=4096, max_tensors=8, max_ndim=4, max_dim=1 << 12)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def outcome(data, limits=Limits()) -> None:
    """Parse; a refusal must be a one-line ProtocolError, an acceptance a message that serializes again."""
    try:
        msg = parse(data, limits)
    except ProtocolError as e:
        assert str(e) and "\n" not in str(e)
        return
    again = msg.serialize()
    if getattr(msg, "encoding", None) != "int8":  # re-quantizing int8 values may pick other codes
        assert parse(again) == msg


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    (hlen,) = struct.unpack_from("<I", data, 8)
    return data[:12], json.loads(data[12:12 + hlen]), data[12 + hlen:]


def join(prefix: bytes, header, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()  # may write NaN/Infinity: the parser must refuse them
    return prefix[:8] + struct.pack("<I", len(raw)) + raw + payload


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    outcome(data)


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=512))
def test_random_bytes_behind_a_valid_magic(version, kind, hlen, rest):
    outcome(b"FSFL" + struct.pack("<BBHI", version, kind, 0, hlen) + rest)


@FUZZ
@given(st.sampled_from(CORPUS), st.data())
def test_bit_flips_truncations_and_extensions(data, draw):
    frame_ = bytearray(data)
    how = draw.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if how == "flip":
        for bit in draw.draw(st.lists(st.integers(0, 8 * len(frame_) - 1), min_size=1, max_size=8)):
            frame_[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        del frame_[draw.draw(st.integers(0, len(frame_) - 1)):]
    elif how == "extend":
        frame_ += draw.draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw.draw(st.integers(0, len(frame_)))
        frame_[at:at + draw.draw(st.integers(0, 16))] = draw.draw(st.binary(max_size=16))
    outcome(bytes(frame_))
    outcome(bytes(frame_), SMALL)


@FUZZ
@given(st.sampled_from(CORPUS), st.data())
def test_header_json_edits(data, draw):
    prefix, header, payload = split(data)
    node, path = header, []
    while isinstance(node, (dict, list)) and node and draw.draw(st.booleans()):
        key = draw.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        if isinstance(parent, dict) and draw.draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw.draw(json_values)
    else:
        header = draw.draw(json_values)
    outcome(join(prefix, header, payload))


sizes = st.integers(-3, 2**80) | st.integers(0, 64) | st.just(2**62)


@FUZZ
@given(st.sampled_from([d for d in CORPUS if split(d)[1]["tensors"]]), st.data())
def test_lies_about_shapes_and_sizes(data, draw):
    prefix, header, payload = split(data)
    entry = draw.draw(st.sampled_from(header["tensors"]))
    shape = draw.draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 9), max_size=8))
    if draw.draw(st.booleans()):
        entry["shape"] = shape
    if draw.draw(st.booleans()):
        entry["nbytes"] = draw.draw(sizes)
    elif draw.draw(st.booleans()) and all(d >= 0 for d in entry["shape"]):  # an honest header for a huge tensor
        entry["nbytes"] = int(np.prod(entry["shape"], dtype=object)) * 4
    if draw.draw(st.booleans()):
        entry[draw.draw(st.sampled_from(["dtype", "encoding", "name"]))] = draw.draw(
            st.sampled_from(["float32", "bfloat16", "int8", "bool", "raw", "fp16", "int8", "z", "attention_mask", "", 3]))
    payload = payload[: draw.draw(st.integers(0, len(payload)))] if draw.draw(st.booleans()) else payload
    outcome(join(prefix, header, payload))
    outcome(join(prefix, header, payload), SMALL)


def test_huge_declared_sizes_allocate_nothing():
    huge = [1 << 24] * 6
    header = {"fields": ACT_FIELDS, "tensors": [
        {"name": "z", "dtype": "float32", "shape": huge, "encoding": "fp32", "nbytes": 4 * (1 << 144)}, MASK]}
    data = frame(5, header, b"\0" * 64)
    tracemalloc.start()
    try:
        outcome(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CORPUS), st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
def test_a_connection_that_refuses_a_frame_is_unchanged(data, flips):
    client, server = reach("IN_ROUND+train")
    frame_ = bytearray(data)
    for bit in flips:
        frame_[bit // 8 % len(frame_)] ^= 1 << (bit % 8)
    for conn in (client, server):
        before = snapshot(conn)
        try:
            conn.receive(bytes(frame_))
        except ProtocolError:
            assert snapshot(conn) == before


@settings(max_examples=100, deadline=None)
@given(
    st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 7)),
    st.sampled_from(["train", "eval"]),
    st.integers(0, 2**32),
)
def test_any_activations_round_trips_exactly_in_fp32(shape, mode, seed):
    from flexsfl.core.wire import Activations

    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30)
    mask = rng.integers(0, 2, shape[:2])
    labels = rng.integers(-100, 1000, shape[:2] if seed % 2 else shape[:1])
    msg = Activations(round_id=seed, step_id=seed // 3, mode=mode, z=z, attention_mask=mask, labels=labels)
    assert parse(msg.serialize()) == msg


@settings(max_examples=100, deadline=None)
@given(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 7)), st.integers(0, 2**32),
       st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_any_u_shaped_leg_round_trips_exactly_in_fp32(shape, seed, loss):
    from flexsfl.core.wire import Activations, MiddleOutput, TopGradients

    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30) for _ in range(3)]
    for msg in (
        Activations(round_id=seed, step_id=seed // 3, mode="train", z=arrays[0], attention_mask=rng.integers(0, 2, shape[:2])),
        MiddleOutput(round_id=seed, step_id=seed // 3, h=arrays[1]),
        TopGradients(round_id=seed, step_id=seed // 3, loss=loss, grad_h=arrays[2]),
    ):
        data = msg.serialize()
        assert parse(data) == msg
        header = json.loads(data[12:12 + struct.unpack_from("<I", data, 8)[0]])
        assert "labels" not in header["fields"] and "labels" not in [t["name"] for t in header["tensors"]]
