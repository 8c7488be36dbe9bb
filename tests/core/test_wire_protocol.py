"""The connection state machine (no sockets): every allowed transition, every refused one (a
peer's frame -> ProtocolError, this side's own send -> InvalidState), for head/tail sessions and
U-shaped ones (``U:`` situations: Z up, H down, dL/dH up, dL/dZ down, no labels on the wire), and
the session-level checks of activations and adapter sets."""

from __future__ import annotations

import numpy as np
import pytest

from flexsfl.core.errors import ConfigError, ErrorCode, FrameError, InvalidState, OrderError, ProtocolError, TensorError
from flexsfl.core.wire import (
    PROTOCOL_VERSION,
    Activations,
    Adapters,
    Bye,
    Connection,
    Error,
    Gradients,
    Hello,
    Limits,
    Metrics,
    MiddleOutput,
    Pending,
    Predictions,
    Role,
    RoundConfig,
    RoundEnd,
    State,
    TopGradients,
    Upload,
    Welcome,
    check_activations,
    check_tensors,
)

HASH = "0123456789abcdef" * 4
Z = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 8
MASK = np.ones((2, 3), np.int64)


def act(mode="train", round_id=1, step_id=7, encoding="fp16", z=Z, labels=np.array([0, 1])):
    return Activations(round_id=round_id, step_id=step_id, mode=mode, z=z, attention_mask=np.ones(z.shape[:2], np.int64),
                       labels=labels if mode == "train" else None, encoding=encoding)


CATALOGUE = {
    "Hello": Hello(client_id="pi4-01", token="t", layout_hash=HASH, split=2, backend="ort", encodings=("fp16", "fp32")),
    "Welcome": Welcome(session_id="s-1", encoding="fp16", max_frame_bytes=1 << 20),
    "RoundConfig": RoundConfig(round_id=1, local_steps=2, batch_size=2, lr=0.01, optimizer="sgd", align_lambda=0.0),
    "Adapters": Adapters(round_id=1, tensors={"a": np.ones((2, 4), np.float32)}),
    "Activations/train": act("train"),
    "Activations/eval": act("eval"),
    "Gradients": Gradients(round_id=1, step_id=7, loss=0.5, g=Z, encoding="fp16"),
    "Predictions": Predictions(round_id=1, step_id=7, logits=np.zeros((2, 5), np.float32)),
    "Upload": Upload(round_id=1, num_samples=10, tensors={"a": np.ones((2, 4), np.float32)}),
    "Metrics": Metrics(round_id=1, metrics={"loss": 0.5}),
    "RoundEnd": RoundEnd(round_id=1),
    "Error": Error(code=ErrorCode.SERVER_ERROR, message="x"),
    "Bye": Bye(reason="done"),
    # U-shaped
    "Hello/U": Hello(client_id="pi5-u", token="t", layout_hash=HASH, split=1, top=1, backend="ort", encodings=("fp16",)),
    "Activations/u-train": act("train", labels=None),
    "MiddleOutput": MiddleOutput(round_id=1, step_id=7, h=Z, encoding="fp16"),
    "TopGradients": TopGradients(round_id=1, step_id=7, loss=0.5, grad_h=Z, encoding="fp16"),
}
CLIENT_SENDS = {"Hello", "Activations/train", "Activations/eval", "Upload", "Metrics", "Error", "Bye",
                "Hello/U", "Activations/u-train", "TopGradients"}

