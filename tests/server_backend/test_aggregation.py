"""Layer-wise aggregation across heterogeneous split points, checked against numpy by hand."""

import numpy as np
import pytest

from flexsfl.server_backend.aggregation import ClientUpdate, fedavg, layerwise_fedavg, weighted_mean

L = 4


def _params(rng, value=None):
    names = {f"m.layers.{j}.q.lora_A.weight": j for j in range(L)}
    names["m.score.weight"] = L
    return {n: (rng.standard_normal((3, 2)).astype(np.float32) if value is None else np.full((3, 2), value, np.float32))
            for n in names}, names


def test_weighted_mean_matches_numpy_average():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(3)]
    w = [10, 30, 60]
    np.testing.assert_allclose(weighted_mean(arrays, w), np.average(np.stack(arrays), axis=0, weights=w), rtol=1e-6)
    with pytest.raises(ValueError):
        weighted_mean(arrays, [0, 0, 0])


def test_layerwise_fedavg_heterogeneous_splits():
    rng = np.random.default_rng(1)
    phi, blocks = _params(rng)
    splits, samples = [1, 2, 3], [100, 50, 25]
    ups = [ClientUpdate({n: a for n, a in _params(rng)[0].items() if blocks[n] < s}, k, s) for s, k in zip(splits, samples)]
    new = layerwise_fedavg(phi, blocks, ups)
    for name, j in blocks.items():
        holders = [(u.params[name], u.num_samples) for u in ups if j < u.split]
        server_w = sum(u.num_samples for u in ups if j >= u.split)
        if not holders:
            np.testing.assert_array_equal(new[name], phi[name])  # deepest block and task head: server only
            continue
        arrays = [a for a, _ in holders] + ([phi[name]] if server_w else [])
        weights = [k for _, k in holders] + ([server_w] if server_w else [])
        want = np.tensordot(np.array(weights, np.float64), np.stack(arrays).astype(np.float64), axes=1) / sum(weights)
        np.testing.assert_allclose(new[name], want, rtol=1e-6, atol=1e-7)
    # block 0 is on every device: the server's φ^0 takes no part
    b0 = "m.layers.0.q.lora_A.weight"
    np.testing.assert_allclose(new[b0], np.average([u.params[b0] for u in ups], axis=0, weights=samples), rtol=1e-6)
    # block 2 is on client 3's device only; clients 1 and 2 trained it through the tail (75 samples)
    b2 = "m.layers.2.q.lora_A.weight"
    np.testing.assert_allclose(new[b2], (25 * ups[2].params[b2] + 150 * phi[b2]) / 175, rtol=1e-5)


def test_layerwise_fedavg_leaves_inputs_alone_and_handles_no_updates():
    rng = np.random.default_rng(2)
    phi, blocks = _params(rng)
    before = {n: a.copy() for n, a in phi.items()}
    assert layerwise_fedavg(phi, blocks, []) == phi
    layerwise_fedavg(phi, blocks, [ClientUpdate({n: a + 1 for n, a in phi.items() if blocks[n] < 2}, 5, 2)])
    for n in phi:
        np.testing.assert_array_equal(phi[n], before[n])


def test_layerwise_equals_fedavg_when_every_client_has_the_same_split():
    rng = np.random.default_rng(3)
    phi, blocks = _params(rng)
    ups = [ClientUpdate({n: a for n, a in _params(rng)[0].items() if blocks[n] < L}, k, L) for k in (3, 7)]
    got = layerwise_fedavg(phi, blocks, ups)
    want = fedavg([(u.params, u.num_samples) for u in ups])
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6)
