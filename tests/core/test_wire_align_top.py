"""The alignment term at the top's input on the wire: ``RoundConfig.align_top``, Z' up with Z
(``Activations.z_ref``) and H' down with H (``MiddleOutput.h_ref``) — codec round trips, and the
state machine's rules: only in U-shaped train steps of an align_top round, H' exactly when Z'
was sent, matching shapes and finite values; everything else refused in one line, changing nothing."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from flexsfl.core.errors import ErrorCode, InvalidState, ProtocolError, TensorError
from flexsfl.core.wire import (
    Activations,
    Connection,
    Gradients,
    Hello,
    MiddleOutput,
    Role,
    RoundConfig,
    RoundEnd,
    State,
    TopGradients,
    Upload,
    Welcome,
    parse,
)

HASH = "0123456789abcdef" * 4
Z = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 8
ZR = Z[::-1].copy() + 0.25
MASK = np.ones((2, 3), np.int64)


def cfg(round_id=1, align_top=True, lam=0.1):
    return RoundConfig(round_id=round_id, local_steps=2, batch_size=2, lr=0.01, optimizer="sgd", align_lambda=lam,
                       align_top=align_top)


def act(step_id=0, mode="train", z_ref=ZR, round_id=1):
    return Activations(round_id=round_id, step_id=step_id, mode=mode, z=Z, attention_mask=MASK, z_ref=z_ref, encoding="fp32")


def mid(step_id=0, h_ref=ZR, round_id=1):
    return MiddleOutput(round_id=round_id, step_id=step_id, h=Z, h_ref=h_ref, encoding="fp32")


def session(top=1, config=None):
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    for m in (Hello(client_id="u1", token="t", layout_hash=HASH, split=1, top=top, backend="ort", encodings=("fp32",)),
              Welcome(session_id="s", encoding="fp32", max_frame_bytes=1 << 20)):
        (server if isinstance(m, Hello) else client).receive((client if isinstance(m, Hello) else server).send(m))
    if config is not None:
        client.receive(server.send(config))
    return client, server


def snap(c: Connection):
    return c.state, c.round_id, c.pending, c.align_top


def refused(sender: Connection, receiver: Connection, msg, error, text):
    """``msg`` is refused by its sender (InvalidState) and its receiver (``error``, one line), changing nothing."""
    before = snap(sender), snap(receiver)
    with pytest.raises(InvalidState, match=text):
        sender.send(msg)
    with pytest.raises(error, match=text) as e:
        receiver.receive(msg.serialize())
    assert "\n" not in str(e.value)
    assert (snap(sender), snap(receiver)) == before
    return e.value


# --- codec --------------------------------------------------------------------------------------


def test_round_trips_with_and_without_the_reference_tensors():
    for m in (cfg(), cfg(align_top=False), act(), act(z_ref=None), mid(), mid(h_ref=None)):
        back = parse(m.serialize())
        assert back == m
    assert parse(cfg().serialize()).align_top is True
    assert RoundConfig(round_id=0, local_steps=1, batch_size=1, lr=0.1, optimizer="sgd", align_lambda=0.0).align_top is False
    assert list(parse(act().serialize()).arrays()) == ["z", "attention_mask", "z_ref"]
    # fp16 carries Z' like Z (one encoding per message)
    half = Activations(round_id=1, step_id=0, mode="train", z=Z, attention_mask=MASK, z_ref=ZR, encoding="fp16")
    np.testing.assert_array_equal(parse(half.serialize()).z_ref, ZR.astype(np.float16).astype(np.float32))


def test_reference_tensors_must_match_their_partner():
    with pytest.raises(TensorError, match=r"Activations.z_ref has shape \[2, 2, 4\], z has \[2, 3, 4\]"):
        act(z_ref=ZR[:, :2])
    with pytest.raises(TensorError, match=r"MiddleOutput.h_ref has shape \[1, 3, 4\], h has \[2, 3, 4\]"):
        mid(h_ref=ZR[:1])
    with pytest.raises(TensorError, match="z_ref must be a float array"):
        act(z_ref=ZR.astype(np.int64))


def test_a_nan_z_ref_does_not_parse():
    frame = bytearray(act().serialize())
    frame[-ZR.nbytes:-ZR.nbytes + 4] = struct.pack("<f", math.nan)  # z_ref is the last tensor
    with pytest.raises(TensorError, match="z_ref") as e:
        parse(bytes(frame))
    assert e.value.code is ErrorCode.NON_FINITE and "\n" not in str(e.value)


# --- state machine -------------------------------------------------------------------------------


def test_an_align_top_step_goes_z_and_z_ref_up_h_and_h_ref_down():
    client, server = session(config=cfg())
    assert client.align_top and server.align_top
    for step in range(2):
        assert server.receive(client.send(act(step))).z_ref is not None
        assert server.pending.ref and client.pending.ref
        got = client.receive(server.send(mid(step)))
        np.testing.assert_array_equal(got.h_ref, ZR)
        server.receive(client.send(TopGradients(round_id=1, step_id=step, loss=0.5, grad_h=Z)))
        client.receive(server.send(Gradients(round_id=1, step_id=step, loss=0.5, g=Z)))
        assert client.pending is None and server.pending is None
    # a step that does not align (align_every > 1, or no φ yet) sends no Z' and gets no H'
    server.receive(client.send(act(2, z_ref=None)))
    assert not server.pending.ref
    client.receive(server.send(mid(2, h_ref=None)))
    assert client.state is State.IN_ROUND


@pytest.mark.parametrize("config, msg, text", [
    (cfg(align_top=False), act(), "carries z_ref .* whose RoundConfig has align_top false"),
    (cfg(), act(mode="eval"), "carries z_ref .* in an eval step"),
    (None, act(mode="eval"), "carries z_ref .* in an eval step"),
])
def test_z_ref_outside_an_align_top_train_step_is_refused(config, msg, text):
    client, server = session(config=config)
    e = refused(client, server, msg, ProtocolError, text)
    assert e.code is ErrorCode.BAD_TENSOR
    server.receive(client.send(act(z_ref=None, mode=msg.mode)))  # the same step without Z' still goes through


def test_align_top_is_per_round():
    client, server = session(config=cfg(1))
    server.receive(client.send(act()))
    client.receive(server.send(mid()))
    server.receive(client.send(TopGradients(round_id=1, step_id=0, loss=0.5, grad_h=Z)))
    client.receive(server.send(Gradients(round_id=1, step_id=0, loss=0.5, g=Z)))
    server.receive(client.send(Upload(round_id=1, num_samples=2, tensors={"a": np.ones(2, np.float32)})))
    client.receive(server.send(RoundEnd(round_id=1)))
    client.receive(server.send(cfg(2, align_top=False)))
    assert not client.align_top and not server.align_top
    refused(client, server, act(round_id=2), ProtocolError, "align_top false")


def test_h_ref_must_answer_z_ref_exactly():
    client, server = session(config=cfg())
    server.receive(client.send(act()))
    refused(server, client, mid(h_ref=None), ProtocolError, "lacks h_ref")
    client, server = session(config=cfg())
    server.receive(client.send(act(z_ref=None)))
    refused(server, client, mid(), ProtocolError, "carries h_ref .* sent no z_ref")


def test_round_config_align_top_needs_a_u_session_and_lambda():
    client, server = session(top=-1)
    refused(server, client, cfg(), ProtocolError, "align_top is for U-shaped sessions")
    client, server = session()
    refused(server, client, cfg(lam=0.0), ProtocolError, "align_top needs align_lambda > 0")
    client.receive(server.send(cfg(align_top=False, lam=0.0)))  # the same round without it is fine


def test_head_tail_step_with_z_ref_is_refused():
    client, server = session(top=-1, config=cfg(align_top=False))
    msg = Activations(round_id=1, step_id=0, mode="train", z=Z, attention_mask=MASK, labels=np.array([0, 1]), z_ref=ZR,
                      encoding="fp32")
    refused(client, server, msg, ProtocolError, "carries z_ref .* in a head/tail session")
