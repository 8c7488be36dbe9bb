"""Protocol messages: frozen dataclasses that own their wire format.

A frame (protocol version 6; version 2 made a round's meaning typed fields of
:class:`RoundConfig` instead of version 1's free-form ``extra``; version 3 added the U-shaped
topology: ``Hello.top``, :class:`MiddleOutput` and :class:`TopGradients`, and an
:class:`Activations` whose labels the session, not the message, requires; version 4 added
``RoundConfig.local_rule``, ``head_steps`` and ``prox_mu``, how a whole-model device spends its
steps for FedRep and Ditto; version 5 added ``RoundConfig.alignment``, where the alignment term
is computed: ``logit_kl`` rounds send ``Activations.z_ref`` from head/tail devices too, and the
server's :class:`Gradients` say what its term added, ``align_loss``/``align_ratio``/``align_gap``;
version 6 added ``RoundConfig.evaluate``, whether the device scores its own test split after the round) is::

    b"FSFL" | version u8 | kind u8 | flags u16 (0) | header_len u32 LE | header | payloads

``header`` is ``header_len`` bytes of UTF-8 JSON, ``{"fields": {...}, "tensors": [...]}``:
the message's scalar fields and its tensor table (see :mod:`.tensors`). The payloads follow in
table order, each exactly its ``nbytes``, and the frame ends exactly where the last one does.
The sender pads the header with JSON whitespace so the first payload starts 8-byte aligned,
which lets the receiver view the biggest tensor (listed first) without a copy.

Usage::

    data = Activations(round_id=3, step_id=0, mode="train", z=z, attention_mask=m, labels=y,
                       encoding="fp16").serialize()
    msg = parse(data)             # -> Activations, float tensors decoded to float32

:func:`parse` never trusts a declared size before checking it against :class:`Limits` and the
frame's real length, and raises only :class:`~flexsfl.core.errors.ProtocolError` subclasses:
``FrameError`` (bytes that do not parse; codes MALFORMED_FRAME, TOO_LARGE, UNKNOWN_KIND,
BAD_VERSION) or ``TensorError`` (BAD_TENSOR, NON_FINITE). Constructing a message validates it
the same way, so an invalid message can neither be built nor parsed.

Arrays in a parsed message are read-only and may view the frame's bytes (zero copy).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import re
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from flexsfl.core.alignment import ALIGNMENTS
from flexsfl.core.constants import LOCAL_RULES, OPTIMIZERS
from flexsfl.core.errors import ErrorCode, FrameError, TensorError
from flexsfl.core.wire.tensors import DEFAULT_LIMITS, ENCODINGS, Limits, TensorHeader, _is_int, _is_text, decode, encode

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "CLIENT_ID_RE",
    "MessageKind",
    "RoundMode",
    "Message",
    "Hello",
    "Welcome",
    "RoundConfig",
    "Adapters",
    "Activations",
    "Gradients",
    "Predictions",
    "MiddleOutput",
    "TopGradients",
    "Upload",
    "Metrics",
    "RoundEnd",
    "Error",
    "Bye",
    "parse",
]

PROTOCOL_VERSION = 6  # the frame's version byte and Hello.protocol_version; peers must match exactly
MAGIC = b"FSFL"
_PREFIX = struct.Struct("<4sBBHI")  # magic, version, kind, flags, header_len
_ALIGN = 8
_INT_MAX = (1 << 63) - 1  # ids and counts must fit an int64 (SQLite, numpy) on every peer
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CLIENT_ID_RE = _IDENT  # Hello.client_id (fullmatch): flash and the device check an id with it before any connection
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MessageKind(enum.IntEnum):
    """The kind byte of a frame."""

    HELLO = 1  # client -> server
    WELCOME = 2  # server -> client
    ROUND_CONFIG = 3  # server -> client
    ADAPTERS = 4  # server -> client
    ACTIVATIONS = 5  # client -> server
    GRADIENTS = 6  # server -> client
    PREDICTIONS = 7  # server -> client
    UPLOAD = 8  # client -> server
    METRICS = 9  # client -> server
    ROUND_END = 10  # server -> client
    ERROR = 11  # either way
    BYE = 12  # either way
    MIDDLE_OUTPUT = 13  # server -> client (U-shaped: H of the server's middle)
    TOP_GRADIENTS = 14  # client -> server (U-shaped: dL/dH from the device's top)


class RoundMode(enum.StrEnum):
    """Where the model trains in a round (:attr:`RoundConfig.mode`)."""

    SPLIT = "split"  # head on the device, tail on the server: steps travel as Activations/Gradients
    FULL = "full"  # the whole model on the device (FedAvg / local-only baselines): no steps on the wire


# --- field validators: (where, value) -> normalized value, or FrameError naming the field ---

_Check = Callable[[str, Any], Any]


def _bad(where: str, want: str, v: Any) -> FrameError:
    return FrameError(f"{where} must be {want}, got {type(v).__name__} {v!r:.60}")


def _int(lo: int = 0) -> _Check:
    def check(where: str, v: Any) -> int:
        if not _is_int(v) or not lo <= v <= _INT_MAX:
            raise _bad(where, f"an int in [{lo}, 2**63)", v)
        return v

    return check


def _float(lo: float = -np.inf, *, above: bool = False) -> _Check:
    want = f"a finite number {'>' if above else '>='} {lo:g}" if lo > -np.inf else "a finite number"

    def check(where: str, v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _bad(where, want, v)
        v = float(v)  # JSON writes 1.0 as 1.0, but other peers may write 1
        if not np.isfinite(v) or v < lo or (above and v == lo):
            raise _bad(where, want, v)
        return v

    return check


def _text(choices: tuple[str, ...] = (), *, pattern: re.Pattern | None = None, empty: bool = True) -> _Check:
    want = f"one of {', '.join(choices)}" if choices else "an identifier ([A-Za-z0-9._-], 1-128 chars)" if pattern else "a string"
    if not empty:
        want = "a non-empty string"

    def check(where: str, v: Any) -> str:
        if not _is_text(v) or (choices and v not in choices) or (pattern and not pattern.fullmatch(v)) or (not empty and not v):
            raise _bad(where, want, v)
        return v

    return check


def _hex64(where: str, v: Any) -> str:
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        raise _bad(where, "64 lowercase hex digits (a sha256)", v)
    return v


def _encodings(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(e, str) and e in ENCODINGS for e in v) or len(set(v)) != len(v):
        raise _bad(where, f"a non-empty list of distinct encodings from {', '.join(ENCODINGS)}", v)
    return tuple(v)


def _scalars(where: str, v: Any) -> dict[str, bool | int | float | str]:
    """A flat JSON object of bools, ints, finite floats and strings (copied, so callers can't mutate it)."""
    if not isinstance(v, dict):
        raise _bad(where, "an object", v)
    for k, x in v.items():
        if not _is_text(k) or not k:
            raise _bad(f"{where} key", "a non-empty string", k)
        if isinstance(x, float) and not np.isfinite(x):
            raise _bad(f"{where}[{k!r:.80}]", "finite", x)
        if not isinstance(x, (bool, int, float)) and not _is_text(x):
            raise _bad(f"{where}[{k!r:.80}]", "a bool, number or string", x)
        if _is_int(x) and abs(x) > _INT_MAX:
            raise _bad(f"{where}[{k!r:.80}]", "an int that fits 64 bits", x)
    return dict(v)


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(where, "true or false", v)
    return v


def _round_mode(where: str, v: Any) -> RoundMode:
    if not _is_text(v) or v not in RoundMode._value2member_map_:
        raise _bad(where, f"one of {', '.join(m.value for m in RoundMode)}", v)
    return RoundMode(v)


def _error_code(where: str, v: Any) -> ErrorCode:
    if not _is_int(v) or v not in ErrorCode._value2member_map_:
        raise _bad(where, f"an ErrorCode ({min(ErrorCode)}..{max(ErrorCode)})", v)
    return ErrorCode(v)


def _field(check: _Check, *, secret: bool = False, **kw: Any) -> Any:
    """A JSON field of a message, validated by ``check`` on construction; a ``secret`` one
    never shows in ``repr`` (messages get logged)."""
    return dataclasses.field(metadata={"check": check, "secret": secret}, **kw)


# --- tensor slots ---


@dataclasses.dataclass(frozen=True)
class _Slot:
    """How one array field travels: ``float`` (decoded to float32, sent in the message's
    encoding), ``int64`` (raw int64) or ``mask`` (int64 0/1 in memory, raw uint8 on the wire)."""

    kind: str
    ndims: tuple[int, ...] = ()  # allowed numbers of dimensions; () = any
    optional: bool = False


_WIRE_DTYPE = {"int64": "int64", "mask": "uint8"}
_ANY_FLOAT = _Slot("float")


def _array(slot: _Slot, **kw: Any) -> Any:
    """An array field of a message."""
    return dataclasses.field(metadata={"slot": slot}, **kw)


def _encoding() -> Any:
    """The encoding a message's float tensors travel in (read back from the frame on parse)."""
    return dataclasses.field(default="fp32", metadata={"encoding": True})


def _normalize(where: str, slot: _Slot, a: Any) -> np.ndarray:
    """The canonical in-memory array of a slot (float32 or int64), or TensorError naming it."""
    if not isinstance(a, np.ndarray):
        raise TensorError(f"{where} must be a numpy array, got {type(a).__name__}")
    if slot.ndims and a.ndim not in slot.ndims:
        raise TensorError(f"{where} must have {' or '.join(map(str, slot.ndims))} dimensions, got shape {list(a.shape)}")
    if slot.kind == "float":
        if a.dtype.kind != "f":
            raise TensorError(f"{where} must be a float array, got {a.dtype.name}")
        return a.astype(np.float32, copy=False)
    if a.dtype.kind not in "biu":
        raise TensorError(f"{where} must be an integer array, got {a.dtype.name}")
    if slot.kind == "mask" and a.size and not ((a == 0) | (a == 1)).all():
        raise TensorError(f"{where} must hold only 0 and 1")
    if a.dtype.kind == "u" and a.size and a.max() > _INT_MAX:
        raise TensorError(f"{where} holds values that do not fit int64")
    return a.astype(np.int64, copy=False)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype.name}{list(v.shape)}"
    if isinstance(v, dict) and any(isinstance(x, np.ndarray) for x in v.values()):
        return "{" + ", ".join(f"{k!r:.80}: {_describe(x)}" for k, x in v.items()) + "}"
    return repr(v)


