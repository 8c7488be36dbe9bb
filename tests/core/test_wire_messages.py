"""Messages: round trips of every kind in every encoding, field validation, frame parsing errors."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from flexsfl.core.errors import ErrorCode, FrameError, ProtocolError, TensorError
from flexsfl.core.wire import (
    ENCODINGS,
    MAGIC,
    PROTOCOL_VERSION,
    Activations,
    Adapters,
    Bye,
    Error,
    Gradients,
    Hello,
    Limits,
    Message,
    MessageKind,
    Metrics,
    MiddleOutput,
    Predictions,
    RoundConfig,
    RoundEnd,
    TopGradients,
    Upload,
    Welcome,
    parse,
)

HASH = "ab" * 32


def exact(shape, encoding, seed=0) -> np.ndarray:
    """Float32 values that ``encoding`` carries exactly: k/8 with |k| <= 127 and, for int8,
    each vector's absmax exactly 127/8 (so its scale is 1/8)."""
    k = np.random.default_rng(seed).integers(-127, 128, shape)
    if k.size:
        k[..., 0] = 127
    return (k / 8).astype(np.float32)


def one_of_each(encoding: str = "fp32") -> list[Message]:
    b, t, d = 2, 5, 16
    mask = np.ones((b, t), np.int64)
    mask[1, 3:] = 0
    return [
        Hello(client_id="pi-4.kitchen_01", token="s3cret", layout_hash=HASH, split=3, backend="ort",
              encodings=("int8", "fp16"), profile={"memory_mb": 4096, "head_throughput": 12.5, "arch": "aarch64"}),
        Welcome(session_id="7f3a", encoding=encoding, max_frame_bytes=1 << 20, info={"model": "minilm", "blocks": 6, "resumed": False}),
        RoundConfig(round_id=4, local_steps=10, batch_size=8, lr=5e-4, optimizer="adamw", align_lambda=0.1),
        Adapters(round_id=4, tensors={"layer.0.q.lora_A": exact((8, 16), encoding, 1), "layer.0.q.lora_B": exact((16, 8), encoding, 2)},
                 encoding=encoding),
        Activations(round_id=4, step_id=2, mode="train", z=exact((b, t, d), encoding, 3), attention_mask=mask,
                    labels=np.array([0, 1]), encoding=encoding),
        Activations(round_id=4, step_id=3, mode="train", z=exact((b, t, d), encoding, 4), attention_mask=mask,
                    labels=np.where(mask == 1, 17, -100), encoding=encoding),
        Activations(round_id=4, step_id=4, mode="eval", z=exact((b, t, d), encoding, 5), attention_mask=mask, encoding=encoding),
        Gradients(round_id=4, step_id=2, loss=0.6931, g=exact((b, t, d), encoding, 6), encoding=encoding),
        Predictions(round_id=4, step_id=4, logits=exact((b, 3), encoding, 7), encoding=encoding),
        Predictions(round_id=4, step_id=5, logits=exact((b, t, 30), encoding, 8), encoding=encoding),
        Upload(round_id=4, num_samples=120, tensors={"layer.0.q.lora_A": exact((8, 16), encoding, 9)}, encoding=encoding),
        Metrics(round_id=4, metrics={"loss": 0.25, "steps": 10, "backend": "ort"}),
        RoundEnd(round_id=4, info={"clients": 3}),
        Error(code=ErrorCode.BUNDLE_MISMATCH, message="layout hash differs; re-export the bundle"),
        Bye(reason="done"),
        Bye(),
        RoundConfig(round_id=5, local_steps=1, batch_size=2, lr=1e-2, optimizer="sgd", align_lambda=0.0, mode="full",
                    personal=False, adapters=False, evaluate=False),
        # U-shaped: the device holds a top of 2 blocks; Z without labels, H down, dL/dH (+ loss) up
        Hello(client_id="pi5-u", token="", layout_hash=HASH, split=2, top=2, backend="executorch"),
        Activations(round_id=4, step_id=6, mode="train", z=exact((b, t, d), encoding, 10), attention_mask=mask, encoding=encoding),
        MiddleOutput(round_id=4, step_id=6, h=exact((b, t, d), encoding, 11), encoding=encoding),
        TopGradients(round_id=4, step_id=6, loss=1.25, grad_h=exact((b, t, d), encoding, 12), encoding=encoding),
    ]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_message_round_trips_in_every_encoding(encoding):
    for msg in one_of_each(encoding):
        data = msg.serialize()
        got = parse(data)
        assert type(got) is type(msg)
        assert got == msg, (msg, got)
        assert data[:4] == MAGIC and data[4] == PROTOCOL_VERSION and data[5] == msg.KIND
        assert got.serialize() == data  # and the frame is canonical


