"""Layer-wise aggregation across heterogeneous split points, checked against numpy by hand."""

import numpy as np
import pytest

from flexsfl.server_backend.aggregation import ClientUpdate, fedavg, holds, layerwise_fedavg, weighted_mean

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


# --- U-shaped clients: blocks [0, s) and [L-u, L) plus the task head ("block" L) -------------------


def test_holds_head_blocks_top_blocks_and_the_task_head():
    held = lambda s, u: [j for j in range(L + 1) if holds(j, s, u, L)]  # noqa: E731
    assert held(1, None) == [0]  # head/tail: the server holds the rest and the task head
    assert held(1, 0) == [0, L]  # u = 0: the device still holds the task head (and the loss)
    assert held(1, 2) == [0, 2, 3, L]
    assert held(2, 1) == [0, 1, 3, L]


def test_layerwise_fedavg_u_shaped_and_head_tail_clients_by_hand():
    rng = np.random.default_rng(4)
    phi, blocks = _params(rng)
    # a: (s=1, u=2) holds 0, 2, 3, head; b: (s=2, u=0) holds 0, 1, head; c: head/tail s=1 holds 0.
    a = ClientUpdate({n: a for n, a in _params(rng)[0].items() if blocks[n] in (0, 2, 3, L)}, 10, 1, 2)
    b = ClientUpdate({n: a for n, a in _params(rng)[0].items() if blocks[n] in (0, 1, L)}, 30, 2, 0)
    c = ClientUpdate({n: a for n, a in _params(rng)[0].items() if blocks[n] == 0}, 60, 1, None)
    new = layerwise_fedavg(phi, blocks, [a, b, c], num_blocks=L)
    n = {j: next(k for k, v in blocks.items() if v == j) for j in range(L + 1)}
    # block 0: every device; the server's φ^0 takes no part
    np.testing.assert_allclose(new[n[0]], (10 * a.params[n[0]] + 30 * b.params[n[0]] + 60 * c.params[n[0]]) / 100, rtol=1e-5)
    # block 1: b holds it; the server trained it for a (middle 1..1) and c (tail): 70 samples
    np.testing.assert_allclose(new[n[1]], (30 * b.params[n[1]] + 70 * phi[n[1]]) / 100, rtol=1e-5)
    # block 2: a holds it; server trained it for b (middle 2..3) and c: 90 samples
    np.testing.assert_allclose(new[n[2]], (10 * a.params[n[2]] + 90 * phi[n[2]]) / 100, rtol=1e-5)
    # block 3: a holds it; server trained it for b and c
    np.testing.assert_allclose(new[n[3]], (10 * a.params[n[3]] + 90 * phi[n[3]]) / 100, rtol=1e-5)
    # task head: a and b hold it; the server trained it for c only
    np.testing.assert_allclose(new[n[L]], (10 * a.params[n[L]] + 30 * b.params[n[L]] + 60 * phi[n[L]]) / 100, rtol=1e-5)


def test_layerwise_fedavg_all_u_shaped_leaves_the_server_out_of_the_top():
    rng = np.random.default_rng(5)
    phi, blocks = _params(rng)
    ups = [ClientUpdate({n: a for n, a in _params(rng)[0].items() if holds(blocks[n], 1, 1, L)}, k, 1, 1) for k in (2, 6)]
    new = layerwise_fedavg(phi, blocks, ups, num_blocks=L)
    for name, j in blocks.items():
        if j in (1, 2):  # the middle: nobody holds it, φ^j is the server's alone
            np.testing.assert_array_equal(new[name], phi[name])
        else:  # head block 0, top block 3, task head: the clients' mean, no φ
            np.testing.assert_allclose(new[name], (2 * ups[0].params[name] + 6 * ups[1].params[name]) / 8, rtol=1e-5)
    with pytest.raises(ValueError, match="need num_blocks"):
        layerwise_fedavg(phi, blocks, ups)


def test_layerwise_fedavg_u_shaped_with_a_robust_rule():
    rng = np.random.default_rng(6)
    phi, blocks = _params(rng)
    ups = [ClientUpdate({n: a for n, a in _params(rng)[0].items() if holds(blocks[n], 1, 0, L)}, 1, 1, 0) for _ in range(3)]
    new = layerwise_fedavg(phi, blocks, ups, "median", num_blocks=L)
    head = next(k for k, v in blocks.items() if v == L)
    np.testing.assert_allclose(new[head], np.median(np.stack([u.params[head] for u in ups]), axis=0), rtol=1e-6)