# How to get to each situation from a fresh pair, and what each allowed message leads to there.
SCRIPTS = {
    "AWAIT_HELLO": [],
    "AWAIT_WELCOME": ["Hello"],
    "IDLE": ["Hello", "Welcome"],
    "IDLE+eval": ["Hello", "Welcome", "Activations/eval"],
    "IN_ROUND": ["Hello", "Welcome", "RoundConfig"],
    "IN_ROUND+train": ["Hello", "Welcome", "RoundConfig", "Activations/train"],
    "IN_ROUND+eval": ["Hello", "Welcome", "RoundConfig", "Activations/eval"],
    "AWAIT_ROUND_END": ["Hello", "Welcome", "RoundConfig", "Upload"],
    "CLOSED": ["Hello", "Bye"],
    "U:AWAIT_WELCOME": ["Hello/U"],
    "U:IDLE": ["Hello/U", "Welcome"],
    "U:IDLE+eval>MiddleOutput": ["Hello/U", "Welcome", "Activations/eval"],
    "U:IN_ROUND": ["Hello/U", "Welcome", "RoundConfig"],
    "U:IN_ROUND+train>MiddleOutput": ["Hello/U", "Welcome", "RoundConfig", "Activations/u-train"],
    "U:IN_ROUND+train>TopGradients": ["Hello/U", "Welcome", "RoundConfig", "Activations/u-train", "MiddleOutput"],
    "U:IN_ROUND+train>Gradients": ["Hello/U", "Welcome", "RoundConfig", "Activations/u-train", "MiddleOutput", "TopGradients"],
    "U:IN_ROUND+eval>MiddleOutput": ["Hello/U", "Welcome", "RoundConfig", "Activations/eval"],
    "U:AWAIT_ROUND_END": ["Hello/U", "Welcome", "RoundConfig", "Upload"],
}
ALLOWED = {
    "AWAIT_HELLO": {"Hello": "AWAIT_WELCOME", "Hello/U": "U:AWAIT_WELCOME"},
    "AWAIT_WELCOME": {"Welcome": "IDLE"},
    "IDLE": {"RoundConfig": "IN_ROUND", "Activations/eval": "IDLE+eval", "Metrics": "IDLE"},
    "IDLE+eval": {"Predictions": "IDLE"},
    "IN_ROUND": {"Adapters": "IN_ROUND", "Activations/train": "IN_ROUND+train", "Activations/eval": "IN_ROUND+eval",
                 "Upload": "AWAIT_ROUND_END", "Metrics": "IN_ROUND"},
    "IN_ROUND+train": {"Gradients": "IN_ROUND"},
    "IN_ROUND+eval": {"Predictions": "IN_ROUND"},
    "AWAIT_ROUND_END": {"RoundEnd": "IDLE", "Metrics": "AWAIT_ROUND_END"},
    "CLOSED": {},
    "U:AWAIT_WELCOME": {"Welcome": "U:IDLE"},
    "U:IDLE": {"RoundConfig": "U:IN_ROUND", "Activations/eval": "U:IDLE+eval>MiddleOutput", "Metrics": "U:IDLE"},
    "U:IDLE+eval>MiddleOutput": {"MiddleOutput": "U:IDLE"},
    "U:IN_ROUND": {"Adapters": "U:IN_ROUND", "Activations/u-train": "U:IN_ROUND+train>MiddleOutput",
                   "Activations/eval": "U:IN_ROUND+eval>MiddleOutput", "Upload": "U:AWAIT_ROUND_END", "Metrics": "U:IN_ROUND"},
    "U:IN_ROUND+train>MiddleOutput": {"MiddleOutput": "U:IN_ROUND+train>TopGradients"},
    "U:IN_ROUND+train>TopGradients": {"TopGradients": "U:IN_ROUND+train>Gradients"},
    "U:IN_ROUND+train>Gradients": {"Gradients": "U:IN_ROUND"},
    "U:IN_ROUND+eval>MiddleOutput": {"MiddleOutput": "U:IN_ROUND"},
    "U:AWAIT_ROUND_END": {"RoundEnd": "U:IDLE", "Metrics": "U:AWAIT_ROUND_END"},
}
# Refused for what the session decides about labels, not for their order (the peer's fault all the same).
NOT_ORDER = {
    ("IN_ROUND", "Activations/u-train"): (TensorError, "a head/tail train step needs labels"),
    ("U:IN_ROUND", "Activations/train"): (ProtocolError, "carries labels in a U-shaped session"),
}
for situation, allowed in ALLOWED.items():
    if situation != "CLOSED":
        closed = "U:CLOSED" if situation.startswith("U:") else "CLOSED"
        allowed.update({"Error": closed, "Bye": closed})