# --- messages ---

_message = dataclasses.dataclass(frozen=True, kw_only=True, eq=False, repr=False)


@_message
class Message:
    """Base of all messages. Subclasses are frozen, keyword-only dataclasses whose fields are
    JSON fields (validated on construction) or array slots; ``KIND`` is their frame kind.

    Equality compares every field, arrays by dtype, shape and values, so that
    ``parse(m.serialize()) == m`` for any message whose float values the encoding represents
    exactly (always for ``fp32``).
    """

    KIND: ClassVar[MessageKind]
    # Messages with a ``tensors: dict[str, ndarray]`` of float arrays (any names) set this.
    DYNAMIC_TENSORS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if "check" in f.metadata:
                object.__setattr__(self, f.name, f.metadata["check"](f"{cls}.{f.name}", v))
            elif "slot" in f.metadata:
                if v is None and f.metadata["slot"].optional:
                    continue
                object.__setattr__(self, f.name, _normalize(f"{cls}.{f.name}", f.metadata["slot"], v))
            elif "encoding" in f.metadata:
                _text(ENCODINGS)(f"{cls}.{f.name}", v)
        if self.DYNAMIC_TENSORS:
            t = getattr(self, "tensors")
            if not isinstance(t, dict) or not t:
                raise TensorError(f"{cls}.tensors must be a non-empty dict of name -> float array")
            for name in t:
                if not _is_text(name) or not name:
                    raise TensorError(f"{cls}.tensors keys must be non-empty strings, got {name!r:.80}")
            object.__setattr__(self, "tensors", {k: _normalize(f"{cls}.tensors[{k!r:.80}]", _ANY_FLOAT, a) for k, a in t.items()})
        self._check()

    def _check(self) -> None:
        """Rules across fields; subclasses override."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    def __repr__(self) -> str:
        body = ", ".join(
            f"{f.name}={'***' if f.metadata.get('secret') else _describe(getattr(self, f.name))}" for f in dataclasses.fields(self)
        )
        return f"{type(self).__name__}({body})"

    def arrays(self) -> dict[str, np.ndarray]:
        """The message's tensors by wire name, in wire order (absent optional slots left out)."""
        if self.DYNAMIC_TENSORS:
            return dict(getattr(self, "tensors"))
        return {f.name: v for f in dataclasses.fields(self) if "slot" in f.metadata and (v := getattr(self, f.name)) is not None}

    @classmethod
    def _slot(cls, name: str) -> _Slot | None:
        if cls.DYNAMIC_TENSORS:
            return _ANY_FLOAT
        f = cls.__dataclass_fields__.get(name)
        return f.metadata.get("slot") if f is not None else None

    @classmethod
    def _json_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if "check" in f.metadata]

    def serialize(self) -> bytes:
        """The frame for this message. Raises TensorError if a float value does not fit the
        encoding (overflow); the message itself was validated when it was built."""
        fields = {n: getattr(self, n) for n in self._json_fields()}
        table, chunks = [], []
        for name, a in self.arrays().items():
            slot = self._slot(name)
            if slot.kind == "float":
                header, parts = encode(name, a, self.encoding)
            else:
                header, parts = encode(name, a.astype(_WIRE_DTYPE[slot.kind], copy=False), "raw")
            table.append(header.to_json())
            chunks.extend(parts)
        head = json.dumps({"fields": fields, "tensors": table}, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        head += b" " * (-(_PREFIX.size + len(head)) % _ALIGN)
        prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, self.KIND, 0, len(head))
        return b"".join([prefix, head, *chunks])

    @classmethod
    def _from_wire(cls, fields: dict, tensors: list[tuple[TensorHeader, memoryview]]) -> "Message":
        name = cls.__name__
        want = cls._json_fields()
        if fields.keys() != set(want):
            problems = []
            if missing := sorted(set(want) - fields.keys()):
                problems.append(f"missing field(s) {', '.join(missing)}")
            if extra := sorted(fields.keys() - set(want)):
                problems.append(f"unknown field(s) {', '.join(f'{k!r:.40}' for k in extra[:5])}")
            raise FrameError(f"{name}: {'; '.join(problems)}")
        arrays: dict[str, np.ndarray] = {}
        encodings = set()
        for header, buf in tensors:
            slot = cls._slot(header.name)
            if slot is None:
                raise TensorError(f"{name}: unexpected tensor {header.name!r:.80}")
            if header.name in arrays:
                raise TensorError(f"{name}: tensor {header.name!r:.80} appears twice")
            if slot.kind == "float":
                if header.encoding == "raw":
                    raise TensorError(f"{name}: tensor {header.name!r:.80} must be a float tensor, got {header.dtype}")
                encodings.add(header.encoding)
            elif (header.encoding, header.dtype) != ("raw", _WIRE_DTYPE[slot.kind]):
                raise TensorError(
                    f"{name}: tensor {header.name!r:.80} must travel as raw {_WIRE_DTYPE[slot.kind]}, got {header.dtype}/{header.encoding}"
                )
            arrays[header.name] = decode(header, buf)
        if len(encodings) > 1:
            raise TensorError(f"{name}: float tensors use different encodings ({', '.join(sorted(encodings))}); one message uses one")
        kw: dict[str, Any] = dict(fields)
        if cls.DYNAMIC_TENSORS:
            kw["tensors"] = arrays
        else:
            for f in dataclasses.fields(cls):
                slot = f.metadata.get("slot")
                if slot is not None and f.name not in arrays and not slot.optional:
                    raise TensorError(f"{name}: missing tensor {f.name!r}")
            for k, a in arrays.items():
                # int64 slots keep the zero-copy view; masks widen from uint8 (read-only, like the rest)
                if cls._slot(k).kind == "mask":
                    a = a.astype(np.int64)
                    a.flags.writeable = False
                kw[k] = a
        if any("encoding" in f.metadata for f in dataclasses.fields(cls)):
            kw["encoding"] = encodings.pop() if encodings else "fp32"
        return cls(**kw)