def test_kinds_are_distinct_and_complete():
    kinds = [type(m).KIND for m in one_of_each()]
    assert set(kinds) == set(MessageKind)


def test_zero_size_batches_are_legal_on_the_wire():
    # The codec carries empty tensors; refusing a batch of 0 is check_activations' job.
    for enc in ENCODINGS:
        msg = Activations(round_id=0, step_id=0, mode="train", z=np.zeros((0, 4, 8), np.float32),
                          attention_mask=np.zeros((0, 4), np.int64), labels=np.zeros(0, np.int64), encoding=enc)
        assert parse(msg.serialize()) == msg


@pytest.mark.parametrize("encoding, rel, floor", [("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 2.0**-134)])
def test_lossy_encodings_stay_within_their_bounds_in_a_message(encoding, rel, floor):
    z = np.random.default_rng(0).standard_normal((4, 32, 64), dtype=np.float32) * 10
    msg = Gradients(round_id=1, step_id=1, loss=1.0, g=z, encoding=encoding)
    got = parse(msg.serialize())
    assert got.encoding == encoding and got.g.dtype == np.float32
    assert (np.abs(got.g.astype(np.float64) - z) <= np.maximum(np.abs(z) * rel, floor)).all()
    assert got != msg  # the values did change


def test_int8_z_is_within_absmax_over_254_and_quarter_size():
    z = np.random.default_rng(1).standard_normal((8, 128, 384), dtype=np.float32)
    m = np.ones((8, 128), np.int64)
    fp32 = Activations(round_id=0, step_id=0, mode="eval", z=z, attention_mask=m).serialize()
    int8 = Activations(round_id=0, step_id=0, mode="eval", z=z, attention_mask=m, encoding="int8").serialize()
    assert len(int8) < 0.26 * len(fp32)
    got = parse(int8).z
    absmax = np.abs(z).max(axis=-1, keepdims=True)
    assert (np.abs(got - z) <= absmax / 254 * (1 + 1e-5)).all()


def test_biggest_tensor_is_aligned_and_parsed_without_a_copy():
    msg = one_of_each()[4]
    data = msg.serialize()
    (hlen,) = struct.unpack_from("<I", data, 8)
    assert (12 + hlen) % 8 == 0
    got = parse(data)
    assert np.shares_memory(got.z, np.frombuffer(data, np.uint8))
    assert got.z.flags.aligned


def test_parsed_messages_are_immutable_and_do_not_alias_mutable_input():
    msg = one_of_each()[4]
    buf = bytearray(msg.serialize())
    got = parse(buf)
    buf[-200:] = bytes(200)  # the transport reuses its buffer
    assert got == msg
    for a in (got.z, got.attention_mask, got.labels):
        assert not a.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.round_id = 5


def test_equality_compares_arrays_by_dtype_shape_and_value():
    a = one_of_each()[4]
    assert a == dataclasses.replace(a)
    assert a != dataclasses.replace(a, z=a.z + 1)
    assert a != dataclasses.replace(a, labels=np.array([1, 1]))
    assert a != dataclasses.replace(a, encoding="fp16")
    assert a != dataclasses.replace(a, mode="eval", labels=None)
    assert a != one_of_each()[7]


def test_construction_normalizes_dtypes():
    msg = Activations(round_id=0, step_id=0, mode="train", z=np.zeros((1, 2, 3), np.float64),
                      attention_mask=np.ones((1, 2), bool), labels=np.array([1], np.int32))
    assert (msg.z.dtype, msg.attention_mask.dtype, msg.labels.dtype) == (np.float32, np.int64, np.int64)
    assert msg.attention_mask.tolist() == [[1, 1]]


def test_repr_is_short_and_hides_the_token():
    text = repr(one_of_each()[0]) + repr(one_of_each()[4])
    assert "s3cret" not in text and "token=***" in text
    assert "z=float32[2, 5, 16]" in text and len(text) < 600


def test_error_from_exception_keeps_the_protocol_code():
    err = Error.from_exception(TensorError("tensor 'z' holds NaN", ErrorCode.NON_FINITE))
    assert (err.code, err.message) == (ErrorCode.NON_FINITE, "tensor 'z' holds NaN")
    assert Error.from_exception(RuntimeError("boom")).code == ErrorCode.SERVER_ERROR
    assert parse(err.serialize()) == err


# --- field validation ---------------------------------------------------------------------------

BASE = {m.KIND: m for m in reversed(one_of_each())}  # the first message of each kind


@pytest.mark.parametrize(
    "kind, edit, error, message",
    [
        (MessageKind.HELLO, {"client_id": "pi 4"}, FrameError, "Hello.client_id must be an identifier"),
        (MessageKind.HELLO, {"client_id": "x" * 129}, FrameError, "Hello.client_id must be an identifier"),
        (MessageKind.HELLO, {"layout_hash": "AB" * 32}, FrameError, "Hello.layout_hash must be 64 lowercase hex digits"),
        (MessageKind.HELLO, {"split": 0}, FrameError, r"Hello.split must be an int in \[1, 2\*\*63\)"),
        (MessageKind.HELLO, {"split": True}, FrameError, "Hello.split must be an int"),
        (MessageKind.HELLO, {"backend": ""}, FrameError, "Hello.backend must be a non-empty string"),
        (MessageKind.HELLO, {"encodings": ()}, FrameError, "Hello.encodings must be a non-empty list"),
        (MessageKind.HELLO, {"encodings": ("fp16", "fp16")}, FrameError, "Hello.encodings must be a non-empty list of distinct"),
        (MessageKind.HELLO, {"encodings": ("fp8",)}, FrameError, "Hello.encodings"),
        (MessageKind.HELLO, {"profile": {"memory_mb": [1]}}, FrameError, r"Hello.profile\['memory_mb'\] must be a bool, number or string"),
        (MessageKind.HELLO, {"profile": {"x": float("nan")}}, FrameError, r"Hello.profile\['x'\] must be finite"),
        (MessageKind.HELLO, {"profile": {"": 1}}, FrameError, "Hello.profile key must be a non-empty string"),
        (MessageKind.HELLO, {"protocol_version": 0}, FrameError, "Hello.protocol_version"),
        (MessageKind.WELCOME, {"encoding": "gzip"}, FrameError, "Welcome.encoding must be one of fp32, fp16, bf16, int8"),
        (MessageKind.WELCOME, {"max_frame_bytes": 0}, FrameError, "Welcome.max_frame_bytes"),
        (MessageKind.ROUND_CONFIG, {"lr": 0.0}, FrameError, "RoundConfig.lr must be a finite number > 0"),
        (MessageKind.ROUND_CONFIG, {"lr": float("inf")}, FrameError, "RoundConfig.lr must be a finite number"),
        (MessageKind.ROUND_CONFIG, {"optimizer": "adam"}, FrameError, "RoundConfig.optimizer must be one of sgd, adamw"),
        (MessageKind.ROUND_CONFIG, {"mode": "half"}, FrameError, "RoundConfig.mode must be one of split, full"),
        (MessageKind.ROUND_CONFIG, {"personal": 1}, FrameError, "RoundConfig.personal must be true or false"),
        (MessageKind.ROUND_CONFIG, {"adapters": "yes"}, FrameError, "RoundConfig.adapters must be true or false"),
        (MessageKind.ROUND_CONFIG, {"align_lambda": -0.5}, FrameError, "RoundConfig.align_lambda must be a finite number >= 0"),
        (MessageKind.ROUND_CONFIG, {"round_id": -1}, FrameError, "RoundConfig.round_id"),
        (MessageKind.ROUND_CONFIG, {"round_id": 1 << 63}, FrameError, "RoundConfig.round_id"),
        (MessageKind.ROUND_CONFIG, {"local_steps": "3"}, FrameError, "RoundConfig.local_steps must be an int"),
        (MessageKind.ADAPTERS, {"tensors": {}}, TensorError, "Adapters.tensors must be a non-empty dict"),
        (MessageKind.ADAPTERS, {"tensors": {"a": np.arange(3)}}, TensorError, r"Adapters.tensors\['a'\] must be a float array"),
        (MessageKind.ADAPTERS, {"tensors": {"a": [1.0]}}, TensorError, r"Adapters.tensors\['a'\] must be a numpy array"),
        (MessageKind.ADAPTERS, {"encoding": "fp64"}, FrameError, "Adapters.encoding must be one of"),
        (MessageKind.ACTIVATIONS, {"mode": "test"}, FrameError, "Activations.mode must be one of train, eval"),
        (MessageKind.ACTIVATIONS, {"labels": np.array([0.5, 1.0])}, TensorError, "Activations.labels must be an integer array"),
        (MessageKind.ACTIVATIONS, {"labels": np.array([0, 1, 1])}, TensorError, r"Activations.labels has shape \[3\], z needs \[2\] or \[2, 5\]"),
        (MessageKind.ACTIVATIONS, {"attention_mask": np.full((2, 5), 2)}, TensorError, "Activations.attention_mask must hold only 0 and 1"),
        (MessageKind.ACTIVATIONS, {"attention_mask": np.ones((2, 4))}, TensorError, "Activations.attention_mask must be an integer array"),
        (MessageKind.ACTIVATIONS, {"attention_mask": np.ones((2, 4), int)}, TensorError, r"attention_mask has shape \[2, 4\], z needs \[2, 5\]"),
        (MessageKind.ACTIVATIONS, {"z": np.zeros((2, 5), np.float32)}, TensorError, "Activations.z must have 3 dimensions, got shape"),
        (MessageKind.ACTIVATIONS, {"z": np.zeros((2, 5, 3), np.int32)}, TensorError, "Activations.z must be a float array, got int32"),
        (MessageKind.GRADIENTS, {"loss": float("nan")}, FrameError, "Gradients.loss must be a finite number"),
        (MessageKind.HELLO, {"top": -2}, FrameError, r"Hello.top must be an int in \[-1, 2\*\*63\)"),
        (MessageKind.MIDDLE_OUTPUT, {"h": np.zeros((2, 5), np.float32)}, TensorError, "MiddleOutput.h must have 3 dimensions"),
        (MessageKind.MIDDLE_OUTPUT, {"step_id": -1}, FrameError, "MiddleOutput.step_id"),
        (MessageKind.TOP_GRADIENTS, {"loss": float("inf")}, FrameError, "TopGradients.loss must be a finite number"),
        (MessageKind.TOP_GRADIENTS, {"grad_h": np.zeros((2, 5, 3), np.int64)}, TensorError,
         "TopGradients.grad_h must be a float array, got int64"),
        (MessageKind.PREDICTIONS, {"logits": np.zeros(3, np.float32)}, TensorError, "Predictions.logits must have 2 or 3 dimensions"),
        (MessageKind.UPLOAD, {"num_samples": -3}, FrameError, "Upload.num_samples"),
        (MessageKind.METRICS, {"metrics": {"acc": None}}, FrameError, r"Metrics.metrics\['acc'\] must be a bool, number or string"),
        (MessageKind.METRICS, {"metrics": [("acc", 1.0)]}, FrameError, "Metrics.metrics must be an object"),
        (MessageKind.ERROR, {"code": 99}, FrameError, r"Error.code must be an ErrorCode \(1..11\)"),
        (MessageKind.BYE, {"reason": "\ud800"}, FrameError, "Bye.reason must be a string"),
    ],
)
def test_construction_validates_and_names_the_field(kind, edit, error, message):
    with pytest.raises(error, match=message) as e:
        dataclasses.replace(BASE[kind], **edit)
    assert "\n" not in str(e.value)


# --- frames that do not parse -------------------------------------------------------------------


def frame(kind=MessageKind.BYE, header=None, payload=b"", *, version=PROTOCOL_VERSION, flags=0, magic=MAGIC, hlen=None) -> bytes:
    if header is None:
        header = {"fields": {"reason": ""}, "tensors": []}
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBBHI", magic, version, kind, flags, len(raw) if hlen is None else hlen) + raw + payload


def _z_table(**edit):
    entry = {"name": "z", "dtype": "float32", "shape": [1, 1, 2], "encoding": "fp32", "nbytes": 8}
    return [{**entry, **edit}]


ACT_FIELDS = {"round_id": 0, "step_id": 0, "mode": "eval"}
MASK = {"name": "attention_mask", "dtype": "uint8", "shape": [1, 1], "encoding": "raw", "nbytes": 1}
Z_BYTES = np.float32([1, 2]).tobytes()


@pytest.mark.parametrize(
    "data, code, message",
    [
        (b"FSF", ErrorCode.MALFORMED_FRAME, "frame is 3 bytes, shorter than the 12-byte prefix"),
        (frame(magic=b"GET "), ErrorCode.MALFORMED_FRAME, "frame starts with b'GET ', not b'FSFL'"),
        (frame(version=PROTOCOL_VERSION + 1), ErrorCode.BAD_VERSION,
         f"protocol version {PROTOCOL_VERSION + 1}; this flexsfl speaks {PROTOCOL_VERSION}"),
        (frame(version=1), ErrorCode.BAD_VERSION, f"protocol version 1; this flexsfl speaks {PROTOCOL_VERSION}, upgrade"),
        (frame(kind=99), ErrorCode.UNKNOWN_KIND, "unknown message kind 99"),
        (frame(kind=0), ErrorCode.UNKNOWN_KIND, "unknown message kind 0"),
        (frame(flags=1), ErrorCode.MALFORMED_FRAME, "flags 0x0001"),
        (frame(hlen=1 << 20), ErrorCode.TOO_LARGE, "header is 1048576 bytes, over the limit of 65536"),
        (frame(hlen=100), ErrorCode.MALFORMED_FRAME, "header alone needs 112; the frame is truncated"),
        (frame(header=b"\xff\xfe{}"), ErrorCode.MALFORMED_FRAME, "not UTF-8 JSON"),
        (frame(header=b'{"fields": {"reason": ""}, "tensors": [}'), ErrorCode.MALFORMED_FRAME, "not UTF-8 JSON: Expecting value"),
        (frame(header=b"[" * 60000), ErrorCode.MALFORMED_FRAME, "not UTF-8 JSON"),  # nesting deeper than the parser's recursion limit
        (frame(header=b'{"fields": {"reason": "", "reason": "x"}, "tensors": []}'), ErrorCode.MALFORMED_FRAME, "repeats the key"),
        (frame(header=b'{"fields": {"reason": NaN}, "tensors": []}'), ErrorCode.MALFORMED_FRAME, "holds NaN, which is not JSON"),
        (frame(header=b'{"fields": {"reason": ' + b"9" * 5000 + b"}, \"tensors\": []}"), ErrorCode.MALFORMED_FRAME, "not UTF-8 JSON"),
        (frame(header=[]), ErrorCode.MALFORMED_FRAME, 'exactly the keys "fields" and "tensors"'),
        (frame(header={"fields": {}, "tensors": [], "x": 1}), ErrorCode.MALFORMED_FRAME, 'exactly the keys "fields" and "tensors"'),
        (frame(header={"fields": [], "tensors": []}), ErrorCode.MALFORMED_FRAME, '"fields" must be an object'),
        (frame(header={"fields": {}, "tensors": {}}), ErrorCode.MALFORMED_FRAME, '"tensors" must be a list'),
        (frame(header={"fields": {"reason": ""}, "tensors": []}, payload=b"x"), ErrorCode.MALFORMED_FRAME, "accounts for \\d+; the frame is padded"),
        (frame(header={"fields": {}, "tensors": [{}] * 5000}), ErrorCode.TOO_LARGE, "5000 tensors, over the limit of 4096"),
        (frame(header={"fields": {}}), ErrorCode.MALFORMED_FRAME, 'exactly the keys'),
        (frame(header={"fields": {"reason": "", "why": 1}, "tensors": []}), ErrorCode.MALFORMED_FRAME, "Bye: unknown field\\(s\\) 'why'"),
        (frame(kind=MessageKind.HELLO, header={"fields": {"client_id": "a"}, "tensors": []}), ErrorCode.MALFORMED_FRAME,
         "Hello: missing field\\(s\\) backend, encodings, layout_hash, profile, protocol_version, split, token"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table()}, Z_BYTES[:4]), ErrorCode.MALFORMED_FRAME,
         "the frame is truncated"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table(nbytes=1 << 62)}, Z_BYTES), ErrorCode.MALFORMED_FRAME,
         "nbytes 4611686018427387904 does not match"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table(shape=[1 << 24] * 6, nbytes=4 << 144)}, Z_BYTES),
         ErrorCode.MALFORMED_FRAME, "the frame is truncated"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table()}, Z_BYTES), ErrorCode.BAD_TENSOR,
         "Activations: missing tensor 'attention_mask'"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table() + [{**MASK, "name": "x"}]}, Z_BYTES + b"\x01"),
         ErrorCode.BAD_TENSOR, "Activations: unexpected tensor 'x'"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table() * 2}, Z_BYTES * 2), ErrorCode.BAD_TENSOR,
         "tensor 'z' appears twice"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table() + [{**MASK, "dtype": "int8"}]}, Z_BYTES + b"\x01"),
         ErrorCode.BAD_TENSOR, "tensor 'attention_mask' must travel as raw uint8, got int8/raw"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table(dtype="int32", encoding="raw") + [MASK]}, Z_BYTES + b"\x01"),
         ErrorCode.BAD_TENSOR, "tensor 'z' must be a float tensor, got int32"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table() + [MASK]}, Z_BYTES + b"\x02"),
         ErrorCode.BAD_TENSOR, "attention_mask must hold only 0 and 1"),
        (frame(MessageKind.ACTIVATIONS, {"fields": ACT_FIELDS, "tensors": _z_table() + [MASK]}, np.float32([1, np.inf]).tobytes() + b"\x01"),
         ErrorCode.NON_FINITE, "tensor 'z' holds 1 NaN/Inf value\\(s\\), first at index \\(0, 0, 1\\)"),
        (frame(MessageKind.UPLOAD, {"fields": {"round_id": 0, "num_samples": 1}, "tensors": [
            {"name": "a", "dtype": "float32", "shape": [1], "encoding": "fp32", "nbytes": 4},
            {"name": "b", "dtype": "float16", "shape": [1], "encoding": "fp16", "nbytes": 2}]}, b"\0" * 6),
         ErrorCode.BAD_TENSOR, "float tensors use different encodings \\(fp16, fp32\\)"),
    ],
)
def test_bad_frames_raise_one_line_protocol_errors(data, code, message):
    with pytest.raises(ProtocolError, match=message) as e:
        parse(data)
    assert e.value.code == code
    assert "\n" not in str(e.value)


def test_frame_size_limit_is_checked_first_and_configurable():
    data = one_of_each()[4].serialize()
    with pytest.raises(FrameError, match=f"frame is {len(data)} bytes, over the limit of 100") as e:
        parse(data, Limits(max_frame_bytes=100))
    assert e.value.code == ErrorCode.TOO_LARGE and e.value.close_code == 1009
    with pytest.raises(FrameError, match="2 tensors, over the limit of 1"):
        parse(one_of_each()[3].serialize(), Limits(max_tensors=1))


@pytest.mark.parametrize("data", ["FSFL", 12345, None, [1, 2]])
def test_non_bytes_input_is_a_frame_error(data):
    with pytest.raises(FrameError):
        parse(data)