def situation_of(conn: Connection) -> str:
    p = conn.pending
    if not conn.u_shaped:
        return conn.state.name + (f"+{p.mode}" if p else "")
    return "U:" + conn.state.name + (f"+{p.mode}>{p.awaits.__name__}" if p else "")


def deliver(client: Connection, server: Connection, key: str):
    sender, receiver = (client, server) if key in CLIENT_SENDS else (server, client)
    msg = CATALOGUE[key]
    got = receiver.receive(sender.send(msg))
    assert got == msg
    assert situation_of(client) == situation_of(server)
    return got


def reach(situation: str) -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    for key in SCRIPTS[situation]:
        deliver(client, server, key)
    assert situation_of(client) == situation
    return client, server


def snapshot(conn: Connection):
    return (conn.state, conn.round_id, conn.pending, conn.encoding, conn.session_id, conn.limits, conn.top)


@pytest.mark.parametrize("situation, key, after", [(s, k, a) for s, allowed in ALLOWED.items() for k, a in allowed.items()])
def test_every_allowed_transition(situation, key, after):
    client, server = reach(situation)
    deliver(client, server, key)
    assert situation_of(client) == situation_of(server) == after


@pytest.mark.parametrize("situation, key", [(s, k) for s in ALLOWED for k in CATALOGUE if k not in ALLOWED[s]])
def test_every_other_message_is_refused_without_changing_state(situation, key):
    client, server = reach(situation)
    sender, receiver = (client, server) if key in CLIENT_SENDS else (server, client)
    before = snapshot(sender), snapshot(receiver)
    with pytest.raises(InvalidState, match="^cannot send: ") as e:  # this side's bug, not the peer's
        sender.send(CATALOGUE[key])
    assert not isinstance(e.value, ProtocolError) and "\n" not in str(e.value)
    error, message = NOT_ORDER.get((situation, key), (OrderError, None))
    with pytest.raises(error, match=message) as e:
        receiver.receive(CATALOGUE[key].serialize())  # a peer that skipped the check
    assert (error is not OrderError or e.value.code == ErrorCode.OUT_OF_ORDER) and "\n" not in str(e.value)
    assert (snapshot(sender), snapshot(receiver)) == before


@pytest.mark.parametrize("key", sorted(set(CATALOGUE) - {"Error", "Bye"}))
def test_a_message_from_the_wrong_side_is_refused(key):
    client, server = reach("IN_ROUND")
    wrong = server if key in CLIENT_SENDS else client
    with pytest.raises(InvalidState, match="is sent by the (client|server), not the (server|client)"):
        wrong.send(CATALOGUE[key])
    with pytest.raises(OrderError, match="is sent by the"):
        (client if wrong is server else server).receive(CATALOGUE[key].serialize())


def test_two_rounds_with_eval_between_them():
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)

    def both(msg, expect_state):
        sender, receiver = (client, server) if isinstance(msg, (Hello, Activations, Upload, Metrics, Bye)) else (server, client)
        assert receiver.receive(sender.send(msg)) == msg
        assert client.state is server.state is expect_state

    both(CATALOGUE["Hello"], State.AWAIT_WELCOME)
    both(Welcome(session_id="abc", encoding="fp32", max_frame_bytes=1 << 20), State.IDLE)
    assert client.encoding == server.encoding == "fp32" and client.session_id == "abc"
    for r in (3, 8):  # round ids increase, not necessarily by one
        both(RoundConfig(round_id=r, local_steps=2, batch_size=2, lr=0.1, optimizer="adamw", align_lambda=0.5), State.IN_ROUND)
        assert client.round_id == server.round_id == r
        both(Adapters(round_id=r, tensors={"a": np.zeros((2, 2), np.float32)}), State.IN_ROUND)
        for step in range(2):
            both(act("train", r, step, "fp32"), State.IN_ROUND)
            assert server.pending == Pending(r, step, "train", (2, 3, 4))
            both(Gradients(round_id=r, step_id=step, loss=0.1, g=Z), State.IN_ROUND)
            assert server.pending is None
        both(act("eval", r, 2, "fp32"), State.IN_ROUND)
        both(Predictions(round_id=r, step_id=2, logits=np.zeros((2, 3, 9), np.float32)), State.IN_ROUND)
        both(Metrics(round_id=r, metrics={"acc": 0.9}), State.IN_ROUND)
        both(Upload(round_id=r, num_samples=4, tensors={"a": np.zeros((2, 2), np.float32)}), State.AWAIT_ROUND_END)
        both(Metrics(round_id=r, metrics={"upload_ms": 3}), State.AWAIT_ROUND_END)
        both(RoundEnd(round_id=r), State.IDLE)
        both(act("eval", 99, 0, "fp32"), State.IDLE)  # between rounds, any round id
        both(Predictions(round_id=99, step_id=0, logits=np.zeros((2, 4), np.float32)), State.IDLE)
        both(Metrics(round_id=r, metrics={"personal_acc": 0.8}), State.IDLE)
    both(Bye(), State.CLOSED)


