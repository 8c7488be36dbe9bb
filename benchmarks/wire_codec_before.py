"""The float codec as it was before its buffers were reused (commit e3d2e88), for side-by-side timing.

Frozen copy of the kernels of ``flexsfl.core.wire.tensors`` at that commit: every call allocates
its temporaries and its result afresh. Used only by :mod:`flexsfl.benchmarks.wire_codec` to time
"before" and "after" in one process; it raises no project errors (inputs are the benchmark's).
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode", "decode"]

_F32 = np.dtype("<f4")
_ROUNDER = np.float32(1.5 * 2**23)
_FP16_MIN_NORMAL_BITS = np.uint32(113 << 23)
_FP16_REBIAS = np.uint32((((15 - 127) << 23) + 0xFFF) % 2**32)
_FP16_SUB_MAGIC = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
_FP16_SUB_MAGIC_F = np.array(_FP16_SUB_MAGIC).view(np.float32)[()]


def _to_fp16(x: np.ndarray) -> np.ndarray:
    u = x.reshape(-1).view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    _ = int(a.max())  # the overflow check
    h = a >> np.uint32(13)
    h &= np.uint32(1)
    h += a
    h += _FP16_REBIAS
    h >>= np.uint32(13)
    small = a < _FP16_MIN_NORMAL_BITS
    if small.any():
        s = a.view(np.float32) + _FP16_SUB_MAGIC_F
        sb = s.view(np.uint32)
        sb -= _FP16_SUB_MAGIC
        np.copyto(h, sb, where=small)
    sign = u >> np.uint32(16)
    sign &= np.uint32(0x8000)
    h |= sign
    return h.astype("<u2")


def _from_fp16(bits: np.ndarray) -> np.ndarray:
    _ = int(np.max(bits & 0x7FFF))  # the finiteness check
    w = bits.astype(np.uint32)
    sign = w & np.uint32(0x8000)
    sign <<= np.uint32(16)
    w &= np.uint32(0x7FFF)
    small = w < np.uint32(0x400)
    w <<= np.uint32(13)
    w += np.uint32(112 << 23)
    if small.any():
        sub = (bits & np.uint16(0x3FF)).astype(np.float32)
        sub *= np.float32(2.0**-24)
        np.copyto(w, sub.view(np.uint32), where=small)
    w |= sign
    return w.view(_F32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    u = x.reshape(-1).view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    b = r.astype("<u2")
    _ = int(np.max(b & 0x7FFF))  # the overflow check
    return b


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    _ = int(np.max(bits & 0x7FFF))  # the finiteness check
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(_F32)


def _quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = x.reshape(-1, x.shape[-1])
    absmax = np.max(np.abs(v), axis=1, initial=0.0)
    scales = (absmax / np.float32(127.0)).astype(_F32)
    q = v / np.where(scales > 0, scales, np.float32(1.0))[:, None]
    np.clip(q, -127, 127, out=q)
    q += _ROUNDER
    q -= _ROUNDER
    return q.astype(np.int8), scales


def encode(x: np.ndarray, encoding: str) -> tuple[np.ndarray, ...]:
    """float32 ``x`` -> the payload parts, as the codec at e3d2e88 computed them."""
    if encoding == "int8":
        return _quantize(x)
    if not np.isfinite(x).all():
        raise ValueError("non-finite input")
    if encoding == "fp32":
        return (x,)
    return (_to_fp16(x),) if encoding == "fp16" else (_to_bf16(x),)


def decode(parts: tuple[np.ndarray, ...], encoding: str, shape: tuple[int, ...]) -> np.ndarray:
    """The payload parts -> float32 of ``shape``."""
    if encoding == "int8":
        q, scales = parts
        return (q * scales[:, None]).reshape(shape)
    if encoding == "fp32":
        if not np.isfinite(parts[0]).all():
            raise ValueError("non-finite payload")
        return parts[0].reshape(shape)
    bits = parts[0].reshape(-1).view(np.uint16)
    return (_from_fp16(bits) if encoding == "fp16" else _from_bf16(bits)).reshape(shape)
