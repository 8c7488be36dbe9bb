"""The float codec's kernels (float32 <-> fp16 / bf16 / int8) and the buffers they reuse.

Every kernel writes into buffers taken from :data:`POOL` (in-place ufuncs with ``out=``), so a
step's encode and decode allocate nothing new once the first step has sized the buffers: no fresh
megabyte temporaries, hence no page faults on the critical path. The buffers are per thread.

Contract on what a kernel returns: the array lives in a pooled buffer, and :class:`BufferPool`
hands a buffer out again only once no array, view or memoryview refers to it any more (CPython's
reference count says so). So a decoded array never changes under its holder however many decodes
follow, and an encoded payload stays valid for as long as its memoryview is alive; callers need
no care beyond not keeping arrays they do not need (a kept array just means the next call
allocates). Buffers under :attr:`BufferPool.min_bytes` are plain allocations (the allocator's
arena serves them without faults).

The fp16 encode is a branch-free float trick, bit-identical to IEEE round-to-nearest-even for
finite input: adding to ``|x|`` a float ``c`` whose exponent is ``max(e, -14) + 13`` (``e`` that
of ``x``) leaves the sum with exactly fp16's quantum at ``x`` as its last place, so the FPU rounds
``|x|`` to fp16's grid (ties to even, subnormals included) and the sum's low mantissa bits count
quanta. ``c``'s own mantissa carries the half's sign and exponent fields in the bits above them,
so the low 16 bits of the sum are the half's whole bit pattern. It runs in cache-sized blocks.
Decode moves the half's bits to float32's places and rebiases the exponent, which is exact for
normal halves; for subnormal ones a second candidate subtracts the implicit bit, and the smaller
of the two is the value (see :func:`from_fp16`).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from flexsfl.core.errors import ErrorCode, TensorError

__all__ = [
    "BufferPool",
    "POOL",
    "non_finite",
    "check_finite",
    "to_fp16",
    "from_fp16",
    "to_bf16",
    "from_bf16",
    "quantize_int8",
    "dequantize_int8",
]

_F32 = np.dtype("<f4")
_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")


class BufferPool:
    """Per-thread reusable 1-D buffers, keyed by role; a buffer is reused only when unreferenced.

    :meth:`take` returns an array of ``n`` elements of ``dtype`` viewing a pooled buffer that no
    live array refers to (or a fresh one: below ``min_bytes``, when ``per_key`` buffers of that
    role are all in use, or when the thread's pool already holds ``max_bytes``). Contents are
    arbitrary. Buffers grow to the largest request seen and are kept until the thread ends.
    """

    def __init__(self, min_bytes: int = 64 << 10, per_key: int = 4, max_bytes: int = 256 << 20) -> None:
        self.min_bytes, self.per_key, self.max_bytes = min_bytes, per_key, max_bytes
        self._local = threading.local()

    def _slots(self) -> dict[str, list[np.ndarray]]:
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        return slots

    def held_bytes(self) -> int:
        """Bytes this thread's pool holds."""
        return sum(b.nbytes for bufs in self._slots().values() for b in bufs)

    def take(self, key: str, n: int, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(n, dtype)
        bufs = self._slots().setdefault(key, [])
        for i in range(len(bufs)):
            # References to a free buffer: the list's and getrefcount's argument. A returned
            # array (and any view or memoryview of it) holds one more through its .base.
            if sys.getrefcount(bufs[i]) == 2:
                if bufs[i].nbytes < nbytes:
                    if self.held_bytes() - bufs[i].nbytes + nbytes > self.max_bytes:
                        continue
                    bufs[i] = np.empty(nbytes, np.uint8)
                return bufs[i][:nbytes].view(dtype)
        if len(bufs) >= self.per_key or self.held_bytes() + nbytes > self.max_bytes:
            return np.empty(n, dtype)
        bufs.append(np.empty(nbytes, np.uint8))
        return bufs[-1][:nbytes].view(dtype)


POOL = BufferPool()


def non_finite(name: str, a: np.ndarray, what: str) -> TensorError:
    """The one-line error for a tensor holding NaN/Inf (slow path: only when raising)."""
    bad = np.flatnonzero(~np.isfinite(a))
    first = np.unravel_index(bad[0], a.shape) if a.ndim else ()
    return TensorError(
        f"tensor {name!r:.80} {what} {bad.size} NaN/Inf value(s), first at index {tuple(int(i) for i in first)}; "
        f"the values diverged (lower the learning rate) or overflowed",
        ErrorCode.NON_FINITE,
    )


def check_finite(name: str, x: np.ndarray, what: str) -> None:
    """Raise :func:`non_finite` unless every value of float32 ``x`` is finite."""
    if x.size and not np.isfinite(x, out=POOL.take("finite", x.size, np.bool_).reshape(x.shape)).all():
        raise non_finite(name, x, what)


# --- fp16 ------------------------------------------------------------------------------------

_FP16_OVERFLOW_BITS = 0x477FF000  # float32 bits of 65520: rounds to Inf in float16
_ABS = np.uint32(0x7FFFFFFF)
_MIN_NORMAL16_F = np.float32(2.0**-14)  # fp16's smallest normal
_EXP_MASK = np.uint32(0x7F800000)
_SIGN_TO_15 = np.uint32(16)  # float32 sign (bit 31) -> the half's (bit 15)
_SIGN15 = np.uint32(0x8000)
_EXP_TO_10 = np.uint32(13)  # float32 exponent field (bit 23) -> the half's (bit 10)
# c's constant part: exponent + 13 (so its last place is fp16's quantum), and the half's exponent
# field minus one (its implicit bit is counted in the quanta) = float32's - 113, modulo 2^32.
_C_BIAS = np.uint32(((13 << 23) - (113 << 10)) % (1 << 32))

_BLOCK = 32768  # elements per fp16 block: its input, output and temporaries (0.5 MiB) stay in L2, a Pi 4's too
# np.maximum against an array runs vectorized, against a scalar 2-4x slower: the clamp's operand (128 KiB).
_MIN_NORMAL16_BLOCK = np.full(_BLOCK, _MIN_NORMAL16_F)


def to_fp16(name: str, x: np.ndarray) -> np.ndarray:
    """float32 ``x`` (C-contiguous) -> float16 payload (pooled), round to nearest even.
    Raises TensorError for NaN/Inf or ``|x| >= 65520``.

    Works block by block (:data:`_BLOCK` elements): a dozen passes over cache-resident blocks
    instead of over megabyte arrays that each pass would fetch from memory again."""
    u = x.reshape(-1).view(_U32)
    n = u.size
    top = 0  # largest |x| bit pattern seen: NaN/Inf (>= 0x7F800000) and overflow stop the loop
    out = POOL.take("enc.out16", n, _U16)
    k = min(n, _BLOCK)
    A, C, D = POOL.take("enc.a", k, _U32), POOL.take("enc.c", k, _U32), POOL.take("enc.d", k, _U32)
    for i in range(0, n, _BLOCK):
        j = min(n, i + _BLOCK)
        m = j - i
        ub, a, c, d = u[i:j], A[:m], C[:m], D[:m]
        np.bitwise_and(ub, _ABS, out=a)
        top = max(top, int(a.max()))
        if top >= _FP16_OVERFLOW_BITS:
            break
        np.maximum(a.view(_F32), _MIN_NORMAL16_BLOCK[:m], out=c.view(_F32))
        c &= _EXP_MASK  # E' << 23, E' = max(E, 113): x's float32 exponent field, clamped at fp16's smallest normal
        np.right_shift(c, _EXP_TO_10, out=d)
        c += d  # + E' << 10
        np.right_shift(ub, _SIGN_TO_15, out=d)
        d &= _SIGN15
        c += d  # + sign << 15
        c += _C_BIAS  # c = 2^(E'-114) (1 + m 2^-23), m = sign << 15 | (E' - 113) << 10: under 2^16
        # c's last place is fp16's quantum at x and |x| < 2^(E'-126) << c, so the FPU rounds |x| to
        # that quantum and bits(|x| + c) = bits(c) + k, k = |x| in quanta, rounded (ties to even:
        # m's bits are a multiple of 1024). Low 16 bits: sign << 15 | (E' - 113) << 10 + k, the
        # half's bit pattern (k < 2048 counts the implicit bit; < 0x7C00 in all, so no carry).
        af = a.view(_F32)
        af += c.view(_F32)
        np.copyto(out[i:j], a, casting="unsafe")  # keep the low 16 bits
    if top >= 0x7F800000:
        raise non_finite(name, x, "has")
    if top >= _FP16_OVERFLOW_BITS:
        raise TensorError(f"tensor {name!r:.80} has values of magnitude >= 65520, which overflow float16; use encoding bf16 or fp32")
    return out.view("<f2").reshape(x.shape)


_SIGN32 = np.int32(-(1 << 31))
_TO_13 = np.int32(13)  # int32, as the shifted array: a uint32 scalar would promote the pass to int64
_MAGNITUDE_AT_13 = np.uint32(0x7FFF << 13)  # the half's exponent and mantissa, at float32's places
_REBIAS = np.uint32(112 << 23)  # float32's exponent bias minus the half's
_REBIAS_PLUS_ONE = np.uint32(113 << 23)
_INF16_AT_13 = 0x7C00 << 13  # exponent field all ones: Inf or NaN


def from_fp16(name: str, bits: np.ndarray) -> np.ndarray:
    """float16 bit patterns (uint16) -> float32 (pooled), exactly. Raises TensorError naming
    tensor ``name`` if a pattern is Inf or NaN (checked on the way, not in a pass of its own).

    Nine in-place passes per cache-sized block, and no float32 subnormal is ever an operand:
    x86 takes a ~100-cycle microcode assist per subnormal multiplied, and gradients are mostly
    fp16 subnormals (numpy's own cast takes a scalar path, 20x slower on them). With the half's
    magnitude bits ``h`` moved to float32's places, ``A = bits(h + 112 << 23)`` is the value
    of a normal half, and ``B = bits(h + 113 << 23) - 2^-14`` that of a subnormal one (its
    mantissa over the smallest normal, minus the smallest normal: exact). For a normal half
    ``B = 2v - 2^-14 >= v = A``; for a subnormal one ``A = 2^-15 + v/2 > v = B``: ``min(A, B)``
    is the value either way."""
    flat = bits.reshape(-1).view(np.int16)
    n = flat.size
    out = POOL.take("dec.out", n, np.int32)
    k = min(n, _BLOCK)
    B, A = POOL.take("dec.b", k, _U32), POOL.take("dec.a", k, _U32)
    top = 0  # largest magnitude pattern seen (<< 13): Inf/NaN stop the loop
    for i in range(0, n, _BLOCK):
        j = min(n, i + _BLOCK)
        m = j - i
        w, b, a = out[i:j], B[:m], A[:m]
        np.copyto(w, flat[i:j], casting="safe")  # sign-extends: the sign in bits 15..31
        np.left_shift(w, _TO_13, out=b.view(np.int32))
        b &= _MAGNITUDE_AT_13
        top = max(top, int(b.max()))
        if top >= _INF16_AT_13:
            raise non_finite(name, bits.view(np.float16).astype(_F32), "holds")
        w &= _SIGN32
        np.add(b, _REBIAS, out=a)
        b += _REBIAS_PLUS_ONE
        bf = b.view(_F32)
        bf -= _MIN_NORMAL16_F
        np.minimum(a.view(_F32), bf, out=bf)
        w |= b.view(np.int32)
    return out.view(_F32).reshape(bits.shape)


# --- bf16 ------------------------------------------------------------------------------------

_BF16_OVERFLOW = np.array(0x7F7F8000, _U32).view(_F32)[()]  # 3.3962e38: rounds to Inf in bfloat16


def to_bf16(name: str, x: np.ndarray) -> np.ndarray:
    """float32 ``x`` (C-contiguous) -> bfloat16 bit patterns (uint16, pooled), round to nearest
    even. Raises TensorError for NaN/Inf or ``|x| >= 3.3962e38``."""
    u = x.reshape(-1).view(_U32)
    hi, lo = (float(x.max()), float(x.min())) if x.size else (0.0, 0.0)
    if not (np.isfinite(hi) and np.isfinite(lo)):
        raise non_finite(name, x, "has")
    if max(hi, -lo) >= _BF16_OVERFLOW:
        raise TensorError(f"tensor {name!r:.80} has values of magnitude >= 3.3962e38, which overflow bfloat16; use encoding fp32")
    r = POOL.take("enc.c", u.size, _U32)
    np.right_shift(u, np.uint32(16), out=r)
    r &= np.uint32(1)  # the lowest kept bit: ties go to even
    r += np.uint32(0x7FFF)
    r += u
    r >>= np.uint32(16)
    out = POOL.take("enc.out16", u.size, _U16)
    np.copyto(out, r, casting="unsafe")
    return out.reshape(x.shape)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (pooled), exactly."""
    w = POOL.take("dec.out", bits.size, _U32)
    np.copyto(w, bits.reshape(-1), casting="safe")
    w <<= np.uint32(16)
    return w.view(_F32).reshape(bits.shape)


# --- int8 ------------------------------------------------------------------------------------

# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the nearest
# integer, ties to even (the sum has no fraction bits left): np.rint's result at a tenth of its cost.
_ROUNDER = np.float32(1.5 * 2**23)
# Largest int8 scale whose product with any code (-128..127) stays finite in float32.
INT8_MAX_SCALE = np.nextafter(np.float32(np.finfo(np.float32).max / 128), np.float32(0))


def quantize_int8(name: str, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 vectors ``v`` [nvec, veclen] -> (int8 codes [nvec, veclen], float32 scales [nvec]),
    both pooled. Raises TensorError for NaN/Inf or values beyond 3.37e38."""
    nvec, veclen = v.shape
    q = POOL.take("enc.q", v.size, _F32).reshape(nvec, veclen)
    np.abs(v, out=q)
    absmax = np.max(q, axis=1, initial=0.0)  # NaN propagates, so this also checks finiteness
    if not np.isfinite(absmax).all():
        raise non_finite(name, v, "has")
    scales = POOL.take("enc.scales", nvec, _F32)
    np.divide(absmax, np.float32(127.0), out=scales)
    if scales.size and scales.max() > INT8_MAX_SCALE:
        raise TensorError(f"tensor {name!r:.80} has values of magnitude > 3.37e38, which overflow the int8 encoding; use encoding fp32")
    # Codes are computed against the scale as stored, so decoding is consistent even where a
    # tiny scale rounds to a float32 subnormal (and may round down: hence the clip). A scale of
    # 0 (an all-zero vector, or one so tiny that absmax/127 underflows) divides by 1: codes 0.
    absmax[...] = np.where(scales > 0, scales, np.float32(1.0))
    np.divide(v, absmax[:, None], out=q)
    np.clip(q, -127, 127, out=q)
    q += _ROUNDER
    q -= _ROUNDER
    codes = POOL.take("enc.codes", v.size, np.int8).reshape(nvec, veclen)
    np.copyto(codes, q, casting="unsafe")
    return codes, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes [nvec, veclen] times their float32 scales -> float32 (pooled)."""
    out = POOL.take("dec.out", q.size, _F32).reshape(q.shape)
    np.multiply(q, scales[:, None], out=out)
    return out