@pytest.mark.parametrize(
    "setup, msg, error, message",
    [
        (["Activations/train"], Gradients(round_id=1, step_id=8, loss=0.5, g=Z, encoding="fp16"), OrderError,
         "Gradients answers round 1 step 8, but the outstanding Activations is round 1 step 7"),
        (["Activations/train"], Gradients(round_id=2, step_id=7, loss=0.5, g=Z, encoding="fp16"), OrderError, "answers round 2 step 7"),
        (["Activations/train"], Predictions(round_id=1, step_id=7, logits=np.zeros((2, 5), np.float32)), OrderError,
         r"Predictions while Activations round 1 step 7 awaits its answer \(Gradients\)"),
        (["Activations/train"], Gradients(round_id=1, step_id=7, loss=0.5, g=Z[:, :2], encoding="fp16"), TensorError,
         r"Gradients.g has shape \[2, 2, 4\], but z had \[2, 3, 4\]"),
        (["Activations/train"], Gradients(round_id=1, step_id=7, loss=0.5, g=Z, encoding="int8"), TensorError,
         "Gradients.g travels in int8, but the connection negotiated fp16"),
        (["Activations/eval"], Predictions(round_id=1, step_id=7, logits=np.zeros((3, 5), np.float32)), TensorError,
         r"Predictions.logits has shape \[3, 5\], but z had \[2, 3, 4\]"),
        (["Activations/eval"], Predictions(round_id=1, step_id=7, logits=np.zeros((2, 2, 5), np.float32)), TensorError,
         r"Predictions.logits has shape \[2, 2, 5\]"),
        ([], act("train", encoding="fp32"), TensorError, "Activations.z travels in fp32, but the connection negotiated fp16"),
        ([], act("train", round_id=2), OrderError, "Activations is for round 2, but round 1 is running"),
        ([], Adapters(round_id=0, tensors={"a": np.ones(1, np.float32)}), OrderError, "Adapters is for round 0, but round 1 is running"),
        ([], Upload(round_id=3, num_samples=1, tensors={"a": np.ones(1, np.float32)}), OrderError, "Upload is for round 3"),
        ([], Metrics(round_id=0, metrics={}), OrderError, "Metrics is for round 0, but round 1 is running"),
        (["Upload"], RoundEnd(round_id=2), OrderError, "RoundEnd is for round 2, but round 1 is running"),
        (["Activations/train"], Metrics(round_id=1, metrics={}), OrderError,
         r"Metrics while Activations round 1 step 7 awaits its answer \(Gradients\); one request at a time"),
        (["Activations/train"], act("train", step_id=8), OrderError, "awaits its answer"),
        (["Upload", "RoundEnd"], CATALOGUE["RoundConfig"], OrderError,
         "RoundConfig starts round 1, but round 1 came before; round ids must increase"),
    ],
)
def test_ids_shapes_and_encodings_must_be_consistent(setup, msg, error, message):
    client, server = reach("IN_ROUND")
    for key in setup:
        deliver(client, server, key)
    sender, receiver = (client, server) if isinstance(msg, (Activations, Upload, Metrics)) else (server, client)
    before = snapshot(sender), snapshot(receiver)
    with pytest.raises(InvalidState, match=message):
        sender.send(msg)
    with pytest.raises(error, match=message):
        receiver.receive(msg.serialize())
    assert (snapshot(sender), snapshot(receiver)) == before