@_message
class Hello(Message):
    """Client -> server, first message: who I am, what my head is, what I can do."""

    KIND = MessageKind.HELLO
    protocol_version: int = _field(_int(1), default=PROTOCOL_VERSION)
    client_id: str = _field(_text(pattern=_IDENT))
    token: str = _field(_text(), secret=True)  # shared secret; empty when the server runs without tokens
    layout_hash: str = _field(_hex64)  # Manifest.layout_hash of the client's bundle
    split: int = _field(_int(1))  # s: blocks in the client's head
    # u: blocks in the client's top (U-shaped topology: labels and loss stay on the device);
    # -1 = head/tail (the server holds every block after the head and the task head)
    top: int = _field(_int(-1), default=-1)
    backend: str = _field(_text(empty=False))  # "ort", "executorch", ...
    encodings: tuple[str, ...] = _field(_encodings, default=ENCODINGS)  # preference order
    profile: dict = _field(_scalars, default_factory=dict)  # memory_mb, head_throughput, uplink_mbps, ...


@_message
class Welcome(Message):
    """Server -> client, accepts a Hello: the session, the chosen encoding and the frame limit."""

    KIND = MessageKind.WELCOME
    session_id: str = _field(_text(pattern=_IDENT))
    encoding: str = _field(_text(ENCODINGS))  # one of Hello.encodings; used for Z and g
    max_frame_bytes: int = _field(_int(1))
    info: dict = _field(_scalars, default_factory=dict)


