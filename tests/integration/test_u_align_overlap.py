"""The device's side of ``--align-top`` in one process, on a real ``--top`` bundle (tiny BERT, ORT).

With align_top, a step's Z' must travel with its Z, so :class:`UTrainer` computes the *next*
step's Z' while the device waits (the transport's worker thread). That gives the same personal
head and top, bit for bit, as computing each Z' right before its step (``overlap_alignment=False``),
draws no batch past the round (the data cursor ends where it would), and with ``--align-every k``
sends Z' on every k-th step only. A stand-in server (H = tanh(Z), H' = tanh(Z'), dL/dZ = dL/dH/2:
any fixed functions) answers each step.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.top import open_top
from flexsfl.edge_runtime.trainer import RoundSettings
from flexsfl.edge_runtime.u_trainer import UTrainer

TRAIN = [Example(f"example number {i} says {'yes' if i % 2 else 'no'} and more words", i % 2) for i in range(16)]
STEPS, LAM = 4, 0.5


@pytest.fixture(scope="module")
def bundle(u_bundles):
    return load_bundle(u_bundles("bert", 1, 1, "ort"))


def _trainer(bundle, **kw) -> UTrainer:
    return UTrainer(bundle, open_backend("ort", bundle, threads=1), open_top(bundle, "ort", threads=1), TRAIN, seed=3, **kw)


def _run(bundle, *, overlap: bool, align_every: int = 1, align_top: bool = True):
    t = _trainer(bundle, align_every=align_every, overlap_alignment=overlap)
    phi = {**t.backend.get_params(), **t.top.get_params()}
    sent, prefetched = [], []
    for r in range(2):  # round 1 starts from a personal θ that differs from φ: the terms are non-zero
        t.begin_round(RoundSettings(r, STEPS, 4, 0.05, "sgd", LAM, align_top=align_top), phi)
        for _ in range(STEPS):
            step = t.forward()
            z_ref = t.pending_z_ref
            sent.append(z_ref is not None)
            worker = None
            prefetched.append(t.needs_reference)
            if overlap and t.needs_reference:  # as the transport does: a worker thread while the device waits
                worker = threading.Thread(target=t.align_reference)
                worker.start()
            grad_h, loss = t.top_step(np.tanh(step.z), None if z_ref is None else np.tanh(z_ref))
            if worker is not None:
                worker.join()
            t.backward(np.float32(0.5) * grad_h, loss)
        if r == 1:
            metrics = t.stats.as_metrics()
        t.end_round()
    return {**t.backend.get_params(), **t.top.get_params()}, t, sent, prefetched, metrics


def test_next_step_z_ref_in_the_wait_equals_the_serial_order_bit_for_bit(bundle):
    serial, ts, sent_s, pre_s, _ = _run(bundle, overlap=False)
    overlapped, to, sent_o, pre_o, m = _run(bundle, overlap=True)
    assert serial.keys() == overlapped.keys()
    for k in serial:
        np.testing.assert_array_equal(overlapped[k], serial[k], err_msg=k)
    assert (to.cursor.epoch, to.cursor.position) == (ts.cursor.epoch, ts.cursor.position)  # nothing drawn past a round
    assert sent_s == sent_o == [True] * 2 * STEPS
    assert pre_s == [False] * 2 * STEPS  # serial: each Z' in its own forward()
    assert pre_o == ([True] * (STEPS - 1) + [False]) * 2  # the next step's Z', never past the round's last step
    assert m["align_top_steps"] == STEPS and m["align_top_ratio"] == pytest.approx(LAM, rel=1e-5)
    assert m["aligned_steps"] == STEPS and m["align_ratio"] == pytest.approx(LAM, rel=1e-5)


def test_align_top_changes_head_and_top_and_align_every(bundle):
    with_top, _, _, _, _ = _run(bundle, overlap=True)
    without, t, sent, _, m = _run(bundle, overlap=True, align_top=False)
    assert not any(sent) and m["align_top_steps"] == 0 and m["aligned_steps"] == STEPS
    assert any(not np.array_equal(with_top[k], without[k]) for k in with_top if "layer.0." in k)  # the head, through the middle
    _, _, sent, pre, m = _run(bundle, overlap=True, align_every=2)
    assert sent == [True, False] * STEPS and m["align_top_steps"] == STEPS // 2
    assert pre == [False, True, False, False] * 2  # step 1 draws step 2's batch and Z'; none past the round


def test_h_ref_must_answer_z_ref(bundle):
    t = _trainer(bundle)
    phi = {**t.backend.get_params(), **t.top.get_params()}
    t.begin_round(RoundSettings(0, 2, 4, 0.05, "sgd", LAM, align_top=True), phi)
    step = t.forward()
    before = t.top.get_params()
    with pytest.raises(ConfigError, match="a step that sends Z' needs H' back"):
        t.top_step(np.tanh(step.z))
    for k, v in t.top.get_params().items():  # refused: nothing stepped
        np.testing.assert_array_equal(v, before[k])
    t.top_step(np.tanh(step.z), np.tanh(t.pending_z_ref))