@pytest.mark.parametrize(
    "setup, msg, error, message",
    [
        (["Activations/u-train", "MiddleOutput"], TopGradients(round_id=1, step_id=9, loss=0.5, grad_h=Z, encoding="fp16"),
         OrderError, "TopGradients answers round 1 step 9, but the outstanding Activations is round 1 step 7"),
        ([], TopGradients(round_id=1, step_id=7, loss=0.5, grad_h=Z, encoding="fp16"), OrderError,
         "TopGradients answers no Activations; none is outstanding"),
        (["Activations/u-train"], CATALOGUE["TopGradients"], OrderError,
         r"TopGradients while Activations round 1 step 7 awaits its answer \(MiddleOutput\)"),
        (["Activations/u-train", "MiddleOutput"], TopGradients(round_id=1, step_id=7, loss=0.5, grad_h=Z[:1], encoding="fp16"),
         TensorError, r"TopGradients.grad_h has shape \[1, 3, 4\], but z had \[2, 3, 4\]"),
        (["Activations/u-train", "MiddleOutput"], TopGradients(round_id=1, step_id=7, loss=0.5, grad_h=Z, encoding="fp32"),
         TensorError, "TopGradients.grad_h travels in fp32, but the connection negotiated fp16"),
        (["Activations/u-train"], MiddleOutput(round_id=1, step_id=7, h=Z[:, :2], encoding="fp16"), TensorError,
         r"MiddleOutput.h has shape \[2, 2, 4\], but z had \[2, 3, 4\]"),
        (["Activations/u-train"], CATALOGUE["Gradients"], OrderError, r"awaits its answer \(MiddleOutput\)"),
        (["Activations/u-train", "MiddleOutput"], CATALOGUE["Gradients"], OrderError, r"awaits its answer \(TopGradients\)"),
        (["Activations/eval"], CATALOGUE["Predictions"], OrderError, r"awaits its answer \(MiddleOutput\)"),
        ([], CATALOGUE["Activations/train"], ProtocolError, "labels stay on the device"),
    ],
)
def test_u_shaped_steps_go_z_h_dldh_dldz_in_order(setup, msg, error, message):
    client, server = reach("U:IN_ROUND")
    assert client.top == server.top == 1 and client.u_shaped
    for key in setup:
        deliver(client, server, key)
    sender, receiver = (client, server) if isinstance(msg, (Activations, TopGradients)) else (server, client)
    before = snapshot(sender), snapshot(receiver)
    with pytest.raises(InvalidState, match=message):
        sender.send(msg)
    with pytest.raises(error, match=message) as e:
        receiver.receive(msg.serialize())
    assert "\n" not in str(e.value)
    assert (snapshot(sender), snapshot(receiver)) == before


def test_head_tail_sessions_never_see_the_u_messages():
    client, server = reach("IN_ROUND+train")
    assert client.top == -1 and not server.u_shaped
    for msg, receiver in ((CATALOGUE["MiddleOutput"], client), (CATALOGUE["TopGradients"], server)):
        with pytest.raises(OrderError):
            receiver.receive(msg.serialize())
    client, server = reach("IN_ROUND")
    with pytest.raises(OrderError, match="only for U-shaped sessions"):
        server.receive(CATALOGUE["TopGradients"].serialize())


def test_welcome_must_pick_an_offered_encoding():
    client, server = reach("AWAIT_WELCOME")
    bad = Welcome(session_id="s", encoding="int8", max_frame_bytes=1 << 20)
    with pytest.raises(InvalidState, match=r"Welcome.encoding 'int8' was not offered in Hello \(fp16, fp32\)"):
        server.send(bad)
    with pytest.raises(ProtocolError, match="was not offered"):
        client.receive(bad.serialize())
    assert client.state is server.state is State.AWAIT_WELCOME