@_message
class RoundConfig(Message):
    """Server -> client: a round starts; how to train in it.

    ``mode`` says where the model trains (a client built for the other mode must refuse the
    round), ``personal`` whether the client keeps its own adapters across rounds (False: every
    round starts from the global adapters sent with it), and ``adapters`` whether an
    :class:`Adapters` message follows this one before anything else of the round.
    """

    KIND = MessageKind.ROUND_CONFIG
    round_id: int = _field(_int())
    local_steps: int = _field(_int(1))  # tau
    batch_size: int = _field(_int(1))
    lr: float = _field(_float(0.0, above=True))
    optimizer: str = _field(_text(OPTIMIZERS))
    align_lambda: float = _field(_float(0.0))  # lambda of the alignment term; 0 disables it
    mode: RoundMode = _field(_round_mode, default=RoundMode.SPLIT)
    personal: bool = _field(_bool, default=True)  # keep theta_k across rounds
    adapters: bool = _field(_bool, default=True)  # an Adapters message follows
    # U-shaped only: the alignment term also at the top's input H. The device then sends
    # Z' = head(x; φ) with Z (Activations.z_ref) and gets H' = middle_φ(Z') with H (MiddleOutput.h_ref).
    align_top: bool = _field(_bool, default=False)
    # Where the alignment term is computed (core.alignment.ALIGNMENTS). feature_kl: on the device,
    # at Z. logit_kl (head/tail sessions only): on the server, at the tail's logits; with
    # align_lambda > 0 every train step's Activations carries Z' (z_ref) and the Gradients hold the term.
    alignment: str = _field(_text(ALIGNMENTS), default="feature_kl")
    # Whole-model rounds only (mode full; a split round sends the defaults): how the device spends
    # its local_steps. fedrep: the first head_steps train the task head alone, the rest the body
    # alone; ditto: local_steps on the global model, then local_steps on the personal model with
    # the proximal term prox_mu/2 ‖v − w‖² against the global model w sent with this round.
    local_rule: str = _field(_text(LOCAL_RULES), default="plain")
    head_steps: int = _field(_int(), default=0)
    prox_mu: float = _field(_float(0.0), default=0.0)
    # Whether the device scores its own held-out split after this round's upload (its Metrics then
    # carry personal_acc / personal_ppl); the server asks every --score-every rounds and in the last.
    evaluate: bool = _field(_bool, default=True)


