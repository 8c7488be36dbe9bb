"""What a registered client may claim, checked against what the server served; robust aggregators vs numpy."""

import numpy as np
import pytest

from flexsfl.core.errors import OrderError, TensorError
from flexsfl.server_backend.aggregation import ClientUpdate, combine, coordinate_median, layerwise_fedavg, trimmed_mean
from flexsfl.server_backend.guards import RateLimit, RoundLedger, check_upload_norms, reference_norms


def test_ledger_admits_each_step_once_within_tau():
    led = RoundLedger(round_id=3, local_steps=4, batch_size=8)
    for i in range(4):
        led.admit_step(3, i, 8)
    assert led.samples == 32 and led.allowed_samples() == 32
    for rid, sid, match in ((3, 0, "already served"), (3, 4, r"outside 0\.\.3"), (3, -1, "outside"),
                            (3, 2**40, "outside"), (2, 1, "round 2, but round 3")):
        with pytest.raises(OrderError, match=match):
            led.admit_step(rid, sid, 8)
    assert led.samples == 32 and led.steps == {0, 1, 2, 3}  # refused steps counted nothing
    assert RoundLedger(0, 4, 8).allowed_samples() == 1
    full = RoundLedger(0, 4, 8, whole_model=True)
    assert full.allowed_samples() == 32
    with pytest.raises(OrderError, match="whole model"):
        full.admit_step(0, 0, 8)


def test_upload_norm_bound():
    ref = reference_norms({"A": np.ones((4, 4), np.float32), "B": np.zeros((4, 4), np.float32)})
    assert ref == {"A": 4.0, "B": 0.0}
    check_upload_norms({"A": np.full((4, 4), 10.0, np.float32), "B": np.full((4, 4), 0.5, np.float32)}, ref, 10.0)
    with pytest.raises(TensorError, match="'B' has norm 4.4e\\+30, over 10x"):
        check_upload_norms({"B": np.full((4, 4), 1.1e30, np.float32)}, ref, 10.0)  # B's bound: the mean (2.0) x 10
    with pytest.raises(TensorError, match="'A' has norm"):
        check_upload_norms({"A": np.full((4, 4), 11.0, np.float32)}, ref, 10.0)
    check_upload_norms({"A": np.full((4, 4), 1e30, np.float32)}, ref, 0.0)  # 0 disables


def test_robust_aggregators_equal_numpy():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(5)]
    stack = np.stack(arrays).astype(np.float64)
    np.testing.assert_allclose(coordinate_median(arrays), np.median(stack, 0), rtol=1e-6)
    s = np.sort(stack, 0)
    np.testing.assert_allclose(trimmed_mean(arrays, 0.2), s[1:4].mean(0), rtol=1e-6)
    np.testing.assert_allclose(combine(arrays, [1, 1, 1, 1, 4], "mean"),
                               (stack[:4].sum(0) + 4 * stack[4]) / 8, rtol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        combine(arrays, [1] * 5, "max")


def test_median_keeps_the_layerwise_rule_and_ignores_one_huge_upload():
    phi = {"h.0": np.zeros(3, np.float32), "h.2": np.full(3, 5.0, np.float32)}
    blocks = {"h.0": 0, "h.2": 2}
    honest = [ClientUpdate({"h.0": np.full(3, v, np.float32)}, 10, 1) for v in (1.0, 2.0)]
    bad = ClientUpdate({"h.0": np.full(3, 1e30, np.float32)}, 2**62, 1)
    out = layerwise_fedavg(phi, blocks, honest + [bad], "median")
    np.testing.assert_array_equal(out["h.0"], np.full(3, 2.0, np.float32))  # median of 1, 2, 1e30
    np.testing.assert_array_equal(out["h.2"], phi["h.2"])  # block 2 is nobody's head: the server's alone
    assert layerwise_fedavg(phi, blocks, honest + [bad])["h.0"][0] > 1e29  # the mean is what the guards protect


def test_rate_limit():
    r = RateLimit(per_s=1.0, burst=3)
    assert [r.allow() for _ in range(5)] == [True, True, True, False, False]
    assert r.take_suppressed() == 2 and r.take_suppressed() == 0
