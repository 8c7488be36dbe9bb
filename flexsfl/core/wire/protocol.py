"""The per-connection state machine of the flexsfl protocol, with no I/O.

Both sides keep a :class:`Connection`. The transport hands every frame it receives to
:meth:`Connection.receive` and writes whatever :meth:`Connection.send` returns; this module never
touches a socket, so its tests never open one::

    conn = Connection(Role.CLIENT)
    ws.send(conn.send(Hello(...)))
    welcome = conn.receive(ws.recv())

States (``->`` is the message that moves on; the sender is in brackets)::

    AWAIT_HELLO --Hello[c]--> AWAIT_WELCOME --Welcome[s]--> IDLE
    IDLE --RoundConfig[s]--> IN_ROUND --Upload[c]--> AWAIT_ROUND_END --RoundEnd[s]--> IDLE
    IN_ROUND:  Adapters[s]; Activations[c] answered by Gradients[s] (train) or Predictions[s] (eval)
    IDLE:      eval Activations[c] answered by Predictions[s]
    IDLE, IN_ROUND, AWAIT_ROUND_END: Metrics[c]
    any state but CLOSED --Error or Bye[either]--> CLOSED

A U-shaped session (``Hello.top >= 0``: the device holds the last blocks, the task head and
the labels) answers steps in more legs; its Activations carry no labels::

    train: Activations[c] (Z) -> MiddleOutput[s] (H) -> TopGradients[c] (dL/dH) -> Gradients[s] (dL/dZ)
    eval:  Activations[c] (Z) -> MiddleOutput[s] (H); the device scores its own top's predictions

and Predictions never pass. A head/tail session (``Hello.top == -1``) never sees MiddleOutput
or TopGradients, and its train Activations must carry labels.

Alignment at the top's input: in a round whose RoundConfig has ``align_top`` (only for a
U-shaped session, with ``align_lambda > 0``), a train Activations may also carry ``z_ref``
(Z' = head(x; φ)); its MiddleOutput must then carry ``h_ref`` (H' = middle_φ(Z')), and only then.
Logit-level alignment: in a round whose RoundConfig has ``alignment = logit_kl`` (only for a
head/tail session) and ``align_lambda > 0``, *every* train Activations must carry ``z_ref`` (the
server needs Z' to compute the term; one without it is refused). A ``z_ref`` anywhere else
(another round, an eval step, a head/tail session in a feature_kl round) is refused.

At most one Activations is outstanding: until the step's last leg, only the next leg
(:attr:`Pending.awaits`), Error or Bye may pass. Inside a round every round_id must be the round's; an answer must carry the ids
of the Activations it answers, and its tensor must match that batch's shape. Z and g travel in
the encoding chosen in Welcome (one of those the client offered in Hello), and from Welcome on
both sides hold frames to the smaller of their own limit and Welcome.max_frame_bytes.

Who is at fault decides the exception, and a refused message always leaves the connection
exactly as it was:

* :meth:`Connection.receive` of a frame that is malformed or not allowed now raises a
  :class:`~flexsfl.core.errors.ProtocolError` (the peer's fault); the caller may then send
  ``Error.from_exception(exc)``, which is allowed in every state but CLOSED, and close.
* :meth:`Connection.send` of a message that this side may not send now (out of order, from the
  wrong side, for another round or step, over the agreed frame limit) raises
  :class:`~flexsfl.core.errors.InvalidState`, which is *not* a ProtocolError: it is a bug (or a
  race with a closing connection) in the code driving this side, and must not be reported to
  the peer as the peer's error.
* Arguments of the wrong type (a role that is not a :class:`Role`, a send of something that is
  not a :class:`~.messages.Message`, a receive of something that is not bytes) raise ``TypeError``.

:func:`check_activations` and :func:`check_tensors` validate what depends on the session's
model (hidden size, batch limits, adapter names), which the codec cannot know.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from flexsfl.core.constants import TASKS
from flexsfl.core.errors import ConfigError, ErrorCode, InvalidState, OrderError, ProtocolError, TensorError
from flexsfl.core.wire.messages import (
    PROTOCOL_VERSION,
    Activations,
    Adapters,
    Bye,
    Error,
    Gradients,
    Hello,
    Message,
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
from flexsfl.core.wire.tensors import DEFAULT_LIMITS, Limits

__all__ = ["Role", "State", "Pending", "Connection", "check_activations", "check_tensors"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = enum.auto()  # nothing sent yet
    AWAIT_WELCOME = enum.auto()  # Hello sent, no answer yet
    IDLE = enum.auto()  # between rounds
    IN_ROUND = enum.auto()  # after RoundConfig, until the client's Upload
    AWAIT_ROUND_END = enum.auto()  # Upload sent, the server aggregates
    CLOSED = enum.auto()  # after Error or Bye; nothing more may pass


@dataclasses.dataclass(frozen=True)
class Pending:
    """The Activations whose step is not finished, and the leg it waits for."""

    round_id: int
    step_id: int
    mode: str  # "train" -> Gradients, "eval" -> Predictions (head/tail) or MiddleOutput (U-shaped)
    shape: tuple[int, int, int]  # of z: [B, T, d] (H, dL/dH and dL/dZ have it too)
    awaits: type[Message] = Gradients  # the step's next message (U-shaped train: MiddleOutput, TopGradients, Gradients)
    ref: bool = False  # the Activations carried z_ref: its MiddleOutput must carry h_ref


@dataclasses.dataclass(frozen=True)
class _Session:
    """Everything a message can change; replaced whole, so a refused message changes nothing."""

    limits: Limits
    state: State = State.AWAIT_HELLO
    round_id: int | None = None  # the current round (IN_ROUND, AWAIT_ROUND_END) or the last one
    pending: Pending | None = None
    offered: tuple[str, ...] = ()  # Hello.encodings
    encoding: str | None = None  # Welcome.encoding
    session_id: str | None = None
    top: int = -1  # Hello.top: >= 0 in a U-shaped session
    align_top: bool = False  # the current round's RoundConfig.align_top: z_ref allowed in its train steps
    logit_kl: bool = False  # the current round is logit_kl with align_lambda > 0: its head/tail train steps need z_ref


_SENDER: dict[type[Message], Role] = {
    Hello: Role.CLIENT,
    Welcome: Role.SERVER,
    RoundConfig: Role.SERVER,
    Adapters: Role.SERVER,
    Activations: Role.CLIENT,
    Gradients: Role.SERVER,
    Predictions: Role.SERVER,
    MiddleOutput: Role.SERVER,
    TopGradients: Role.CLIENT,
    Upload: Role.CLIENT,
    Metrics: Role.CLIENT,
    RoundEnd: Role.SERVER,
}


class Connection:
    """One side of one connection. Not thread-safe: drive it from one task."""

    def __init__(self, role: Role, limits: Limits = DEFAULT_LIMITS) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"Connection role must be Role.CLIENT or Role.SERVER, got {type(role).__name__} {role!r}")
        if not isinstance(limits, Limits):
            raise TypeError(f"Connection limits must be a wire Limits, got {type(limits).__name__}")
        self.role = role
        self._s = _Session(limits=limits)

    @property
    def peer(self) -> Role:
        return Role.SERVER if self.role is Role.CLIENT else Role.CLIENT

    @property
    def state(self) -> State:
        return self._s.state

    @property
    def limits(self) -> Limits:
        """The limits frames are held to now (max_frame_bytes shrinks at Welcome)."""
        return self._s.limits

    @property
    def round_id(self) -> int | None:
        return self._s.round_id

    @property
    def pending(self) -> Pending | None:
        return self._s.pending

    @property
    def encoding(self) -> str | None:
        """The encoding of Z and g, once Welcome has chosen it."""
        return self._s.encoding

    @property
    def session_id(self) -> str | None:
        return self._s.session_id

    @property
    def top(self) -> int:
        """Hello.top: the device's top blocks in a U-shaped session, -1 for head/tail."""
        return self._s.top

    @property
    def u_shaped(self) -> bool:
        return self._s.top >= 0

    @property
    def align_top(self) -> bool:
        """The current round's RoundConfig.align_top: its U-shaped train steps may carry Z' (and get H')."""
        return self._s.align_top

    @property
    def logit_kl(self) -> bool:
        """The current round aligns at the logits (RoundConfig.alignment logit_kl, λ > 0): every train step carries Z'."""
        return self._s.logit_kl

    def send(self, msg: Message) -> bytes:
        """Check that this side may send ``msg`` now, advance the state and return the frame.

        Raises :class:`~flexsfl.core.errors.InvalidState` and changes nothing if it may not
        (wrong state or side, ids or shapes that do not match the session, a frame over the
        agreed limit): the caller's bug, not the peer's. ``TypeError`` if ``msg`` is not a Message.
        """
        if not isinstance(msg, Message):
            raise TypeError(f"Connection.send takes a protocol message, not {type(msg).__name__}")
        try:
            after = self._advance(msg, self.role)
        except ProtocolError as e:
            raise InvalidState(f"cannot send: {e}") from e
        data = msg.serialize()
        if len(data) > self._s.limits.max_frame_bytes:
            raise InvalidState(
                f"cannot send: {type(msg).__name__} frame is {len(data)} bytes, over the connection's limit of "
                f"{self._s.limits.max_frame_bytes}; send smaller batches or fewer tensors"
            )
        self._s = after
        return data

    def receive(self, data: bytes) -> Message:
        """Parse a frame from the peer, check it is allowed now, advance the state and return it.

        An Error or Bye from the peer is returned (the connection is then CLOSED); acting on it
        is the caller's job. Raises a ProtocolError (the peer's fault) and changes nothing if the
        frame is malformed or not allowed now. ``data`` must be the bytes of a binary frame
        (``TypeError`` otherwise: the transport refuses text frames itself).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Connection.receive takes the bytes of a binary frame, not {type(data).__name__}")
        msg = parse(data, self._s.limits)
        self._s = self._advance(msg, self.peer)
        return msg

    def _advance(self, msg: Message, sender: Role) -> _Session:
        """The session after ``sender`` sends ``msg``, or OrderError/ProtocolError (``send`` turns
        those into InvalidState: there the sender is this side)."""
        s, name = self._s, type(msg).__name__
        if s.state is State.CLOSED:
            raise OrderError(f"{name} after the connection closed; open a new connection")
        if isinstance(msg, (Error, Bye)):
            return dataclasses.replace(s, state=State.CLOSED, pending=None)
        if _SENDER[type(msg)] is not sender:
            raise OrderError(f"{name} is sent by the {_SENDER[type(msg)].value}, not the {sender.value}")
        if s.pending is not None and type(msg) is not s.pending.awaits:
            p = s.pending
            raise OrderError(f"{name} while Activations round {p.round_id} step {p.step_id} awaits its answer "
                             f"({p.awaits.__name__}); one request at a time")
        if isinstance(msg, (MiddleOutput, TopGradients)) and s.top < 0:
            raise OrderError(f"{name} is only for U-shaped sessions (Hello.top >= 0); this session is head/tail")
        if isinstance(msg, Predictions) and s.top >= 0:
            raise OrderError("Predictions in a U-shaped session; the device's top makes its own predictions")
        return _TRANSITIONS[type(msg)](s, msg)


def _require(s: _Session, msg: Message, *states: State) -> None:
    if s.state not in states:
        allowed = " or ".join(st.name for st in states)
        raise OrderError(f"{type(msg).__name__} is not allowed in state {s.state.name} (only in {allowed})")


def _same_round(s: _Session, msg: Message) -> None:
    if msg.round_id != s.round_id:
        raise OrderError(f"{type(msg).__name__} is for round {msg.round_id}, but round {s.round_id} is running")


def _on_hello(s: _Session, m: Hello) -> _Session:
    _require(s, m, State.AWAIT_HELLO)
    if m.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Hello.protocol_version is {m.protocol_version}; this side speaks {PROTOCOL_VERSION}, upgrade the older side",
            ErrorCode.BAD_VERSION,
        )
    return dataclasses.replace(s, state=State.AWAIT_WELCOME, offered=m.encodings, top=m.top)


def _on_welcome(s: _Session, m: Welcome) -> _Session:
    _require(s, m, State.AWAIT_WELCOME)
    if m.encoding not in s.offered:
        raise ProtocolError(f"Welcome.encoding {m.encoding!r} was not offered in Hello ({', '.join(s.offered)})")
    limits = dataclasses.replace(s.limits, max_frame_bytes=min(s.limits.max_frame_bytes, m.max_frame_bytes))
    return dataclasses.replace(s, state=State.IDLE, encoding=m.encoding, session_id=m.session_id, limits=limits)


def _on_round_config(s: _Session, m: RoundConfig) -> _Session:
    _require(s, m, State.IDLE)
    if s.round_id is not None and m.round_id <= s.round_id:
        raise OrderError(f"RoundConfig starts round {m.round_id}, but round {s.round_id} came before; round ids must increase")
    if m.align_top and s.top < 0:
        raise ProtocolError("RoundConfig.align_top is for U-shaped sessions (Hello.top >= 0); this session is head/tail")
    if m.align_top and not m.align_lambda > 0:
        raise ProtocolError("RoundConfig.align_top needs align_lambda > 0: it applies the alignment term at the top's input too")
    if m.alignment == "logit_kl" and s.top >= 0:
        raise ProtocolError("RoundConfig.alignment logit_kl is for head/tail sessions (the server holds the logits); "
                            "this session is U-shaped")
    return dataclasses.replace(s, state=State.IN_ROUND, round_id=m.round_id, align_top=m.align_top,
                               logit_kl=m.alignment == "logit_kl" and m.align_lambda > 0)


def _on_adapters(s: _Session, m: Adapters) -> _Session:
    _require(s, m, State.IN_ROUND)
    _same_round(s, m)
    return s


def _on_activations(s: _Session, m: Activations) -> _Session:
    if m.mode == "train":
        _require(s, m, State.IN_ROUND)
    else:
        _require(s, m, State.IN_ROUND, State.IDLE)
    if s.state is State.IN_ROUND:
        _same_round(s, m)
    if m.encoding != s.encoding:
        raise TensorError(f"Activations.z travels in {m.encoding}, but the connection negotiated {s.encoding}")
    in_train = m.mode == "train" and s.state is State.IN_ROUND
    if m.z_ref is not None and not (in_train and (s.align_top if s.top >= 0 else s.logit_kl)):
        where = ("an eval step" if m.mode != "train" else f"round {m.round_id}, whose RoundConfig has align_top false"
                 if s.top >= 0 else f"a head/tail session (round {m.round_id} is not a logit_kl round)")
        raise ProtocolError(f"Activations round {m.round_id} step {m.step_id} carries z_ref (Z') in {where}; "
                            "send Z' only in train steps of an align_top (U-shaped) or logit_kl (head/tail) round",
                            ErrorCode.BAD_TENSOR)
    if m.z_ref is None and in_train and s.top < 0 and s.logit_kl:
        raise ProtocolError(f"Activations round {m.round_id} step {m.step_id} lacks z_ref (Z'): round {m.round_id} aligns "
                            "at the logits (logit_kl), so every train step sends Z' = head(x; φ) with Z", ErrorCode.BAD_TENSOR)
    if s.top >= 0:
        if m.labels is not None:
            raise ProtocolError(f"Activations round {m.round_id} step {m.step_id} carries labels in a U-shaped session "
                                "(Hello.top >= 0); labels stay on the device, send Z and the mask only", ErrorCode.BAD_TENSOR)
        return dataclasses.replace(s, pending=Pending(m.round_id, m.step_id, m.mode, m.z.shape, MiddleOutput,
                                                      m.z_ref is not None))
    if m.mode == "train" and m.labels is None:
        raise TensorError(f"Activations round {m.round_id} step {m.step_id}: a head/tail train step needs labels")
    return dataclasses.replace(s, pending=Pending(m.round_id, m.step_id, m.mode, m.z.shape,
                                                  Gradients if m.mode == "train" else Predictions))


def _answer(s: _Session, m: Message, mode: str | None) -> Pending:
    name, p = type(m).__name__, s.pending
    if p is None:
        raise OrderError(f"{name} answers no Activations; none is outstanding")
    if mode is not None and p.mode != mode:
        raise OrderError(f"{name} answers an Activations in mode {mode!r}, but the outstanding one is {p.mode!r}")
    if (m.round_id, m.step_id) != (p.round_id, p.step_id):
        raise OrderError(
            f"{name} answers round {m.round_id} step {m.step_id}, but the outstanding Activations is round {p.round_id} step {p.step_id}"
        )
    return p


def _on_gradients(s: _Session, m: Gradients) -> _Session:
    p = _answer(s, m, "train")
    _same_shape(s, p, "g", m.g, m)
    return dataclasses.replace(s, pending=None)


def _same_shape(s: _Session, p: Pending, name: str, a: np.ndarray, m: Message) -> None:
    if a.shape != p.shape:
        raise TensorError(f"{type(m).__name__}.{name} has shape {list(a.shape)}, but z had {list(p.shape)}")
    if m.encoding != s.encoding:
        raise TensorError(f"{type(m).__name__}.{name} travels in {m.encoding}, but the connection negotiated {s.encoding}")


def _on_middle_output(s: _Session, m: MiddleOutput) -> _Session:
    p = _answer(s, m, None)
    _same_shape(s, p, "h", m.h, m)
    if p.ref != (m.h_ref is not None):
        raise ProtocolError(f"MiddleOutput round {m.round_id} step {m.step_id} "
                            + ("lacks h_ref (H'), but its Activations sent z_ref" if p.ref
                               else "carries h_ref (H'), but its Activations sent no z_ref"), ErrorCode.BAD_TENSOR)
    if p.mode == "eval":
        return dataclasses.replace(s, pending=None)
    return dataclasses.replace(s, pending=dataclasses.replace(p, awaits=TopGradients))


def _on_top_gradients(s: _Session, m: TopGradients) -> _Session:
    p = _answer(s, m, "train")
    _same_shape(s, p, "grad_h", m.grad_h, m)
    return dataclasses.replace(s, pending=dataclasses.replace(p, awaits=Gradients))


def _on_predictions(s: _Session, m: Predictions) -> _Session:
    p = _answer(s, m, "eval")
    lead = p.shape[: m.logits.ndim - 1]  # [B] for [B, C] logits, [B, T] for [B, T, C]
    if m.logits.shape[:-1] != lead:
        raise TensorError(f"Predictions.logits has shape {list(m.logits.shape)}, but z had {list(p.shape)}")
    return dataclasses.replace(s, pending=None)


def _on_upload(s: _Session, m: Upload) -> _Session:
    _require(s, m, State.IN_ROUND)
    _same_round(s, m)
    return dataclasses.replace(s, state=State.AWAIT_ROUND_END)


def _on_metrics(s: _Session, m: Metrics) -> _Session:
    _require(s, m, State.IDLE, State.IN_ROUND, State.AWAIT_ROUND_END)
    if s.state is not State.IDLE:
        _same_round(s, m)
    return s


def _on_round_end(s: _Session, m: RoundEnd) -> _Session:
    _require(s, m, State.AWAIT_ROUND_END)
    _same_round(s, m)
    return dataclasses.replace(s, state=State.IDLE)


_TRANSITIONS = {
    Hello: _on_hello,
    Welcome: _on_welcome,
    RoundConfig: _on_round_config,
    Adapters: _on_adapters,
    Activations: _on_activations,
    Gradients: _on_gradients,
    Predictions: _on_predictions,
    MiddleOutput: _on_middle_output,
    TopGradients: _on_top_gradients,
    Upload: _on_upload,
    Metrics: _on_metrics,
    RoundEnd: _on_round_end,
}


def check_activations(msg: Activations, *, hidden_size: int, max_batch: int, max_seq: int, num_labels: int, task: str) -> None:
    """Check an Activations against the session's model; raise TensorError naming what is wrong.

    ``task`` is ``"seq_cls"`` (labels [B] in [0, num_labels)) or ``"causal_lm"`` (labels [B, T]
    in [0, num_labels) or -100). Needs 1 <= B <= max_batch, 1 <= T <= max_seq, d == hidden_size,
    no all-zero mask row, and for training at least one label that is not -100; those last two
    would make the server's loss NaN. (The message itself guarantees the mask is 0/1 and the
    shapes agree.)
    """
    if task not in TASKS:
        raise ConfigError(f"check_activations: task must be 'seq_cls' or 'causal_lm', got {task!r}")
    b, t, d = msg.z.shape
    if not 1 <= b <= max_batch:
        raise TensorError(f"Activations.z batch size {b} is outside 1..{max_batch}")
    if not 1 <= t <= max_seq:
        raise TensorError(f"Activations.z sequence length {t} is outside 1..{max_seq}")
    if d != hidden_size:
        raise TensorError(f"Activations.z hidden size is {d}, the model's is {hidden_size}; the bundle does not match the server")
    empty = np.flatnonzero(~msg.attention_mask.any(axis=1))
    if empty.size:
        raise TensorError(f"Activations.attention_mask row {int(empty[0])} is all zeros; every sequence needs a token")
    y = msg.labels
    if y is None:
        return
    if task == "seq_cls":
        if y.shape != (b,):
            raise TensorError(f"Activations.labels has shape {list(y.shape)}; sequence classification needs [{b}]")
        bad = (y < 0) | (y >= num_labels)
    else:
        if y.shape != (b, t):
            raise TensorError(f"Activations.labels has shape {list(y.shape)}; a causal LM needs [{b}, {t}]")
        bad = ((y < 0) & (y != -100)) | (y >= num_labels)
        if msg.mode == "train" and (y == -100).all():
            raise TensorError("Activations.labels are all -100 (ignored); a train step needs at least one label")
    if bad.any():
        where = np.argwhere(bad)[0]
        raise TensorError(
            f"Activations.labels{list(map(int, where))} = {int(y[tuple(where)])} is outside 0..{num_labels - 1}"
            + (" (or -100)" if task == "causal_lm" else "")
        )


def check_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], *, what: str = "tensors") -> None:
    """Check an adapter set against the layout: exactly the expected names, each with its shape.

    ``what`` names the set in the error ("Upload.tensors"). Raises TensorError listing the
    first few missing or unexpected names, or the first tensor with the wrong shape.
    """
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{label} {', '.join(map(repr, names[:3]))}{more}")
        raise TensorError(f"{what}: {'; '.join(parts)}; client and server disagree on the adapter layout")
    for n, shape in expected.items():
        if tuple(tensors[n].shape) != tuple(shape):
            raise TensorError(f"{what}[{n!r}] has shape {list(tensors[n].shape)}, expected {list(shape)}")