@_message
class Adapters(Message):
    """Server -> client: the global adapters phi of the client's head blocks (PEFT names)."""

    KIND = MessageKind.ADAPTERS
    DYNAMIC_TENSORS = True
    round_id: int = _field(_int())
    tensors: dict[str, np.ndarray]  # PEFT name -> float32 array
    encoding: str = _encoding()


@_message
class Activations(Message):
    """Client -> server: the smashed data of one step.

    ``z`` float32 [B, T, d]; ``attention_mask`` int64 [B, T] of 0/1 (uint8 on the wire);
    ``labels`` int64 [B] (sequence classification) or [B, T] (causal LM, -100 = ignore).
    The session decides about labels (:mod:`.protocol`): a head/tail train step needs them, a
    U-shaped session (``Hello.top >= 0``) refuses any. ``z_ref``: Z' = head(x; φ), float32 like
    ``z``, only in a train step of a round whose RoundConfig has ``align_top`` (U-shaped) or
    ``alignment = logit_kl`` with ``align_lambda > 0`` (head/tail: there every train step needs it;
    the session checks). ``z`` and ``z_ref`` travel in ``encoding``.
    """

    KIND = MessageKind.ACTIVATIONS
    round_id: int = _field(_int())
    step_id: int = _field(_int())
    mode: str = _field(_text(("train", "eval")))
    z: np.ndarray = _array(_Slot("float", (3,)))
    attention_mask: np.ndarray = _array(_Slot("mask", (2,)))
    labels: np.ndarray | None = _array(_Slot("int64", (1, 2), optional=True), default=None)
    z_ref: np.ndarray | None = _array(_Slot("float", (3,), optional=True), default=None)
    encoding: str = _encoding()

    def _check(self) -> None:
        bt = self.z.shape[:2]
        if self.z_ref is not None and self.z_ref.shape != self.z.shape:
            raise TensorError(f"Activations.z_ref has shape {list(self.z_ref.shape)}, z has {list(self.z.shape)}; Z' must match Z")
        if self.attention_mask.shape != bt:
            raise TensorError(f"Activations.attention_mask has shape {list(self.attention_mask.shape)}, z needs {list(bt)}")
        if self.labels is not None and self.labels.shape not in (bt[:1], bt):
            raise TensorError(f"Activations.labels has shape {list(self.labels.shape)}, z needs {list(bt[:1])} or {list(bt)}")


