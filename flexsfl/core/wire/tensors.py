"""How one numpy array travels inside a frame: a :class:`TensorHeader` plus its payload bytes.

The header is one entry of the frame header's tensor table
``{"name", "dtype", "shape", "encoding", "nbytes"}``; the payload is exactly ``nbytes`` bytes,
little-endian, C order. ``dtype`` is the element type of the payload, ``encoding`` says how the
payload maps back to values (so a generic reader knows the element type without knowing the
encodings). Arrays never travel pickled: unpickling runs code chosen by the sender, and a device
must not hand its process to whoever reaches its socket.

=========  ==========================  ===================================  ===========  ==========================
encoding   payload dtype               payload                              decodes to   worst-case abs. error
=========  ==========================  ===================================  ===========  ==========================
``raw``    int64 int32 int8 uint8 bool values as they are                   same dtype   exact
``fp32``   float32                     values as they are                   float32      exact
``fp16``   float16                     IEEE half, round to nearest even     float32      max(|x|·2⁻¹¹, 2⁻²⁵)
``bf16``   bfloat16                    top 16 bits of float32, RNE          float32      max(|x|·2⁻⁸, 2⁻¹³⁴)
``int8``   int8                        int8 codes, then one float32 scale   float32      absmax(vector)/254 + 2⁻¹⁴³
                                       per vector along the last dim                     (+ float32 rounding)
=========  ==========================  ===================================  ===========  ==========================

``fp16`` cannot carry ``|x| >= 65520`` (it would become Inf), ``bf16`` cannot carry
``|x| >= 3.3962e38`` and ``int8`` not ``|x| > 3.37e38``; :func:`encode` refuses such tensors
instead of sending Inf.
bfloat16 has no numpy dtype; it travels as uint16 bit patterns.

Every float tensor is checked for NaN/Inf when it is encoded and again when it is decoded
(:class:`~flexsfl.core.errors.TensorError` with code ``NON_FINITE``, naming the tensor).
Decoding is zero-copy where the payload already is the result (``raw``, ``fp32``): the array is a
read-only view of the frame's bytes. The other encodings decode into buffers reused across calls
(:mod:`.codec`): one is written again only once nothing refers to the array decoded into it, so
a decoded array keeps its values however many decodes follow. All decoded arrays are read-only;
copy one to write to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError, ErrorCode, FrameError, TensorError
from flexsfl.core.wire import codec
from flexsfl.core.wire.codec import POOL

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "Limits",
    "DEFAULT_LIMITS",
    "TensorHeader",
    "payload_nbytes",
    "encode",
    "decode",
]

# Payload dtype name -> numpy dtype of the payload elements (bfloat16 as its bit pattern).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# Transfer encodings of float tensors, negotiated per connection (Hello/Welcome).
ENCODINGS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

# Encoding -> payload dtypes it may carry. "raw" is how integer and bool tensors travel.
_PAYLOAD_DTYPES: dict[str, tuple[str, ...]] = {
    "raw": ("int64", "int32", "int8", "uint8", "bool"),
    "fp32": ("float32",),
    "fp16": ("float16",),
    "bf16": ("bfloat16",),
    "int8": ("int8",),
}

_F32 = np.dtype("<f4")
_HEADER_KEYS = frozenset({"name", "dtype", "shape", "encoding", "nbytes"})
# Exponent bits of the 16-bit formats; all set means Inf or NaN.
_BF16_EXP = 0x7F80


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits a receiver enforces before it trusts any size a frame declares.

    Every limit is checked against the header's declarations before a payload byte is read,
    so a hostile frame cannot make the receiver allocate more than the frame's own length
    (times four, for the ``int8``/``fp16``/``bf16`` to float32 expansion).
    """

    # Whole frame. Z for B=8, T=512, d=2048 in fp32 is 32 MiB; the transport sets the
    # websocket max_size to this too.
    max_frame_bytes: int = 64 << 20
    # The JSON header: field values and the tensor table. The largest we expect, an Upload of
    # LoRA on all 7 projections of SmolLM2's 30 blocks (420 PEFT-named tensors), takes 56 KiB.
    max_header_bytes: int = 64 << 10
    # Tensors in one frame (that Upload has 420).
    max_tensors: int = 4096
    # Dimensions per tensor: [B, T, d] is 3; 6 leaves room and stops silly shapes.
    max_ndim: int = 6
    # Size of one dimension; the largest vocabularies (logits [B, T, V]) are ~256k.
    max_dim: int = 1 << 24

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Limits.{f.name} must be a positive int, got {v!r}")
        if self.max_header_bytes >= 1 << 32:
            raise ConfigError(f"Limits.max_header_bytes must be below 2**32 (a u32 on the wire), got {self.max_header_bytes}")


