"""Logit-level alignment on the wire (protocol 5): ``RoundConfig.alignment``, Z' with every train
step of a head/tail ``logit_kl`` round (``Activations.z_ref``), and what the server's term added
(``Gradients.align_*``) — codec round trips and the state machine's rules: Z' required in such a
round's train steps and refused anywhere else, logit_kl refused for U-shaped sessions; every
refusal one line, changing nothing."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from flexsfl.core.errors import ErrorCode, FrameError, ProtocolError, TensorError
from flexsfl.core.wire import Activations, Gradients, RoundConfig, parse
from tests.core.test_wire_align_top import MASK, Z, ZR, refused, session

Y = np.array([0, 1])


def cfg(alignment="logit_kl", lam=0.1, round_id=1):
    return RoundConfig(round_id=round_id, local_steps=2, batch_size=2, lr=0.01, optimizer="sgd", align_lambda=lam,
                       alignment=alignment)


def act(z_ref=ZR, mode="train", step_id=0):
    return Activations(round_id=1, step_id=step_id, mode=mode, z=Z, attention_mask=MASK, labels=Y, z_ref=z_ref,
                       encoding="fp32")


def test_round_trips_and_defaults():
    g = Gradients(round_id=1, step_id=0, loss=0.5, g=Z, align_loss=0.02, align_ratio=0.1, align_gap=0.3)
    for m in (cfg(), cfg("feature_kl"), act(), g, Gradients(round_id=1, step_id=0, loss=0.5, g=Z)):
        assert parse(m.serialize()) == m
    assert RoundConfig(round_id=0, local_steps=1, batch_size=1, lr=0.1, optimizer="sgd", align_lambda=0.1).alignment == "feature_kl"
    with pytest.raises(FrameError, match="RoundConfig.alignment must be one of feature_kl, logit_kl"):
        cfg("logit-kl")
    with pytest.raises(FrameError, match="Gradients.align_ratio must be a finite number >= 0"):
        Gradients(round_id=1, step_id=0, loss=0.5, g=Z, align_ratio=-1.0)


def test_a_logit_kl_round_carries_z_ref_in_every_train_step_and_gets_the_term_back():
    client, server = session(top=-1, config=cfg())
    assert client.logit_kl and server.logit_kl
    for step in range(2):
        server.receive(client.send(act(step_id=step)))
        client.receive(server.send(Gradients(round_id=1, step_id=step, loss=0.5, g=Z, align_ratio=0.1)))
    server.receive(client.send(act(z_ref=None, mode="eval")))  # eval steps never carry Z'


def test_missing_or_misplaced_z_ref_is_refused_in_one_line():
    client, server = session(top=-1, config=cfg())
    e = refused(client, server, act(z_ref=None), ProtocolError, r"lacks z_ref \(Z'\): round 1 aligns at the logits")
    assert e.code is ErrorCode.BAD_TENSOR
    refused(client, server, act(mode="eval"), ProtocolError, r"carries z_ref \(Z'\) in an eval step")
    for other in (cfg("feature_kl"), cfg(lam=0.0)):  # feature_kl, or λ = 0: no Z' on the wire
        client, server = session(top=-1, config=other)
        assert not client.logit_kl
        refused(client, server, act(), ProtocolError, r"carries z_ref \(Z'\) in a head/tail session \(round 1 is not a logit_kl")
        server.receive(client.send(act(z_ref=None)))


def test_bad_z_ref_values_are_refused_by_the_codec():
    bad_shape = act()
    object.__setattr__(bad_shape, "z_ref", np.ascontiguousarray(ZR[:, :2]))
    client, server = session(top=-1, config=cfg())
    with pytest.raises(TensorError, match=r"Activations.z_ref has shape \[2, 2, 4\], z has \[2, 3, 4\]"):
        server.receive(bad_shape.serialize())
    with pytest.raises(TensorError, match="z_ref must be a float array"):
        act(z_ref=ZR.astype(np.int64))
    frame = bytearray(act().serialize())
    frame[-ZR.nbytes:-ZR.nbytes + 4] = struct.pack("<f", math.nan)  # z_ref is the last tensor
    with pytest.raises(TensorError, match="z_ref") as e:
        server.receive(bytes(frame))
    assert e.value.code is ErrorCode.NON_FINITE and server.pending is None


def test_logit_kl_is_refused_for_u_shaped_sessions():
    client, server = session(top=1)
    refused(server, client, cfg(), ProtocolError, "RoundConfig.alignment logit_kl is for head/tail sessions")