@_message
class Gradients(Message):
    """Server -> client: the answer to a train Activations; ``g`` = dL/dZ, float32 [B, T, d].

    In a ``logit_kl`` round ``g`` already holds the logit-level alignment term
    (``λ‖g_task‖·a/‖a‖``), and the ``align_*`` fields say what it was: the per-sequence mean KL of
    the global tail's logits of Z' against those of Z, ‖term‖/‖g_task‖ (λ, or 0 when there was
    nothing to align) and ‖ℓ - ℓ'‖/‖ℓ'‖; all 0 in other rounds.
    """

    KIND = MessageKind.GRADIENTS
    round_id: int = _field(_int())
    step_id: int = _field(_int())
    loss: float = _field(_float())
    g: np.ndarray = _array(_Slot("float", (3,)))
    align_loss: float = _field(_float(0.0), default=0.0)
    align_ratio: float = _field(_float(0.0), default=0.0)
    align_gap: float = _field(_float(0.0), default=0.0)
    encoding: str = _encoding()


@_message
class Predictions(Message):
    """Server -> client: the answer to an eval Activations; ``logits`` float32 [B, C] or [B, T, C]."""

    KIND = MessageKind.PREDICTIONS
    round_id: int = _field(_int())
    step_id: int = _field(_int())
    logits: np.ndarray = _array(_Slot("float", (2, 3)))
    encoding: str = _encoding()


