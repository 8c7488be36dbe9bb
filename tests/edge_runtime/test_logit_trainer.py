"""The device in a ``logit_kl`` round: Z' = head(x; φ) computed in ``forward()`` (before Z is sent,
nothing left for the wait), ``g`` applied as it came (the server's term is in it: the device adds
nothing), the server's ``align_*`` counted in the round's metrics, and ``--align-every`` > 1 refused."""

from __future__ import annotations

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.backends import open_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings

TRAIN = [Example(f"example number {i} says {'yes' if i % 2 else 'no'} and more words", i % 2) for i in range(16)]


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("gpt2", 1, "ort"))


def _trainer(bundle, **kw) -> HeadTrainer:
    return HeadTrainer(bundle, open_backend("ort", bundle, threads=1), TRAIN, seed=3, **kw)


def _round(t: HeadTrainer, phi, alignment: str, lam: float = 0.5) -> list:
    t.begin_round(RoundSettings(0, 3, 4, 0.05, "sgd", lam, alignment=alignment), phi)
    steps = []
    for _ in range(3):
        step = t.forward()
        steps.append(step)
        assert not t.needs_reference  # logit_kl: Z' is already computed; feature_kl, λ = 0: nothing to compute
        if step.z_ref is not None:
            t.server_alignment(0.02, lam, 0.3)
        t.backward(np.tanh(step.z) * np.float32(0.01), 1.0)
    return steps


def test_logit_kl_sends_z_ref_and_applies_g_as_it_came(bundle):
    a, b, c = _trainer(bundle), _trainer(bundle), _trainer(bundle)
    phi = a.backend.get_params()
    logit = _round(a, phi, "logit_kl")
    plain = _round(b, phi, "feature_kl", lam=0.0)
    c.begin_round(RoundSettings(0, 3, 4, 0.05, "sgd", 0.0), phi)  # θ = φ, the same batches: its Z is head(x; φ)
    for s, p in zip(logit, plain):
        assert p.z_ref is None and np.array_equal(s.z, p.z)
        assert np.array_equal(s.z_ref, c.forward().z)  # Z' = head(x; φ) of the step's own batch
    assert np.array_equal(logit[0].z_ref, logit[0].z) and not np.array_equal(logit[2].z_ref, logit[2].z)  # θ moves from φ
    pa, pb = a.backend.get_params(), b.backend.get_params()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)  # g applied as it came: the λ = 0 update
    m = a.stats.as_metrics()
    assert m["aligned_steps"] == 3 and m["align_ratio"] == pytest.approx(0.5) and m["align_loss"] == pytest.approx(0.02)
    assert m["align_gap"] == pytest.approx(0.3) and m["align_ms"] > 0 and b.stats.as_metrics()["aligned_steps"] == 0


def test_align_every_is_refused_in_a_logit_kl_round(bundle):
    t = _trainer(bundle, align_every=2)
    with pytest.raises(ConfigError, match="aligns at the logits .* restart this device without --align-every 2"):
        t.begin_round(RoundSettings(0, 3, 4, 0.05, "sgd", 0.5, alignment="logit_kl"), t.backend.get_params())
    t.begin_round(RoundSettings(0, 3, 4, 0.05, "sgd", 0.0, alignment="logit_kl"), t.backend.get_params())  # λ = 0: no Z'
    assert t.forward().z_ref is None