def test_hello_with_another_protocol_version_is_refused():
    server = Connection(Role.SERVER)
    other = PROTOCOL_VERSION + 1
    hello = Hello(protocol_version=other, client_id="c", token="", layout_hash=HASH, split=1, backend="ort")
    with pytest.raises(ProtocolError, match=f"Hello.protocol_version is {other}; this side speaks {PROTOCOL_VERSION}") as e:
        server.receive(hello.serialize())
    assert e.value.code == ErrorCode.BAD_VERSION and server.state is State.AWAIT_HELLO


def test_welcome_lowers_the_frame_limit_for_both_sides():
    client, server = Connection(Role.CLIENT, Limits(max_frame_bytes=1 << 22)), Connection(Role.SERVER)
    server.receive(client.send(CATALOGUE["Hello"]))
    client.receive(server.send(Welcome(session_id="s", encoding="fp16", max_frame_bytes=4096)))
    assert client.limits.max_frame_bytes == server.limits.max_frame_bytes == 4096
    client.receive(server.send(CATALOGUE["RoundConfig"]))
    big = act("train", z=np.zeros((2, 3, 1024), np.float32))  # 12 KiB of fp16
    before = snapshot(client)
    with pytest.raises(InvalidState, match="Activations frame is \\d+ bytes, over the connection's limit of 4096"):
        client.send(big)
    assert snapshot(client) == before
    with pytest.raises(FrameError, match="over the limit of 4096"):
        server.receive(big.serialize())
    assert server.receive(client.send(act("train"))) == act("train")


def test_after_a_bad_frame_the_receiver_can_still_send_error_and_close():
    client, server = reach("IN_ROUND")
    with pytest.raises(FrameError) as e:
        server.receive(b"FSFL" + bytes([PROTOCOL_VERSION]) + b"\x05\x00\x00\x07\x00\x00\x00garbage")
    assert server.state is State.IN_ROUND
    got = client.receive(server.send(Error.from_exception(e.value)))
    assert isinstance(got, Error) and got.code == ErrorCode.MALFORMED_FRAME
    assert client.state is server.state is State.CLOSED
    for conn, msg in ((client, CATALOGUE["Metrics"]), (server, CATALOGUE["RoundEnd"]), (client, CATALOGUE["Bye"])):
        with pytest.raises(InvalidState, match="after the connection closed"):
            conn.send(msg)


def test_own_side_misuse_is_invalid_state_not_the_peers_error():
    """A side that sends out of turn has a bug of its own: the error must not carry a protocol
    code that would blame the peer, and the Error it leads to says SERVER_ERROR."""
    client, server = reach("IDLE")
    before = snapshot(server)
    with pytest.raises(InvalidState) as e:
        server.send(CATALOGUE["RoundEnd"])  # no round is running
    assert not isinstance(e.value, ProtocolError) and not hasattr(e.value, "close_code")
    assert isinstance(e.value.__cause__, OrderError)  # what the peer would have been told, kept for the log
    assert Error.from_exception(e.value).code == ErrorCode.SERVER_ERROR
    assert snapshot(server) == before
    assert client.receive(server.send(CATALOGUE["RoundConfig"])) == CATALOGUE["RoundConfig"]  # still usable


def test_connection_refuses_wrong_argument_types():
    with pytest.raises(TypeError, match="Role.CLIENT or Role.SERVER"):
        Connection("client")
    with pytest.raises(TypeError, match="limits must be a wire Limits"):
        Connection(Role.CLIENT, {"max_frame_bytes": 1})
    conn = Connection(Role.CLIENT)
    for bad in (b"hello", {"kind": "Hello"}, None):
        with pytest.raises(TypeError, match="takes a protocol message"):
            conn.send(bad)
    for bad in ("text", 7, None, [1, 2]):
        with pytest.raises(TypeError, match="takes the bytes of a binary frame"):
            conn.receive(bad)
    assert conn.state is State.AWAIT_HELLO
    server = Connection(Role.SERVER)
    assert server.receive(bytearray(conn.send(CATALOGUE["Hello"]))) == CATALOGUE["Hello"]  # bytes-like is fine