@_message
class MiddleOutput(Message):
    """Server -> client, U-shaped: ``h`` = the middle's output H, float32 [B, T, d], for the
    Activations with the same ids (train: the device answers with :class:`TopGradients`; eval:
    the device runs its top itself and keeps the predictions). ``h_ref`` = H' = middle_φ(Z'),
    no gradient kept, exactly when the Activations carried ``z_ref`` (the session checks)."""

    KIND = MessageKind.MIDDLE_OUTPUT
    round_id: int = _field(_int())
    step_id: int = _field(_int())
    h: np.ndarray = _array(_Slot("float", (3,)))
    h_ref: np.ndarray | None = _array(_Slot("float", (3,), optional=True), default=None)
    encoding: str = _encoding()

    def _check(self) -> None:
        if self.h_ref is not None and self.h_ref.shape != self.h.shape:
            raise TensorError(f"MiddleOutput.h_ref has shape {list(self.h_ref.shape)}, h has {list(self.h.shape)}; H' must match H")


@_message
class TopGradients(Message):
    """Client -> server, U-shaped: ``grad_h`` = dL/dH, float32 [B, T, d], from the device's top
    (which holds the labels), and the step's ``loss`` for the server's metrics."""

    KIND = MessageKind.TOP_GRADIENTS
    round_id: int = _field(_int())
    step_id: int = _field(_int())
    loss: float = _field(_float())
    grad_h: np.ndarray = _array(_Slot("float", (3,)))
    encoding: str = _encoding()


@_message
class Upload(Message):
    """Client -> server, end of a round: the personal adapters theta_k and the samples behind them."""

    KIND = MessageKind.UPLOAD
    DYNAMIC_TENSORS = True
    round_id: int = _field(_int())
    num_samples: int = _field(_int())
    tensors: dict[str, np.ndarray]
    encoding: str = _encoding()


@_message
class Metrics(Message):
    """Client -> server: named measurements (loss, accuracy, step latency, ...)."""

    KIND = MessageKind.METRICS
    round_id: int = _field(_int())
    metrics: dict = _field(_scalars)


@_message
class RoundEnd(Message):
    """Server -> client: the round is aggregated; the client may evaluate or wait for the next."""

    KIND = MessageKind.ROUND_END
    round_id: int = _field(_int())
    info: dict = _field(_scalars, default_factory=dict)


@_message
class Error(Message):
    """Either way: the sender refuses something and closes. ``code`` is an :class:`ErrorCode`."""

    KIND = MessageKind.ERROR
    code: ErrorCode = _field(_error_code)
    message: str = _field(_text())

    @classmethod
    def from_exception(cls, exc: Exception) -> "Error":
        """The Error to send for an exception: a ProtocolError keeps its code, anything else is SERVER_ERROR."""
        code = getattr(exc, "code", ErrorCode.SERVER_ERROR)
        return cls(code=code if isinstance(code, ErrorCode) else ErrorCode.SERVER_ERROR, message=str(exc))