DEFAULT_LIMITS = Limits()


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _vectors(shape: Sequence[int]) -> tuple[int, int]:
    """(number of vectors, vector length) of an int8-encoded tensor; a 0-d tensor is one vector of one."""
    if not shape:
        return 1, 1
    return _numel(shape[:-1]), shape[-1]


def payload_nbytes(dtype: str, encoding: str, shape: Sequence[int]) -> int:
    """Exact payload size of a tensor: its values, plus one float32 scale per vector for ``int8``."""
    n = _numel(shape) * DTYPES[dtype].itemsize
    if encoding == "int8":
        n += 4 * _vectors(shape)[0]
    return n


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One entry of a frame's tensor table. Build it with :func:`encode` or :meth:`from_json`."""

    name: str
    dtype: str  # payload element type, a key of DTYPES
    shape: tuple[int, ...]
    encoding: str  # "raw" or one of ENCODINGS
    nbytes: int  # payload length; always payload_nbytes(dtype, encoding, shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "encoding": self.encoding, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, obj: Any, index: int, limits: Limits = DEFAULT_LIMITS) -> "TensorHeader":
        """Validate one table entry a peer sent. Raises FrameError/TensorError naming the tensor."""
        where = f"tensor table entry {index}"
        if not isinstance(obj, dict) or obj.keys() != _HEADER_KEYS:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise FrameError(f"{where} must be an object with keys {sorted(_HEADER_KEYS)}, got {str(keys):.120}")
        name = obj["name"]
        if not _is_text(name) or not name:
            raise FrameError(f"{where}: name must be a non-empty string")
        where = f"tensor {name!r:.80}"
        dtype, encoding, shape, nbytes = obj["dtype"], obj["encoding"], obj["shape"], obj["nbytes"]
        if not isinstance(encoding, str) or encoding not in _PAYLOAD_DTYPES:
            raise TensorError(f"{where}: unknown encoding {encoding!r:.40} (known: raw, {', '.join(ENCODINGS)})")
        if not isinstance(dtype, str) or dtype not in _PAYLOAD_DTYPES[encoding]:
            raise TensorError(f"{where}: encoding {encoding!r} carries dtype {' or '.join(_PAYLOAD_DTYPES[encoding])}, not {dtype!r:.40}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise TensorError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.80}")
        if len(shape) > limits.max_ndim:
            raise FrameError(f"{where}: {len(shape)} dimensions, over the limit of {limits.max_ndim}", ErrorCode.TOO_LARGE)
        if any(d > limits.max_dim for d in shape):
            raise FrameError(f"{where}: shape {shape} has a dimension over the limit of {limits.max_dim}", ErrorCode.TOO_LARGE)
        if not _is_int(nbytes) or nbytes != payload_nbytes(dtype, encoding, shape):
            raise FrameError(
                f"{where}: nbytes {nbytes!r:.40} does not match {dtype}{shape} in encoding {encoding} "
                f"({payload_nbytes(dtype, encoding, shape)} bytes)"
            )
        return cls(name, dtype, tuple(shape), encoding, nbytes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text(v: Any) -> bool:
    """A str that is valid UTF-8 (JSON escapes can smuggle in lone surrogates, which are not)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bits_finite(bits: np.ndarray, exponent: int) -> bool:
    """Whether no 16-bit float pattern has all ``exponent`` bits set (numpy's isfinite on
    float16 is ten times slower than this integer check)."""
    if not bits.size:
        return True
    t = POOL.take("dec.bits", bits.size, np.uint16)
    np.bitwise_and(bits.reshape(-1), np.uint16(0x7FFF), out=t)
    return int(t.max()) < exponent


def encode(name: str, array: np.ndarray, encoding: str) -> tuple[TensorHeader, tuple[memoryview, ...]]:
    """Encode ``array`` for the wire.

    ``encoding`` is ``"raw"`` for int64/int32/int8/uint8/bool arrays, or one of :data:`ENCODINGS`
    for float arrays (float16/32/64 input; the values are taken as float32 first). Returns the
    table entry and the payload as buffers whose concatenation is exactly ``header.nbytes`` bytes;
    where the array already is the payload (``raw``, contiguous ``fp32``) they view it, no copy.
    Otherwise they view buffers reused across calls (:mod:`.codec`), which stay untouched for as
    long as a returned memoryview is alive.
    Raises TensorError if the dtype does not fit the encoding or a float value is NaN/Inf or
    would overflow the encoding.
    """
    a = np.asarray(array)
    if encoding == "raw":
        dtype = a.dtype.name
        if dtype not in _PAYLOAD_DTYPES["raw"]:
            raise TensorError(f"tensor {name!r:.80}: dtype {dtype} cannot travel raw (allowed: {', '.join(_PAYLOAD_DTYPES['raw'])})")
        payload = np.ascontiguousarray(a, dtype=DTYPES[dtype])
        parts: tuple[np.ndarray, ...] = (payload,)
    elif encoding in ENCODINGS:
        if a.dtype.kind != "f":
            raise TensorError(f"tensor {name!r:.80}: encoding {encoding} is for float tensors, not {a.dtype.name}")
        if a.dtype == _F32 and a.flags.c_contiguous:
            x = a
        else:
            x = POOL.take("enc.in", a.size, _F32).reshape(a.shape)
            np.copyto(x, a, casting="same_kind")
        if encoding == "int8":
            dtype, parts = "int8", codec.quantize_int8(name, x.reshape(_vectors(x.shape)))
        elif encoding == "fp32":
            codec.check_finite(name, x, "has")
            dtype, parts = "float32", (x,)
        elif encoding == "fp16":
            dtype, parts = "float16", (codec.to_fp16(name, x),)
        else:
            dtype, parts = "bfloat16", (codec.to_bf16(name, x),)
    else:
        raise TensorError(f"tensor {name!r:.80}: unknown encoding {encoding!r:.40} (known: raw, {', '.join(ENCODINGS)})")
    header = TensorHeader(name, dtype, tuple(int(d) for d in a.shape), encoding, sum(p.nbytes for p in parts))
    return header, tuple(memoryview(p.reshape(-1).view(np.uint8)) for p in parts)


def decode(header: TensorHeader, buffer: bytes | memoryview) -> np.ndarray:
    """Decode a payload of exactly ``header.nbytes`` bytes; floats come back as float32.

    The result is read-only; for ``raw`` and ``fp32`` it is a view of ``buffer`` (zero copy), so
    ``buffer`` must not change while the array is in use. Raises TensorError for NaN/Inf, bool
    bytes other than 0/1, or negative int8 scales.
    """
    name, shape, enc = header.name, header.shape, header.encoding
    if len(buffer) != header.nbytes:
        raise FrameError(f"tensor {name!r:.80}: payload is {len(buffer)} bytes, header says {header.nbytes}")
    if enc == "int8":
        nvec, veclen = _vectors(shape)
        q = np.frombuffer(buffer, np.int8, count=nvec * veclen).reshape(nvec, veclen)
        scales = np.frombuffer(buffer, _F32, offset=nvec * veclen)
        if not ((scales >= 0) & (scales <= codec.INT8_MAX_SCALE)).all():  # NaN fails both
            raise TensorError(
                f"tensor {name!r:.80}: int8 scales must be in [0, {codec.INT8_MAX_SCALE:.4g}] (larger ones overflow)", ErrorCode.NON_FINITE
            )
        out = codec.dequantize_int8(q, scales).reshape(shape)
    else:
        raw = np.frombuffer(buffer, DTYPES[header.dtype]).reshape(shape)
        if enc == "raw":
            if header.dtype == "bool" and raw.size and int(raw.view(np.uint8).max()) > 1:
                raise TensorError(f"tensor {name!r:.80}: bool payload holds bytes other than 0 and 1")
            out = raw
        elif enc == "fp32":
            codec.check_finite(name, raw, "holds")
            out = raw
        elif enc == "fp16":
            out = codec.from_fp16(name, raw.view(np.uint16))
        else:  # bf16
            if not _bits_finite(raw, _BF16_EXP):
                raise codec.non_finite(name, (raw.astype(np.uint32) << 16).view(_F32), "holds")
            out = codec.from_bf16(raw)
    if not out.flags.aligned:  # a payload after an odd-sized one; numpy copes, other consumers may not
        out = out.copy()
    out.flags.writeable = False
    return out