# --- session-level checks -----------------------------------------------------------------------

SEQ = dict(hidden_size=4, max_batch=2, max_seq=3, num_labels=2, task="seq_cls")
LM = dict(hidden_size=4, max_batch=2, max_seq=3, num_labels=50, task="causal_lm")


def lm_act(labels, mode="train"):
    return Activations(round_id=0, step_id=0, mode=mode, z=Z, attention_mask=MASK, labels=np.array(labels))


def test_check_activations_accepts_valid_batches():
    check_activations(act("train"), **SEQ)
    check_activations(act("eval"), **SEQ)
    check_activations(lm_act([[1, 2, -100], [49, -100, 0]]), **LM)
    check_activations(lm_act([[-100] * 3] * 2, mode="eval"), **LM)


@pytest.mark.parametrize(
    "msg, limits, message",
    [
        (act("train", z=np.zeros((0, 3, 4), np.float32), labels=np.zeros(0, int)), SEQ, "batch size 0 is outside 1..2"),
        (act("train", z=np.zeros((3, 3, 4), np.float32), labels=np.zeros(3, int)), SEQ, "batch size 3 is outside 1..2"),
        (act("eval", z=np.zeros((2, 0, 4), np.float32)), SEQ, "sequence length 0 is outside 1..3"),
        (act("train"), {**SEQ, "max_seq": 2}, "sequence length 3 is outside 1..2"),
        (act("train"), {**SEQ, "hidden_size": 8}, "hidden size is 4, the model's is 8; the bundle does not match the server"),
        (Activations(round_id=0, step_id=0, mode="eval", z=Z, attention_mask=np.array([[1, 1, 0], [0, 0, 0]])), SEQ,
         "attention_mask row 1 is all zeros"),
        (act("train", labels=np.array([0, 2])), SEQ, r"Activations.labels\[1\] = 2 is outside 0..1"),
        (act("train", labels=np.array([-1, 0])), SEQ, r"Activations.labels\[0\] = -1 is outside 0..1"),
        (lm_act([[1, 2, -100], [49, -100, 0]]), SEQ, r"labels has shape \[2, 3\]; sequence classification needs \[2\]"),
        (act("train"), LM, r"labels has shape \[2\]; a causal LM needs \[2, 3\]"),
        (lm_act([[1, 2, 50], [0, 0, 0]]), LM, r"Activations.labels\[0, 2\] = 50 is outside 0..49 \(or -100\)"),
        (lm_act([[1, 2, -99], [0, 0, 0]]), LM, r"labels\[0, 2\] = -99"),
        (lm_act([[-100] * 3] * 2), LM, "labels are all -100 \\(ignored\\); a train step needs at least one label"),
    ],
)
def test_check_activations_names_what_is_wrong(msg, limits, message):
    with pytest.raises(TensorError, match=message) as e:
        check_activations(msg, **limits)
    assert "\n" not in str(e.value)


def test_check_activations_refuses_an_unknown_task():
    with pytest.raises(ConfigError, match="task must be"):
        check_activations(act("train"), **{**SEQ, "task": "regression"})


def test_check_tensors():
    expected = {"a": (2, 4), "b": (4, 2)}
    check_tensors({"b": np.zeros((4, 2)), "a": np.zeros((2, 4))}, expected)  # order does not matter
    with pytest.raises(TensorError, match=r"Upload.tensors\['b'\] has shape \[2, 4\], expected \[4, 2\]"):
        check_tensors({"a": np.zeros((2, 4)), "b": np.zeros((2, 4))}, expected, what="Upload.tensors")
    with pytest.raises(TensorError, match="tensors: missing 'b'; unexpected 'c'; client and server disagree"):
        check_tensors({"a": np.zeros((2, 4)), "c": np.zeros(1)}, expected)
    many = {f"t{i}": (1,) for i in range(10)}
    with pytest.raises(TensorError, match="missing 't0', 't1', 't2' and 7 more; client"):
        check_tensors({}, many)
