"""The server's tail: split steps equal centralized training; batching keeps per-client gradients exact."""

import numpy as np
import pytest
import torch

from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head, task_loss
from flexsfl.server_backend.schedule import StepSchedule
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost


def _batches(n, b=4, t=10, seed=0, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 5000, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, t // 2:] = 0
        ids[mask == 0] = 0
        out.append((ids, mask, torch.randint(0, num_labels, (b,), generator=g)))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


def test_split_training_equals_centralized(tiny_llama):
    lr, split, steps = 0.05, 2, 6
    central = load_model(tiny_llama, num_labels=3)
    split_model = load_model(tiny_llama, num_labels=3)
    host = TailHost(split_model, OptimizerConfig("sgd", lr))
    head = build_head(split_model, split)
    head_params = [p for _, p in head.trainable()]
    opt_c = torch.optim.SGD([p for p in central.model.parameters() if p.requires_grad], lr=lr)
    for ids, mask, y in _batches(steps):
        # centralized: one model, one loss
        opt_c.zero_grad()
        task_loss(central.model(input_ids=ids, attention_mask=mask).logits, y, "seq_cls").backward()
        opt_c.step()
        # split: the "client" runs the head, the host the tail
        z = head(ids, mask)
        res = host.train_step(StepRequest(split, z.detach().numpy(), mask.numpy(), y.numpy()))
        assert res.error is None and np.isfinite(res.loss)
        for p in head_params:
            p.grad = None
        z.backward(torch.from_numpy(res.g))
        with torch.no_grad():
            for p in head_params:
                p -= lr * p.grad
    want = {n: p for n, p in central.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in split_model.model.named_parameters() if p.requires_grad}
    for n in want:
        rel = (got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)
        assert rel.item() <= 1e-5, n


def test_batched_gradients_equal_per_request(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    host = TailHost(lm, OptimizerConfig("sgd", 0.1))
    before = host.state()
    reqs = []
    for k, (s, t) in enumerate([(1, 10), (1, 7), (3, 12), (1, 10)]):
        ids, mask, y = _batches(1, b=2 + k % 2, t=t, seed=k)[0]
        with torch.no_grad():
            z = host.head(s)(ids, mask)
        reqs.append(StepRequest(s, z.numpy(), mask.numpy(), y.numpy()))
    # per-request gradients from the same weights, without stepping
    alone = []
    for r in reqs:
        host.load_state(before)
        host.optimizer = OptimizerConfig("sgd", 1e-30).build(list(host.params.values()))
        alone.append(host.train_step(r))
    host.load_state(before)
    host.optimizer = OptimizerConfig("sgd", 0.1).build(list(host.params.values()))
    host.steps = 0
    host.schedule = StepSchedule(len(reqs))  # one group: every request sees the same weights
    batched = host.train_batch(reqs)
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(b.g, a.g, rtol=1e-4, atol=1e-7)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert host.steps == 1
    assert any(not np.array_equal(before[n], v) for n, v in host.state().items())


def test_non_finite_activations_change_nothing(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    host = TailHost(lm, OptimizerConfig("sgd", 0.1))
    before = host.state()
    ids, mask, y = _batches(1)[0]
    z = host.head(2)(ids, mask).detach().numpy()
    z[0, 0, :] = 3e38  # finite (the wire accepts it), but overflows inside the tail
    res = host.train_step(StepRequest(2, z, mask.numpy(), y.numpy()))
    assert res.g is None and "not finite" in res.error
    for n, v in host.state().items():
        np.testing.assert_array_equal(v, before[n])
    assert host.steps == 0
