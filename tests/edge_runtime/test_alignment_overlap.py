"""Alignment off the critical path: Z' computed in a worker thread while g is awaited gives the
same personal head, bit for bit, as Z' computed right after Z; --align-every k aligns every k-th step."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings

TRAIN = [Example(f"example number {i} says {'yes' if i % 2 else 'no'} and more words", i % 2) for i in range(16)]
STEPS = 6


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("gpt2", 1, "ort"))


def _run(bundle, *, overlap: bool, align_every: int = 1, lam: float = 0.5) -> tuple[dict[str, np.ndarray], HeadTrainer]:
    t = HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN, seed=3, align_every=align_every, overlap_alignment=overlap)
    phi = t.backend.get_params()
    for r in range(2):  # round 1 starts from a θ_k that differs from φ: the alignment term is non-zero
        t.begin_round(RoundSettings(r, STEPS // 2, 4, 0.05, "adamw", lam), phi)
        for _ in range(STEPS // 2):
            step = t.forward()
            g = np.tanh(step.z) * np.float32(0.01)  # a server's g: any fixed function of Z
            if overlap:  # as the transport does: Z' in a worker thread while the main thread "waits"
                assert t.needs_reference == (lam > 0 and t.stats.steps % align_every == 0)
                worker = threading.Thread(target=t.align_reference)
                worker.start()
                worker.join()
            else:
                assert not t.needs_reference  # computed in forward()
            t.backward(g, 1.0)
        if r == 0:
            last = dict(t.stats.as_metrics())
        t.end_round()
    return t.backend.get_params(), t, last


def test_overlapped_alignment_equals_the_serial_order_bit_for_bit(bundle):
    serial, _, _ = _run(bundle, overlap=False)
    overlapped, t, _ = _run(bundle, overlap=True)
    assert serial.keys() == overlapped.keys()
    for k in serial:
        np.testing.assert_array_equal(overlapped[k], serial[k], err_msg=k)
    m = t.stats.as_metrics()
    assert m["aligned_steps"] == STEPS // 2 and m["align_ratio"] == pytest.approx(0.5, rel=1e-3)
    assert m["align_ms"] > 0 and m["step_ms"] >= m["forward_ms"] + m["backward_ms"]


def test_the_alignment_changes_the_head(bundle):
    with_align, _, _ = _run(bundle, overlap=True)
    without, _, _ = _run(bundle, overlap=True, lam=0.0)
    assert any(not np.array_equal(with_align[k], without[k]) for k in with_align)


def test_a_caller_that_skips_align_reference_gets_the_same_numbers(bundle):
    serial, _, _ = _run(bundle, overlap=False)
    t = HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN, seed=3)
    phi = t.backend.get_params()
    for r in range(2):
        t.begin_round(RoundSettings(r, STEPS // 2, 4, 0.05, "adamw", 0.5), phi)
        for _ in range(STEPS // 2):
            step = t.forward()
            t.backward(np.tanh(step.z) * np.float32(0.01), 1.0)  # backward() computes Z' first
        t.end_round()
    for k, v in t.backend.get_params().items():
        np.testing.assert_array_equal(v, serial[k], err_msg=k)


def test_align_every_k_aligns_every_kth_step_only(bundle):
    _, t, _ = _run(bundle, overlap=True, align_every=2)
    assert t.stats.as_metrics()["aligned_steps"] == 2  # steps 0 and 2 of a 3-step round
    every, _, _ = _run(bundle, overlap=True, align_every=1)
    sparse, _, _ = _run(bundle, overlap=True, align_every=2)
    assert any(not np.array_equal(every[k], sparse[k]) for k in every)


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_align_every_must_be_a_positive_whole_number(bundle, k):
    with pytest.raises(ConfigError, match="--align-every"):
        HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN, align_every=k)