@_message
class Bye(Message):
    """Either way: the sender is done and closes."""

    KIND = MessageKind.BYE
    reason: str = _field(_text(), default="")


_BY_KIND: dict[MessageKind, type[Message]] = {
    c.KIND: c
    for c in (Hello, Welcome, RoundConfig, Adapters, Activations, Gradients, Predictions, MiddleOutput, TopGradients, Upload,
              Metrics, RoundEnd, Error, Bye)
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        repeated = [k for k, c in collections.Counter(k for k, _ in pairs).items() if c > 1]
        raise FrameError(f"frame header repeats the key(s) {', '.join(map(repr, repeated[:5]))}")
    return d


def _no_constants(name: str) -> None:
    raise FrameError(f"frame header holds {name}, which is not JSON; numbers must be finite")


def parse(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one frame into its message.

    ``data`` should be ``bytes``: the message's arrays may view it. Other bytes-like objects
    are copied once, so later changes to them cannot reach the message. Raises FrameError or
    TensorError (both :class:`~flexsfl.core.errors.ProtocolError`) with a one-line reason.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif isinstance(data, str):
        raise FrameError("got a text frame; flexsfl frames are binary")
    elif not isinstance(data, bytes):
        raise FrameError(f"a frame must be bytes, got {type(data).__name__}")
    n = len(data)
    if n > limits.max_frame_bytes:
        raise FrameError(f"frame is {n} bytes, over the limit of {limits.max_frame_bytes}", ErrorCode.TOO_LARGE)
    if n < _PREFIX.size:
        raise FrameError(f"frame is {n} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, kind, flags, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"frame starts with {magic!r}, not {MAGIC!r}; the peer does not speak the flexsfl protocol")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            f"frame has protocol version {version}; this flexsfl speaks {PROTOCOL_VERSION}, upgrade the older side", ErrorCode.BAD_VERSION
        )
    if kind not in MessageKind._value2member_map_:
        raise FrameError(f"frame has unknown message kind {kind}", ErrorCode.UNKNOWN_KIND)
    if flags:
        raise FrameError(f"frame has flags {flags:#06x}; version {PROTOCOL_VERSION} defines none (must be 0)")
    if hlen > limits.max_header_bytes:
        raise FrameError(f"frame header is {hlen} bytes, over the limit of {limits.max_header_bytes}", ErrorCode.TOO_LARGE)
    end = _PREFIX.size + hlen
    if end > n:
        raise FrameError(f"frame is {n} bytes but its header alone needs {end}; the frame is truncated")
    try:
        header = json.loads(data[_PREFIX.size:end].decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError and int-size errors are ValueErrors
        raise FrameError(f"frame header is not UTF-8 JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(header, dict) or header.keys() != {"fields", "tensors"}:
        raise FrameError('frame header must be a JSON object with exactly the keys "fields" and "tensors"')
    fields, table = header["fields"], header["tensors"]
    if not isinstance(fields, dict):
        raise FrameError('frame header "fields" must be an object')
    if not isinstance(table, list):
        raise FrameError('frame header "tensors" must be a list')
    if len(table) > limits.max_tensors:
        raise FrameError(f"frame has {len(table)} tensors, over the limit of {limits.max_tensors}", ErrorCode.TOO_LARGE)
    headers = [TensorHeader.from_json(t, i, limits) for i, t in enumerate(table)]
    total = end + sum(h.nbytes for h in headers)
    if total != n:
        raise FrameError(f"frame is {n} bytes but its header accounts for {total}; the frame is {'truncated' if total > n else 'padded'}")
    view = memoryview(data)
    tensors, offset = [], end
    for h in headers:
        tensors.append((h, view[offset:offset + h.nbytes]))
        offset += h.nbytes
    return _BY_KIND[MessageKind(kind)]._from_wire(fields, tensors)
